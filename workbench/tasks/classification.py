"""Classification: top-1/top-5 against labels, agreement with the FP32 model, the softmax KL, distillation of
logits, and the check that refuses labels the model's predictions are unrelated to."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .base import Metric, Task, first_output


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
    the reference), agreement_confident (the same over the samples where the
    reference's top class has probability >= CONFIDENT, and their count) and
    mean_kl (KL(reference || this), nats per sample).
    """

    # Where FP32 itself is unsure (its top class below this probability), a tiny change of the logits flips its
    # guess: agreement there says little about INT8's fidelity.
    CONFIDENT = 0.5

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
        self.hits: list[np.ndarray] = []  # per sample: top-1 right (paired intervals, Task.delta)
        self.agrees: list[np.ndarray] = []  # per sample: top-1 the reference's
        self.agree_confident = 0
        self.predicted: list[np.ndarray] = []  # per sample: the top-1 class (per_image.npz)
        self.n_confident = 0

    def update(self, logits, labels=None, reference=None) -> None:
        logits = _as_numpy(logits)
        if logits.ndim != 2:
            raise ValueError(f"a classifier's output must be (batch, classes), got shape {logits.shape}")
        if not np.isfinite(logits).all():
            raise FloatingPointError("the model produced NaN/Inf logits")
        self.n += logits.shape[0]
        self.predicted.append(logits.argmax(1).astype(np.int32))
        if self.labeled and labels is not None:
            labels = _as_numpy(labels).astype(np.int64)
            if len(labels) and labels.max() >= logits.shape[1]:  # else scored as wrong: a misleading "at chance"
                raise DataError(f"a label is {labels.max()}, but the model has {logits.shape[1]} outputs "
                                f"(classes 0..{logits.shape[1] - 1})")
            k = min(5, logits.shape[1])
            topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            predicted = logits.argmax(1)
            self.hits.append(predicted == labels)
            self.top1 += int((predicted == labels).sum())
            self.label_counts.update(labels.tolist())
            self.predicted_counts.update(predicted.tolist())
            self.top5 += int((topk == labels[:, None]).any(1).sum())
        if reference is not None:
            ref = _as_numpy(reference)
            self.agrees.append(logits.argmax(1) == ref.argmax(1))
            self.agree += int((logits.argmax(1) == ref.argmax(1)).sum())
            log_p, log_q = _log_softmax(ref.astype(np.float64)), _log_softmax(logits.astype(np.float64))
            self.kl_sum += float((np.exp(log_p) * (log_p - log_q)).sum())
            confident = np.exp(log_p.max(1)) >= self.CONFIDENT
            self.n_confident += int(confident.sum())
            self.agree_confident += int(self.agrees[-1][confident].sum())
            self.n_ref += logits.shape[0]

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {"samples": self.n}
        if self.labeled and self.n:
            out["top1"] = 100.0 * self.top1 / self.n
            out["top5"] = 100.0 * self.top5 / self.n
        if self.n_ref:
            out["agreement_top1"] = 100.0 * self.agree / self.n_ref
            out["confident_samples"] = self.n_confident
            if self.n_confident:
                out["agreement_confident"] = 100.0 * self.agree_confident / self.n_confident
            out["mean_kl"] = self.kl_sum / self.n_ref
        return out

    def chance_top1(self) -> float | None:
        """Percent top-1 that these predictions would score on shuffled labels (predictions independent of the
        labels): the sum over classes of predicted share x label share. None without labels."""
        n = sum(self.label_counts.values())
        if not n:
            return None
        return 100.0 * sum(c * self.predicted_counts[k] for k, c in self.label_counts.items()) / n**2


class TopOneAgreement:
    """The share of images whose top class is the reference's, with its Wilson interval (stats.wilson_interval)."""

    criterion = "top-1 agreement"

    def __init__(self):
        self.agree = self.compared = 0

    def update(self, outputs, reference) -> None:
        out, ref = _as_numpy(first_output(outputs)), _as_numpy(first_output(reference))
        if out.ndim != 2 or out.shape != ref.shape:
            from ..errors import WorkbenchError

            raise WorkbenchError(f"top-1 agreement needs (batch, classes) logits from both graphs; got {out.shape} "
                                 f"and {ref.shape}: is this model a classifier? (a detector's graph says so in its "
                                 "metadata: export it with the workbench)")
        self.agree += int((out.argmax(1) == ref.argmax(1)).sum())
        self.compared += int(out.shape[0])

    def estimate(self, confidence: float):
        from ..stats import wilson_interval

        return wilson_interval(self.agree, self.compared, confidence) if self.compared else None


