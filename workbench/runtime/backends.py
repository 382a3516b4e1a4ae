"""The one table of backends: every way the workbench runs a model, one row each.

A row names the backend (its key in metrics.json, in recipes' `stages.evaluate.backends`, in bench.json),
its title in the report, the run artifacts it needs (workbench/artifacts.py), how to open its runner on
the model or file the run holds, whether evaluate sizes and times it, whether the bench stage times it
(and the bench-only variants, such as FP16 on CUDA), and, for a graph that computes the same function as
another backend, the pair evaluate compares output by output. evaluate, the bench stage, `workbench bench`
and the report all read this table, so a new engine is its runner plus one `register_backend` row.
The table itself is light: runners (torch, ONNX Runtime, TensorRT) are imported when one is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from torch import nn

    from .runners import Runner


@dataclass(frozen=True)
class Options:
    """How runners are opened: the device PyTorch runs on, ONNX Runtime's intra-op threads."""

    device: Any = "cpu"
    threads: int | None = None


@dataclass(frozen=True)
class Variant:
    """A bench-only row of a PyTorch backend: its model in another precision or on CUDA, or the GPU's compute alone."""

    name: str
    make: Callable[[nn.Module, str], Runner]  # (the backend's model, this variant's name) -> runner
    size_factor: float = 1.0  # bytes against the backend's: 0.5 for FP16
    cuda: bool = True  # timed only where CUDA is present
    fp16: bool = False  # timed only with the bench stage's cuda_fp16


@dataclass(frozen=True)
class Comparison:
    """Two backends that compute the same function, compared output by output (evaluate) and named in the report."""

    key: str  # evaluate's metrics key
    against: str  # the reference backend
    sentence: str  # the report's, followed by "on <agreement> (max |output difference| ...)"


@dataclass(frozen=True)
class Backend:
    name: str
    title: str  # the report's
    needs: tuple[str, ...]  # artifacts (workbench.artifacts) the run must hold, all of them
    model: Callable[[Any], nn.Module | Path | None]  # the module or file it runs, from a Run (None: not available)
    opens: Callable[[Any, str, Options], Runner]  # (that model, the backend's name, options) -> runner
    sized: bool = True  # evaluate records its bytes (file or parameters); fake-quant's mean nothing for deployment
    timed: bool = True  # evaluate times it; fake-quant speed means nothing for deployment
    benched: bool = False  # the bench stage times it
    variants: tuple[Variant, ...] = ()  # bench-only rows after it
    compares: Comparison | None = None
    # An engine: the backend running the graph it was compiled from, faithfully. evaluate measures the engine's
    # agreement with it on every evaluation image and flags one outside the build guard's threshold.
    guarded_against: str | None = None
    file_suffix: str | None = None  # `workbench bench` opens files of this suffix with this row's runner
    # What a deployment would run, and in which precision: the run's summary puts the fastest INT8 engine against
    # the fastest FP32 one. None: a row that checks arithmetic (fake-quant, the faithful or TensorRT-style graph).
    deploys: Literal["fp32", "int8"] | None = None
    # Why a row that the tables show is no candidate for deployment (the console and the report say so under the
    # table): a reference that checks arithmetic, a configuration known to mislead. None: a deployable runtime.
    not_for_deployment: str | None = None
    reference: bool = False  # the FP32 model every other row's difference is taken against (one row)
    per_class: bool = False  # an INT8 row the detection report breaks down per class against the reference
    # A paragraph the report adds under the table when this row was timed (what its latency means).
    timed_note: str | None = None


BACKENDS: dict[str, Backend] = {}


def reference_name() -> str:
    """The backend every difference is taken against (the table's reference row)."""
    return next(r.name for r in BACKENDS.values() if r.reference)


def not_for_deployment(name: str) -> str | None:
    """Why the backend `name` (or a bench variant of one) is no deployment candidate; None for a deployable one."""
    if name in BACKENDS:
        return BACKENDS[name].not_for_deployment
    return None


