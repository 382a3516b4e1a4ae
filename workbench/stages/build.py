"""build: an engine compiled from the run's exported ONNX, checked against the graph it was built from.

Engines: TensorRT (runtime/tensorrt.py; NVIDIA GPUs) and OpenVINO (runtime/openvino.py; the CPU). `auto`
takes TensorRT where the `tensorrt` package is installed, OpenVINO elsewhere. An INT8 engine is compiled
from the Q/DQ graph; OpenVINO also compiles the FP32 graph, the baseline its speed-up is measured against.
Every engine then runs beside the faithful execution of its graph on calibration images (runtime/guard.py)
and is handed on only if it computes the same function; a refused engine's files are removed.

Without the engine's package (or, for TensorRT, a GPU) the stage records why nothing was built and the run
goes on to its reports; `required: true` fails the run instead, as it does for a refused engine.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from ..errors import WorkbenchError
from ..schema import MAX_BATCH, ImageSide
from .registry import StageOptions, register_stage


class BuildOptions(StageOptions):
    engine: Literal["auto", "tensorrt", "openvino"] = Field(
        "auto", description="tensorrt (NVIDIA GPUs), openvino (CPUs); auto: tensorrt where the tensorrt package is "
        "installed, openvino elsewhere.")
    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="int8: the Q/DQ graph (model.onnx; OpenVINO also compiles the FP32 graph beside it); "
        "fp16 (TensorRT only) / fp32: the FP32 graph.")
    min_batch: int = Field(1, ge=1, le=MAX_BATCH, description="TensorRT: smallest batch of the optimization profile.")
    opt_batch: int = Field(8, ge=1, le=MAX_BATCH, description="TensorRT: batch it tunes for.")
    max_batch: int = Field(32, ge=1, le=MAX_BATCH, description="TensorRT: largest batch.")
    min_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="TensorRT: smallest (H, W), for graphs exported with dynamic_size.")
    opt_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="TensorRT: (H, W) it tunes for (default: the recipe's input size).")
    max_size: tuple[ImageSide, ImageSide] | None = Field(None, description="TensorRT: largest (H, W).")
    strongly_typed: bool = Field(True, description="TensorRT: precisions from the graph (TensorRT 10's recommended "
                                 "mode for Q/DQ).")
    fp16: bool = Field(True, description="TensorRT, weakly typed builds: allow FP16 for the layers the graph keeps "
                       "float.")
    workspace_mib: int = Field(4096, ge=16, description="TensorRT: builder workspace limit.")
    timing_cache: str | None = Field(None, description="TensorRT: timing cache file, read and updated by every build "
                                     "(default: ~/.cache/workbench).")
    sparse_weights: bool = Field(False, description="TensorRT: use 2:4 sparse kernels (after prune: sparsity_2to4).")
    openvino_graph: Literal["u8", "tensorrt_style"] = Field(
        "u8", description="OpenVINO: the INT8 layout compiled. u8: the same ranges with unsigned activations (zero "
        "point 128 where signed) and 8-bit weight initializers, computed correctly on every CPU; tensorrt_style: "
        "model.onnx as it is (signed activations), which OpenVINO computes wrongly after a Concat on CPUs without "
        "AMX (the guard refuses it there).")
    openvino_weights: Literal["auto", "s8", "reduce_range"] = Field(
        "auto", description="OpenVINO, u8 graph: s8 (8-bit weights: CPUs with VNNI or AMX), reduce_range (7 bits "
        "where a 16-bit sum could saturate: x86 CPUs without VNNI); auto: for the CPU the build runs on.")
    guard: bool = Field(True, description="Run the engine beside the faithful graph on calibration images and refuse "
                        "it when their outputs disagree.")
    guard_samples: int = Field(32, ge=1, le=4096, description="Calibration images the guard compares on.")
    guard_min_agreement: float = Field(
        90.0, ge=0, le=100, description="Refuse an engine that agrees with the faithful graph on fewer than this "
        "percent of top-1 predictions (classifiers) or confident boxes (detectors). Engines that compute the graph's "
        "function agree on 97-100% (rounding differs near ties); the broken ones seen agree on 0-66%.")
    guard_min_sqnr_db: float = Field(
        15.0, description="Where no agreement is measurable (no confident box): refuse an engine whose output SQNR "
        "against the faithful graph is below this.")
    required: bool = Field(False, description="Fail the run when the engine cannot be built or is refused (default: "
                           "record why and go on).")

    @model_validator(mode="after")
    def _consistent(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, "
                             f"{self.max_batch}")
        if self.engine == "openvino" and self.precision == "fp16":
            raise ValueError("precision fp16 is for TensorRT; OpenVINO on the CPU compiles int8 or fp32")
        return self


def resolve_engine(opts: BuildOptions) -> str:
    """The engine `auto` stands for: TensorRT where its package is installed, OpenVINO elsewhere."""
    if opts.engine != "auto":
        return opts.engine
    return "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "openvino"


def _needs(opts: BuildOptions) -> tuple[str, ...]:
    # INT8 compiles the Q/DQ graph, so the model must have been calibrated; FP16/FP32 the FP32 graph.
    return ("quantized", "onnx") if opts.precision == "int8" else ("onnx_fp32",)


def _makes(opts: BuildOptions, made: set[str]) -> set[str]:
    if resolve_engine(opts) == "tensorrt":
        return {"tensorrt_engine"}
    out = {"openvino_int8"} if opts.precision == "int8" else set()
    return out | ({"openvino_fp32"} if "onnx_fp32" in made else set())


@register_stage("build", BuildOptions, needs=_needs, makes=_makes)
def build(run, opts: BuildOptions) -> None:
    """An engine (TensorRT, or OpenVINO for the CPU) from the exported ONNX, checked against its faithful graph."""
    engine = resolve_engine(opts)
    try:
        values = _build_tensorrt(run, opts) if engine == "tensorrt" else _build_openvino(run, opts)
    except EngineNotBuilt as e:
        if opts.required:
            raise WorkbenchError(f"stages.build: {e}") from None
        values = {"engine": engine, "built": False, "reason": str(e), **e.details}
    run.record("build", values)


class EngineNotBuilt(WorkbenchError):
    """The engine's package or device is missing, or the guard refused what was built (`details`: its numbers)."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


