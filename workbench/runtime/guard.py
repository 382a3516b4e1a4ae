"""The engine guard: an engine is handed on only if it computes the function of the graph it was built from.

An INT8 engine (OpenVINO, TensorRT) picks its own kernels for the Q/DQ graph; on some CPUs a kernel choice
has broken the function silently (OpenVINO on the TensorRT-style yolov5n graph: mAP 0.310 -> 0.039, with
nothing said). The guard runs the engine beside the faithful execution of the very graph it was compiled
from (ONNX Runtime with graph optimisations off; for OpenVINO the converted u8 graph, so the guard measures
the engine and not the conversion) and measures the task's agreement (tasks: `agreement_meter`; top-1 for
classifiers, mAP50 of the engine's boxes against the graph's confident boxes for detectors) with its interval.

How many images: enough that the interval resolves the threshold. It starts at the fewest on which perfect
agreement would (stats.samples_to_resolve: 35 for 90% at 95% confidence) and doubles while the interval
straddles the threshold, up to `max_samples` or the images there are. An engine passes only when the interval
lies at or above the threshold; below it, or undecided when the images run out, or with no image at all, it is
refused. Where the reference makes no confident prediction (a random-weight detector), the SQNR of the raw
outputs decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import WorkbenchError


@dataclass(frozen=True)
class GuardPolicy:
    """What an engine must show: agreement at least `min_agreement` percent, resolved at `confidence`."""

    min_agreement: float = 90.0
    min_sqnr_db: float = 15.0
    confidence: float = 0.95
    max_samples: int = 1024

    @property
    def min_samples(self) -> int:
        from ..stats import samples_to_resolve

        return samples_to_resolve(self.min_agreement, self.confidence)


@dataclass
class GuardResult:
    engine: str
    reference: str  # the graph the engine was compared with (its file name)
    criterion: str  # what the agreement measures (the task's)
    samples: int  # images compared
    sources: dict[str, int]  # images per split they were drawn from
    agreement: float | None  # percent; None where the reference gave nothing to agree on
    low: float | None  # the agreement's interval
    high: float | None
    method: str | None  # of the interval
    compared: int  # what the agreement counts: images or reference boxes
    sqnr_db: float
    min_agreement: float
    min_sqnr_db: float
    confidence: float
    min_samples: int
    first_diverging: dict | None = field(default=None)

    @property
    def resolved(self) -> bool:
        return self.agreement is not None and (self.low >= self.min_agreement or self.high < self.min_agreement)

    @property
    def passed(self) -> bool:
        if not self.samples:
            return False  # a guard that could not run refuses
        if self.agreement is not None:
            return self.samples >= self.min_samples and self.low >= self.min_agreement
        return self.sqnr_db >= self.min_sqnr_db  # no confident output to agree on: the raw outputs must match

    @property
    def verdict(self) -> str:
        if self.passed:
            return "passed"
        if not self.samples:
            return "refused: no images to compare on"
        if self.agreement is None:
            return "refused: output SQNR below the threshold"
        if self.high < self.min_agreement:
            return "refused: agreement below the threshold"
        return "refused: undecided (more images needed)"

    def describe(self) -> str:
        if not self.samples:
            return f"{self.engine}: no images to compare it with {self.reference} on, so it is not verified"
        drawn = " and ".join(f"{n} {split}" for split, n in self.sources.items() if n)
        if self.agreement is not None:
            agree = (f"{self.criterion} {self.agreement:.1f}% [{self.low:.1f}, {self.high:.1f}] "
                     f"({100 * self.confidence:.0f}% {self.method} interval, {self.compared} compared)")
        else:
            agree = "no agreement measurable (the reference makes no confident prediction)"
        need = (f"needs the interval at or above {self.min_agreement:g}% on at least {self.min_samples} images"
                if self.agreement is not None else f"needs SQNR >= {self.min_sqnr_db:g} dB")
        text = (f"{self.engine} against {self.reference} on {self.samples} images ({drawn}): {agree}, output SQNR "
                f"{self.sqnr_db:.1f} dB ({need})")
        if self.verdict.endswith("(more images needed)"):
            text += ("; the images ran out before the interval resolved the threshold: give the guard more images "
                     "(a larger calibration or evaluation split, or --data)")
        return text

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "passed": self.passed, "resolved": self.resolved, "verdict": self.verdict}


def guard_engine(engine, reference, batches: Iterable[tuple[str, np.ndarray]], meter, policy: GuardPolicy,
                 engine_name: str, reference_name: str) -> GuardResult:
    """Run `engine` and `reference` (runners) on (split, images) `batches` until the meter's interval resolves the
    policy's threshold (starting at policy.min_samples images, doubling) or the images or max_samples run out."""
    target = min(policy.min_samples, policy.max_samples)
    samples, sources = 0, {}
    signal = noise = 0.0
    estimate = None
    for split, images in batches:
        images = images[: policy.max_samples - samples]
        ref, out = reference(images), engine(images)
        meter.update(out, ref)
        ref64, out64 = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
        signal += float((ref64 ** 2).sum())
        noise += float(((out64 - ref64) ** 2).sum())
        samples += int(images.shape[0])
        sources[split] = sources.get(split, 0) + int(images.shape[0])
        if samples >= policy.max_samples:
            break
        if samples >= target:
            estimate = meter.estimate(policy.confidence)
            if estimate is None or estimate.resolves(policy.min_agreement):
                break
            target = min(2 * target, policy.max_samples)
    if samples:
        estimate = meter.estimate(policy.confidence)
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return GuardResult(
        engine=engine_name, reference=reference_name, criterion=meter.criterion, samples=samples, sources=sources,
        agreement=None if estimate is None else float(estimate.value),
        low=None if estimate is None else float(estimate.low), high=None if estimate is None else float(estimate.high),
        method=None if estimate is None else estimate.method, compared=meter.compared, sqnr_db=sqnr,
        min_agreement=policy.min_agreement, min_sqnr_db=policy.min_sqnr_db, confidence=policy.confidence,
        min_samples=policy.min_samples)


