"""TensorRT engines from the exported Q/DQ ONNX (TensorRT 10/11 Python API), and a runner for them.

Explicit quantization: the ONNX's Q/DQ nodes say which tensors are INT8, nothing is
calibrated here. A strongly typed network (the default) takes every precision from the
graph; `strongly_typed: false` builds a weakly typed network with the INT8 flag, and FP16
allowed for the layers the graph keeps float. One optimization profile covers the batch
(and, for graphs exported with dynamic height and width, the image size) from min to max.
The timing cache is read before and written after every build, so a rebuild of the same
layers skips their timing. Beside the engine, a JSON sidecar records what it was built
with and for (TensorRT version, GPU, compute capability, shapes) and the engine
inspector's per-layer precisions; `load_engine` refuses an engine for another GPU or
TensorRT version with that sidecar, instead of TensorRT's deserialisation error.

Nothing here runs without `tensorrt` and a CUDA GPU: `require_tensorrt` says what to
install. The checks on the request (profile order, a graph with no Q/DQ handed to an
INT8 build) run before TensorRT is imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from ..io import atomic_path, path_from, write_json
from .engines import Engine

INSTALL_HINT = (
    "install TensorRT 10 or newer for your CUDA version, e.g. `pip install tensorrt-cu12` (NVIDIA's index), "
    "on a machine with an NVIDIA GPU; the ONNX files and reports of the run do not need it"
)


class TensorRTUnavailable(WorkbenchError):
    """`tensorrt` does not import, or no CUDA GPU is present."""


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"TensorRT is not installed ({e}): {INSTALL_HINT}") from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need an NVIDIA GPU and none is visible (torch.cuda.is_available() "
                                  "is False)")
    return trt


@dataclass
class Profile:
    """min/opt/max shapes (N, C, H, W) of the input for one optimization profile."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def check(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise WorkbenchError(f"profile: min {self.min}, opt {self.opt} and max {self.max} must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 0 < lo <= mid <= hi:
                raise WorkbenchError(
                    f"profile: need 0 < min <= opt <= max in every dimension, got min {self.min}, opt {self.opt}, max "
                    f"{self.max}"
                )