class ClassificationTask(Task):
    name = "classification"
    metrics = (
        Metric("top1", "Top-1 %", 2, points=1, short="top-1 %"),
        Metric("top5", "Top-5 %", 2),
        Metric("agreement_top1", "Agreement with FP32 %", 2, points=1, short="top-1 agreement %"),
        Metric("agreement_confident", "Agreement where FP32 is confident %", 2),
        Metric("mean_kl", "Mean KL", 5),
    )
    headline_keys = ("top1", "agreement_top1")
    agreement_key = "agreement_top1"
    proxy_samples = 16
    task_samples = 2000
    train_mode = "train"
    has_label_loss = True
    scores_reference_first = True
    preprocess_steps = "read, resize and crop, normalise"
    postprocess_steps = "argmax"

    def per_image(self, scorer: ClassificationScorer) -> dict[str, np.ndarray] | None:
        if not scorer.predicted:
            return None
        record = {"predicted": np.concatenate(scorer.predicted)}
        if scorer.hits:
            record["correct"] = np.concatenate(scorer.hits)
        return record

    # Fewest confident images the headline is measured on: below it, the Wilson interval spans 15+ points.
    MIN_CONFIDENT = 20

    def _confident_headline(self, metrics: dict[str, float]) -> bool:
        """Unlabeled images (no top-1): agreement where FP32 is confident leads, where there are enough of them."""
        return ("top1" not in metrics and metrics.get("agreement_confident") is not None
                and metrics.get("confident_samples", 0) >= self.MIN_CONFIDENT)

    def fidelity_headline(self, metrics: dict[str, float], samples: int) -> str | None:
        if not self._confident_headline(metrics):
            return None
        from ..stats import wilson_interval

        confident = int(metrics["confident_samples"])
        hits = round(metrics["agreement_confident"] * confident / 100.0)
        est = wilson_interval(hits, confident)
        return (f"Fidelity: it picks FP32's top class on {est.value:.1f}% [{est.low:.1f}, {est.high:.1f}] of the "
                f"{confident} images where FP32 is confident (its top class at "
                f"{100 * ClassificationScorer.CONFIDENT:.0f}% or more; {100 * est.confidence:.0f}% Wilson interval); "
                f"on all {samples} images {metrics['agreement_top1']:.1f}%, where FP32's own guess is often a coin "
                "toss (these images have no labels).")

    def fidelity_sentences(self, metrics: dict[str, float], samples: int) -> list[str]:
        if "agreement_top1" not in metrics:
            return []
        if self._confident_headline(metrics):  # the headline said the agreements
            return [f"Mean KL divergence from FP32's probabilities: {metrics['mean_kl']:.4f} nats. (Where FP32 is "
                    "unsure, on an image unlike its training data such as a texture crop, a tiny change of its scores "
                    "flips the guess: the confident images and the KL divergence show INT8's fidelity.)"]
        confident = metrics.get("confident_samples", 0)
        on_confident = (f"{metrics['agreement_confident']:.1f}% of the {confident} images where FP32 is confident "
                        f"(its top class at {100 * ClassificationScorer.CONFIDENT:.0f}% or more) and on "
                        if confident else "")
        return [f"It picks FP32's top class on {on_confident}{metrics['agreement_top1']:.1f}% of all {samples} "
                f"images; mean KL divergence from FP32's probabilities {metrics['mean_kl']:.4f} nats.",
                "(Agreement: the share of images where INT8's top class is FP32's. Where FP32 is unsure, on an "
                "image unlike its training data such as a texture crop, a tiny change of its scores flips the guess: "
                "the confident images and the KL divergence show INT8's fidelity better.)"]

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return linears[-1:]  # the classifier: its outputs are the classes

    def scorer(self, recipe, dataset, compare_only: bool = False) -> ClassificationScorer:
        return ClassificationScorer(labeled=bool(getattr(dataset, "labeled", True)) and not compare_only)

    def check_labels(self, fp32_scorer: ClassificationScorer, dataset, source: str) -> None:
        check_above_chance(fp32_scorer, dataset, source)

    def agreement_counts(self, outputs, reference, num_classes) -> tuple[int, int]:
        out, ref = _as_numpy(first_output(outputs)), _as_numpy(first_output(reference))
        return int((out.argmax(1) == ref.argmax(1)).sum()), int(out.shape[0])

    def agreement_meter(self, num_classes) -> TopOneAgreement:
        return TopOneAgreement()

    def postprocess(self, outputs, recipe):
        return _as_numpy(first_output(outputs)).argmax(1)

    def delta(self, scorer: ClassificationScorer, reference: ClassificationScorer, confidence: float = 0.95,
              resamples: int = 1000, seed: int = 0):
        """Top-1 (with labels; else agreement with FP32, the reference agreeing with itself) minus the reference's,
        a paired bootstrap of the per-image differences."""
        from ..stats import paired_mean

        if scorer.hits and reference.hits:
            this, ref = np.concatenate(scorer.hits), np.concatenate(reference.hits)
        elif scorer.agrees:
            this = np.concatenate(scorer.agrees)
            ref = np.concatenate(reference.agrees) if reference.agrees else np.ones_like(this)
        else:
            return None
        if len(this) != len(ref) or not len(this):
            return None
        return paired_mean(this.astype(np.float64) - ref, confidence, resamples, seed)

    def metric_step(self, samples: int) -> float:
        return 100.0 / samples  # one image more or less right

    def output_kl(self, reference: torch.Tensor, output: torch.Tensor, num_classes: int | None) -> torch.Tensor:
        log_p, log_q = reference.log_softmax(1), output.log_softmax(1)
        return (log_p.exp() * (log_p - log_q)).sum(1)

    def label_loss(self, outputs, targets) -> torch.Tensor:
        logits = first_output(outputs)
        return F.cross_entropy(logits.float(), torch.as_tensor(targets).to(logits.device))

    def distiller(self, student, teacher, temperature: float, num_classes, image_size) -> "LogitDistiller":
        return LogitDistiller(temperature)


