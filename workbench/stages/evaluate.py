"""evaluate: score every backend on the evaluation split, in one pass, through one task scorer.

Backends (those that exist at this point of the run):
  pytorch_fp32       the model as loaded
  pytorch_fp32_pruned  the pruned (and fine-tuned) model before quantization (after prune)
  pytorch_int8       the fake-quant model (after calibrate; after qat, the QAT model)
  pytorch_int8_ptq   the fake-quant model before QAT (after qat)
  ort_fp32           model_fp32.onnx in ONNX Runtime
  ort_fp32_pruned    model_pruned_fp32.onnx in ONNX Runtime
  ort_int8_faithful  model.onnx, ORT optimisations off: TensorRT's arithmetic on that graph
  ort_int8_default   model.onnx, ORT optimisations on (ORT fuses what it can of the TensorRT-style graph)
  ort_int8_native    model_int8_ort.onnx: the same ranges laid out for ORT's integer kernels (a CPU deployment)
  ort_int8_ptq       model_ptq.onnx (the PTQ graph, after qat), faithful
  tensorrt           the engine of the build stage (where TensorRT and a GPU are present)
Each is also compared with the FP32 model (agreement, KL); the faithful ONNX
is compared with the fake-quant model it was exported from, and the ORT-native
graph with the faithful one (the same ranges; see qdq/ort_flavour.py for where the two differ).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from ..errors import DataError, RecipeError, WorkbenchError
from ..progress import track
from ..recipe import BatchSize, check_batch_sizes
from ..runtime import OrtRunner, TorchRunner, measure_latency
from ..runtime.tensorrt import TensorRTRunner
from ..tasks import is_labeled, new_scorer
from .registry import StageOptions, register_stage

Backend = Literal["pytorch_fp32", "pytorch_fp32_pruned", "pytorch_int8", "pytorch_int8_ptq", "ort_fp32", "ort_fp32_pruned",
                  "ort_int8_faithful", "ort_int8_default", "ort_int8_native", "ort_int8_ptq", "tensorrt"]


# Backends that compute the same function, compared output by output: (graph, its reference).
SAME_FUNCTION = {
    "ort_faithful_vs_fakequant": ("ort_int8_faithful", "pytorch_int8"),  # the export is the fake-quant model
    "ort_native_vs_faithful": ("ort_int8_native", "ort_int8_faithful"),  # the ORT flavour is the TensorRT-style graph
}


class EvaluateOptions(StageOptions):
    backends: list[Backend] | None = Field(None, description="Backends to score; default: every one available.")
    max_samples: int | None = Field(None, gt=0, description="Score only the first N evaluation samples.")
    latency: bool = Field(True, description="Measure latency of each backend (warm-up, repeats, median, p90).")
    latency_batch_sizes: list[BatchSize] = Field(
        default_factory=lambda: [1, 8], min_length=1, description="Batch sizes timed.")
    latency_repeats: int = Field(20, ge=1, description="Timed repeats per batch size.")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads (default: all cores).")

    _batch_sizes_once = field_validator("latency_batch_sizes")(check_batch_sizes)


def available_backends(run) -> list[str]:
    out = ["pytorch_fp32"]
    if "pruned_fp32" in run.state:
        out.append("pytorch_fp32_pruned")
    if "quant" in run.state:
        out.append("pytorch_int8")
    if "ptq_model" in run.state:
        out.append("pytorch_int8_ptq")
    onnx = run.state.get("onnx", {})
    if onnx.get("fp32"):
        out.append("ort_fp32")
    if onnx.get("pruned_fp32"):
        out.append("ort_fp32_pruned")
    if onnx.get("model"):
        if "quant" in run.state:
            out += ["ort_int8_faithful", "ort_int8_default"] + (["ort_int8_native"] if onnx.get("ort_int8") else [])
            out += ["ort_int8_ptq"] if onnx.get("ptq") else []
        elif "ort_fp32" not in out:
            out.append("ort_fp32")
    if run.state.get("engine"):
        out.append("tensorrt")
    return out


def build_runners(run, backends: list[str], threads: int | None) -> dict:
    onnx = run.state.get("onnx", {})
    fp32_onnx = onnx.get("fp32") or (onnx.get("model") if "quant" not in run.state else None)
    makers = {
        "pytorch_fp32": lambda: TorchRunner(run.reference, "pytorch_fp32", run.device),
        "pytorch_fp32_pruned": lambda: TorchRunner(run.state["pruned_fp32"], "pytorch_fp32_pruned", run.device),
        "pytorch_int8": lambda: TorchRunner(run.model, "pytorch_int8", run.device),
        "pytorch_int8_ptq": lambda: TorchRunner(run.state["ptq_model"], "pytorch_int8_ptq", run.device),
        "tensorrt": lambda: TensorRTRunner(run.state["engine"], "tensorrt"),
        "ort_int8_ptq": lambda: OrtRunner(onnx["ptq"], "ort_int8_ptq", "faithful", threads),
        "ort_fp32_pruned": lambda: OrtRunner(onnx["pruned_fp32"], "ort_fp32_pruned", "default", threads),
        "ort_fp32": lambda: OrtRunner(fp32_onnx, "ort_fp32", "default", threads),
        "ort_int8_faithful": lambda: OrtRunner(onnx["model"], "ort_int8_faithful", "faithful", threads),
        "ort_int8_default": lambda: OrtRunner(onnx["model"], "ort_int8_default", "default", threads),
        "ort_int8_native": lambda: OrtRunner(onnx["ort_int8"], "ort_int8_native", "default", threads),
    }
    return {b: makers[b]() for b in backends}


def _nonfinite_output(run, backend: str, error: FloatingPointError, images) -> WorkbenchError:
    """An error naming the backend whose output is NaN/Inf and, for a PyTorch backend, the first layer that made it."""
    from ..models.guards import first_nonfinite_layer

    models = {"pytorch_fp32": run.reference, "pytorch_fp32_pruned": run.state.get("pruned_fp32"),
              "pytorch_int8": run.model, "pytorch_int8_ptq": run.state.get("ptq_model")}
    model = models.get(backend)
    if model is None:  # ONNX Runtime or TensorRT: no layer can be watched from here
        return WorkbenchError(
            f"evaluate: {backend}: {error}. Its graph computes NaN/Inf on this data: evaluate the pytorch_* backends "
            "on the same data to find the layer where it overflows, and check data.transform"
        )
    layer = first_nonfinite_layer(model, images.to(run.device))
    where = (f"the first layer whose output holds NaN/Inf is '{layer}'" if layer else
             "no layer's own output holds NaN/Inf, so it arises in the model's forward between layers")
    return WorkbenchError(
        f"evaluate: {backend}: {error}; {where}. Its weights are finite (checked as it was loaded), so it overflows "
        "float32: check the weights and statistics there (e.g. a BatchNorm running_var of 0 with a large weight) "
        "and data.transform"
    )


@register_stage("evaluate", EvaluateOptions, needs_data=("evaluation",))
def evaluate(run, opts: EvaluateOptions) -> None:
    """Accuracy (or agreement with FP32), size and latency of every backend."""
    available = available_backends(run)
    backends = opts.backends or available
    if missing := [b for b in backends if b not in available]:
        raise RecipeError(
            f"stages.evaluate.backends: {missing} are not available at this point of the recipe "
            f"(available: {available}); put calibrate/export before evaluate"
        )
    runners = build_runners(run, backends, opts.threads)
    dataset = run.dataset("evaluation")
    labeled = is_labeled(dataset)
    scorers = {b: new_scorer(run.recipe, dataset) for b in backends}
    # Every backend is compared with the FP32 model, scored or not.
    reference_runner = runners.get("pytorch_fp32") or TorchRunner(run.reference, "reference", run.device)
    loader = run.loader("evaluation")
    references = None  # FP32's outputs per batch, where it was scored first
    if labeled and run.recipe.task == "classification" and "pytorch_fp32" in scorers:
        # Labels that do not fit the model are refused before any other backend is timed or scored.
        references = []
        for images, labels in _batches(track(loader, "evaluate fp32", total=len(loader)), opts.max_samples):
            references.append(reference_runner(images))
            _update(run, scorers["pytorch_fp32"], "pytorch_fp32", references[-1], labels, references[-1], images)
        _check_above_chance(run, scorers["pytorch_fp32"], dataset)
    # Time before scoring: ONNX Runtime's worker threads keep spinning for a while after a run,
    # which would steal the cores from whichever backend is timed next.
    latencies = {}
    if opts.latency:
        for b, runner in runners.items():
            if b not in ("pytorch_int8", "pytorch_int8_ptq"):  # fake-quant speed means nothing for deployment
                latencies[b] = measure_latency(runner, tuple(run.recipe.model.input_size), opts.latency_batch_sizes, repeats=opts.latency_repeats)
    pairs = {key: [new_scorer(run.recipe, dataset, compare_only=True), 0.0]  # scorer, max |diff|
             for key, pair in SAME_FUNCTION.items() if set(pair) <= set(runners)}
    seen = 0
    for i, (images, labels) in enumerate(_batches(track(loader, "evaluate", total=len(loader)), opts.max_samples)):
        seen += images.shape[0]
        reference = references[i] if references is not None else reference_runner(images)
        outputs = {b: (reference if b == "pytorch_fp32" else runner(images)) for b, runner in runners.items()}
        for b, out in outputs.items():
            if not (b == "pytorch_fp32" and references is not None):  # FP32 already scored
                _update(run, scorers[b], b, out, labels, reference, images)
        for key, entry in pairs.items():
            graph, against = SAME_FUNCTION[key]
            entry[0].update(outputs[graph], labels, outputs[against])
            entry[1] = max(entry[1], float(np.abs(outputs[graph] - outputs[against]).max()))

    results: dict[str, dict] = {}
    for b, runner in runners.items():
        entry = {"metrics": scorers[b].result()}
        if isinstance(runner, (OrtRunner, TensorRTRunner)):
            entry["size_bytes"] = runner.path.stat().st_size
        elif b in ("pytorch_fp32", "pytorch_fp32_pruned"):
            model = run.reference if b == "pytorch_fp32" else run.state["pruned_fp32"]
            entry["size_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        if b in latencies:
            entry["latency"] = latencies[b]
        results[b] = entry
    values = {"samples": seen, "labeled": labeled, "backends": results}
    for key, (scorer, max_abs_diff) in pairs.items():
        if seen:
            values[key] = {**scorer.result(), "max_abs_diff": max_abs_diff}
    run.record("evaluate", values)


def _batches(loader, max_samples: int | None):
    """The loader's (images, labels), cut after max_samples samples (all when None)."""
    seen = 0
    for images, labels in loader:
        if max_samples is not None and seen >= max_samples:
            return
        if max_samples is not None:
            images, labels = images[: max_samples - seen], labels[: max_samples - seen]
        seen += images.shape[0]
        yield images, labels


