"""Layer-by-layer comparison of a PyTorch model and its exported ONNX run in ONNX Runtime.

When the exported graph and the fake-quant model disagree at the output, this says
where the disagreement starts: every Conv/Gemm output is exposed as an extra graph
output and compared with the PyTorch module of the same name (the TorchScript
exporter names nodes after module scopes: see `onnx_tools.scope_to_module`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..onnx_tools import scope_to_module
from .runners import ort_session_options

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
COMPUTE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


# Layers whose output is computed from weights (or statistics): an Inf there is an overflow. Elsewhere an Inf in an
# output may be deliberate (a -inf padding or mask layer before a max pool or softmax), the finite rule for
# weights (models.guards.inf_is_broken) and for the graph's constants (onnx_tools.first_nonfinite_constant).
WEIGHTED_MODULES = COMPUTE_MODULES + (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, batch: torch.Tensor) -> str | None:
    """The first leaf module, in execution order, whose output on `batch` holds NaN, or Inf where it is a weighted
    layer's (where a model with finite weights starts to overflow); else the first whose output holds Inf at all;
    None when none does."""
    found: list[str] = []  # the first layer that breaks the rule
    any_inf: list[str] = []  # the first layer whose output holds Inf, deliberate or not

    def hook(name: str):
        def fn(module, inputs, output):
            if found or not isinstance(output, torch.Tensor) or torch.isfinite(output).all():
                return
            if torch.isnan(output).any() or isinstance(module, WEIGHTED_MODULES):
                found.append(name)
            elif not any_inf:
                any_inf.append(name)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not any(m.children())]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return (found or any_inf or [None])[0]


def layer_divergence(model: nn.Module, onnx_path: str | Path, batch: torch.Tensor, mode: str = "faithful") -> list[dict]:
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
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach().float().cpu().clone()))
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
