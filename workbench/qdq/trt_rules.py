"""Check a Q/DQ ONNX graph against TensorRT's explicit-quantization rules.

TensorRT builds an INT8 engine from the Q/DQ nodes it is given and from nothing else;
a misplaced or malformed pair does not fail the build, it silently leaves a layer in
float or adds a reformat. Each rule below names what TensorRT needs:

- `opset`: per-channel Q/DQ (the `axis` attribute) needs opset 13 or newer.
- `qdq_pair`: every QuantizeLinear feeds DequantizeLinear nodes only, and every
  DequantizeLinear reads a QuantizeLinear or an INT8 constant (no orphans).
- `int8_zero_point`: zero points are INT8 and zero (symmetric); a missing zero point
  means UINT8, which TensorRT rejects.
- `positive_scale`: scales are finite and greater than zero.
- `weight_per_channel_axis`: per-channel weight scales have one entry per output
  channel on the right axis (0 for Conv, 1 for ConvTranspose).
- `activation_per_tensor`: activation (non-constant) Q/DQ scales are scalars.
- `quantized_inputs`: a Conv/ConvTranspose/Gemm/MatMul whose weight is quantized also
  has its data input from a DequantizeLinear, and the other way round; otherwise
  TensorRT runs it in float.
- `residual_add`: an Add of two activations next to an INT8 convolution has every
  input that is not that convolution's own output from a DequantizeLinear, so TensorRT
  fuses the Add into the convolution in INT8. An Add whose float input is an attention's
  MatMul output (attention stays float: quant/rules.py) is not a residual Add, and a residual
  Add the graph's precision plan keeps float (`workbench.float_layers` in its metadata, written
  by export from calibrate's excludes and mixed_precision's plan) is a declared exemption:
  TensorRT runs it in float, as asked.
- `concat_shared_scale`: the quantized inputs of a Concat share one scale, so the Concat
  needs no requantization.

"From a DequantizeLinear" looks through the ops TensorRT moves a DQ past (graph.LAYOUT_OPS and zero Pads), the
one rule the census uses too.

These rules hold vacuously for a graph without Q/DQ, which TensorRT builds in float:
`check_quantized` says when no Conv/Gemm/MatMul computes in INT8 at all (`not_quantized`).

Violations name the node and, from the exporter's scope, the PyTorch module it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .export import load_onnx
from .graph import COMPUTE_OPS, GraphIndex, opset, scope_to_module
from .numeric import Violation, scale_problem

WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def check_quantized(model) -> Violation | None:
    """A `not_quantized` Violation when no Conv/ConvTranspose/Gemm/MatMul reads INT8 data and an INT8 weight
    through DequantizeLinear (TensorRT would run the whole graph in float); None when one does."""
    g = GraphIndex(model)
    if any(n.op_type in COMPUTE_OPS and len(n.input) >= 2 and g.from_dq(n.input[0]) and _weight_qdq(g, n.input[1])
           for n in g.nodes):
        return None
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.nodes)
    compute = sum(n.op_type in COMPUTE_OPS for n in g.nodes)
    if qdq:
        message = (f"this graph is not quantized: it has {qdq} Q/DQ nodes, but none of its {compute} Conv/Gemm/MatMul "
                   "nodes reads INT8 data and weights through them, so TensorRT runs every one in float")
    else:
        message = ("no Q/DQ: this graph is not quantized, so TensorRT runs it in float; check the model.onnx of a run "
                   "with a calibrate stage, not its model_fp32.onnx")
    return Violation("not_quantized", model.graph.name or "graph", None, message)


def check_qdq(model_or_path, module_names: set[str] | None = None) -> list[Violation]:
    """Every violation of the rules in this module's docstring; [] for a graph TensorRT will build as intended."""
    model = load_onnx(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    g = GraphIndex(model)
    out: list[Violation] = []

    def flag(rule: str, node, message: str) -> None:
        out.append(Violation(rule, node.name or node.op_type, scope_to_module(node.name, module_names), message))

    version = opset(model) or 0
    planned_float = _planned_float_adds(model)
    qdq = [n for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if qdq and version < 13:
        out.append(Violation("opset", "graph", None,
                             f"opset {version}: per-channel Q/DQ needs opset 13 or newer; export with opset 17"))

    for n in qdq:
        _check_scale_and_zero_point(g, n, flag)
        scale = g.constant(n.input[1])
        data = n.input[0] if n.op_type == "QuantizeLinear" else None
        if data is not None and data not in g.constants and scale is not None and scale.size > 1:
            flag("activation_per_tensor", n, f"activation quantized with {scale.size} scales; TensorRT takes one scale "
                 "per activation tensor")
        if n.op_type == "QuantizeLinear":
            bad = [c.op_type for c in g.consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad or not g.consumers.get(n.output[0]):
                flag("qdq_pair", n, f"QuantizeLinear feeds {bad or 'nothing'} instead of a DequantizeLinear")
        else:
            src = g.producer.get(n.input[0])
            is_const = n.input[0] in g.constants
            if not is_const and (src is None or src.op_type != "QuantizeLinear"):
                what = src.op_type if src else "a graph input"
                flag("qdq_pair", n, f"DequantizeLinear reads {what}, not a QuantizeLinear or an INT8 constant")

    for n in g.nodes:
        if n.op_type in COMPUTE_OPS:
            _check_matmul(g, n, flag)
        elif n.op_type == "Add" and not _in_units(scope_to_module(n.name), planned_float):
            _check_residual_add(g, n, flag)
        elif n.op_type == "Concat":
            _check_concat(g, n, flag)
    return out


def _planned_float_adds(model) -> set[str]:
    """The residual Add units the graph's precision plan keeps float (from its `workbench.float_layers`)."""
    import json

    for prop in model.metadata_props:
        if prop.key == "workbench.float_layers":
            try:
                return {u for u in json.loads(prop.value) if isinstance(u, str) and u.endswith("residual_add")}
            except ValueError:
                return set()
    return set()


def _in_units(scope: str | None, units: set[str]) -> bool:
    """Whether an Add is a planned-float residual unit's: inside `<block>.residual_add` (a quantized Add switched
    back to float) or the block's own Add (a block the excludes left with its float forward)."""
    blocks = {u.removesuffix(".residual_add").removesuffix(".ffn_residual") for u in units}
    return scope is not None and (any(scope == u or scope.startswith(u + ".") for u in units) or scope in blocks)


def _check_scale_and_zero_point(g: GraphIndex, n, flag) -> None:
    scale = g.constant(n.input[1])
    if scale is not None and (problem := scale_problem(scale)):
        flag("positive_scale", n, problem)
    if len(n.input) < 3 or not n.input[2]:
        if n.op_type == "QuantizeLinear":
            flag("int8_zero_point", n, "no zero point: ONNX then quantizes to UINT8, which TensorRT does not take; "
                 "give an INT8 zero point of 0")
        return
    zp = g.constant(n.input[2])
    if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
        flag("int8_zero_point", n, f"zero point is {zp.dtype} with values {np.unique(zp)[:4].tolist()}; "
             "TensorRT needs INT8 zeros")


def _weight_qdq(g: GraphIndex, name: str):
    """The DequantizeLinear that gives a constant weight, or None."""
    node = g.source(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    q = g.producer.get(node.input[0])
    data = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else node.input[0]
    return node if data in g.constants else None


def _check_matmul(g: GraphIndex, n, flag) -> None:
    if len(n.input) < 2:
        return
    weight_dq = _weight_qdq(g, n.input[1])
    data_dq = g.from_dq(n.input[0])
    if weight_dq is not None and not data_dq:
        flag("quantized_inputs", n,
             "the weight is quantized but the data input is not: TensorRT runs this layer in float")
    if data_dq and weight_dq is None and n.input[1] in g.constants:
        flag("quantized_inputs", n, "the data input is quantized but the weight is not: add Q/DQ on the weight")
    if weight_dq is None:
        return
    scale = g.constant(weight_dq.input[1])
    if scale is None or scale.size <= 1:
        return  # per-tensor weights are allowed
    q = g.producer.get(weight_dq.input[0])
    weight = g.constant(q.input[0] if q is not None and q.op_type == "QuantizeLinear" else weight_dq.input[0])
    given = next((a.i for a in weight_dq.attribute if a.name == "axis"), 1)
    shape = list(weight.shape) if weight is not None else []
    axis = given % max(len(shape), 1)
    # A Transpose between the weight's DQ and the layer moves its channel axis: follow it, from the DQ on.
    for node in reversed(g.looked_through(n.input[1])):
        if node.op_type == "Reshape":
            return  # the channels of a reshaped weight cannot be told apart from here
        if node.op_type == "Transpose" and shape:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(len(shape)))[::-1])
            axis, shape = perm.index(axis), [shape[p] for p in perm]
    if n.op_type in WEIGHT_AXIS:
        want = WEIGHT_AXIS[n.op_type]
    elif n.op_type == "Gemm":
        want = 0 if next((a.i for a in n.attribute if a.name == "transB"), 0) else 1
    else:
        want = 1  # MatMul: (K, N)
    channels = shape[want] if len(shape) > want else None
    if axis != want or (channels is not None and scale.size != channels):
        moved = f" (axis {axis} where the layer reads it)" if axis != given % max(len(shape), 1) else ""
        flag("weight_per_channel_axis", n, f"per-channel weight scales on axis {given}{moved} with {scale.size} "
             f"entries; {n.op_type} needs axis {want} with one per output channel ({channels})")


def _is_activation_dq(g: GraphIndex, dq) -> bool:
    q = g.producer.get(dq.input[0])
    data = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
    return data not in g.constants


def _from_matmul(g: GraphIndex, name: str) -> bool:
    """Whether a tensor is a MatMul's output (through the layout ops the one look-through rule passes)."""
    node = g.source(name)
    return node is not None and node.op_type == "MatMul"


def _check_residual_add(g: GraphIndex, n, flag) -> None:
    inputs = [i for i in n.input if i not in g.constants]
    if len(inputs) != 2:
        return
    sources = [g.source(i) for i in inputs]
    int8_conv = [s is not None and s.op_type in ("Conv", "ConvTranspose") and _weight_qdq(g, s.input[1]) is not None
                 for s in sources]
    quantized = [g.from_dq(i) for i in inputs]
    if not any(int8_conv) and not any(quantized):
        return  # a float region
    if any(not q and not c and _from_matmul(g, i) for i, q, c in zip(inputs, quantized, int8_conv)):
        return  # attention's output joined to its positional convolution: the attention stays float
    for i, (name, q, conv) in enumerate(zip(inputs, quantized, int8_conv)):
        if not q and not conv:
            other = "an INT8 convolution" if any(int8_conv) else "a quantized tensor"
            src = sources[i].op_type if sources[i] is not None else "a graph input"
            flag("residual_add", n, f"input {i} ({src}) is float while the other is {other}: quantize it so TensorRT "
                 "fuses the Add in INT8")


def _check_concat(g: GraphIndex, n, flag) -> None:
    scales = []
    for name in n.input:
        node = g.source(name)
        if node is not None and node.op_type == "DequantizeLinear" and _is_activation_dq(g, node):
            value = g.constant(node.input[1])
            if value is not None:
                scales.append(float(np.asarray(value).reshape(-1)[0]))
    if len(scales) > 1 and not np.allclose(scales, scales[0], rtol=1e-6, atol=0):
        scales_seen = sorted(set(round(s, 8) for s in scales))[:4]
        flag("concat_shared_scale", n, f"quantized inputs have scales {scales_seen}: give them one scale")
