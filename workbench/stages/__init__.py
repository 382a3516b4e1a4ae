"""Stages, one module each, registered by name. Order in a run is the recipe's."""

from .registry import STAGES, StageOptions, StageSpec, get_stage, register_stage

# Importing a stage module registers it.
from . import bench, build, calibrate, export, evaluate, finetune, mixed_precision, prune, qat, sensitivity  # noqa: E402,F401

__all__ = ["STAGES", "StageOptions", "StageSpec", "get_stage", "register_stage"]
