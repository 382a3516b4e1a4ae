"""Layer-by-layer comparison of a PyTorch model and its exported ONNX run in ONNX Runtime.

When the exported graph and the fake-quant model disagree at the output, this says
where the disagreement starts: every Conv/Gemm output is exposed as an extra graph
output and compared with the PyTorch module of the same name (the TorchScript
exporter names nodes after module scopes: see `qdq.graph.scope_to_module`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..hardware.ort import ort_session_options
from ..models.guards import COMPUTE_MODULES
from ..qdq.graph import COMPUTE_OPS, scope_to_module


def layer_divergence(model: nn.Module, onnx_path: str | Path, batch: torch.Tensor,
                     mode: str = "faithful") -> list[dict]:
    """Per compute layer, in graph order: the relative and max absolute difference of its output.

    Rows: {"layer", "onnx_node", "rel_error", "max_abs", "ref_max_abs"}; rel_error is
    ||onnx - torch|| / ||torch||. Layers the exporter named differently (or fused away)
    are skipped.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path))
    modules = dict(model.named_modules())
    names = set(modules) - {""}
    taps = []  # (module name, onnx node name, onnx tensor name)
    for node in proto.graph.node:
        name = scope_to_module(node.name, names)
        if node.op_type in COMPUTE_OPS and name is not None and isinstance(modules[name], COMPUTE_MODULES):
            taps.append((name, node.name, node.output[0]))
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend([onnx.ValueInfoProto(name=t) for _, _, t in taps if t not in existing])

    captured: dict[str, torch.Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o.detach().float().cpu().clone()))
        for name, _, _ in taps
    ]
    try:
        with torch.no_grad():
            model.eval()(batch)
    finally:
        for h in hooks:
            h.remove()

    options = ort_session_options(mode)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taps.onnx"
        onnx.save(proto, str(path))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch.cpu().numpy()})))

    rows = []
    for name, node, tensor in taps:
        ref = captured.get(name)
        if ref is None or tensor not in values:
            continue
        got = torch.from_numpy(np.asarray(values[tensor], dtype=np.float32))
        if got.shape != ref.shape:
            continue
        diff = got - ref
        rows.append({
            "layer": name,
            "onnx_node": node,
            "rel_error": float(diff.norm() / ref.norm().clamp_min(1e-12)),
            "max_abs": float(diff.abs().max()),
            "ref_max_abs": float(ref.abs().max()),
        })
    return rows


def graph_divergence(onnx_path: str | Path, batch: np.ndarray, run_tapped) -> list[dict]:
    """Per compute node of an ONNX graph, in graph order: how far an engine's output is from the faithful ONNX
    Runtime execution of the same graph.

    `run_tapped(path, batch)` runs the engine on the graph at `path` (a copy with every Conv/Gemm/MatMul output
    exposed as a graph output) and returns {tensor name: array}. Rows: {"onnx_node", "rel_error", "max_abs",
    "ref_max_abs"}, rel_error = ||engine - faithful|| / ||faithful||. An engine that fuses the taps away (no
    output under a tap's name) has no row for it.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path))
    taps = [(node.name, node.output[0]) for node in proto.graph.node if node.op_type in COMPUTE_OPS]
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend([onnx.ValueInfoProto(name=t) for _, t in taps if t not in existing])
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "taps.onnx"
        onnx.save(proto, str(path))
        session = ort.InferenceSession(str(path), ort_session_options("faithful"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        faithful = dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch})))
        engine = run_tapped(path, batch)
    rows = []
    for node, tensor in taps:
        if tensor not in engine or tensor not in faithful:
            continue
        ref, got = np.asarray(faithful[tensor], dtype=np.float64), np.asarray(engine[tensor], dtype=np.float64)
        if ref.shape != got.shape:
            continue
        diff = got - ref
        rows.append({"onnx_node": node, "rel_error": float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-12)),
                     "max_abs": float(np.abs(diff).max()), "ref_max_abs": float(np.abs(ref).max())})
    return rows


def first_diverging(rows: list[dict], rel_error: float = 0.1) -> dict | None:
    """The first row (in graph order) whose relative error exceeds `rel_error`, or None."""
    return next((r for r in rows if r["rel_error"] > rel_error), None)
