"""Fold BatchNorm into the convolution before it, before quantization.

TensorRT folds BN into the convolution anyway; folding first means the weight
scales are computed on the weights TensorRT will actually run, and the Q/DQ
ONNX has no BatchNormalization nodes between a Conv and its consumer.

Pairs are found by running the model once with hooks: a BatchNorm whose input
is exactly the output tensor of a convolution, where no other module read that
tensor. The folded model is then checked against the original numerically
(models/equivalence.py), so a pair the hooks misread (a functional use of the conv
output) is refused with the module where the outputs part, never folded silently.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models.equivalence import checked_rewrite

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def find_conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    produced_by: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    modules = dict(model.named_modules())
    handles = []
    keep_alive = []  # tensor ids are only unique while the tensors live

    def hook(name: str):
        def fn(module, inputs, output):
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    readers.setdefault(id(t), []).append(name)
                    keep_alive.append(t)
            if isinstance(module, _CONVS) and isinstance(output, torch.Tensor):
                produced_by[id(output)] = name
                keep_alive.append(output)

        return fn

    for name, module in modules.items():
        if isinstance(module, _CONVS + _BNS):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()
        model(example)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for tensor_id, conv_name in produced_by.items():
        names = readers.get(tensor_id, [])
        # Exactly BatchNorm: a subclass computes more than the affine map folding writes into the convolution
        # (timm's BatchNormAct2d applies its activation too), so it is left as it is; TensorRT folds it at build.
        if len(names) == 1 and type(modules[names[0]]) in _BNS:
            pairs.append((conv_name, names[0]))
    return pairs


def _fuse(conv: nn.Module, bn: nn.Module) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
    shape = [-1] + [1] * (conv.weight.dim() - 1)
    conv.weight.data = conv.weight.data * scale.reshape(shape)
    bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(bias * scale + shift)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def fold_batchnorm_(model: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> list[tuple[str, str]]:
    """Fold each Conv->BN pair in place (BN becomes Identity); returns the pairs folded.

    The folded model must compute the original's outputs on `example` (to `rtol` of their magnitude): where it
    does not (a convolution's output also read by code the hooks cannot see), the model is put back as it was and a
    RewriteError names the first module whose output differs.
    """
    pairs = find_conv_bn_pairs(model, example)
    if not pairs:
        return []
    with _exact_float32():
        return checked_rewrite(
            model, lambda m: _fold(m, pairs), example, rtol=rtol, intended=lambda done: [conv for conv, _ in done],
            what="calibrate: folding BatchNorm into the convolution before it",
            advice="Set fold_batchnorm: false in stages.calibrate (TensorRT still folds it when it builds).")


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        _fuse(modules[conv_name], modules[bn_name])
        _set_module(model, bn_name, nn.Identity())
    return pairs


@contextlib.contextmanager
def _exact_float32():
    # On a GPU, TF32 convolutions differ from the float32 result by ~1e-3 relative, which would
    # fail the check below although the fold is exact; compare in true float32.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