def register_backend(row: Backend) -> Backend:
    """Add a backend to the table (evaluate, bench, `workbench bench` and the report pick it up)."""
    names = {r.name for r in BACKENDS.values()} | {v.name for r in BACKENDS.values() for v in r.variants}
    if row.name in names or any(v.name in names for v in row.variants):
        raise ValueError(f"backend {row.name!r} (or one of its variants) is registered twice")
    BACKENDS[row.name] = row
    return row


def available(run) -> list[str]:
    """The backends the run can score now, in table order."""
    return [r.name for r in BACKENDS.values()
            if all(run.artifacts.has(n) for n in r.needs) and r.model(run) is not None]


def open_runner(run, name: str, options: Options) -> Runner:
    row = BACKENDS[name]
    return row.opens(row.model(run), name, options)


def names() -> tuple[str, ...]:
    """Every backend a recipe may name (bench-only variants are not scored, so not among them)."""
    return tuple(BACKENDS)


def artifact_bytes(model: nn.Module | Path) -> int:
    """A file's bytes on disk (an OpenVINO IR's .xml with its .bin), a module's parameter bytes."""
    if isinstance(model, Path):
        from .engines import companion_bytes

        return model.stat().st_size + companion_bytes(model)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def artifact_files(model, run_dir: Path) -> list[str]:
    """The files a file backend runs, relative to `run_dir`: the model, an OpenVINO IR's .bin, and the JSON sidecar
    an engine build writes beside it (its guard's verdict); [] for a module or a file outside the run."""
    if not isinstance(model, Path):
        return []
    weights = model.with_suffix(".bin") if model.suffix == ".xml" else None
    found = [model, weights, model.with_name(model.name + ".json")]
    try:
        return [str(f.resolve().relative_to(Path(run_dir).resolve())) for f in found if f is not None and f.is_file()]
    except ValueError:  # not under the run directory
        return []


def title(name: str) -> str:
    """The report's title of a backend or bench variant; a name the table does not hold (an older run's) as is."""
    return BACKENDS[name].title if name in BACKENDS else name


def comparisons(names) -> dict[str, tuple[str, str]]:
    """key -> (graph, reference) for every same-function pair both of whose backends are among `names`."""
    return {r.compares.key: (r.name, r.compares.against) for r in BACKENDS.values()
            if r.compares and r.name in names and r.compares.against in names}


def comparison_sentences() -> dict[str, str]:
    """key -> the report's sentence, for every same-function pair in the table."""
    return {r.compares.key: r.compares.sentence for r in BACKENDS.values() if r.compares}


def bench_artifacts(run, options: Options, cuda: bool, fp16: bool) -> dict[str, tuple[Callable[[], Runner], int]]:
    """name -> (runner factory, bytes) for the bench stage: the benched rows the run has, each followed by its
    variants (CUDA ones where `cuda`, FP16 ones where `fp16`)."""
    out = {}
    for name in available(run):
        row = BACKENDS[name]
        if not row.benched:
            continue
        model = row.model(run)
        size = artifact_bytes(model)
        out[name] = (lambda row=row, model=model: row.opens(model, row.name, options), size)
        for v in row.variants:
            if (cuda or not v.cuda) and (fp16 or not v.fp16):
                out[v.name] = (lambda v=v, model=model: v.make(model, v.name), int(size * v.size_factor))
    return out


def file_artifact(path: Path, threads: int | None = None) -> tuple[Callable[[], Runner], int]:
    """(runner factory, bytes) of a model file, opened by the row that serves its suffix."""
    row = next(r for r in BACKENDS.values() if r.file_suffix == path.suffix)
    return (lambda: row.opens(path, path.name, Options(threads=threads))), artifact_bytes(path)


def file_suffixes() -> list[str]:
    """The model file suffixes `workbench bench` times, in table order."""
    return list(dict.fromkeys(r.file_suffix for r in BACKENDS.values() if r.file_suffix))


# Openers: the runner of a module or file.

