"""OpenVINO: the CPU INT8 engine. It compiles a Q/DQ ONNX graph into its own integer kernels.

`compile_model_file` reads an ONNX file, saves it as OpenVINO IR (.xml/.bin, weights kept in FP32: the
Q/DQ nodes say what is INT8), compiles it for this CPU, exports the compiled blob where OpenVINO supports
it, and writes a JSON sidecar: the OpenVINO version, the CPU's model and the instruction sets its INT8
kernels depend on (hardware/cpu.py), and each compute layer's runtime precision read from the compiled
model's runtime graph ("60 of 60 convolutions run in u8"). `OpenVINORunner` runs an IR (or ONNX) file;
`check_sidecar` refuses an artifact compiled by another OpenVINO version or on a CPU with instruction sets
this one lacks, by name.

Nothing here runs without the `openvino` package: `require_openvino` says what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from ..hardware.cpu import cpu_info
from ..io import path_from, write_bytes, write_json
from .engines import Engine

INSTALL_HINT = "pip install openvino (Apache-2.0, CPU wheels for x86-64 and Arm); the run's ONNX files do not need it"
# Runtime-graph layer types that do the multiply-accumulates: the ones whose precision says "INT8 or not".
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
INT8_PRECISIONS = ("u8", "i8")


class OpenVINOUnavailable(WorkbenchError):
    """`openvino` does not import."""


def require_openvino():
    """The openvino module, or OpenVINOUnavailable saying what to install."""
    try:
        import openvino
    except ImportError as e:
        raise OpenVINOUnavailable(f"OpenVINO is not installed ({e}): {INSTALL_HINT}") from None
    return openvino


def version() -> str:
    return require_openvino().get_version()


def sidecar_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def artifact_files(xml: Path) -> list[Path]:
    """Every file `compile_model_file` writes for one IR."""
    return [xml, xml.with_suffix(".bin"), xml.with_suffix(".blob"), sidecar_path(xml)]


def _config(threads: int | None) -> dict:
    # f32 inference precision: on CPUs with AMX or AVX-512 BF16 OpenVINO would otherwise run the float
    # layers in bf16, which is not the arithmetic the faithful graph (and TensorRT's FP32 layers) does.
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def read_onnx(path: Path):
    """The ONNX graph as an OpenVINO model; a graph OpenVINO cannot read is refused with its frontend's message
    (which names the node)."""
    ov = require_openvino()
    from ..qdq.export import load_onnx

    proto = load_onnx(path)  # a missing, empty or truncated file gets the workbench's message first
    try:
        return ov.Core().read_model(str(path))
    except RuntimeError as e:
        # OpenVINO's message starts with where in its sources it failed; the lines after say what.
        said = " ".join(line.strip() for line in str(e).splitlines()
                        if line.strip() and not line.startswith(("Exception from", "Check ")))
        nodes = [n.name or n.output[0] for n in proto.graph.node
                 if f"{n.domain}.{n.op_type}" in said or f" {n.op_type}" in said]
        where = f" (nodes: {', '.join(nodes[:5])})" if nodes else ""
        raise WorkbenchError(f"OpenVINO cannot read {path}{where}: {said or type(e).__name__}") from None


def input_dims(xml: Path) -> list[int | None]:
    """The IR's first input's dimensions, None where dynamic."""
    shape = require_openvino().Core().read_model(str(xml)).inputs[0].get_partial_shape()
    return [d.get_length() if d.is_static else None for d in shape]


def layer_precisions(compiled) -> dict[str, dict[str, int]]:
    """layer type -> {runtime precision: count} for the compute layers of a compiled model's runtime graph."""
    counts: dict[str, Counter] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = str(info["layerType"].value) if "layerType" in info else ""
        if kind in COMPUTE_LAYERS:
            precision = str(info["runtimePrecision"].value).lower() if "runtimePrecision" in info else "?"
            counts.setdefault(kind, Counter())[precision] += 1
    return {kind: dict(c) for kind, c in counts.items()}


