"""pruned_model.pt, the file a prune stage writes: a pruned model as plain data.

`save_pruned` writes its state dict and each module's plain attributes (channel counts, groups). `load_pruned` sets
those on a fresh instance of the original architecture and loads the tensors of the new shapes; the file loads with
weights_only=True, so it runs no code. Here, not in prune/, because loading a model (models/registry.py) reads it
and must not import the pruner.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import PruningError
from ..io import atomic_path
from .coupling import make_coupling_explicit_

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
    from .checkpoints import check_checkpoint_file, check_loaded_tensors

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

    from .checkpoints import check_loaded_tensors

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


def _freeze(model: nn.Module, names: list[str]) -> None:
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