def _build_tensorrt(run, opts: BuildOptions) -> dict:
    from pathlib import Path

    from ..runtime.tensorrt import (
        BuildRequest,
        TensorRTRunner,
        TensorRTUnavailable,
        build_engine,
        check_request,
        default_timing_cache,
        profile_for,
    )

    onnx = run.artifacts.onnx
    c, h, w = run.recipe.model.input_size
    cache = Path(opts.timing_cache) if opts.timing_cache else default_timing_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    req = BuildRequest(
        onnx=onnx.model if opts.precision == "int8" else onnx.fp32,
        engine=run.path(f"model_{opts.precision}.engine"),
        profile=profile_for(c, (opts.min_batch, opts.opt_batch, opts.max_batch),
                            [opts.min_size or (h, w), opts.opt_size or (h, w), opts.max_size or (h, w)]),
        precision=opts.precision, strongly_typed=opts.strongly_typed, fp16=opts.fp16,
        workspace_mib=opts.workspace_mib, timing_cache=cache, sparse_weights=opts.sparse_weights,
    )
    check_request(req)  # a bad profile or a graph without Q/DQ fails with or without TensorRT
    try:
        sidecar = build_engine(req)
    except TensorRTUnavailable as e:
        raise EngineNotBuilt(str(e)) from None
    values = {**sidecar, "engine": "tensorrt", "engine_file": sidecar["engine"], "built": True}
    if opts.guard and opts.precision == "int8":
        files = [req.engine, req.engine.with_name(req.engine.name + ".json")]
        values["guard"] = _guard(run, opts, TensorRTRunner(req.engine, "tensorrt"), req.onnx, files, tap=None)
    run.artifacts.tensorrt_engine = req.engine
    return values


def _build_openvino(run, opts: BuildOptions) -> dict:
    from ..runtime import openvino

    try:
        openvino.require_openvino()
    except openvino.OpenVINOUnavailable as e:
        raise EngineNotBuilt(str(e)) from None
    onnx = run.artifacts.onnx
    values: dict = {"engine": "openvino", "built": True, "openvino": openvino.version()}
    if onnx.fp32 is not None:  # the baseline the INT8 engine's speed is measured against
        xml = run.path("model_openvino_fp32.xml")
        values["fp32"] = openvino.compile_model_file(openvino.CompileRequest(onnx=onnx.fp32, xml=xml))
        run.artifacts.openvino_fp32 = xml
    if opts.precision == "int8":
        xml = run.path("model_openvino_int8.xml")
        graph, notes = _openvino_int8_graph(run, opts)
        values["int8"] = openvino.compile_model_file(openvino.CompileRequest(onnx=graph, xml=xml, notes=notes))
        if opts.guard:
            runner = openvino.OpenVINORunner(xml, "openvino_int8")
            values["guard"] = _guard(run, opts, runner, graph, openvino.artifact_files(xml), tap=openvino.run_tapped)
        run.artifacts.openvino_int8 = xml
    return values


