"""Tasks: the only place that knows what a model's output means.

Every backend's outputs (PyTorch, ONNX Runtime, TensorRT) go through the same task's scorer, so they
are scored identically; sensitivity, mixed precision, pruning, fine-tuning and the report ask the task
the rest (tasks/base.py). One row per task below: its adapter is imported when a run first asks for it,
so reading and validating a recipe does not load torch.
"""

from __future__ import annotations

import functools
import importlib

from .base import Classes, Metric, Scorer, Task, first_output

# name -> "module:class" of its Task subclass
TASKS = {
    "classification": "workbench.tasks.classification:ClassificationTask",
    "detection": "workbench.tasks.detection:DetectionTask",
}
TASK_NAMES = tuple(TASKS)


@functools.cache
def get_task(name: str) -> Task:
    """The adapter of a registered task (recipes can name only these: recipe.py types `task` by TASK_NAMES)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Classes", "Metric", "Scorer", "TASKS", "TASK_NAMES", "Task", "first_output", "get_task"]
