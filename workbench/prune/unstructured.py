"""Unstructured pruning: zero the smallest weights (magnitude) or 2 of every 4 (2:4 sparsity).

Masks are torch.nn.utils.prune masks, so a fine-tune between pruning steps keeps the
pruned weights at zero (the forward uses weight_orig * mask); `make_permanent` folds
the masks into plain weights at the end. Dense runtimes (ONNX Runtime, PyTorch) run a
sparse weight exactly as fast as a dense one: the speed-up of 2:4 comes only from
sparse tensor cores (Ampere and newer) in TensorRT.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_layers(model: nn.Module, ignore: list[str] = ()) -> dict[str, nn.Module]:
    """Conv/Linear layers by name, minus those matching an ignore pattern."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, PRUNABLE) and name and not any(fnmatch.fnmatchcase(name, p) for p in ignore)
    }


def magnitude_prune_(model: nn.Module, layers: dict[str, nn.Module], sparsity: float, scope: str = "global") -> None:
    """Zero the `sparsity` share of smallest-|w| weights: across all `layers` together, or in each layer."""
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers.values()], pruning_method=prune.L1Unstructured,
                                  amount=sparsity)
    else:
        for m in layers.values():
            prune.l1_unstructured(m, "weight", amount=sparsity)


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive input channels at each kernel position (TensorRT's layout)."""
    w = weight.detach()
    # (out, in, *k) -> (out, *k, in): groups of 4 run along the input channels.
    moved = w.movedim(1, -1) if w.dim() > 2 else w
    groups = moved.reshape(-1, 4).abs()
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    mask = keep.reshape(moved.shape)
    return (mask.movedim(-1, 1) if w.dim() > 2 else mask).to(w.dtype)


def sparsity_2to4_(layers: dict[str, nn.Module]) -> list[str]:
    """2:4 sparsity on every layer whose input channels divide by 4; returns the layers skipped."""
    skipped = []
    for name, m in layers.items():
        in_channels = m.weight.shape[1]
        if in_channels % 4:
            skipped.append(name)  # e.g. the first convolution (3 input channels)
            continue
        prune.custom_from_mask(m, "weight", two_four_mask(m.weight))
    return skipped


def make_permanent(layers: dict[str, nn.Module]) -> None:
    """Fold the masks into the weights (the zeros stay; the pruning hooks go)."""
    for m in layers.values():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")


def weight_sparsity(layers: dict[str, nn.Module]) -> dict[str, float]:
    """Share of exactly-zero weights per layer, and "all" over every layer."""
    out, zeros, total = {}, 0, 0
    for name, m in layers.items():
        w = m.weight.detach()
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    out["all"] = zeros / total if total else 0.0
    return out