def int8_summary(precisions: dict[str, dict[str, int]]) -> str:
    """'60 of 60 Convolution run in u8' for each compute layer type."""
    parts = []
    for kind, by_precision in precisions.items():
        total = sum(by_precision.values())
        int8 = {p: n for p, n in by_precision.items() if p in INT8_PRECISIONS}
        how = " and ".join(f"{n} in {p}" for p, n in int8.items()) or "none in INT8"
        parts.append(f"{sum(int8.values())} of {total} {kind} ({how})")
    return "; ".join(parts) or "no compute layers"


@dataclass(kw_only=True)
class CompileRequest:
    """What to compile and where to write it (IR .xml/.bin, the blob, the sidecar)."""

    onnx: Path
    xml: Path
    threads: int | None = None
    notes: dict | None = None  # recorded in the sidecar as given (which graph was chosen, and why)


def save_ir(model, xml: Path) -> None:
    """Write the model as IR (.xml and its .bin), FP32 weights, atomically: both files are written into a temporary
    folder beside `xml` (save_model wants a .xml name and derives the .bin from it), then moved, .bin first."""
    ov = require_openvino()
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", dir=xml.parent))
    try:
        ov.save_model(model, str(tmp / xml.name), compress_to_fp16=False)
        os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(tmp / xml.name, xml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compile_model_file(req: CompileRequest) -> dict:
    """Save the ONNX graph as IR, compile it for this CPU, export the blob; write and return the sidecar."""
    ov = require_openvino()
    model = read_onnx(req.onnx)
    save_ir(model, req.xml)
    compiled = ov.Core().compile_model(str(req.xml), "CPU", _config(req.threads))
    blob = None
    try:
        data = compiled.export_model()
    except RuntimeError:  # a plugin that cannot export: the IR is the artifact
        data = None
    if data:
        blob = req.xml.with_suffix(".blob")
        write_bytes(blob, data.getvalue() if hasattr(data, "getvalue") else bytes(data))  # BytesIO in 2024+
    precisions = layer_precisions(compiled)
    sidecar = {
        "engine": "openvino",
        "ir": req.xml.name,
        "blob": blob.name if blob else None,
        "onnx": path_from(req.xml.parent, req.onnx),  # true after the run directory's rename
        "openvino": ov.get_version(),
        "cpu": cpu_info().as_dict(),
        "layer_precisions": precisions,
        "int8": int8_summary(precisions),
        **(req.notes or {}),
    }
    write_json(sidecar_path(req.xml), sidecar)
    return sidecar


def check_sidecar(artifact: Path) -> dict | None:
    """The artifact's sidecar, refused by name when it was compiled by another OpenVINO or on a CPU whose INT8
    instruction sets this one lacks (its kernels were chosen for those). None when there is no sidecar (an IR
    or ONNX file from elsewhere: compiled here, for this CPU)."""
    path = sidecar_path(artifact)
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_text())
        built_version, built_flags = sidecar["openvino"], set(sidecar["cpu"]["flags"])
        built_cpu = sidecar["cpu"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkbenchError(f"{artifact}: its sidecar {path.name} is unreadable ({type(e).__name__}); compile it "
                             "again with `workbench build MODEL.onnx --engine openvino`") from None
    here = cpu_info()
    if built_version != version():
        raise WorkbenchError(f"{artifact} was compiled by OpenVINO {built_version}, this is OpenVINO {version()}: "
                             "compile the ONNX again here (workbench build MODEL.onnx --engine openvino)")
    if missing := sorted(built_flags - set(here.flags)):
        raise WorkbenchError(f"{artifact} was compiled on {built_cpu} with {', '.join(missing)}, which this CPU "
                             f"({here.model}) lacks: its INT8 kernels were chosen for those instructions; compile "
                             "the ONNX again here (workbench build MODEL.onnx --engine openvino)")
    return sidecar


class OpenVINORunner:
    """Runs an IR (.xml) or ONNX file on the CPU. Each input shape is compiled once, as a static shape: OpenVINO's
    kernels for a fixed batch are faster than for a dynamic one, and a runner sees two or three shapes."""

    def __init__(self, path: str | Path, name: str, threads: int | None = None):
        self.path = Path(path)
        self.name = name
        if self.path.suffix == ".xml":
            check_sidecar(self.path)
        self._core = require_openvino().Core()
        self._model = read_onnx(self.path) if self.path.suffix == ".onnx" else self._core.read_model(str(self.path))
        self._config = _config(threads)
        self._compiled: dict[tuple[int, ...], object] = {}

    def _for_shape(self, shape: tuple[int, ...]):
        if shape not in self._compiled:
            model = self._model.clone()
            model.reshape({model.inputs[0].get_any_name(): list(shape)})
            self._compiled[shape] = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        return self._compiled[shape]

    def __call__(self, batch) -> np.ndarray:
        if hasattr(batch, "detach"):
            batch = batch.detach().cpu().numpy()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        request = self._for_shape(tuple(batch.shape))
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data, copy=True)