def _openvino_int8_graph(run, opts: BuildOptions):
    """The INT8 graph OpenVINO compiles, and the sidecar's note of which it is and why.

    OpenVINO takes signed 8-bit activations as they are only on CPUs with AMX; elsewhere its low-precision
    transformations shift them to u8 (+128), and a signed Q/DQ after a Concat then loses its scale (yolov5n's
    mAP 0.31 -> 0.03 on an AVX-512 VNNI EPYC; benchmarks and docs/BENCHMARKS.md). Handing it the same ranges
    with u8 activations (zero point 128: exactly the values of signed 8-bit) avoids that rewrite on every CPU.
    On x86 CPUs without VNNI its u8 x s8 kernels sum pairs in 16 bits (VPMADDUBSW), which saturate at full
    8-bit weights: there the weights whose sums could are re-quantized to 7 bits (reduce_range).
    """
    from ..qdq.ort_flavour import to_ort_int8
    from ..runtime.cpu import cpu_info

    model = run.artifacts.onnx.model
    if opts.openvino_graph == "tensorrt_style":
        return model, {"graph": "tensorrt_style", "graph_note": "Compiled from model.onnx as exported (signed "
                       "activations), as the recipe asked: OpenVINO computes a signed Q/DQ after a Concat wrongly "
                       "on CPUs without AMX."}
    cpu = cpu_info()
    weights = opts.openvino_weights
    if weights == "auto":
        weights = "s8" if cpu.int8_dot else "reduce_range"
    why_weights = ("8-bit weights: this CPU's INT8 dot products (VNNI/AMX) accumulate in 32 bits" if weights == "s8"
                   else "7-bit weights where a 16-bit sum could saturate (no VNNI on this CPU)"
                   if opts.openvino_weights == "auto" else f"{weights} weights, as the recipe asked")
    path = run.path("model_openvino_int8.onnx")
    to_ort_int8(model, path, weights)
    return path, {"graph": f"u8 activations, {weights} weights", "weights": weights,
                  "graph_note": ("Compiled from model_openvino_int8.onnx: model.onnx's ranges with unsigned "
                                 f"activations (zero point 128 where signed), which OpenVINO computes faithfully "
                                 f"on every CPU; {why_weights}.")}


def _guard(run, opts: BuildOptions, runner, graph, files: list, tap) -> dict:
    """Compare the engine with the faithful execution of the ONNX `graph` it was built from; a refused engine's
    files are removed and EngineNotBuilt raised with what was measured and the first diverging layer (where
    `tap` can run the engine on a tapped graph)."""
    from ..data import make_loader
    from ..qdq.compare import first_diverging, graph_divergence
    from ..runtime.guard import compare_engine
    from ..runtime.runners import OrtRunner

    faithful = OrtRunner(graph, "faithful", "faithful")
    loader = make_loader(run.dataset("calibration"), run.recipe.data)
    batches, taken = [], 0
    for images, _ in loader:
        batches.append(images[: opts.guard_samples - taken].numpy())
        taken += batches[-1].shape[0]
        if taken >= opts.guard_samples:
            break
    result = compare_engine(runner, faithful, batches, run.task, run.num_classes(), opts.guard_min_agreement,
                            opts.guard_min_sqnr_db)
    values = result.as_dict()
    if result.passed:
        return values
    where = ""
    if tap is not None:
        rows = graph_divergence(graph, batches[0][:1], tap)
        first = first_diverging(rows)
        values["first_diverging"] = first
        if first is not None:
            where = (f"; the first layer whose output diverges is node {first['onnx_node']} (relative error "
                     f"{first['rel_error']:.3f})")
    for path in files:
        path.unlink(missing_ok=True)
    raise EngineNotBuilt(f"the {result.engine} engine was refused: {result.describe()}{where}. Its files were "
                         "removed; the faithful ONNX graph is the artifact to deploy (or set guard: false to keep it)",
                         {"guard": values})