def _update(run, scorer, backend: str, out, labels, reference, images) -> None:
    """scorer.update, its refusals worded for the recipe: NaN/Inf output, labels the model has no class for."""
    try:
        scorer.update(out, labels, reference)
    except FloatingPointError as e:  # the scorers' NaN/Inf check
        raise _nonfinite_output(run, backend, e, images) from None
    except DataError as e:  # a label past the model's outputs
        classes = int(np.asarray(out).shape[1])
        beyond = next(s for s in run.dataset("evaluation").samples if s.label >= classes)
        where, mode = _label_source(run)
        raise DataError(
            f"data.evaluation: {e}, so these labels are not the model's classes: e.g. {beyond.key} -> class "
            f"{beyond.label}. Check the labels of the source {where} (labels: {mode}), or give a model with these "
            "classes; to score agreement with FP32 only, set data.evaluation.labels: none"
        ) from None


def _label_source(run) -> tuple[str, str]:
    """The evaluation split's source and label mode, as messages name them."""
    split = run.recipe.data.evaluation
    where = f"calib_set {split.calib_set!r}" if split.calib_set else f"{split.source} {split.path or split.name!r}"
    mode = split.labels or ("folder" if split.source == "imagefolder" else f"label_column {split.label_column!r}")
    return where, mode


