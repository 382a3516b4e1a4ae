"""build: an engine compiled from the run's exported ONNX, checked against the graph it was built from.

Engines: TensorRT (runtime/tensorrt.py; NVIDIA GPUs) and OpenVINO (runtime/openvino.py; the CPU). `auto`
takes TensorRT where the `tensorrt` package is installed, OpenVINO elsewhere. An INT8 engine is compiled
from the Q/DQ graph; OpenVINO also compiles the FP32 graph, the baseline its speed-up is measured against.
The graph's Q/DQ numbers are checked first (qdq/numeric.py). Every INT8 engine then runs beside the faithful
execution of the graph it was compiled from (runtime/guard.py), on as many calibration and then evaluation
images as resolve the guard's threshold, and is handed on only if it computes the same function; a refused
engine's files are removed. `guard: false` keeps it, marked unverified in its sidecar and every table.

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
        "model.onnx as it is (signed activations), which the OpenVINO versions measured compute wrongly after a "
        "Concat on CPUs without AMX (the guard refuses it where it does).")
    openvino_weights: Literal["auto", "s8", "reduce_range"] = Field(
        "auto", description="OpenVINO, u8 graph: s8 (8-bit weights: CPUs with VNNI or AMX), reduce_range (7 bits "
        "where a 16-bit sum could saturate: x86 CPUs without VNNI); auto: for the CPU the build runs on.")
    guard: bool = Field(True, description="Run the engine beside the faithful execution of the graph it was compiled "
                        "from and refuse it when they disagree (false: keep it, marked unverified everywhere).")
    guard_max_samples: int = Field(1024, ge=1, le=65536, description="Most images the guard compares on. It starts "
                                   "at the fewest on which perfect agreement resolves guard_min_agreement (35 for 90% "
                                   "at 95%) and doubles while the interval straddles it, drawing the calibration "
                                   "split, then the evaluation split.")
    guard_min_agreement: float = Field(
        90.0, ge=0, lt=100, description="Refuse an engine whose agreement with its faithful graph is not resolved at "
        "or above this percent: top-1 agreement (classifiers), mAP50 of its boxes against the graph's confident "
        "boxes (detectors). Engines that compute the graph's function agree on 97-100%; the broken ones seen, 0-66%.")
    guard_confidence: float = Field(0.95, gt=0.5, lt=1, description="Of the agreement's interval.")
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
    out = {"openvino_int8", "openvino_int8_graph"} if opts.precision == "int8" else set()
    return out | ({"openvino_fp32"} if "onnx_fp32" in made else set())


@register_stage("build", BuildOptions, needs=_needs, makes=_makes)
def build(run, opts: BuildOptions) -> None:
    """An engine (TensorRT, or OpenVINO for the CPU) from the exported ONNX, checked against its faithful graph."""
    from ..runtime.guard import GuardPolicy

    engine = resolve_engine(opts)
    run.artifacts.engine_guard = GuardPolicy(opts.guard_min_agreement, opts.guard_min_sqnr_db, opts.guard_confidence,
                                             opts.guard_max_samples)
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

    from ..qdq.numeric import require_numeric
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
    require_numeric(req.onnx)
    try:
        sidecar = build_engine(req)
    except TensorRTUnavailable as e:
        raise EngineNotBuilt(str(e)) from None
    values = {**sidecar, "engine": "tensorrt", "engine_file": sidecar["engine"], "built": True}
    if opts.precision == "int8":
        files = [req.engine, req.engine.with_name(req.engine.name + ".json")]
        values.update(_guard(run, opts, lambda: TensorRTRunner(req.engine, "tensorrt"), req.onnx, files, None,
                             "tensorrt"))
    run.artifacts.tensorrt_engine = req.engine
    return values


def _build_openvino(run, opts: BuildOptions) -> dict:
    from ..qdq.numeric import require_numeric
    from ..runtime import openvino

    try:
        openvino.require_openvino()
    except openvino.OpenVINOUnavailable as e:
        raise EngineNotBuilt(str(e)) from None
    onnx = run.artifacts.onnx
    values: dict = {"engine": "openvino", "built": True, "openvino": openvino.version()}
    if onnx.fp32 is not None:  # the baseline the INT8 engine's speed is measured against
        require_numeric(onnx.fp32)
        xml = run.path("model_openvino_fp32.xml")
        values["fp32"] = openvino.compile_model_file(openvino.CompileRequest(onnx=onnx.fp32, xml=xml))
        run.artifacts.openvino_fp32 = xml
    if opts.precision == "int8":
        require_numeric(onnx.model)
        xml = run.path("model_openvino_int8.xml")
        arithmetic = run.artifacts.quant.arithmetic
        if arithmetic.target == "openvino":  # calibrated and exported in OpenVINO's arithmetic: compiled as it is
            graph = onnx.model
            notes = {"graph": "as exported (target: openvino)", "weights": f"s{arithmetic.weight_bits}",
                     "graph_note": f"Compiled from {graph.name} as exported: the target's arithmetic "
                                   f"({arithmetic.describe()}); {arithmetic.why}."}
            if arithmetic.weight_bits == 8 and not openvino.cpu_info().int8_dot:
                notes["graph_note"] += (" This CPU has no VNNI: its kernels sum u8 x s8 products in 16 bits, which "
                                        "8-bit weights can saturate (the guard decides; target.cpu: avx2 quantizes for "
                                        "it).")
        else:
            graph, notes = openvino.int8_graph(onnx.model, run.path("model_openvino_int8.onnx"), opts.openvino_graph,
                                               opts.openvino_weights)
        values["int8"] = openvino.compile_model_file(openvino.CompileRequest(onnx=graph, xml=xml, notes=notes))
        files = openvino.artifact_files(xml) + ([graph] if graph != onnx.model else [])
        values.update(_guard(run, opts, lambda: openvino.OpenVINORunner(xml, "openvino_int8"), graph, files,
                             openvino.run_tapped, "openvino_int8"))
        run.artifacts.openvino_int8, run.artifacts.openvino_int8_graph = xml, graph
    return values


def _guard(run, opts: BuildOptions, runner, graph, files: list, tap, engine_name: str) -> dict:
    """The guard's record: the engine compared with the faithful execution of the ONNX `graph` it was compiled from,
    on the calibration images and then the evaluation images (runtime/guard.py). A refused engine's files are
    removed and EngineNotBuilt raised with what was measured; with the guard off the engine is kept, marked
    unverified in its sidecar and the build's record."""
    from ..runtime.guard import EngineRefused, mark_sidecar, verify_engine

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
