"""Tasks: the only place that knows what a model's output means.

Every backend's outputs (PyTorch, ONNX Runtime, TensorRT) go through the same
scorer, so they are scored identically. `new_scorer(recipe, dataset)` builds the
scorer for a recipe's task; each scorer has `update(outputs, targets, reference)`
and `result()`.
"""

from .classification import ClassificationScorer
from .detection import DetectionScorer

TASKS = {"classification": ClassificationScorer, "detection": DetectionScorer}


def new_scorer(recipe, dataset, compare_only: bool = False):
    """A fresh scorer for `recipe.task` over `dataset`; compare_only: agreement with a reference only."""
    if recipe.task == "detection":
        d = recipe.detection
        return DetectionScorer(dataset.coco_gt, dataset.category_ids, len(dataset.category_ids), d.conf, d.iou, d.max_det)
    return ClassificationScorer(labeled=dataset.labeled and not compare_only)


def is_labeled(dataset) -> bool:
    return bool(getattr(dataset, "labeled", True))


__all__ = ["ClassificationScorer", "DetectionScorer", "TASKS", "is_labeled", "new_scorer"]