CHANCE_MIN_SAMPLES = 100
CHANCE_ALPHA = 0.001
CHANCE_Z = 3.09  # the one-sided normal quantile of 1 - CHANCE_ALPHA
CHANCE_MARGIN = 5.0  # points above chance that count as a real, if weak, model


def _check_above_chance(run, fp32_scorer, dataset) -> None:
    """Refuse labels that the FP32 model's predictions are unrelated to: a labelling problem, not a result.

    Chance is what the model's own predictions would score on shuffled labels (ClassificationScorer.chance_top1).
    Wrong labels (a class order that is not the model's, a label mode that does not fit the files) score at it
    or below; a trained model, even a weak one, above it. Refused only when the evidence says "at chance", on
    at least 100 images: FP32's hits are no more than chance gives with probability 0.1% (binomial tail, exact
    where chance is a fraction of a percent), AND the upper 99.9% bound of its top-1 (Wilson) is below both
    chance + 5 points and 50%. So a weak model that is probably above chance passes (a binary one at 53% on 1000
    images), and so does a set where chance itself is high (one class dominates both labels and predictions).
    """
    n, hits, chance = fp32_scorer.n, fp32_scorer.top1, fp32_scorer.chance_top1()
    if n < CHANCE_MIN_SAMPLES or chance is None:
        return
    if _binomial_tail(hits, n, chance / 100.0) < CHANCE_ALPHA:
        return  # clearly above chance
    if _wilson_upper(hits, n, CHANCE_Z) >= min(chance + CHANCE_MARGIN, 50.0):
        return  # too few images to tell a weak model from chance
    top1 = 100.0 * hits / n
    where, mode = _label_source(run)
    step = max(1, n // 3)
    examples = "; ".join(f"{s.key} -> class {s.label}" for s in dataset.samples[:n:step][:3])
    raise DataError(
        f"data.evaluation: the FP32 model scores {top1:.2f}% top-1 on {n} images, no better than the {chance:.2f}% its "
        f"predictions would score on shuffled labels, so the labels do not match the model's classes. Check the labels "
        f"of the source {where} (labels: {mode}), e.g. {examples}. If the model is untrained or has no classes for "
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
