"""One ONNX graph, indexed: constants, producers and readers, which tensors TensorRT computes on in INT8, and which
PyTorch module each exported node came from. Every reader of a Q/DQ graph (the census, TensorRT's rules, the ONNX
Runtime flavour, the layer comparison) asks these questions here, so they get one answer."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

# The ops that compute from a weight: the layers INT8 is for (each reads data and a weight through DequantizeLinear).
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Ops a DequantizeLinear moves past unchanged, so the op after them still reads INT8 data: Cast/Identity (modelopt
# exports Casts around Q/DQ), Reshape/Transpose (they move values, and symmetric per-tensor dequantization commutes
# with moving values; TensorRT propagates DQ forward through them). A Pad commutes only when it pads with zeros
# (`_zero_pad`): -inf before a max pool, or any other fill, has no INT8 value, so the layer after it runs in float.
LAYOUT_OPS = ("Cast", "Identity", "Reshape", "Transpose")


class GraphIndex:
    """One ONNX graph indexed for rewriting and checking: constants by name (initializers and Constant
    nodes), the node producing each tensor, the nodes reading it, and the graph's outputs."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.nodes = list(model.graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list] = collections.defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)
        self.constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.constants[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.outputs = {o.name for o in model.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def looked_through(self, name: str) -> list:
        """The nodes between the tensor `name` and its source (see `source`), nearest first."""
        path = []
        node = self.producer.get(name)
        while node is not None and self.commutes(node):
            path.append(node)
            node = self.producer.get(node.input[0])
        return path

    def source(self, name: str):
        """The node producing `name`, looking through the ops a DequantizeLinear moves past (LAYOUT_OPS, zero Pads)."""
        path = self.looked_through(name)
        return self.producer.get(path[-1].input[0] if path else name)

    def commutes(self, node) -> bool:
        """Whether a DequantizeLinear before `node` can move past it (the one look-through rule)."""
        return node.op_type in LAYOUT_OPS or self._zero_pad(node)

    def _zero_pad(self, node) -> bool:
        if node.op_type != "Pad":
            return False
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        value = self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return mode == "constant" and (value is None or not np.any(value))

    def from_dq(self, name: str) -> bool:
        node = self.source(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def computes_in_int8(self, node) -> bool:
        """A compute op whose data input and weight both come through DequantizeLinear."""
        return node.op_type in COMPUTE_OPS and len(node.input) >= 2 and self.from_dq(node.input[0]) \
            and self.from_dq(node.input[1])


def opset(model) -> int | None:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def qdq_census(path: str | Path) -> dict:
    """Counts of Q/DQ nodes and of Conv/Gemm/MatMul whose weight and input come through DequantizeLinear."""
    import onnx

    model = onnx.load(str(path))
    g = GraphIndex(model)
    ops = collections.Counter(node.op_type for node in g.nodes)
    quantized, float_nodes = collections.Counter(), collections.defaultdict(list)
    for node in g.nodes:
        if g.computes_in_int8(node):
            quantized[node.op_type] += 1
        elif node.op_type in COMPUTE_OPS:
            float_nodes[node.op_type].append(node.name)
    return {
        "opset": opset(model),
        "nodes": sum(ops.values()),
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "quantized": dict(quantized),
        "float": dict(float_nodes),
        "op_counts": dict(ops),
    }


def scope_to_module(node_name: str, module_names: set[str] | None = None) -> str | None:
    """The PyTorch module an exported node belongs to, from the TorchScript exporter's scope name.

    `/model.2/m/m.0/cv1/conv/Conv` is `model.2.m.0.cv1.conv`: each scope segment is a child's name relative
    to its parent, except that children of a container (the ModuleList `m`) are named relative to the
    container's parent (`m.0`; PyTorch forbids dots in attribute names, so only those segments hold one).
    A quantizer's nodes belong to the layer it quantizes (`.../conv/input_quantizer/QuantizeLinear` is the
    conv's). With the model's `module_names`, the deepest scope that is one of its modules; without them
    (a file checked on its own) the whole scope. None when the node has no scope (or its first is no module).
    """
    path: list[str] = []  # module names from the root down
    parts: list[str] = []  # the relative names they are made of
    for seg in [s for s in node_name.split("/") if s][:-1]:
        if seg.endswith("_quantizer"):
            break
        if parts and seg.startswith(parts[-1] + "."):  # a container's child: `m` then `m.0`
            parts[-1] = seg
        else:
            parts.append(seg)
        name = ".".join(parts)
        if module_names is not None and name not in module_names:
            break
        path.append(name)
    return path[-1] if path else None


def nodes_by_module(path: str | Path, model, ops: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Module name -> names of the exported nodes in its scope (optionally only these op types), in graph order."""
    import onnx

    names = {n for n, _ in model.named_modules() if n}
    out: dict[str, list[str]] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if ops is None or node.op_type in ops:
            module = scope_to_module(node.name, names)
            if module is not None:
                out.setdefault(module, []).append(node.name)
    return out
