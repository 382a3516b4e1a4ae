"""Stages, one module each, registered by name with what they need and make. Order in a run is the recipe's."""

# Importing a stage module registers it.
from . import bench, build, calibrate, evaluate, export, finetune, mixed_precision, prune, qat, sensitivity  # noqa: E402,F401,I001
from .registry import STAGES, StageOptions, StageSpec, order_problems, register_stage

__all__ = ["STAGES", "StageOptions", "StageSpec", "order_problems", "register_stage"]
