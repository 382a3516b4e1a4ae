"""Checks on what a model file holds and on the model it loads into, before anything uses them.

A TorchScript archive is compiled code, not a Python model with layers to quantize:
it is named as such instead of failing later with "no layer to quantize". Weights
holding NaN or Inf would pass load and fail deep inside calibration or export, so
the first layer holding them is named right after loading.
"""

from __future__ import annotations

import itertools
import zipfile
from pathlib import Path

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


def check_finite(model: nn.Module, source: str) -> None:
    """Raise ModelLoadError naming the first layer and tensor that holds NaN or Inf."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor.detach())
        if bad.any():
            layer, _, attr = name.rpartition(".")
            kind = "NaN" if torch.isnan(tensor).any() else "Inf"
            raise ModelLoadError(
                f"{source}: layer '{layer or type(model).__name__}' holds {kind} in its {attr} "
                f"({int(bad.sum())} of {tensor.numel()} values), so every output would be garbage. The weights are "
                "broken (a diverged training run or a damaged file): load a checkpoint saved before they went bad."
            )
