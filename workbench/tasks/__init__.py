"""Tasks: the only place that knows what a model's output means.

Every backend's outputs (PyTorch, ONNX Runtime, TensorRT) go through the same
scorer, so they are scored identically.
"""

from .classification import ClassificationScorer

TASKS = {"classification": ClassificationScorer}


def new_scorer(task: str, labeled: bool):
    return TASKS[task](labeled=labeled)


__all__ = ["ClassificationScorer", "TASKS", "new_scorer"]
