"""The numbers every engine trusts in a Q/DQ graph: checked before anything compiles or times it.

An engine takes a QuantizeLinear's scale and zero point as given: a scale of 0, -1, NaN or Inf compiles
(OpenVINO reported "70 of 70 Convolution in u8" for such a file) and computes garbage. These checks are
engine-agnostic, unlike TensorRT's rules (trt_rules.py, which also reports them for `workbench check-onnx`):

- `positive_scale`: every Q/DQ scale is finite and greater than zero.
- `zero_point_range`: every zero point is an 8- or 16-bit integer (its value is then in its type's range) of the
  scale's shape (one per channel where the scale is per channel).
- `finite_constant`: no weight, bias or scale holds NaN, and none read as a weight holds Inf.

`build` (stage and CLI), `quantize` (through the build stage) and `bench` refuse a graph that fails one, naming
the node (`require_numeric`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from .graph import GraphIndex, scope_to_module

ZERO_POINT_TYPES = (np.int8, np.uint8, np.int16, np.uint16)
NUMERIC_RULES = ("positive_scale", "zero_point_range", "finite_constant")


@dataclass(frozen=True)
class Violation:
    """A finding in a Q/DQ graph (these checks, and TensorRT's rules in trt_rules.py): rule, node, module, why."""

    rule: str
    node: str
    module: str | None
    message: str

    def __str__(self) -> str:
        where = f" (module {self.module})" if self.module else ""
        return f"[{self.rule}] {self.node}{where}: {self.message}"

    def as_dict(self) -> dict:
        return asdict(self)


def scale_problem(scale: np.ndarray) -> str | None:
    """What is wrong with a Q/DQ scale, or None."""
    if np.all(np.isfinite(scale)) and np.all(scale > 0):
        return None
    bad = scale[~(np.isfinite(scale) & (scale > 0))] if scale.ndim else np.asarray([scale])
    return (f"scale has values <= 0 or not finite ({', '.join(f'{v:.3g}' for v in np.unique(bad)[:4])}; min "
            f"{np.nanmin(scale) if np.any(np.isfinite(scale)) else np.min(scale):.3g})")


def zero_point_problem(zero_point: np.ndarray, scale: np.ndarray | None) -> str | None:
    """What is wrong with a Q/DQ zero point (its type and shape, against the scale's), or None."""
    if zero_point.dtype.type not in ZERO_POINT_TYPES:
        return (f"zero point is {zero_point.dtype} (values {np.unique(zero_point)[:4].tolist()}); Q/DQ zero points are "
                "int8 or uint8 (int16/uint16)")
    if scale is not None and zero_point.size != scale.size:
        return f"zero point has {zero_point.size} values for {scale.size} scales"
    return None


def numeric_violations(model) -> list:
    """Every violation of this module's rules (trt_rules.Violation), in graph order; [] for sound numbers."""
    from .export import first_nonfinite_constant

    g = GraphIndex(model)
    out = []
    for n in g.nodes:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = g.constant(n.input[1]) if len(n.input) > 1 else None
        where = n.name or n.output[0]
        if scale is not None and (problem := scale_problem(scale)):
            out.append(Violation("positive_scale", where, scope_to_module(n.name), problem))
        zero_point = g.constant(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zero_point is not None and (problem := zero_point_problem(zero_point, scale)):
            out.append(Violation("zero_point_range", where, scope_to_module(n.name), problem))
    found = first_nonfinite_constant(model)
    if found is not None:
        name, reader, nan, inf = found
        out.append(Violation("finite_constant", reader, scope_to_module(reader),
                             f"constant {name} holds {nan} NaN and {inf} Inf values"))
    return out


def require_numeric(model_or_path, what: str | Path | None = None) -> None:
    """WorkbenchError (exit 2) naming each node whose scale, zero point or constants an engine cannot compute with."""
    from .export import load_onnx

    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    found = numeric_violations(model)
    if not found:
        return
    listed = "; ".join(str(v) for v in found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
    raise WorkbenchError(f"{what or model_or_path}: {len(found)} Q/DQ node(s) with numbers no engine can compute "
                         f"with: {listed}. Nothing was compiled; export the graph again from a calibrated model "
                         "(`workbench check-onnx` lists every finding)")