def sidecar_of(artifact: Path) -> Path:
    """An engine file's JSON sidecar (model.engine.json, model_openvino_int8.xml.json)."""
    return artifact.with_name(artifact.name + ".json")


def mark_sidecar(artifact: Path, result: GuardResult | None) -> None:
    """Record the guard's verdict in the engine's sidecar: `verified` true only for an engine the guard passed;
    `guard: null` for one built with the guard off (--no-guard, guard: false), which every table marks
    unverified."""
    import json

    from ..io import write_json

    path = sidecar_of(artifact)
    sidecar = json.loads(path.read_text()) if path.is_file() else {}
    sidecar["verified"] = bool(result is not None and result.passed)
    sidecar["guard"] = None if result is None else result.as_dict()
    write_json(path, sidecar)


def engine_verified(artifact: Path) -> bool:
    """Whether the guard passed this engine file when it was built (its sidecar says so); False for an engine without
    a sidecar, or one built with the guard off."""
    import json

    try:
        return json.loads(sidecar_of(artifact).read_text()).get("verified") is True
    except (OSError, ValueError, AttributeError):
        return False


class EngineRefused(Exception):
    """The guard refused an engine (its files are removed): `result` holds what was measured."""

    def __init__(self, message: str, result: GuardResult):
        super().__init__(message)
        self.result = result


def verify_engine(runner, graph: Path, batches: Iterable[tuple[str, np.ndarray]], meter, policy: GuardPolicy,
                  files: list[Path], engine_name: str, tap=None) -> GuardResult:
    """Guard the engine `runner` against the faithful execution of the ONNX `graph` it was compiled from; the
    verdict goes into its sidecar (files[0]'s). A refused engine's `files` are removed and EngineRefused raised
    with its numbers and, where `tap` can run the graph's tensors in the engine, the first diverging layer."""
    from .runners import OrtRunner

    faithful = OrtRunner(graph, "faithful", "faithful")
    taken: list[np.ndarray] = []

    def kept(source):  # the first batch, for locating a divergence
        for split, images in source:
            if not taken:
                taken.append(images[:1])
            yield split, images

    result = guard_engine(runner, faithful, kept(batches), meter, policy, engine_name, graph.name)
    if result.passed:
        mark_sidecar(files[0], result)
        return result
    where = ""
    if tap is not None and taken:
        from .compare import first_diverging, graph_divergence

        result.first_diverging = first_diverging(graph_divergence(graph, taken[0], tap))
        if result.first_diverging is not None:
            where = (f"; the first layer whose output diverges is node {result.first_diverging['onnx_node']} "
                     f"(relative error {result.first_diverging['rel_error']:.3f})")
    for path in files:
        path.unlink(missing_ok=True)
    raise EngineRefused(f"the {engine_name} engine was refused ({result.verdict}): {result.describe()}{where}. Its "
                        "files were removed", result)


class EngineNotBuilt(WorkbenchError):
    """The engine's package or device is missing, or the guard refused what was built (`details`: its numbers)."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def guard_in_run(run, opts, runner, graph, files: list, tap, engine_name: str) -> dict:
    """The guard's record: the engine compared with the faithful execution of the ONNX `graph` it was compiled from,
    on the calibration images and then the evaluation images (runtime/guard.py). A refused engine's files are
    removed and EngineNotBuilt raised with what was measured; with the guard off the engine is kept, marked
    unverified in its sidecar and the build's record."""
    if not opts.guard:
        mark_sidecar(files[0], None)
        return {"verified": False, "guard": None}
    try:
        result = verify_engine(runner(), graph, _guard_images(run), run.task.agreement_meter(run.num_classes()),
                               run.artifacts.engine_guard, files, engine_name, tap)
    except EngineRefused as e:
        raise EngineNotBuilt(f"{e}; the faithful ONNX graph is the artifact to deploy (or set guard: false to keep "
                             "the engine, marked unverified)", {"guard": e.result.as_dict()}) from None
    return {"verified": True, "guard": result.as_dict()}


def _guard_images(run):
    """(split, images) batches: the calibration split, then the evaluation split where the recipe has one."""
    splits = ["calibration"] + (["evaluation"] if run.recipe.data.evaluation is not None else [])
    for split in splits:
        for images, _ in run.loader(split):
            yield split, images.numpy()
