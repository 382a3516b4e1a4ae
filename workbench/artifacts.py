"""What stages hand on to later stages: one typed record, and the names stages declare their needs by.

A stage reads the artifacts earlier stages made and adds its own; its registration (stages/registry.py)
says which it needs, which it makes and which it cannot follow. `stages.registry.order_problems` walks a
recipe with those declarations before anything runs (`workbench validate`, and `run` before it loads the
model), and resume.py fills the same record back from a run directory. Everything a stage hands on lives
here, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from torch import nn

    from .quant.ptq import QuantResult
    from .runtime.guard import GuardPolicy

# The names a stage declares it needs or makes. Backends (runtime/backends.py) name them too: keep them stable.
Artifact = Literal[
    "quantized", "pruned", "pruned_file", "ptq", "onnx", "onnx_fp32", "onnx_pruned_fp32", "onnx_ptq", "ort_int8",
    "tensorrt_engine", "openvino_int8", "openvino_int8_graph", "openvino_fp32", "sensitivity",
]
ARTIFACTS: tuple[str, ...] = get_args(Artifact)

# What each is and which stage makes it, as an error message names them.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "quantized": ("a calibrated model", "calibrate"),
    "pruned": ("a pruned model", "prune"),
    "pruned_file": ("pruned_model.pt", "prune"),
    "ptq": ("the PTQ model kept before QAT trains it", "qat"),
    "onnx": ("an exported ONNX graph", "export"),
    "onnx_fp32": ("the FP32 graph (model_fp32.onnx, or model.onnx of an unquantized model)", "export"),
    "onnx_pruned_fp32": ("the pruned FP32 graph model_pruned_fp32.onnx (after prune and calibrate, fp32: true)",
                         "export"),
    "onnx_ptq": ("the PTQ graph model_ptq.onnx (after qat)", "export"),
    "ort_int8": ("the ONNX Runtime flavour model_int8_ort.onnx (of a calibrated model, ort_int8: true)", "export"),
    "tensorrt_engine": ("a TensorRT engine", "build (engine: tensorrt)"),
    "openvino_int8": ("an OpenVINO INT8 model", "build (engine: openvino)"),
    "openvino_int8_graph": ("the ONNX graph the OpenVINO INT8 model was compiled from", "build (engine: openvino)"),
    "openvino_fp32": ("an OpenVINO FP32 model", "build (engine: openvino, after export with fp32)"),
    "sensitivity": ("the sensitivity table", "sensitivity"),
}
assert set(DESCRIPTIONS) == set(ARTIFACTS)


@dataclass
class OnnxFiles:
    """The ONNX files export wrote; None where it wrote no such file."""

    model: Path  # the run's model: Q/DQ when it was quantized, FP32 otherwise
    fp32: Path | None = None  # the FP32 graph: model_fp32.onnx, or model.onnx itself when the model is not quantized
    pruned_fp32: Path | None = None
    ptq: Path | None = None
    ort_int8: Path | None = None


@dataclass
class Artifacts:
    """The in-memory hand-over between stages; None until the stage that makes it ran."""

    quant: QuantResult | None = None  # set by calibrate: run.model is quantized from then on
    pruned_fp32: nn.Module | None = None  # run.model itself until calibrate quantizes it, then a copy
    pruned_file: Path | None = None
    ptq_model: nn.Module | None = None
    onnx: OnnxFiles | None = None
    tensorrt_engine: Path | None = None
    openvino_int8: Path | None = None  # the compiled IR (.xml; .bin, .blob and .json beside it)
    openvino_int8_graph: Path | None = None  # the ONNX it was compiled from: its arithmetic, the guard's reference
    openvino_fp32: Path | None = None
    engine_guard: GuardPolicy | None = None  # the threshold the build's guard held engines to (evaluate checks it)
    sensitivity: list[dict[str, Any]] | None = None

    def has(self, name: Artifact) -> bool:
        """Whether the artifact `name` was made (a stage's declared need is met)."""
        onnx = self.onnx
        present = {
            "quantized": self.quant is not None,
            "pruned": self.pruned_fp32 is not None,
            "pruned_file": self.pruned_file is not None,
            "ptq": self.ptq_model is not None,
            "onnx": onnx is not None,
            "onnx_fp32": onnx is not None and onnx.fp32 is not None,
            "onnx_pruned_fp32": onnx is not None and onnx.pruned_fp32 is not None,
            "onnx_ptq": onnx is not None and onnx.ptq is not None,
            "ort_int8": onnx is not None and onnx.ort_int8 is not None,
            "tensorrt_engine": self.tensorrt_engine is not None,
            "openvino_int8": self.openvino_int8 is not None,
            "openvino_int8_graph": self.openvino_int8_graph is not None,
            "openvino_fp32": self.openvino_fp32 is not None,
            "sensitivity": self.sensitivity is not None,
        }
        if name not in present:
            raise KeyError(f"unknown artifact {name!r}; artifacts: {', '.join(ARTIFACTS)}")
        return present[name]

    def made(self) -> set[str]:
        return {name for name in ARTIFACTS if self.has(name)}

    def move(self, old: Path, new: Path) -> None:
        """Point every file under directory `old` to its place under `new` (a resumed run's directory, renamed
        after its stages were restored from it)."""

        def moved(path):
            return new / path.relative_to(old) if isinstance(path, Path) and path.is_relative_to(old) else path

        for record in (self, self.onnx) if self.onnx is not None else (self,):
            for f in fields(record):
                setattr(record, f.name, moved(getattr(record, f.name)))
