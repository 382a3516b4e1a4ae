"""Training shared by fine-tuning after pruning and quantization-aware training: one loop, written once."""

from .loop import TrainOptions, fit
from .losses import HeadTaps, distillation_loss, head_distillation

__all__ = ["HeadTaps", "TrainOptions", "distillation_loss", "fit", "head_distillation"]