def run_tapped(path: Path, batch: np.ndarray, threads: int | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX file once on `batch`; every output by each of its tensor names (for compare.graph_divergence)."""
    core = require_openvino().Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): list(batch.shape)})
    compiled = core.compile_model(model, "CPU", _config(threads))
    results = compiled({0: np.ascontiguousarray(batch, dtype=np.float32)})
    return {name: np.asarray(value) for port, value in results.items() for name in port.get_names()}


def weights_for_cpu(requested: str = "auto") -> tuple[str, str]:
    """(weights, why) of the u8 graph OpenVINO compiles: 8-bit (s8) where this CPU's INT8 dot products accumulate in
    32 bits (VNNI, AMX; Arm), 7 bits where a 16-bit pairwise sum could saturate (x86 without VNNI: VPMADDUBSW)."""
    from ..hardware import cpu

    if requested != "auto":
        return requested, f"{requested} weights, as asked"
    if cpu.cpu_info().int8_dot:
        return "s8", "8-bit weights: this CPU's INT8 dot products (VNNI/AMX) accumulate in 32 bits"
    return "reduce_range", "7-bit weights where a 16-bit sum could saturate (no VNNI on this CPU)"


def int8_graph(model: Path, out: Path, graph: str = "u8", weights: str = "auto",
               arithmetic=None) -> tuple[Path, dict]:
    """The INT8 graph OpenVINO compiles for this CPU, and the sidecar's note of which it is and why.

    OpenVINO takes signed 8-bit activations as they are only on CPUs with AMX; elsewhere its low-precision
    transformations shift them to u8 (+128), and a signed Q/DQ after a Concat then loses its scale (yolov5n's
    mAP 0.31 -> 0.03 on an AVX-512 VNNI EPYC; docs/BENCHMARKS.md). The same ranges with u8 activations (zero point
    128: exactly the values of signed 8-bit), written to `out`, avoid that rewrite on every CPU; their weights
    follow weights_for_cpu. `out` is also the guard's reference: the arithmetic the engine is meant to compute.
    """
    from ..qdq.ort_flavour import to_ort_int8

    if arithmetic is not None and arithmetic.target == "openvino":  # calibrated and exported in OpenVINO's arithmetic
        note = f"Compiled from {model.name} as exported: the target's arithmetic ({arithmetic.describe()}); " \
               f"{arithmetic.why}."
        from ..hardware import cpu

        if arithmetic.weight_bits == 8 and not cpu.cpu_info().int8_dot:  # through the module: a stub reaches it
            note += (" This CPU has no VNNI: its kernels sum u8 x s8 products in 16 bits, which 8-bit weights can "
                     "saturate (the guard decides; target.cpu: avx2 quantizes for it).")
        return model, {"graph": "as exported (target: openvino)", "weights": f"s{arithmetic.weight_bits}",
                       "graph_note": note}
    if graph == "tensorrt_style":
        return model, {"graph": "tensorrt_style", "graph_note": f"Compiled from {model.name} as exported (signed "
                       "activations), as asked: OpenVINO computes a signed Q/DQ after a Concat wrongly on CPUs "
                       "without AMX."}
    chosen, why = weights_for_cpu(weights)
    to_ort_int8(model, out, chosen)
    return out, {"graph": f"u8 activations, {chosen} weights", "weights": chosen,
                 "graph_note": (f"Compiled from {out.name}: {model.name}'s ranges with unsigned activations (zero "
                                f"point 128 where signed), which OpenVINO computes faithfully on every CPU; {why}.")}


def exported_arithmetic(model: Path):
    """The target arithmetic the export recorded in the graph's metadata (`workbench.target`; only targets other
    than tensorrt write it), or None. The file is untrusted: a value that is not an arithmetic the workbench writes
    is refused with the field named."""
    import json

    from ..qdq.export import load_onnx
    from ..targets import Arithmetic

    found = [p.value for p in load_onnx(model).metadata_props if p.key == "workbench.target"]
    if not found:
        return None
    if len(found[0]) > 4096:  # an arithmetic is a few hundred bytes; a deep nest would exhaust the JSON parser
        raise WorkbenchError(f"{model}: metadata workbench.target is {len(found[0])} characters, not an arithmetic "
                             "the workbench writes; export the model again")
    try:
        return Arithmetic.from_dict(json.loads(found[0]))
    except (ValueError, TypeError, RecursionError) as e:
        raise WorkbenchError(f"{model}: metadata workbench.target is not {e}; export the model again") from None


def compile_int8(model: Path, xml: Path, graph_out: Path, guard, graph: str = "u8",
                 weights: str = "auto", arithmetic=None) -> tuple[dict, Path, dict]:
    """The INT8 IR of the Q/DQ graph `model` for this CPU, kept only once `guard` (engines.Guard) passes it: its layout
    `graph` (int8_graph; written to `graph_out` unless that layout is `model` itself) compiled to `xml`. Returns (the
    IR's sidecar as compiled, the graph compiled, the guard's record). The build stage and `workbench build` both
    compile through here, so both honour the layout and weights asked for and guard against the graph compiled."""
    compiled, notes = int8_graph(model, graph_out, graph, weights, arithmetic)
    converted = [compiled] if compiled != model else []  # never the caller's own file: a refusal removes these
    try:
        sidecar = compile_model_file(CompileRequest(onnx=compiled, xml=xml, notes=notes))
    except BaseException:
        for path in converted:
            path.unlink(missing_ok=True)
        raise
    record = guard(lambda: OpenVINORunner(xml, "openvino_int8"), compiled, artifact_files(xml) + converted,
                   run_tapped, "openvino_int8")
    return sidecar, compiled, record


def build_in_run(run, opts) -> dict:
    """The build stage's OpenVINO IRs (stages/build.py's options `opts`): the FP32 baseline and the guarded INT8."""
    from ..qdq.numeric import require_numeric
    from .guard import EngineNotBuilt, guard_in_run

    try:
        require_openvino()
    except OpenVINOUnavailable as e:
        raise EngineNotBuilt(str(e)) from None
    onnx = run.artifacts.onnx
    values: dict = {"engine": "openvino", "built": True, "openvino": version()}
    if onnx.fp32 is not None:  # the baseline the INT8 engine's speed is measured against
        require_numeric(onnx.fp32)
        xml = run.path("model_openvino_fp32.xml")
        values["fp32"] = compile_model_file(CompileRequest(onnx=onnx.fp32, xml=xml))
        run.artifacts.openvino_fp32 = xml
    if opts.precision == "int8":
        require_numeric(onnx.model)
        xml = run.path("model_openvino_int8.xml")
        values["int8"], graph, guarded = compile_int8(
            onnx.model, xml, run.path("model_openvino_int8.onnx"), lambda *a: guard_in_run(run, opts, *a),
            opts.openvino_graph, opts.openvino_weights, run.artifacts.quant.arithmetic)
        values.update(guarded)
        run.artifacts.openvino_int8, run.artifacts.openvino_int8_graph = xml, graph
    return values


def build_file(req, guard) -> dict:
    """`workbench build --engine openvino` (req: engines.FileBuild): the IR of one ONNX file; returns its sidecar."""
    from ..qdq.graph import qdq_census

    if req.precision == "int8" and qdq_census(req.onnx)["QuantizeLinear"] == 0:
        raise WorkbenchError(f"{req.onnx} has no QuantizeLinear/DequantizeLinear nodes, so an INT8 build would "
                             "run in float: build the model.onnx of a run with a calibrate stage, or ask "
                             "--precision fp32")
    xml = req.out or _default_out(req.onnx)
    if xml.suffix != ".xml":  # OpenVINO writes an IR only under .xml (its .bin beside it)
        xml = xml.with_name(xml.name + ".xml")
    if req.precision != "int8":
        return compile_model_file(CompileRequest(onnx=req.onnx, xml=xml))
    arithmetic = exported_arithmetic(req.onnx)
    if arithmetic is not None and arithmetic.target == "openvino" and (
            req.openvino_graph != "u8" or req.openvino_weights != "auto"):
        raise WorkbenchError(f"{req.onnx} was calibrated and exported for target: openvino ({arithmetic.describe()}): "
                             "it is compiled as it is, so drop --openvino-graph and --openvino-weights")
    compile_int8(req.onnx, xml, xml.with_name(xml.stem + "_graph.onnx"), guard, req.openvino_graph,
                 req.openvino_weights, arithmetic)
    return json.loads(sidecar_path(xml).read_text())


def _default_out(onnx: Path) -> Path:
    return onnx.with_name(f"{onnx.stem}_openvino.xml")


def _unavailable() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("openvino") is not None else f"OpenVINO is not installed: {INSTALL_HINT}"


def _makes(opts, made: set[str]) -> set[str]:
    out = {"openvino_int8", "openvino_int8_graph"} if opts.precision == "int8" else set()
    return out | ({"openvino_fp32"} if "onnx_fp32" in made else set())


def _run_files(options, values: dict) -> list[str]:
    # The IR, its weights and its sidecar; the blob (a compiled cache) where the compile left one; and the converted
    # graph the INT8 engine was compiled from, which evaluate measures the engine against.
    files = [p.name for key in ("int8", "fp32") if key in values
             for p in artifact_files(Path(f"model_openvino_{key}.xml")) if p.suffix != ".blob"]
    int8 = values.get("int8")
    # only where the engine was compiled from that conversion (not from model.onnx itself: the tensorrt_style layout,
    # or the openvino target's graph as exported)
    if isinstance(int8, dict) and Path(str(int8.get("onnx", ""))).name == "model_openvino_int8.onnx":
        files.append("model_openvino_int8.onnx")
    return files


def _restore(run, options, values: dict) -> bool:
    """The IRs, each with its sidecar, which says it was compiled by this OpenVINO for this CPU (else: compile
    again)."""
    found = {}
    for key in ("int8", "fp32"):
        if key in values:
            xml = run.path(f"model_openvino_{key}.xml")
            try:
                check_sidecar(xml)
            except WorkbenchError:  # another OpenVINO or CPU since: compile again
                return False
            found[key] = xml
    run.artifacts.openvino_int8, run.artifacts.openvino_fp32 = found.get("int8"), found.get("fp32")
    if "int8" in found:  # the graph it was compiled from (model.onnx itself for the TensorRT-style layout)
        converted = run.path("model_openvino_int8.onnx")
        run.artifacts.openvino_int8_graph = converted if converted.is_file() else run.artifacts.onnx.model
    return True


def _report(b: dict) -> list[str]:
    cpu = (b.get("int8") or b.get("fp32"))["cpu"]
    text = [f"OpenVINO {b['openvino']} on {cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags'])})."]
    for key in ("int8", "fp32"):
        if key in b:
            side = b[key]
            text.append(f"- `{side['ir']}` (from `{Path(side['onnx']).name}`): {side['int8']}."
                        + (f" {side['graph_note']}" if side.get("graph_note") else ""))
    return text


def _describe(sidecar: dict, onnx: Path, out: Path | None) -> str:
    where = out or onnx.with_name(sidecar["ir"])
    return f"OpenVINO IR: {where} (OpenVINO {sidecar['openvino']}, {sidecar['cpu']['model']}); {sidecar['int8']}"


def _input_shape(path: Path) -> tuple:
    fixed = input_dims(path)
    return (tuple(fixed[1:]) if len(fixed) > 1 and all(fixed[1:]) else None), (fixed[0] if fixed else None)


ENGINE = Engine(
    name="openvino", title="OpenVINO", section="OpenVINO (CPU)", device="the CPU", package="openvino",
    precisions=("int8", "fp32"), options=("openvino_graph", "openvino_weights"), suffixes=(".xml", ".bin"),
    unavailable=_unavailable, makes=_makes, build=build_in_run, build_file=build_file, run_files=_run_files,
    restore=_restore, report=_report, describe=_describe, default_out=_default_out, input_shape=_input_shape,
)
