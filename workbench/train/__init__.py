"""Training shared by fine-tuning after pruning and quantization-aware training: one loop, written once."""

from .loop import TrainOptions, fit
from .losses import distillation_loss

__all__ = ["TrainOptions", "distillation_loss", "fit"]
