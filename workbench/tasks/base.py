"""The task interface: everything outside tasks/ asks a Task what a model's output means.

A stage never branches on the task's name. It asks the run's task (`get_task(recipe.task)`) for the
scorer of a backend's outputs, how far one output is from the FP32 model's (the proxies' KL), what to
distil and with which loss, which layers carry the task's output (structured pruning keeps their
channels), how many samples a sweep needs by default, the metrics a report shows and the headline
among them. A new task is one subclass in its own file and one row in tasks/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn


def first_output(out: Any) -> Any:
    """The tensor a model's output leads with. YOLO models in eval mode return (predictions, feature maps), some
    classifiers (logits, aux logits), torchvision's segmenters {"out": ..., "aux": ...}: every consumer of outputs
    reads the first, through this one rule."""
    while isinstance(out, (list, tuple, dict)):
        if not out:
            raise ValueError(f"the model returned an empty {type(out).__name__}")
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out


class Scorer(Protocol):
    """Accumulates one backend's outputs batch by batch; `result()` gives its metrics (keys of Task.metrics)."""

    def update(self, outputs: Any, targets: Any = None, reference: Any = None) -> None: ...

    def result(self) -> dict[str, float]: ...


class AgreementMeter(Protocol):
    """Accumulates an engine's outputs beside its reference's; `estimate` gives the agreement in percent with its
    interval (stats.Estimate), None where the reference gives nothing to agree on."""

    criterion: str  # what the agreement is, in words
    compared: int  # what it counts: images (top-1) or the reference's boxes

    def update(self, outputs: Any, reference: Any) -> None: ...

    def estimate(self, confidence: float) -> Any: ...


class Distiller(Protocol):
    """The distillation loss of a student's outputs against its teacher's; `remove()` drops any hooks it set."""

    def loss(self, student_out: Any, teacher_out: Any) -> torch.Tensor: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class Classes:
    """What the model predicts: its class count where the task needs it, and their names where it has them."""

    count: int | None = None
    names: list[str] | None = None


@dataclass(frozen=True)
class Metric:
    """A number a scorer reports: its key in metrics.json, its column in tables, and how it reads as points."""

    key: str
    title: str  # the report's column
    digits: int
    points: float | None = None  # factor to "points", the unit budgets and deltas are in (percent: 1; mAP: 100)
    short: str | None = None  # the name a one-number summary gives it


