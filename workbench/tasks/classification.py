"""Classification scoring: top-1/top-5 against labels, and agreement with the FP32 model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from ..errors import DataError


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class ClassificationScorer:
    """Accumulates one backend's logits batch by batch; `result()` gives its metrics.

    With labels: top1, top5 (percent). Always, when reference logits (the FP32
    model's) are given: agreement_top1 (percent of samples whose argmax matches
    the reference) and mean_kl (KL(reference || this), nats per sample).
    """

    primary_metric = "top1"

    def __init__(self, labeled: bool):
        self.labeled = labeled
        self.n = 0
        self.top1 = 0
        self.top5 = 0
        self.agree = 0
        self.kl_sum = 0.0
        self.n_ref = 0
        self.label_counts: Counter = Counter()  # how often each class was the label / the prediction: chance_top1
        self.predicted_counts: Counter = Counter()

    def update(self, logits, labels=None, reference=None) -> None:
        logits = _as_numpy(logits)
        if logits.ndim != 2:
            raise ValueError(f"a classifier's output must be (batch, classes), got shape {logits.shape}")
        if not np.isfinite(logits).all():
            raise FloatingPointError("the model produced NaN/Inf logits")
        self.n += logits.shape[0]
        if self.labeled and labels is not None:
            labels = _as_numpy(labels).astype(np.int64)
            if len(labels) and labels.max() >= logits.shape[1]:  # else scored as wrong: a misleading "at chance"
                raise DataError(f"a label is {labels.max()}, but the model has {logits.shape[1]} outputs "
                                f"(classes 0..{logits.shape[1] - 1})")
            k = min(5, logits.shape[1])
            topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            predicted = logits.argmax(1)
            self.top1 += int((predicted == labels).sum())
            self.label_counts.update(labels.tolist())
            self.predicted_counts.update(predicted.tolist())
            self.top5 += int((topk == labels[:, None]).any(1).sum())
        if reference is not None:
            ref = _as_numpy(reference)
            self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())
            log_p, log_q = _log_softmax(ref.astype(np.float64)), _log_softmax(logits.astype(np.float64))
            self.kl_sum += float((np.exp(log_p) * (log_p - log_q)).sum())
            self.n_ref += logits.shape[0]

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {"samples": self.n}
        if self.labeled and self.n:
            out["top1"] = 100.0 * self.top1 / self.n
            out["top5"] = 100.0 * self.top5 / self.n
        if self.n_ref:
            out["agreement_top1"] = 100.0 * self.agree / self.n_ref
            out["mean_kl"] = self.kl_sum / self.n_ref
        return out

    def chance_top1(self) -> float | None:
        """Percent top-1 that these predictions would score on shuffled labels (predictions independent of the
        labels): the sum over classes of predicted share x label share. None without labels."""
        n = sum(self.label_counts.values())
        if not n:
            return None
        return 100.0 * sum(c * self.predicted_counts[k] for k, c in self.label_counts.items()) / n**2

    @staticmethod
    def headline(metrics: dict[str, float]) -> tuple[str, float | None]:
        """The one number a summary shows for this backend."""
        if "top1" in metrics:
            return "top-1 %", metrics["top1"]
        return "top-1 agreement %", metrics.get("agreement_top1")
