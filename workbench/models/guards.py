"""Checks on what a model file holds and on the model it loads into, before anything uses them.

A TorchScript archive is compiled code, not a Python model with layers to quantize:
it is named as such instead of failing later with "no layer to quantize". Weights
holding NaN or Inf would pass load and fail deep inside calibration or export, so
the first layer holding them is named right after loading. The finite rule
(`first_nonfinite`: NaN nowhere, Inf only in buffers that are not read as weights)
is the one that loading, calibration and training all apply.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import ModelLoadError


def is_torchscript(path: str | Path) -> bool:
    """Whether `path` is a torch.jit.save archive (a zip with constants.pkl and a code/ folder)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            parts = [name.split("/") for name in archive.namelist()]
    except OSError:
        return False
    # torch.save zips hold <folder>/data.pkl and data/; only TorchScript adds constants.pkl and code/.
    return any(p[-1] == "constants.pkl" or (len(p) > 2 and p[1] == "code") for p in parts)


def refuse_torchscript(path: str | Path, field: str) -> None:
    if is_torchscript(path):
        raise ModelLoadError(
            f"{field}: {path} is a TorchScript archive (torch.jit.save), which the workbench cannot quantize: "
            "quantization needs the Python model and its layers. Give the architecture as model.spec (e.g. "
            "'import:package.module:factory' or 'torchvision:NAME') and its weights as model.weights, a state dict "
            "saved with torch.save(model.state_dict(), path)."
        )


class NonFinite(NamedTuple):
    """A model tensor that breaks the finite rule (see `first_nonfinite`)."""

    name: str  # 'layer.attr', as in the state dict
    nan: int
    inf: int
    broken: int  # the values that break the rule: NaN, plus Inf where Inf is not allowed
    numel: int

    @property
    def kind(self) -> str:
        return "NaN" if self.nan else "Inf"


def inf_is_broken(module: nn.Module, attr: str, is_parameter: bool) -> bool:
    """The finite rule's one exception: Inf is legitimate in a buffer (an attention or padding mask of -inf added
    before a softmax or a max pool), except in the buffers read as weights: BatchNorm statistics and quantization
    ranges (modelopt's `_amax`). NaN is broken anywhere. Export applies the same rule to the graph's constants
    (qdq.export.first_nonfinite_constant)."""
    if is_parameter:
        return True
    return attr == "_amax" or (isinstance(module, nn.modules.batchnorm._BatchNorm)
                               and attr in ("running_mean", "running_var"))


def first_nonfinite(model: nn.Module) -> NonFinite | None:
    """The first parameter or floating-point buffer, module by module, that holds NaN, or Inf where
    `inf_is_broken`; None when the model keeps the rule. Loading, calibration and training all check this."""
    for prefix, module in model.named_modules():
        tensors = [(a, t, True) for a, t in module.named_parameters(recurse=False)]
        tensors += [(a, t, False) for a, t in module.named_buffers(recurse=False) if t is not None]
        for attr, tensor, is_parameter in tensors:
            if not tensor.is_floating_point():
                continue
            t = tensor.detach()
            if torch.isfinite(t).all():
                continue
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            broken = nan + (inf if inf_is_broken(module, attr, is_parameter) else 0)
            if broken:
                return NonFinite(f"{prefix}.{attr}" if prefix else attr, nan, inf, broken, t.numel())
    return None


def check_finite(model: nn.Module, source: str) -> None:
    """Raise ModelLoadError naming the first layer and tensor that breaks the finite rule (`first_nonfinite`)."""
    if bad := first_nonfinite(model):
        layer, _, attr = bad.name.rpartition(".")
        raise ModelLoadError(
            f"{source}: layer '{layer or type(model).__name__}' holds {bad.kind} in its {attr} "
            f"({bad.broken} of {bad.numel} values), so every output would be garbage. The weights are "
            "broken (a diverged training run or a damaged file): load a checkpoint saved before they went bad."
        )


# The PyTorch layers that compute from a weight (the modules the ONNX compute ops come from).
COMPUTE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear)

# Layers whose output is computed from weights (or statistics): an Inf there is an overflow. Elsewhere an Inf in an
# output may be deliberate (a -inf padding or mask layer before a max pool or softmax), the finite rule for
# weights (`inf_is_broken`) and for the graph's constants (qdq.export.first_nonfinite_constant).
WEIGHTED_MODULES = COMPUTE_MODULES + (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def first_nonfinite_layer(model: nn.Module, batch: torch.Tensor) -> str | None:
    """The first leaf module, in execution order, whose output on `batch` holds NaN, or Inf where it is a weighted
    layer's (where a model with finite weights starts to overflow); else the first whose output holds Inf at all;
    None when none does. The finite rule applied to what a model computes, where the checks above apply it to
    what it holds."""
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
