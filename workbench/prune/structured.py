"""Structured channel pruning over Torch-Pruning's dependency graph.

Removing output channels of one convolution changes the inputs of every layer
that reads them, the BatchNorm after it and, through residual Adds and Concats,
the channels of coupled layers elsewhere. Torch-Pruning traces the model into a
dependency graph and prunes each coupled group together, so the model stays
consistent; channel counts are rounded to a multiple of `round_to` so INT8
kernels (multiples of 8 or 16 channels) still get full tiles.

A pruned model is saved as plain data (`save_pruned`): its state dict and each
module's plain attributes (channel counts, groups). `load_pruned` sets those on
a fresh instance of the original architecture and loads the tensors of the new
shapes; the file loads with weights_only=True, so it runs no code.
"""

from __future__ import annotations

import copy
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WorkbenchError
from ..io import atomic_path


class PruningError(WorkbenchError):
    """Structured pruning cannot be applied to this model as asked."""


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


_COUPLING = "structured pruning: rewriting option-A shortcuts (F.pad) as 1x1 convolutions"
_COUPLING_ADVICE = ("This is a workbench defect, not your model's: report it; meanwhile ignore the blocks around it "
                    "(stages.prune.ignore) or use unstructured pruning.")


def make_coupling_explicit_(model: nn.Module, example: torch.Tensor | None = None) -> None:
    """Rewrite modules whose channel coupling the dependency graph cannot see into exact equivalents it can.

    Applied before pruning and before loading a pruned model, so both see the same modules. Proved to keep the
    float model's outputs on `example` (models/equivalence.py); without one (a pruned file being loaded), each
    replaced module is proved against the one it replaces on a random input. A RewriteError where either differs.
    """
    from ..models.cifar_resnet import LambdaLayer, option_a_as_convolutions_
    from ..models.equivalence import checked_rewrite, checked_swap

    if not any(isinstance(m, LambdaLayer) for m in model.modules()):
        return  # nothing to rewrite: no check to run
    if example is not None:
        checked_rewrite(model, option_a_as_convolutions_, example, what=_COUPLING, advice=_COUPLING_ADVICE)
        return
    for name, old, new in option_a_as_convolutions_(model):
        sample = torch.randn(2, old.in_planes, 8, 8, generator=torch.Generator().manual_seed(0))
        checked_swap(name, old, new, sample.to(new.weight.device), what=_COUPLING, advice=_COUPLING_ADVICE)


def _freeze(model: nn.Module, names: list[str]) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)


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


# pruned_model.pt: plain data that torch.load reads with weights_only=True (no pickled classes).
PRUNED_FORMAT = "workbench.pruned"
PRUNED_VERSION = 1


def save_pruned(model: nn.Module, path: str | Path) -> Path:
    """The pruned model as its state dict plus every module's plain attributes (channel counts, groups, ...)."""
    path = Path(path)
    saved = {
        "format": PRUNED_FORMAT,
        "version": PRUNED_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "attributes": {name: _plain_attributes(m) for name, m in model.named_modules()},
    }
    with atomic_path(path) as tmp:
        torch.save(saved, tmp)
    return path


def load_pruned(model: nn.Module, path: str | Path, trust_pickle: bool = False,
                example: torch.Tensor | None = None) -> nn.Module:
    """Reshape a fresh instance of the original architecture to the saved pruned one and load its weights.

    Files of the older format (Torch-Pruning's own state dict, which pickles whole modules) load only
    with `trust_pickle`, since unpickling them runs code from the file. `example` (an input of the model's size)
    is what the rewrite before loading is proved on.
    """
    from ..models.checkpoints import check_checkpoint_file, check_loaded_tensors

    check_checkpoint_file(path, "model.pruned", "the pruned_model.pt of a run's prune stage")
    make_coupling_explicit_(model, example)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return _load_pickled_pruned(model, path, trust_pickle)
    except Exception as e:  # truncated or foreign files raise a zoo of errors
        raise PruningError(f"model.pruned: cannot read {path} "
                           f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    check_loaded_tensors(saved, "model.pruned", path)  # before a tensor's shape is allocated in the model
    if not isinstance(saved, dict) or saved.get("format") != PRUNED_FORMAT:
        raise PruningError(f"model.pruned: {path} is not a pruned_model.pt written by a prune stage")
    if saved.get("version") != PRUNED_VERSION:
        raise PruningError(
            f"model.pruned: {path} has format version {saved.get('version')!r}; this workbench reads version "
            f"{PRUNED_VERSION}: re-run the prune stage with this version"
        )
    try:
        _apply_pruned(model, saved["attributes"], saved["state_dict"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise _not_this_architecture(path, e) from None
    return model.eval()


def _plain_attributes(module: nn.Module) -> dict:
    """The module's own public attributes that are plain data: where Torch-Pruning records new channel counts."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and _is_plain(v)}


def _is_plain(value) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (tuple, list):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False  # tensors are in the state dict; modules, functions and other objects are not data


def _apply_pruned(model: nn.Module, attributes: dict, state: dict) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in attributes if name not in modules]
    if unknown:
        raise KeyError(f"the architecture has no layer {unknown[0]!r}")
    for name, values in attributes.items():
        for key, value in values.items():
            if getattr(modules[name], key, None) != value:
                setattr(modules[name], key, value)
    # Replace every tensor whose shape pruning changed by one of the saved shape; load_state_dict then
    # copies the values and refuses missing or unexpected keys.
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            continue
        if module._parameters.get(attr) is not None and module._parameters[attr].shape != value.shape:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(torch.empty_like(value, dtype=old.dtype),
                                                    requires_grad=old.requires_grad)
        elif module._buffers.get(attr) is not None and module._buffers[attr].shape != value.shape:
            module._buffers[attr] = torch.empty_like(value, dtype=module._buffers[attr].dtype)
    model.load_state_dict(state, strict=True)


def _not_this_architecture(path: str | Path, error: Exception) -> PruningError:
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    return PruningError(f"model.pruned: {path} is not a pruned model of this architecture ({reason})")


def _load_pickled_pruned(model: nn.Module, path: str | Path, trust_pickle: bool) -> nn.Module:
    """A pruned model in Torch-Pruning's pickled state dict (what this workbench wrote before)."""
    import torch_pruning as tp

    from ..models.checkpoints import check_loaded_tensors

    if not trust_pickle:
        raise PruningError(
            f"model.pruned: {path} holds pickled Python objects, not only tensors and numbers: it is a pruned model in "
            "the older format (Torch-Pruning's state dict), or not one at all, and unpickling it runs code from the "
            "file. Set model.trust_pickle: true if you trust it; a prune stage now writes a format that loads safely."
        )
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        check_loaded_tensors(state, "model.pruned", path)
        tp.load_state_dict(model, state_dict=state)
        _freeze(model, frozen)
    except (RuntimeError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise _not_this_architecture(path, e) from None
    return model.eval()