def default_timing_cache() -> Path:
    """The timing cache every build reads and updates, unless a recipe or `--timing-cache` names another."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench")) / "tensorrt_timing.cache"


def profile_for(channels: int, batches: tuple[int, int, int], sizes: list[tuple[int, int]]) -> Profile:
    """The profile of (min, opt, max) batches and (H, W) sizes."""
    return Profile(*[(b, channels, *hw) for b, hw in zip(batches, sizes)])


@dataclass(kw_only=True)
class BuildRequest:
    """What to build: every field named where a request is made (build stage, `workbench build`)."""

    onnx: Path
    engine: Path
    profile: Profile
    precision: str = "int8"  # int8: the graph must carry Q/DQ; fp16 / fp32: it must not need to
    strongly_typed: bool = True
    fp16: bool = True  # weakly typed only: FP16 allowed where the graph has no Q/DQ
    workspace_mib: int = 4096
    timing_cache: Path | None = None
    sparse_weights: bool = False
    notes: dict = field(default_factory=dict)


def check_request(req: BuildRequest) -> dict:
    """What can be checked without TensorRT: the file, the profile against the graph's input, Q/DQ for INT8.

    Returns the graph's input name and its Q/DQ census.
    """
    from ..qdq.export import load_onnx
    from ..qdq.graph import qdq_census

    model = load_onnx(req.onnx)  # a clear error for a missing file or one that is not a model
    req.profile.check()
    graph_input = model.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(req.profile.min):
        raise WorkbenchError(f"profile: {req.onnx} takes a rank-{len(dims)} input, the profile gives rank "
                             f"{len(req.profile.min)}")
    for i, d in enumerate(dims):
        fixed = d.dim_value if d.HasField("dim_value") else None
        if fixed and not req.profile.min[i] == req.profile.max[i] == fixed:
            raise WorkbenchError(
                f"profile: dimension {i} of {graph_input.name!r} is fixed at {fixed} in {req.onnx}, but the profile "
                "asks "
                f"{req.profile.min[i]}..{req.profile.max[i]}; export with dynamic_batch / dynamic_size or match it"
            )
    census = qdq_census(req.onnx)
    if req.precision == "int8" and census["QuantizeLinear"] == 0:
        raise WorkbenchError(
            f"{req.onnx} has no QuantizeLinear/DequantizeLinear nodes, so an INT8 build would have nothing to run in "
            "INT8: "
            "build the model.onnx of a run with a calibrate stage, or ask precision: fp16"
        )
    return {"input": graph_input.name, "census": census}


def build_engine(req: BuildRequest) -> dict:
    """Build and write the engine, its sidecar and the timing cache; returns the sidecar."""
    checked = check_request(req)
    trt = require_tensorrt()
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if req.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(req.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise WorkbenchError(f"TensorRT's ONNX parser rejected {req.onnx}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, req.workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then lists each layer's precision
    if not req.strongly_typed:
        # Weak typing: TensorRT chooses per layer among the allowed precisions.
        if req.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if req.fp16 or req.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
    if req.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    profile.set_shape(checked["input"], req.profile.min, req.profile.opt, req.profile.max)
    config.add_optimization_profile(profile)
    cache_bytes = req.timing_cache.read_bytes() if req.timing_cache and req.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise WorkbenchError(f"TensorRT could not build an engine from {req.onnx} (see its messages above)")
    with atomic_path(req.engine) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    if req.timing_cache:
        with atomic_path(req.timing_cache) as tmp:
            Path(tmp).write_bytes(bytes(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON)).get("Layers", [])
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    sidecar = {
        "engine": req.engine.name,
        "onnx": path_from(req.engine.parent, req.onnx),  # true after the run directory's rename
        "tensorrt": trt.__version__,
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "input": checked["input"],
        "profile": {"min": list(req.profile.min), "opt": list(req.profile.opt), "max": list(req.profile.max)},
        "strongly_typed": req.strongly_typed,
        "precision": req.precision,
        "sparse_weights": req.sparse_weights,
        "workspace_mib": req.workspace_mib,
        "qdq": checked["census"]["QuantizeLinear"],
        "layer_precisions": layer_precision_summary(layers),
        **req.notes,
    }
    write_json(sidecar_path(req.engine), sidecar)
    return sidecar


def sidecar_path(engine: Path) -> Path:
    return engine.with_suffix(engine.suffix + ".json")


_DATATYPES = (("int8", "Int8"), ("fp8", "FP8"), ("half", "Half"), ("fp16", "Half"), ("bfloat16", "BFloat16"),
              ("bf16", "BFloat16"), ("float", "Float"), ("fp32", "Float"), ("int32", "Int32"), ("bool", "Bool"))


def layer_precision_summary(layers: list) -> dict[str, int]:
    """Count the engine's layers by the data type of their outputs (from the inspector's JSON)."""
    counts: dict[str, int] = {}
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        outputs = layer.get("Outputs") or [{}]
        fmt = str(outputs[0].get("Format/Datatype", "unknown"))
        words = fmt.lower().replace("/", " ").split()
        kind = next((name for token, name in _DATATYPES if token in words), fmt)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def check_engine_matches(sidecar: dict, tensorrt_version: str, compute_capability: str, gpu: str) -> None:
    """An engine runs only on the TensorRT version and GPU architecture it was built for: say so before TensorRT
    fails."""
    if sidecar.get("tensorrt") != tensorrt_version:
        raise WorkbenchError(
            f"engine {sidecar.get('engine')} was built with TensorRT {sidecar.get('tensorrt')}, this machine has "
            f"{tensorrt_version}: "
            "rebuild it here (workbench build MODEL.onnx)"
        )
    if sidecar.get("compute_capability") != compute_capability:
        raise WorkbenchError(
            f"engine {sidecar.get('engine')} was built for {sidecar.get('gpu')} (compute capability "
            f"{sidecar.get('compute_capability')}), "
            f"this GPU is {gpu} ({compute_capability}): rebuild it here (workbench build MODEL.onnx)"
        )


class TensorRTRunner:
    """Runs an engine on numpy batches (the same interface as OrtRunner) through torch's CUDA tensors."""

    def __init__(self, engine_path: str | Path, name: str = "tensorrt"):
        trt = require_tensorrt()
        import torch

        self.name = name
        self.path = Path(engine_path)
        side = sidecar_path(self.path)
        if not side.is_file():
            raise WorkbenchError(f"{self.path}: no sidecar {side.name}; build engines with workbench build so their "
                                 "target is recorded")
        self.sidecar = json.loads(side.read_text())
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        check_engine_matches(self.sidecar, trt.__version__, f"{props.major}.{props.minor}", props.name)
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise WorkbenchError(f"{self.path}: TensorRT could not deserialise this engine")
        self.context = self.engine.create_execution_context()
        self.input = self.sidecar["input"]
        self.outputs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                        if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
        self.trt = trt

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input, tuple(x.shape))
        self.context.set_tensor_address(self.input, x.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            out = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise WorkbenchError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        return outs[0].float().cpu().numpy()


def build_in_run(run, opts) -> dict:
    """The build stage's TensorRT engine (stages/build.py's options `opts`), guarded where INT8."""
    from ..qdq.numeric import require_numeric
    from .guard import EngineNotBuilt, guard_in_run

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
        values.update(guard_in_run(run, opts, lambda: TensorRTRunner(req.engine, "tensorrt"), req.onnx, files, None,
                                   "tensorrt"))
    run.artifacts.tensorrt_engine = req.engine
    return values


def build_file(req, guard) -> dict:
    """`workbench build --engine tensorrt` (req: engines.FileBuild): the engine of one ONNX file; returns its
    sidecar."""
    if req.size:
        hw = tuple(req.size)
    elif len(req.dims) == 4 and req.dims[2] and req.dims[3]:
        hw = (req.dims[2], req.dims[3])
    else:
        raise WorkbenchError(f"{req.onnx} has a dynamic image size: give --size H W")
    channels = req.dims[1] if len(req.dims) > 1 and req.dims[1] else 3
    cache = Path(req.timing_cache) if req.timing_cache else default_timing_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    engine_file = req.out or _default_out(req.onnx)
    sidecar = build_engine(BuildRequest(
        onnx=req.onnx, engine=engine_file,
        profile=profile_for(channels, tuple(req.batch), [hw] * 3), precision=req.precision,
        strongly_typed=req.strongly_typed, fp16=True, workspace_mib=req.workspace_mib, timing_cache=cache,
        sparse_weights=req.sparse,
    ))
    if req.precision != "int8":
        return sidecar
    guard(lambda: TensorRTRunner(engine_file, "tensorrt"), req.onnx, [engine_file, sidecar_path(engine_file)], None,
          "tensorrt")
    return json.loads(sidecar_path(engine_file).read_text())


def _default_out(onnx: Path) -> Path:
    return onnx.with_suffix(".engine")


def _unavailable() -> str | None:
    try:
        require_tensorrt()
    except TensorRTUnavailable as e:
        return str(e)
    return None


def _makes(opts, made: set[str]) -> set[str]:
    return {"tensorrt_engine"}


def _run_files(options, values: dict) -> list[str]:
    return [f"model_{options.precision}.engine", f"model_{options.precision}.engine.json"]  # the sidecar: `verified`


def _restore(run, options, values: dict) -> bool:
    run.artifacts.tensorrt_engine = run.path(f"model_{options.precision}.engine")
    return True


def _report(b: dict) -> list[str]:
    return [f"`{b['engine_file']}`: TensorRT {b['tensorrt']} on {b['gpu']} (compute capability "
            f"{b['compute_capability']}), {'strongly' if b['strongly_typed'] else 'weakly'} typed, profile "
            f"{b['profile']}; layers by output precision: {b['layer_precisions']}. Sidecar: "
            f"`{b['engine_file']}.json`."]


def _describe(sidecar: dict, onnx: Path, out: Path | None) -> str:
    where = out or onnx.with_name(sidecar["engine"])
    return (f"engine: {where} (TensorRT {sidecar['tensorrt']}, {sidecar['gpu']}); layers by precision: "
            f"{sidecar['layer_precisions']}")


def _input_shape(path: Path) -> tuple:
    """The profile's opt shape, from the engine's sidecar (an engine takes any batch in its profile)."""
    side = sidecar_path(path)
    try:
        return tuple(json.loads(side.read_text())["profile"]["opt"][1:]), None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkbenchError(f"{path}: its sidecar {side.name} is missing or unreadable ({type(e).__name__}); "
                             "build engines with `workbench build`, which writes it") from None


ENGINE = Engine(
    name="tensorrt", title="TensorRT", section="TensorRT engine", device="NVIDIA GPUs", package="tensorrt",
    precisions=("int8", "fp16", "fp32"),
    options=("min_batch", "opt_batch", "max_batch", "min_size", "opt_size", "max_size", "strongly_typed", "fp16",
             "workspace_mib", "timing_cache", "sparse_weights"),
    suffixes=(".engine",), unavailable=_unavailable, makes=_makes, build=build_in_run, build_file=build_file,
    run_files=_run_files, restore=_restore, report=_report, describe=_describe, default_out=_default_out,
    input_shape=_input_shape,
)