def _torch(model: nn.Module, name: str, options: Options) -> Runner:
    import copy

    import torch

    from .runners import TorchRunner

    # A copy where the run's model lives elsewhere: the bench stage times on the CPU a model the run keeps on CUDA.
    here = next(model.parameters(), None)
    if here is not None and here.device.type != torch.device(options.device).type:
        model = copy.deepcopy(model).to(options.device)
    return TorchRunner(model, name, options.device)


def _ort(mode: str) -> Callable[[Path, str, Options], Runner]:
    def opens(path: Path, name: str, options: Options) -> Runner:
        from .runners import OrtRunner

        return OrtRunner(path, name, mode, options.threads)

    return opens


def _openvino(path: Path, name: str, options: Options) -> Runner:
    from .openvino import OpenVINORunner

    return OpenVINORunner(path, name, options.threads)


def _tensorrt(path: Path, name: str, options: Options) -> Runner:
    from .tensorrt import TensorRTRunner

    return TensorRTRunner(path, name)


def _cuda(model: nn.Module, half: bool = False) -> nn.Module:
    import copy

    import torch

    model = copy.deepcopy(model).cuda()
    # FP16 in channels-last memory, the layout cuDNN's tensor-core convolutions want.
    return model.half().to(memory_format=torch.channels_last) if half else model


def _cuda_fp32(model, name):
    from .runners import TorchRunner

    return TorchRunner(_cuda(model), name, "cuda")


def _cuda_fp16(model, name):
    import torch

    from .runners import TorchRunner

    return TorchRunner(_cuda(model, half=True), name, "cuda", torch.float16)


def _compute_fp32(model, name):
    from .runners import DeviceResidentRunner

    return DeviceResidentRunner(_cuda(model), name)


def _compute_fp16(model, name):
    import torch

    from .runners import DeviceResidentRunner

    return DeviceResidentRunner(_cuda(model, half=True), name, torch.float16, channels_last=True)


def _onnx(field: str) -> Callable[[Any], Path | None]:
    return lambda run: getattr(run.artifacts.onnx, field)


