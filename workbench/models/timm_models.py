"""`timm:NAME`: a model of timm's registry (pip install timm; `workbench models list 'timm:*'` lists them).

Built without weights, or with a state-dict file (model.weights: PATH, loaded as every source's), or with the released
weights of its default pretrained tag (model.weights: DEFAULT) read from the Hugging Face hub cache, where timm keeps
them: never downloaded unless the recipe says model.allow_download: true. Cached weights are read here as tensors only
(safetensors, or torch.load with weights_only=True) and handed to timm, which adapts them as its own loader does.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

PRETRAINED = "DEFAULT"  # model.weights: the released weights of the model's default pretrained tag
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repositories hold, preferred first


def names() -> list[str]:
    if importlib.util.find_spec("timm") is None:
        return []
    import timm

    return timm.list_models()


def reads_weights(weights: str) -> bool:
    """Whether model.weights names weights this source finds itself (DEFAULT), not a file every source loads."""
    return weights == PRETRAINED


def problems(name: str, config: Any) -> list[str]:
    """What stops timm:`name` from building here, found without building it or touching the network."""
    if importlib.util.find_spec("timm") is None:
        return [f"model.spec timm:{name} needs the timm package: pip install timm"]
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        return [f"model.spec: timm has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (`workbench models list 'timm:*'` lists them)"]
    if not config.weights or not reads_weights(config.weights):
        return []
    repo = _hub_repo(name)
    if repo is None:
        return [f"model.weights {PRETRAINED}: timm:{name} has no released weights on the Hugging Face Hub; give a "
                "state-dict file as model.weights"]
    if _cached_file(repo) is None and not config.allow_download:
        return [f"model.weights {PRETRAINED} of timm:{name} is the Hugging Face repository {repo}, which is not in the "
                "hub cache, and nothing is downloaded unless the recipe says model.allow_download: true. Download it "
                "once (huggingface-cli download " + repo + "), point model.weights at a file, or set "
                "model.allow_download: true."]
    return []


def build(name: str, config: Any):
    """timm:`name` with config.kwargs, with its cached (or, allowed, downloaded) released weights for DEFAULT."""
    import timm

    if not (config.weights and reads_weights(config.weights)):
        return timm.create_model(name, pretrained=False, **config.kwargs)
    cached = _cached_file(_hub_repo(name))
    if cached is None:  # problems() let this through: the recipe allows the download
        return timm.create_model(name, pretrained=True, **config.kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": _tensors(cached)},
                             **config.kwargs)


def data_defaults(name: str) -> dict:
    """What timm says its model's data are: input size, mean, std, crop share and interpolation."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {"input_size": tuple(cfg.input_size), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
            "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}


def _hub_repo(name: str) -> str | None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None


def _cached_file(repo: str) -> str | None:
    """The repository's weights file in the hub cache (HF_HUB_CACHE, read now), or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in _HUB_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=os.environ.get("HF_HUB_CACHE"))
        if isinstance(found, str):
            return found
    return None


def _tensors(path: str) -> dict:
    """A cached weights file as tensors only: no code from the file runs."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
