"""evaluate: score every backend on the evaluation split, in one pass, through one task scorer.

The backends are the rows of runtime/backends.py that the run can run at this point (its FP32 model,
the pruned and fake-quant models, each exported graph in ONNX Runtime, an engine). Each is also compared
with the FP32 model (agreement, KL); a graph that computes the same function as another backend (the
faithful ONNX and its fake-quant model, the ONNX Runtime flavour and the faithful graph) is compared with
it output by output.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..errors import DataError, RecipeError, WorkbenchError
from ..progress import track
from ..runtime.backends import BACKENDS
from ..schema import BatchSize, check_batch_sizes
from .registry import Restorer, StageOptions, metrics_only, register_stage

BackendName = Literal[tuple(BACKENDS)]


class EvaluateOptions(StageOptions):
    backends: list[BackendName] | None = Field(None, description="Backends to score; default: every one available.")
    max_samples: int | None = Field(None, gt=0, description="Score only the first N evaluation samples.")
    latency: bool = Field(True, description="Measure latency of each backend (warm-up, repeats, median, p90).")
    latency_batch_sizes: list[BatchSize] = Field(
        default_factory=lambda: [1, 8], min_length=1, description="Batch sizes timed.")
    latency_repeats: int = Field(20, ge=1, description="Timed repeats per batch size.")
    threads: int | None = Field(None, ge=1, description="CPU threads for every backend, timed and scored: PyTorch, "
                                "ONNX Runtime, OpenVINO (default: all cores).")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Of the paired bootstrap interval every difference "
                              "with FP32 (and QAT's with PTQ) is reported with.")

    _batch_sizes_once = field_validator("latency_batch_sizes")(check_batch_sizes)


def _needs(opts: EvaluateOptions) -> list[str]:
    return [need for name in opts.backends or () for need in BACKENDS[name].needs]


def _nonfinite_output(run, backend: str, error: FloatingPointError, images) -> WorkbenchError:
    """An error naming the backend whose output is NaN/Inf and, for a PyTorch backend, the first layer that made it."""
    from pathlib import Path

    from ..models.guards import first_nonfinite_layer

    model = BACKENDS[backend].model(run)
    if isinstance(model, Path):  # ONNX Runtime or TensorRT: no layer can be watched from here
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


@register_stage("evaluate", EvaluateOptions, needs=_needs, needs_data=("evaluation",), restorer=Restorer(metrics_only),
                results=True)
def evaluate(run, opts: EvaluateOptions) -> None:
    """Accuracy (or agreement with FP32), size and latency of every backend."""
    from ..runtime.latency import cpu_threads, torch_threads

    threads = cpu_threads(opts.threads)  # the same count for PyTorch, ONNX Runtime and OpenVINO
    with torch_threads(threads):
        _evaluate(run, opts, threads)


def _evaluate(run, opts: EvaluateOptions, threads: int) -> None:
    import numpy as np

    from ..runtime import backends as table
    from ..runtime.latency import measure_latency

    available = table.available(run)
    backends = opts.backends or available
    if missing := [b for b in backends if b not in available]:
        raise RecipeError(
            f"stages.evaluate.backends: {missing} are not available at this point of the recipe "
            f"(available: {available}); put calibrate/export before evaluate"
        )
    options = table.Options(device=run.device, threads=threads)
    runners = {b: table.open_runner(run, b, options) for b in backends}
    dataset = run.dataset("evaluation")
    task = run.task
    labeled = bool(getattr(dataset, "labeled", True))
    scorers = {b: task.scorer(run.recipe, dataset) for b in backends}
    # Every backend is compared with the FP32 model, scored or not.
    reference_runner = runners.get("pytorch_fp32") or table.open_runner(run, "pytorch_fp32", options)
    loader = run.loader("evaluation")
    references = None  # FP32's outputs per batch, where it was scored first
    if labeled and task.scores_reference_first and "pytorch_fp32" in scorers:
        # Labels that do not fit the model are refused before any other backend is timed or scored.
        references = []
        for images, labels in _batches(track(loader, "evaluate fp32", total=len(loader)), opts.max_samples):
            references.append(reference_runner(images))
            _update(run, scorers["pytorch_fp32"], "pytorch_fp32", references[-1], labels, references[-1], images)
        where, mode = _label_source(run)
        task.check_labels(scorers["pytorch_fp32"], dataset, f"{where} (labels: {mode})")
    # Time before scoring: ONNX Runtime's worker threads keep spinning for a while after a run,
    # which would steal the cores from whichever backend is timed next.
    latencies, speed = {}, None
    if opts.latency:
        # One step per backend and batch size, so the log shows progress while 8 backends are timed (minutes on a
        # loaded 2-core machine), not a silence.
        timed = [(b, size) for b in runners if BACKENDS[b].timed for size in opts.latency_batch_sizes]
        for b, size in track(timed, "latency (backends x batch sizes)", total=len(timed)):
            latencies.setdefault(b, {}).update(measure_latency(runners[b], tuple(run.recipe.model.input_size), [size],
                                                               repeats=opts.latency_repeats))
        speed = _speed_split(run, dataset, reference_runner)
    same_function = table.comparisons(runners)
    pairs = {key: [task.scorer(run.recipe, dataset, compare_only=True), 0.0]  # scorer, max |diff|
             for key in same_function}
    # Every engine against the graph it was compiled from, the guard's way, on the whole split (the build's guard
    # decided on as few images as resolved its threshold).
    engine_checks = {b: (BACKENDS[b].guarded_against, task.agreement_meter(run.num_classes())) for b in runners
                     if BACKENDS[b].guarded_against in runners}
    # and the graph an engine was compiled from, where it is a conversion (OpenVINO's u8 layout with this CPU's
    # weight bits), against the faithful graph: the accuracy the conversion itself costs
    conversions = {graph: (BACKENDS[graph].compares.against, task.agreement_meter(run.num_classes()))
                   for graph, _ in engine_checks.values()
                   if BACKENDS[graph].compares and BACKENDS[graph].compares.against in runners}
    seen = 0
    for i, (images, labels) in enumerate(_batches(track(loader, "evaluate", total=len(loader)), opts.max_samples)):
        seen += images.shape[0]
        reference = references[i] if references is not None else reference_runner(images)
        outputs = {b: (reference if b == "pytorch_fp32" else runner(images)) for b, runner in runners.items()}
        for b, out in outputs.items():
            if not (b == "pytorch_fp32" and references is not None):  # FP32 already scored
                _update(run, scorers[b], b, out, labels, reference, images)
        for b, (against, meter) in (engine_checks | conversions).items():
            meter.update(outputs[b], outputs[against])
        for key, entry in pairs.items():
            graph, against = same_function[key]
            entry[0].update(outputs[graph], labels, outputs[against])
            entry[1] = max(entry[1], float(np.abs(outputs[graph] - outputs[against]).max()))

    results: dict[str, dict] = {}
    for b in runners:
        entry = {"metrics": scorers[b].result()}
        if BACKENDS[b].sized:
            entry["size_bytes"] = table.artifact_bytes(BACKENDS[b].model(run))
        if files := table.artifact_files(BACKENDS[b].model(run), run.dir):
            entry["files"] = files  # relative to the run directory: true after it is renamed, and in deploy/
        if b in latencies:
            entry["latency"] = latencies[b]
        results[b] = entry
    _differences(task, scorers, results, opts.confidence)
    _check_engines(run, engine_checks, conversions, results)
    _write_per_image(run, task, scorers)
    values = {"samples": seen, "labeled": labeled, "backends": results}
    if latencies:
        from ..hardware.cpu import cpu_info

        values["latency_setup"] = {"threads": threads, "repeats": opts.latency_repeats,
                                   "batch_sizes": list(opts.latency_batch_sizes), "pytorch_device": str(run.device),
                                   "cpu": cpu_info().as_dict()}
    if speed:
        values["speed_ms_per_image"] = speed
    for key, (scorer, max_abs_diff) in pairs.items():
        if seen:
            values[key] = {**scorer.result(), "max_abs_diff": max_abs_diff}
    run.record("evaluate", values)


def _check_engines(run, engine_checks: dict, conversions: dict, results: dict) -> None:
    """Each engine's agreement with the graph it was compiled from on the evaluation split, with its interval, and
    that graph's with the faithful graph where it is a conversion; one outside the build guard's threshold here is
    a warning in the console, the report and metrics.json (an engine kept unverified is said so)."""
    from ..runtime.guard import GuardPolicy, engine_verified

    policy = run.artifacts.engine_guard or GuardPolicy()
    for b in engine_checks:
        results[b]["verified"] = engine_verified(BACKENDS[b].model(run))
    for b, (against, meter) in (engine_checks | conversions).items():
        estimate = meter.estimate(policy.confidence)
        if estimate is None:  # the faithful graph makes no confident prediction: nothing to agree on
            continue
        within = estimate.value >= policy.min_agreement
        results[b]["engine_check" if b in engine_checks else "conversion_check"] = {
            "against": against, "criterion": meter.criterion, "compared": meter.compared, **estimate.as_dict(),
            "min_agreement": policy.min_agreement, "within": within}
        if within:
            continue
        if b in engine_checks:
            run.warn(f"{b}: {meter.criterion} with the graph it was compiled from ({against}) on the evaluation "
                     f"split is {estimate.describe()}, outside the guard's threshold of {policy.min_agreement:g}%"
                     + ("" if results[b]["verified"] else " (the engine was built unverified)")
                     + ": this engine does not compute its graph's function; deploy the faithful ONNX graph")
        else:
            run.warn(f"{b}: the graph the engine is compiled from (its layout and weight bits for this CPU) against "
                     f"the faithful graph ({against}) on the evaluation split: {meter.criterion} "
                     f"{estimate.describe()}, outside {policy.min_agreement:g}%: the conversion itself loses accuracy "
                     "on this CPU")


def _write_per_image(run, task, scorers: dict) -> None:
    """per_image.npz: each backend's per-image record (a classifier's top-1 and whether it was right), so two runs
    on the same evaluation images can be compared image by image (workbench.stats.paired_mean)."""
    import numpy as np

    from ..io import atomic_path

    arrays = {f"{b}.{key}": value for b, scorer in scorers.items()
              for key, value in (task.per_image(scorer) or {}).items()}
    if arrays:
        with atomic_path(run.path("per_image.npz")) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


# Differences every run reports, each with its paired interval: (key in the backend's entry, reference backend).
DIFFERENCES = (("delta_vs_fp32", "pytorch_fp32"),)
# QAT against the PTQ model it started from, in PyTorch and in the faithful graph.
QAT_DIFFERENCES = {"pytorch_int8": "pytorch_int8_ptq", "ort_int8_faithful": "ort_int8_ptq"}


def _differences(task, scorers: dict, results: dict, confidence: float) -> None:
    """Every backend's headline difference with FP32, and QAT's with PTQ, with paired bootstrap intervals."""
    for backend, scorer in scorers.items():
        for key, reference in DIFFERENCES:
            if backend != reference and reference in scorers:
                interval = task.delta(scorer, scorers[reference], confidence)
                if interval is not None:
                    results[backend][key] = interval.as_dict()
        ptq = QAT_DIFFERENCES.get(backend)
        if ptq in scorers:
            interval = task.delta(scorer, scorers[ptq], confidence)
            if interval is not None:
                results[backend]["delta_vs_ptq"] = interval.as_dict()


SPEED_IMAGES = 8


def _speed_split(run, dataset, reference_runner) -> dict[str, float]:
    """Per image, as Ultralytics reports speed: pre-process (read, resize or letterbox, normalise: the dataset's
    item) and post-process (the task's: a detector's decode and NMS), on the first images; inference is each
    backend's batch-1 latency."""
    import time

    count = min(SPEED_IMAGES, len(dataset))
    start = time.perf_counter()
    images = [dataset[i][0] for i in range(count)]
    preprocess = (time.perf_counter() - start) / count
    outputs = [reference_runner(image[None].numpy()) for image in images]
    start = time.perf_counter()
    for out in outputs:
        run.task.postprocess(out, run.recipe)
    postprocess = (time.perf_counter() - start) / count
    return {"images": count, "preprocess": 1000 * preprocess, "postprocess": 1000 * postprocess}


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
        import numpy as np

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
