"""The ONNX Runtime flavour of a Q/DQ graph: the same calibrated ranges, laid out for ORT's integer kernels.

modelopt's export is TensorRT-style: FP32 weights followed by QuantizeLinear/DequantizeLinear,
signed 8-bit activations with zero-point 0, and the activation (Relu, Clip) between a
convolution and the next QuantizeLinear. TensorRT fuses all of that. ONNX Runtime does not:
it turns `DQ -> Conv -> Q` into QLinearConv (`DQ, DQ -> Add -> Q` into QLinearAdd) only when
the Q follows the op directly, so on that graph every convolution runs in float behind Q/DQ
overhead (measured 1.5-4x slower than FP32). `to_ort_int8` rewrites the graph:

- activations become unsigned 8-bit, ONNX Runtime's fast activation type on x86:
  - after a Relu: zero-point 0 at TensorRT's scale, and the Relu is dropped (quantization
    clamps at 0 itself). Same integers as TensorRT's graph for every value up to the
    calibrated amax; above it TensorRT clamps at amax, this graph at 2 * amax;
  - after a Clip from 0 (ReLU6): zero-point 0 over TensorRT's clipping range [0, min(c, amax)],
    255 steps instead of TensorRT's 127 (a finer grid), and the Clip is dropped;
  - anywhere else: zero-point 128 at the same scale, exactly the values of signed 8-bit;
- weights: each `Q(W)` is computed once (rounding half to even, as ONNX defines it) and stored
  as an 8-bit initializer read by a DequantizeLinear.

Weight types ("weights"):
  exact         signed 8-bit where the layer's input stays within 0..127 (after a Relu) and in depthwise
                convs, the same integers shifted to unsigned with zero-point 128 elsewhere. Never saturates
                for activations within their calibrated ranges (a value above a Relu's amax, which
                TensorRT would clamp, reaches up to 255 here and can).
  s8            signed 8-bit everywhere: ONNX Runtime's fastest U8S8 kernels.
  reduce_range  signed 8-bit where the input stays within 0..127, 7-bit elsewhere (ORT's own fix).
  auto          s8 on CPUs where U8S8 cannot saturate (VNNI, Arm), exact elsewhere.
Why: on x86 CPUs without VNNI, U8S8 multiplies through VPMADDUBSW, whose 16-bit sums of two
products saturate when activations near 255 meet weights near 127 (ONNX Runtime's quantization
docs); U8U8 widens to 16 bits first and never saturates, but is slower. reduce_range changes the
weights (7 bits), so it is not the TensorRT graph's function: measured, benchmarks/ort_int8.py.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..hardware.ort import ort_session_options
from ..io import atomic_path
from . import WeightType
from .export import check_model_file, clean_graph
from .graph import GraphIndex


@dataclass
class OrtConversion:
    path: Path
    weights: str  # the weight type used ("auto" resolved)
    weights_folded: int = 0  # QuantizeLinear of a constant, stored as 8-bit initializers
    weights_unsigned: int = 0  # of those, shifted to u8 with zero-point 128 (exact mode)
    weights_7bit: int = 0  # of those, re-quantized to 7 bits (reduce_range)
    activations_relu: int = 0  # Q/DQ pairs after a Relu: u8, zero-point 0, TensorRT's scale
    activations_clip: int = 0  # Q/DQ pairs after a Clip from 0: u8 over [0, amax], 255 steps
    activations_shifted: int = 0  # other Q/DQ pairs: u8 with zero-point 128 (same values)
    absorbed: list[str] = field(default_factory=list)  # Relu/Clip nodes removed
    fused: dict[str, int] = field(default_factory=dict)  # ops in ONNX Runtime's optimised graph

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("path", "absorbed")}
        return {"path": self.path.name, **out, "absorbed": len(self.absorbed)}


def u8s8_can_saturate() -> bool:
    """True on x86 CPUs without VNNI or AMX, where 8-bit kernels use VPMADDUBSW (16-bit saturating sums)."""
    from ..hardware.cpu import cpu_info

    return not cpu_info().int8_dot


class _Graph(GraphIndex):
    """The graph index, plus the constants the rewrite adds (written as initializers at the end)."""

    def __init__(self, model):
        super().__init__(model)
        self.added: dict[str, np.ndarray] = {}

    def add_constant(self, name: str, value: np.ndarray) -> str:
        self.added[name] = self.constants[name] = value
        return name


def _attr(node, name: str, default=None):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _quantize_constant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                       bits: int = 8) -> np.ndarray:
    """QuantizeLinear as ONNX defines it (round half to even, saturate) for a constant input."""
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(zero_point.dtype)
    lo, hi = (info.min, info.max) if bits == 8 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return np.clip(np.rint(x / scale) + zero_point.astype(np.int32), lo, hi).astype(zero_point.dtype)


def _activation_before(g: _Graph, q) -> tuple[object, float] | None:
    """(Relu/Clip node, its upper bound or inf) when the Q reads a Relu, or a Clip from 0."""
    node = g.producer.get(q.input[0])
    if node is None:
        return None
    if node.op_type == "Relu":
        return node, float("inf")
    if node.op_type == "Clip":
        named = [len(node.input) > i and bool(node.input[i]) for i in (1, 2)]
        lo = g.constant(node.input[1]) if named[0] else _attr(node, "min")
        hi = g.constant(node.input[2]) if named[1] else _attr(node, "max")
        if named[1] and hi is None:
            return None  # an upper bound computed at run time: the Clip must stay
        if lo is not None and np.asarray(lo).size == 1 and float(np.asarray(lo)) == 0.0:
            return node, float(np.asarray(hi)) if hi is not None else float("inf")
    return None


def _signed_pairs(g: _Graph) -> list[tuple]:
    """(Q, scale, zero-point, its DQ readers) for the symmetric signed Q/DQ pairs modelopt writes; anything else
    (a Q read by other ops, a DQ with other parameters or no zero-point) is left as it is."""
    pairs = []
    for q in (n for n in g.nodes if n.op_type == "QuantizeLinear"):
        scale = g.constant(q.input[1])
        zero_point = g.constant(q.input[2]) if len(q.input) > 2 else None
        if scale is None or zero_point is None or zero_point.dtype != np.int8 or np.any(zero_point != 0):
            continue
        readers = g.consumers[q.output[0]]
        if readers and q.output[0] not in g.outputs and all(r.op_type == "DequantizeLinear" and len(r.input) == 3
                                                            and r.input[1] == q.input[1] and r.input[2] == q.input[2]
                                                            for r in readers):
            pairs.append((q, scale, zero_point, readers))
    return pairs


def _move_activations_to_u8(g: _Graph, pairs: list, result: OrtConversion) -> dict[str, int]:
    """Activation Q/DQ pairs to unsigned 8-bit (see the module docstring), Relu/Clip absorbed where they can be.
    Returns DQ output -> the largest u8 value the activation takes within its calibrated range."""
    top = {}
    for q, scale, zero_point, dqs in pairs:
        if g.constant(q.input[0]) is not None:
            continue
        before = _activation_before(g, q) if scale.size == 1 else None  # per-channel activations: shifted only
        if before is not None and before[0].op_type == "Relu":
            # Within the calibrated range the values are 0..127; above it (TensorRT clamps at amax) they
            # reach 255, where U8S8 can saturate: `exact` is exact within the calibrated range.
            new_scale, largest = q.input[1], 127
            q.input[0] = before[0].input[0]  # Q clamps at zero-point 0 = 0.0: the Relu is redundant
            result.activations_relu += 1
        elif before is not None:
            amax = min(float(np.max(scale)) * 127.0, before[1])
            new_scale, largest = g.add_constant(f"{q.output[0]}_scale_u8", np.asarray(amax / 255.0, np.float32)), 255
            q.input[0] = before[0].input[0]  # Q clamps to [0, amax] within the Clip's range: redundant
            result.activations_clip += 1
        else:
            new_scale, largest = q.input[1], 255
            result.activations_shifted += 1
        zp = g.add_constant(f"{q.output[0]}_zero_point_u8",
                            np.full(zero_point.shape, 0 if before is not None else 128, np.uint8))
        q.input[1], q.input[2] = new_scale, zp
        for dq in dqs:
            dq.input[1], dq.input[2] = new_scale, zp
            top[dq.output[0]] = largest

    return top


def _fold_weights(g: _Graph, pairs: list, weights: str, top: dict[str, int], result: OrtConversion) -> set[int]:
    """Each weight's QuantizeLinear computed once into an 8-bit initializer of the chosen type; returns the ids
    of the QuantizeLinear nodes that are now redundant."""
    folded = set()
    for q, scale, zero_point, dqs in pairs:
        weight = g.constant(q.input[0])
        if weight is None:
            continue
        axis = _attr(q, "axis", 1)
        layers = [layer for dq in dqs for layer in g.consumers[dq.output[0]]]
        # Saturation needs a GEMM kernel: ORT's depthwise kernel widens first (measured: identical outputs
        # for EfficientNet-Lite0 with signed and with unsigned depthwise weights).
        depthwise = weight.ndim == 4 and weight.shape[1] == 1 and all(_attr(layer, "group", 1) > 1 for layer in layers)
        wide_input = any(top.get(layer.input[0], 255) > 127 for layer in layers) and not depthwise
        values = _quantize_constant(weight.astype(np.float32), scale, zero_point, axis)
        zp, new_scale = zero_point, q.input[1]
        if wide_input and weights == "exact":
            values = (values.astype(np.int16) + 128).astype(np.uint8)
            zp = np.full(zero_point.shape, 128, np.uint8)
            result.weights_unsigned += 1
        elif wide_input and weights == "reduce_range":
            scale7 = (scale * 127.0 / 63.0).astype(np.float32)
            values = _quantize_constant(weight.astype(np.float32), scale7, zero_point, axis, bits=7)
            new_scale = g.add_constant(f"{q.output[0]}_scale_7bit", scale7)
            result.weights_7bit += 1
        values_name = g.add_constant(f"{q.output[0]}_{values.dtype}", values)
        zp_name = g.add_constant(f"{q.output[0]}_zero_point_{zp.dtype}", zp)
        for dq in dqs:
            dq.input[0], dq.input[1], dq.input[2] = values_name, new_scale, zp_name
        folded.add(id(q))
        result.weights_folded += 1
    return folded


def to_ort_int8(src: str | Path, dst: str | Path, weights: WeightType = "auto") -> OrtConversion:
    """Write the ONNX Runtime flavour of the Q/DQ graph `src` to `dst` (see the module docstring)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise ExportError(f"{src}: not an ONNX model ({e})") from None
    if weights == "auto":
        weights = "exact" if u8s8_can_saturate() else "s8"
    model = clean_graph(model)
    g = _Graph(model)
    result = OrtConversion(Path(dst), weights)

    pairs = _signed_pairs(g)
    if not pairs:
        raise ExportError(f"{src}: no signed INT8 Q/DQ pairs: export a calibrated model (the ONNX Runtime flavour "
                          "re-lays an INT8 graph; an FP32 graph has nothing to convert)")

    top = _move_activations_to_u8(g, pairs, result)  # first: the weights' type depends on the activations
    folded = _fold_weights(g, pairs, weights, top, result)
    kept = [n for n in model.graph.node if id(n) not in folded]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in g.added.items())
    del model.graph.value_info[:]  # the types inferred before (int8 Q outputs) are stale now
    activations = {n.name for n in model.graph.node if n.op_type in ("Relu", "Clip")}
    model = clean_graph(model)  # drops the FP32 weights, and the Relu/Clip nodes nothing reads any more
    result.absorbed = sorted(activations - {n.name for n in model.graph.node})
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
        check_model_file(tmp, f"{dst}: the ONNX Runtime flavour")
        result.fused = optimized_op_counts(tmp)
    return result


def optimized_op_counts(path: str | Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (after its own optimisation): QLinearConv and
    QLinearAdd show integer kernels; a Conv or FusedConv left over is a layer still computed in float."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort_session_options("default")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    interesting = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "Conv", "FusedConv", "Gemm", "MatMul",
                   "QuantizeLinear", "DequantizeLinear")
    return {op: n for op, n in sorted(ops.items()) if op.startswith(interesting)}