class LogitDistiller:
    """KL between temperature-softened teacher and student logits (Hinton et al.), scaled by T^2 so its gradient
    does not shrink with T."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def loss(self, student_out, teacher_out) -> torch.Tensor:
        t = self.temperature
        student, teacher = first_output(student_out).float(), first_output(teacher_out).detach().float()
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                        reduction="batchmean") * t * t

    def remove(self) -> None:
        pass


CHANCE_MIN_SAMPLES = 100
CHANCE_ALPHA = 0.001
CHANCE_Z = 3.09  # the one-sided normal quantile of 1 - CHANCE_ALPHA
CHANCE_MARGIN = 5.0  # points above chance that count as a real, if weak, model


def check_above_chance(fp32_scorer: ClassificationScorer, dataset, source: str) -> None:
    """Refuse labels that the FP32 model's predictions are unrelated to: a labelling problem, not a result.

    Chance is what the model's own predictions would score on shuffled labels (ClassificationScorer.chance_top1).
    Wrong labels (a class order that is not the model's, a label mode that does not fit the files) score at it
    or below; a trained model, even a weak one, above it. Refused only when the evidence says "at chance", on
    at least 100 images: FP32's hits are no more than chance gives with probability 0.1% (binomial tail, exact
    where chance is a fraction of a percent), AND the upper 99.9% bound of its top-1 (Wilson) is below both
    chance + 5 points and 50%. So a weak model that is probably above chance passes (a binary one at 53% on 1000
    images), and so does a set where chance itself is high (one class dominates both labels and predictions).
    `source` names the split's source and label mode for the message.
    """
    n, hits, chance = fp32_scorer.n, fp32_scorer.top1, fp32_scorer.chance_top1()
    if n < CHANCE_MIN_SAMPLES or chance is None:
        return
    if _binomial_tail(hits, n, chance / 100.0) < CHANCE_ALPHA:
        return  # clearly above chance
    if _wilson_upper(hits, n, CHANCE_Z) >= min(chance + CHANCE_MARGIN, 50.0):
        return  # too few images to tell a weak model from chance
    top1 = 100.0 * hits / n
    step = max(1, n // 3)
    examples = "; ".join(f"{s.key} -> class {s.label}" for s in dataset.samples[:n:step][:3])
    if _folders_are_wnids(dataset, source):
        examples += (". The class folders are ImageNet WordNet ids: labels: wnid numbers them by the full "
                     "ImageNet-1k list (folder numbers them 0..N-1 among themselves)")
    raise DataError(
        f"data.evaluation: the FP32 model scores {top1:.2f}% top-1 on {n} images, no better than the {chance:.2f}% its "
        f"predictions would score on shuffled labels, so the labels do not match the model's classes. Check the labels "
        f"of the source {source}, e.g. {examples}. If the model is untrained or has no classes for "
        "these images, set data.evaluation.labels: none to score agreement with FP32 only"
    )


def _wilson_upper(hits: int, n: int, z: float) -> float:
    """The Wilson score interval's upper end for a proportion hits/n, in percent."""
    p = hits / n
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * (centre + spread) / (1 + z * z / n)


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (n may be tens of thousands)."""
    if k <= 0 or p >= 1.0:
        return 1.0
    if p <= 0.0:
        return 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return min(1.0, sum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                        for i in range(k, n + 1)))


def _folders_are_wnids(dataset, source: str) -> bool:
    """Whether the images sit in folders named like ImageNet WordNet ids (n01440764/) and were numbered by folder."""
    if "labels: folder" not in source:
        return False
    import re
    from pathlib import Path

    return all(re.fullmatch(r"n\d{8}", Path(s.key).parent.name) for s in dataset.samples[:50])