# The table, in the order evaluate scores and reports them (FP32 first: every backend is compared with it).
for _row in (
    Backend("pytorch_fp32", "FP32 (PyTorch)", (), lambda run: run.reference, _torch, benched=True, deploys="fp32",
            reference=True,
            not_for_deployment="eager PyTorch: the accuracy reference; its latency is not a deployment's (the FP32 "
            "graph in ONNX Runtime or OpenVINO is)",
            variants=(Variant("pytorch_fp32_cuda", _cuda_fp32),
                      Variant("pytorch_fp32_cuda_compute", _compute_fp32),
                      Variant("pytorch_fp16_cuda", _cuda_fp16, size_factor=0.5, fp16=True),
                      Variant("pytorch_fp16_cuda_compute", _compute_fp16, size_factor=0.5, fp16=True))),
    Backend("pytorch_fp32_pruned", "FP32 pruned (PyTorch)", ("pruned",), lambda run: run.artifacts.pruned_fp32,
            _torch),
    Backend("pytorch_int8", "INT8 fake-quant (PyTorch)", ("quantized",), lambda run: run.model, _torch,
            sized=False, timed=False, per_class=True,
            not_for_deployment="INT8 simulated in float32: what the export is checked against"),
    Backend("pytorch_int8_ptq", "INT8 PTQ before QAT, fake-quant (PyTorch)", ("ptq",),
            lambda run: run.artifacts.ptq_model, _torch, sized=False, timed=False,
            not_for_deployment="the PTQ model QAT started from, for comparison"),
    Backend("ort_fp32", "FP32 (ONNX Runtime)", ("onnx_fp32",), _onnx("fp32"), _ort("default"), benched=True,
            deploys="fp32"),
    Backend("ort_fp32_pruned", "FP32 pruned (ONNX Runtime)", ("onnx_pruned_fp32",), _onnx("pruned_fp32"),
            _ort("default"), benched=True),
    Backend("ort_int8_faithful", "INT8 Q/DQ (ONNX Runtime, faithful: TensorRT arithmetic)", ("quantized", "onnx"),
            _onnx("model"), _ort("faithful"), per_class=True, not_for_deployment="the reference: TensorRT's "
            "arithmetic computed exactly by ONNX Runtime with its optimisations off, slowly", compares=Comparison(
                "ort_faithful_vs_fakequant", "pytorch_int8",  # the export is the fake-quant model
                "The faithful ONNX Runtime execution agrees with the fake-quant model")),
    Backend("ort_int8_default", "INT8 Q/DQ (ONNX Runtime, default optimisations on the TensorRT-style graph)",
            ("quantized", "onnx"), _onnx("model"), _ort("default"), benched=True, file_suffix=".onnx",
            not_for_deployment="the TensorRT-style graph is made for TensorRT: ONNX Runtime's default optimisations "
            "run it on integer kernels whose u8 x s8 sums saturate on CPUs without VNNI, and fuse it differently, so "
            "its accuracy can fall far below the faithful graph's; model_int8_ort.onnx is the ONNX Runtime file",
            timed_note="The TensorRT-style Q/DQ graph keeps FP32 weights behind DequantizeLinear and Relu between Conv "
            "and QuantizeLinear, which ONNX Runtime cannot fuse into its integer kernels: it is the artifact for "
            "TensorRT, and its ONNX Runtime latency is not an INT8 engine's. The CPU deployment artifacts are the "
            "deployable INT8 rows (the ONNX Runtime flavour, the OpenVINO engine where built)."),
    Backend("ort_int8_native", "INT8 ONNX Runtime flavour (model_int8_ort.onnx, ORT integer kernels)",
            ("quantized", "ort_int8"), _onnx("ort_int8"), _ort("default"), benched=True, deploys="int8",
            per_class=True,
            compares=Comparison(
                "ort_native_vs_faithful", "ort_int8_faithful",  # the ORT flavour is the TensorRT-style graph
                "The ONNX Runtime flavour (integer kernels) agrees with the faithful TensorRT-style graph")),
    Backend("ort_int8_ptq", "INT8 PTQ before QAT (ONNX Runtime, faithful)", ("quantized", "onnx_ptq"),
            _onnx("ptq"), _ort("faithful"), not_for_deployment="the PTQ graph QAT started from, for comparison"),
    Backend("tensorrt", "TensorRT engine", ("tensorrt_engine",), lambda run: run.artifacts.tensorrt_engine, _tensorrt,
            benched=True, file_suffix=".engine", deploys="int8", guarded_against="ort_int8_faithful", per_class=True),
    Backend("ort_openvino_graph", "INT8 Q/DQ as OpenVINO is given it (model_openvino_int8.onnx, ONNX Runtime, "
            "faithful)", ("openvino_int8_graph",), lambda run: run.artifacts.openvino_int8_graph, _ort("faithful"),
            sized=False, timed=False, not_for_deployment="the reference the OpenVINO engine is checked against",
            compares=Comparison(
                "openvino_conversion_vs_faithful", "ort_int8_faithful",  # u8 activations, the CPU's weight bits
                "The graph OpenVINO is compiled from (u8 activations, this CPU's weight bits) agrees with the faithful "
                "graph")),
    Backend("openvino_fp32", "FP32 (OpenVINO)", ("openvino_fp32",), lambda run: run.artifacts.openvino_fp32,
            _openvino, benched=True, deploys="fp32"),
    Backend("openvino_int8", "INT8 OpenVINO (compiled from the Q/DQ graph, integer kernels)", ("openvino_int8",),
            lambda run: run.artifacts.openvino_int8, _openvino, benched=True, file_suffix=".xml", deploys="int8",
            guarded_against="ort_openvino_graph", per_class=True,
            compares=Comparison("openvino_vs_faithful", "ort_openvino_graph",
                                "The OpenVINO INT8 engine agrees with the graph it was compiled from")),
):
    register_backend(_row)
assert sum(r.reference for r in BACKENDS.values()) == 1, "the backend table needs exactly one reference row"
