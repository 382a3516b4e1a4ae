"""Structured channel pruning over Torch-Pruning's dependency graph.

Removing output channels of one convolution changes the inputs of every layer
that reads them, the BatchNorm after it and, through residual Adds and Concats,
the channels of coupled layers elsewhere. Torch-Pruning traces the model into a
dependency graph and prunes each coupled group together, so the model stays
consistent; channel counts are rounded to a multiple of `round_to` so INT8
kernels (multiples of 8 or 16 channels) still get full tiles.

A pruned model is saved as plain data (models/pruned_file.py, which loading a
model reads): its state dict and each module's plain attributes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PruningError
from ..models.coupling import make_coupling_explicit_

# The pruned-model file lives in models/ (loading a model reads it); named here too, where its readers found it.
from ..models.pruned_file import PRUNED_FORMAT, PRUNED_VERSION, _freeze, load_pruned, save_pruned  # noqa: F401


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if kind == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


@dataclass(frozen=True)
class ChannelPruning:
    """How many channels go, and which: `ratio` of them, or as many as bring MACs to `macs_target` x the original."""

    ratio: float | None = None
    macs_target: float | None = None
    importance: str = "magnitude"  # magnitude | bn_scale | taylor
    global_pruning: bool = False  # rank channels across all layers (else the same share of every layer)
    round_to: int = 8  # channel counts kept a multiple of this


def prune_channels_(
    model: nn.Module,
    example: torch.Tensor,
    ignored: list[nn.Module],
    how: ChannelPruning,
    gradient_batches=None,
) -> dict:
    """Prune channels as `how` says, keeping the outputs of `ignored` layers; returns before/after counts.

    `gradient_batches`: a callable that runs backward passes on the model, for Taylor importance.
    The model is restored and PruningError raised if the pruned model no longer runs.
    """
    import torch_pruning as tp

    ratio, macs_target, importance = how.ratio, how.macs_target, how.importance
    global_pruning, round_to = how.global_pruning, how.round_to
    make_coupling_explicit_(model, example)
    original = copy.deepcopy(model)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    base_macs, base_params = count_macs_params(model, example)
    per_layer = None
    if ratio and not global_pruning:
        per_layer = _nearest_multiple_ratios(model, ignored, ratio, round_to)
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_importance(importance), pruning_ratio=ratio if ratio else 0.9,
            pruning_ratio_dict=per_layer, global_pruning=global_pruning, ignored_layers=ignored, round_to=round_to,
            iterative_steps=1 if ratio else 30,
        )
    except Exception as e:
        raise PruningError("structured pruning: Torch-Pruning cannot trace this model: "
                           f"{type(e).__name__}: {e}") from None
    if importance == "taylor" and gradient_batches is None:
        raise PruningError("importance taylor needs gradients: a labeled fine-tune split (data.finetune)")
    try:
        for _ in range(1 if ratio else 30):
            if importance == "taylor":
                model.zero_grad()
                gradient_batches(model)
            pruner.step()
            if macs_target and count_macs_params(model, example)[0] <= macs_target * base_macs:
                break
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:
        _restore(model, original)
        suspects = ", ".join(untracked_channel_ops(pruner.DG)) or "none recognised"
        raise PruningError(
            f"structured pruning broke the model: {type(e).__name__}: {str(e).splitlines()[0]}. An operation in its "
            "forward "
            "couples channels in a way Torch-Pruning's dependency graph does not see; it took these for channel-wise "
            f"operations: {suspects}. Ignore the layers around it (stages.prune.ignore) or rewrite it as a layer "
            "(an option-A F.pad shortcut becomes a 1x1 convolution, as workbench does for its CIFAR ResNets)"
        ) from None
    empty = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] == 0]
    if empty:
        _restore(model, original)
        raise PruningError(f"structured pruning would remove every channel of {empty}: lower the ratio or ignore them")
    _freeze(model, frozen)  # Torch-Pruning's new, smaller Parameters are trainable again
    macs, params = count_macs_params(model, example)
    if macs == base_macs and params == base_params:
        # Torch-Pruning skips a step that would leave a layer with no channels, silently.
        raise PruningError(
            f"structured pruning removed nothing: at ratio {ratio} (scope {'global' if global_pruning else 'layer'}) "
            "some layer "
            "would lose every channel, and Torch-Pruning then prunes none; lower the ratio, or use scope: layer"
        )
    return {"macs_before": base_macs, "macs_after": macs, "params_before": base_params, "params_after": params}


# Operations that really keep channel i at channel i; Torch-Pruning assumes this of every op it does not know.
_CHANNELWISE = re.compile(
    r"(Relu|Sigmoid|Silu|Hardswish|Hardsigmoid|Hardtanh|Gelu|LeakyRelu|Elu|Tanh|Clamp|Add|Sub|Mul|Div|Neg|Mean|Sum|Amax|"
    r"MaxPool\dD|AvgPool\dD|AdaptiveAvgPool\dD|AdaptiveMaxPool\dD|UpsampleNearest\dD|UpsampleBilinear\dD|Clone|ToCopy|"
    r"Permute|T|Expand|Unsqueeze|Squeeze|Softmax|LogSoftmax|Exp|Pow|Sqrt|Rsqrt|Max|Min|Where)Backward\d*"
)


def untracked_channel_ops(graph) -> list[str]:
    """The autograd ops that Torch-Pruning treated as channel-wise for want of knowing them."""
    names = set()
    for node in graph.module2node.values():
        grad_fn = getattr(node.module, "_grad_fn", None)
        name = type(grad_fn).__name__ if grad_fn is not None and not isinstance(grad_fn, str) else grad_fn
        if type(node.module).__name__ == "_ElementWiseOp" and name and not _CHANNELWISE.fullmatch(name):
            names.add(name)
    return sorted(names)






def _nearest_multiple_ratios(model: nn.Module, ignored: list[nn.Module], ratio: float, round_to: int) -> dict:
    """Per-layer ratios that keep the multiple of round_to nearest to (1 - ratio) x the channels.

    Torch-Pruning rounds the kept channels down, so ratio 0.2 of 16 channels with round_to 8
    keeps 8 (a 50% cut); here it keeps 16, and 24 of 32, 104 of 128.
    """
    ratios = {}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module not in ignored:
            channels = module.weight.shape[0]
            keep = max(round_to, round(channels * (1 - ratio) / round_to) * round_to)
            # +0.5: Torch-Pruning keeps int(channels x (1 - r)) channels, which must land on `keep` exactly.
            ratios[module] = max(0.0, 1 - (keep + 0.5) / channels) if keep < channels else 0.0
    return ratios


def _restore(model: nn.Module, original: nn.Module) -> None:
    # Pruning replaced parameters with smaller ones: put the original modules back.
    for name, child in list(original.named_children()):
        setattr(model, name, child)
















