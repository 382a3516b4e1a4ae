"""ONNX export of fake-quant (Q/DQ) and float models, and a census of what the graph quantizes."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError
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
                from .ort_int8 import clean_graph

                proto = clean_graph(proto)
            for key, value in (metadata or {}).items():
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"export: the exported graph fails onnx.checker: {e}") from None
    return path


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
