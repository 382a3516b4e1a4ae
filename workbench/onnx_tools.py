"""ONNX export of fake-quant (Q/DQ) and float models, and a census of what the graph quantizes."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError, WorkbenchError
from .io import atomic_path

INPUT_NAME = "images"
OUTPUT_NAME = "output"


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    metadata: dict[str, str] | None = None,
    clean: bool = False,
) -> Path:
    """Export with the TorchScript exporter (modelopt's Q/DQ export needs it: dynamo=False), then check.

    `metadata` goes into the model's metadata_props (e.g. the precision plan). `clean` runs
    onnxslim over the graph (constant folding, dead and duplicate nodes; Q/DQ kept).
    """
    import onnx

    axes = {}
    if dynamic_batch or dynamic_size:
        dims = {}
        if dynamic_batch:
            dims[0] = "batch"
        if dynamic_size:
            dims.update({2: "height", 3: "width"})
        axes = {INPUT_NAME: dims, OUTPUT_NAME: {0: "batch"} if dynamic_batch else {}}
    was_training = model.training
    model.eval()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=axes or None,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except Exception as e:
            raise ExportError(f"export: torch.onnx.export failed for {type(model).__name__}: {e}") from None
        finally:
            model.train(was_training)
        if metadata or clean:
            proto = onnx.load(str(tmp))
            if clean:
                proto = clean_graph(proto)
            for key, value in (metadata or {}).items():
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(tmp))
        check_model_file(tmp, f"export: {path.name}")
    return path


def check_model_file(path: str | Path, what: str) -> None:
    """onnx.checker with full shape inference, and every constant finite; an ExportError that starts with `what`
    if the graph fails either (onnx.checker accepts NaN weights, and so would ONNX Runtime and TensorRT)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{what} fails onnx.checker: {e}") from None
    if bad := first_nonfinite_constant(onnx.load(str(path))):
        name, reader, nan, inf = bad
        raise ExportError(
            f"{what} has {nan} NaN and {inf} Inf values in its constant {name!r} (read by node {reader}): the model's "
            "weights or quantization ranges are not finite, so its outputs would be too. Nothing was written; check "
            "the model's weights (a diverged training stage, BatchNorm statistics with a zero variance)"
        )


# Ops whose constant inputs are weights, biases or quantization scales: an Inf there is a broken model. Elsewhere
# +-inf is a legitimate bound or fill (a Pad with -inf before a max pool, a Clip bound, an attention mask).
_WEIGHT_READERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "QuantizeLinear", "DequantizeLinear"}


def first_nonfinite_constant(model) -> tuple[str, str, int, int] | None:
    """(name, the node reading it, NaN count, Inf count) of the float constant that the graph reads first (the
    layer nearest the input) holding NaN, or Inf where it is read as a weight or scale; None when there is none."""
    index = GraphIndex(model)
    reads = [(name, n) for n in index.nodes for name in n.input if name in index.constants]
    for name, reader in reads:
        value = index.constants[name]
        if value.dtype.kind != "f":
            continue
        nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
        if nan or (inf and reader.op_type in _WEIGHT_READERS):
            return name, reader.name or reader.op_type, nan, inf
    return None


def clean_graph(model):
    """Constant folding, dead nodes and duplicate Q/DQ removed by onnxslim, which keeps Q/DQ nodes
    intact (tested: identical outputs and the same TensorRT rule check on the graphs we export)."""
    import onnxslim

    return onnxslim.slim(model)


def qdq_census(path: str | Path) -> dict:
    """Counts of Q/DQ nodes and of Conv/Gemm/MatMul whose weight and input come through DequantizeLinear."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    ops = collections.Counter(node.op_type for node in graph.node)

    def from_dq(name: str) -> bool:
        node = producer.get(name)
        # Identity/Cast sit between DQ and Conv in some exports; a zero Pad (TF-style "same"
        # padding) commutes with symmetric dequantization, so the Conv still computes on INT8.
        while node is not None and node.op_type in ("Identity", "Cast", "Reshape", "Transpose", "Pad"):
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    quantized, float_nodes = collections.Counter(), collections.defaultdict(list)
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            if len(node.input) >= 2 and from_dq(node.input[0]) and from_dq(node.input[1]):
                quantized[node.op_type] += 1
            else:
                float_nodes[node.op_type].append(node.name)
    return {
        "opset": next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), None),
        "nodes": sum(ops.values()),
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "quantized": dict(quantized),
        "float": {k: v for k, v in float_nodes.items()},
        "op_counts": dict(ops),
    }


def scope_to_module(node_name: str, module_names: set[str]) -> str | None:
    """The PyTorch module an exported node belongs to, from the TorchScript exporter's scope name.

    `/model.2/m/m.0/cv1/conv/Conv` is `model.2.m.0.cv1.conv`: each scope segment is a
    child's name relative to its parent, except that children of a container (the
    ModuleList `m`) are named relative to the container's parent (`m.0`), so each
    segment is tried under the current module and then under its ancestors.
    Returns the deepest module found, or None when the first segment matches nothing.
    """
    segments = [s for s in node_name.split("/") if s][:-1]
    path: list[str] = []  # module names from the root down
    for seg in segments:
        for prefix in reversed([""] + path):
            candidate = f"{prefix}.{seg}" if prefix else seg
            if candidate in module_names:
                path.append(candidate)
                break
        else:
            break
    return path[-1] if path else None


def nodes_by_module(path: str | Path, model: nn.Module, ops: tuple[str, ...] | None = None) -> dict[str, list[str]]:
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


def load_onnx(path: str | Path):
    """The ONNX model at `path`, or a WorkbenchError that says what is wrong with the file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path}: no such file; give the path of an exported .onnx model")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends for a file that is not a model
        why = str(e).splitlines()[0] if str(e) else "cannot parse"
        raise WorkbenchError(f"{path} is not an ONNX model ({type(e).__name__}: {why}); is it truncated or another "
                             "format? Export it again") from None
    # Protobuf parses an empty file (and some other bytes) as an empty ModelProto: no graph to check or run.
    if not model.graph.node or not model.graph.input:
        what = "is empty (0 bytes)" if path.stat().st_size == 0 else "holds no graph (no nodes or no input)"
        raise WorkbenchError(f"{path} {what}, so it is not an ONNX model; export it again (workbench run writes "
                             "model.onnx)")
    return model


def onnx_input_dims(path: str | Path) -> list[int | None]:
    """The first graph input's dimensions, None where dynamic (e.g. [None, 3, 224, 224])."""
    dims = load_onnx(path).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


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

    def source(self, name: str):
        """The producing node, looking through Cast/Identity (modelopt exports Casts around Q/DQ) and zero Pads
        (padding with zeros commutes with symmetric quantization: TensorRT moves the DQ past it)."""
        node = self.producer.get(name)
        while node is not None and (node.op_type in ("Cast", "Identity") or self._zero_pad(node)):
            node = self.producer.get(node.input[0])
        return node

    def _zero_pad(self, node) -> bool:
        if node.op_type != "Pad":
            return False
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        value = self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return mode == "constant" and (value is None or not np.any(value))

    def from_dq(self, name: str) -> bool:
        node = self.source(name)
        return node is not None and node.op_type == "DequantizeLinear"