class Task:
    """What a model's output means. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]  # in the order tables show them
    headline_keys: ClassVar[tuple[str, ...]]  # the one number per backend: the first of these a result has
    agreement_key: ClassVar[str]  # agreement with the FP32 model, in percent
    proxy_samples: ClassVar[int]  # samples the sensitivity proxies are measured on by default
    task_samples: ClassVar[int | None]  # samples of the task-metric sweep by default (None: the whole split)
    train_mode: ClassVar[Literal["train", "eval"]]  # module mode while training with train_mode: auto
    has_label_loss: ClassVar[bool] = False  # labels give a loss of their own (cross-entropy); else distil only
    scores_reference_first: ClassVar[bool] = False  # evaluate scores FP32 alone first to check the labels
    preprocess_steps: ClassVar[str] = "read, resize, normalise"  # what the speed split's pre-process times
    postprocess_steps: ClassVar[str] = "none"  # and its post-process

    # Reading a model and its data

    def classes(self, model: nn.Module, input_size: tuple[int, int, int]) -> Classes:
        """The model's own classes where scoring needs them (never the labels'): count, and names where known."""
        return Classes()

    def prepare_datasets(self, model: nn.Module, input_size, datasets: dict[str, Any]) -> dict[str, Any]:
        """Preflight: check the model is one this task decodes and each split is data it can score; return the
        datasets as the stages read them."""
        return datasets

    def for_model(self, dataset: Any, classes: Callable[[], Classes], field: str) -> Any:
        """A split read for the model (a detector's labels against its own classes)."""
        return dataset

    def onnx_metadata(self, model: nn.Module, classes: Classes, input_size, dynamic_batch: bool,
                      dynamic_size: bool) -> dict[str, str]:
        """Metadata an exported graph carries so the task's own tools read it (Ultralytics' for detectors): it
        describes the graph as exported (`input_size`, and which of batch and height/width are dynamic)."""
        return {}

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose outputs are the task's output: structured pruning leaves their channels alone."""
        return []

    # Scoring

    def scorer(self, recipe: Any, dataset: Any, compare_only: bool = False) -> Scorer:
        raise NotImplementedError

    def check_labels(self, fp32_scorer: Scorer, dataset: Any, source: str) -> None:
        """Refuse labels the FP32 model's predictions are unrelated to (scores_reference_first tasks)."""

    def agreement_counts(self, outputs, reference, num_classes: int | None) -> tuple[int, int]:
        """(agreeing, compared) between a batch of outputs and the reference's (FP32 or a faithful graph): what
        `agreement_key` measures, without labels or a dataset (an engine's guard compares on any images)."""
        raise NotImplementedError

    def agreement_meter(self, num_classes: int | None) -> AgreementMeter:
        """Whether an engine computes its reference graph's function, measured the task's way over batches of both
        outputs (the engine guard and evaluate's engine check): no labels needed."""
        raise NotImplementedError

    def postprocess(self, outputs: Any, recipe: Any) -> Any:
        """What a deployment does with the raw outputs before using them (a detector's decode and NMS): timed by
        evaluate as Ultralytics' speed split does."""
        return first_output(outputs)

    def delta(self, scorer: Scorer, reference: Scorer, confidence: float = 0.95, resamples: int = 1000,
              seed: int = 0):
        """The headline metric's difference, scorer minus reference, in points, with its paired bootstrap interval
        over the images both scored (stats.Interval); None where the headline is not measurable."""
        return None

    def metric_step(self, samples: int) -> float | None:
        """The smallest change of the headline metric `samples` samples can show, in points; None: no fixed step."""
        return None

    # Comparing outputs and training

    def output_kl(self, reference: torch.Tensor, output: torch.Tensor, num_classes: int | None) -> torch.Tensor:
        """KL(reference || output) per sample, over what the outputs mean (the proxies' KL)."""
        raise NotImplementedError

    def label_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The loss against labels (only where has_label_loss)."""
        raise NotImplementedError(f"task {self.name} has no loss against labels")

    def distiller(self, student: nn.Module, teacher: nn.Module, temperature: float, num_classes: int | None,
                  image_size: float) -> Distiller:
        raise NotImplementedError

    # Reading results

    def headline(self, metrics: dict[str, float]) -> tuple[Metric, float] | None:
        """The headline metric of a result and its value, or None when it has none of them."""
        by_key = {m.key: m for m in self.metrics}
        for key in self.headline_keys:
            if metrics.get(key) is not None:
                return by_key[key], metrics[key]
        return None

    def headline_points(self, metrics: dict[str, float]) -> tuple[str, float | None]:
        """(name, value) of the headline in points: top-1 and agreement in percent, mAP50-95 x 100."""
        found = self.headline(metrics)
        if found is None:
            return "none", None
        metric, value = found
        return f"{metric.short} points" if metric.points != 1 else metric.short, value * metric.points

    def agreement_points(self, metrics: dict[str, float]) -> float | None:
        """Agreement with the FP32 model, in percent."""
        return metrics.get(self.agreement_key)

    def per_image(self, scorer: Scorer) -> dict[str, np.ndarray] | None:
        """Per evaluation image, what a later comparison between runs pairs on (per_image.npz), or None."""
        return None

    def fidelity_headline(self, metrics: dict[str, float], samples: int) -> str | None:
        """The run's first fidelity sentence where the headline metric would mislead (None: the headline metric
        against FP32's is the sentence): e.g. agreement on unlabeled images where FP32 itself is unsure."""
        return None

    def fidelity_sentences(self, metrics: dict[str, float], samples: int) -> list[str]:
        """How closely an INT8 backend's outputs follow FP32's, in words a newcomer can read (the run's summary)."""
        value = metrics.get(self.agreement_key)
        return [] if value is None else [f"It agrees with FP32 on {value:.1f}% of {samples} images."]
