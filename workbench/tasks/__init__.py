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


def metric_points(metrics: dict) -> tuple[str, float | None]:
    """The task's headline metric in points, the unit budgets are given in: top-1 and
    agreement in percent, mAP50-95 times 100 (0.310 is 31.0 points)."""
    if "map50_95" in metrics:
        return "mAP50-95 points", 100.0 * metrics["map50_95"]
    for key, name in (("top1", "top-1 %"), ("agreement_top1", "top-1 agreement %"), ("box_agreement", "box agreement %")):
        if key in metrics:
            return name, metrics[key]
    return "none", None


def agreement_points(metrics: dict) -> float | None:
    """Agreement with the FP32 model in percent (top-1 or box agreement)."""
    return metrics.get("agreement_top1", metrics.get("box_agreement"))


def is_labeled(dataset) -> bool:
    return bool(getattr(dataset, "labeled", True))


__all__ = ["ClassificationScorer", "DetectionScorer", "TASKS", "agreement_points", "is_labeled", "metric_points", "new_scorer"]
