"""Hostile and broken models and checkpoints (issue 14): nothing a model file holds may run code, and every
refusal is a message with exit 2 that leaves no run directory behind.

Each crafted pickle below would write a marker file if it ran; the tests that it is refused check that the
marker does not exist, and `test_every_payload_runs_under_plain_pickle` checks that each one really would.
"""

import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from helpers import make_tiny_yolov5_checkpoint, tiny_cnn, trained_cnn
from torch import nn

from workbench.cli import main
from workbench.errors import ModelLoadError
from workbench.models import resolve_model
from workbench.prune.structured import (
    PRUNED_FORMAT,
    ChannelPruning,
    PruningError,
    load_pruned,
    prune_channels_,
    save_pruned,
)
from workbench.recipe import load_recipe
from workbench.schema import ModelConfig

# --- crafting pickles ---------------------------------------------------------


def _str(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + b"\x93"  # STACK_GLOBAL: find_class(module, name)


def _call(fn: bytes, *args: bytes) -> bytes:
    return fn + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def _list(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"  # EMPTY_LIST MARK items APPENDS


def _checkpoint(payload: bytes) -> bytes:
    """{'model': payload} as protocol 4: where a YOLOv5 checkpoint keeps its model."""
    return b"\x80\x04}" + _str("model") + payload + b"s."


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle, the global the loader must name when it refuses it)."""
    cmd = _str(f"touch {marker}")
    code = _str(f"__import__('os').system('touch {marker}')")
    touch = _list(_str("touch"), _str(str(marker)))
    return {
        "torch.os.system": (_call(_global("torch", "os.system"), cmd), "torch.os.system"),
        "torch.hub.os.system": (_call(_global("torch.hub", "os.system"), cmd), "torch.hub.os.system"),
        "getattr chain": (_call(_call(_global("builtins", "getattr"), _global("torch", "os"), _str("system")), cmd),
                          "builtins.getattr"),
        "eval": (_call(_global("builtins", "eval"), code), "builtins.eval"),
        "exec": (_call(_global("builtins", "exec"), code), "builtins.exec"),
        "__import__": (_call(_global("builtins", "__import__"), _str("h1_marker_module")), "builtins.__import__"),
        "functools.partial": (_call(_global("functools", "partial"), _global("posix", "system"), cmd) + b")R",
                              "functools.partial"),
        "subprocess.call": (_call(_global("subprocess", "call"), touch), "subprocess.call"),
        "subprocess.Popen": (_call(_global("subprocess", "Popen"), touch), "subprocess.Popen"),
        "os.system": (_call(_global("os", "system"), cmd), "os.system"),
        "posix.system": (_call(_global("posix", "system"), cmd), "posix.system"),
        # Dotted names under modules the allow-list names: pickle walks them attribute by attribute, so they reach
        # os.system through a torch.nn module's own `import torch` (issue 28: a hole an allow-list widened to every
        # torch.nn.* global would reopen).
        "dotted under torch.nn.modules.module": (_call(_global("torch.nn.modules.module", "torch.os.system"), cmd),
                                                 "torch.nn.modules.module.torch.os.system"),
        "dotted under torch.nn.modules.conv": (_call(_global("torch.nn.modules.conv", "torch.os.system"), cmd),
                                               "torch.nn.modules.conv.torch.os.system"),
    }


def _marker_module(folder: Path, marker: Path) -> None:
    """A module whose import writes the marker (what the __import__ payload imports)."""
    folder.mkdir(exist_ok=True)
    (folder / "h1_marker_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def _torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A file in torch.save's zip layout whose data.pkl is `data_pkl`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


class _Touch:
    """A plain __reduce__ payload, pickled by torch.save as posix.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run(tmp_path: Path, text: str) -> int:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return main(["run", str(path)])


def _recipe(images, tmp_path, spec: str = None, extra: str = "") -> str:
    text = tiny_recipe(images, tmp_path / "runs", extra_model=extra)
    return text.replace('"import:helpers:tiny_cnn"', f'"{spec}"') if spec else text


def _refused(capsys, tmp_path, *parts: str) -> str:
    err = capsys.readouterr().err
    for part in parts:
        assert part in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made
    return err


# --- 1. yolov5: exact globals only ---------------------------------------------


@pytest.mark.parametrize("payload", list(_payloads(Path("x"))))
def test_every_payload_runs_under_plain_pickle(tmp_path, monkeypatch, payload):
    """The payloads are real: an unrestricted unpickler runs each (else the refusals below would prove nothing)."""
    marker = tmp_path / "ran"
    _marker_module(tmp_path / "mods", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, "h1_marker_module", raising=False)
    result = pickle.loads(_checkpoint(_payloads(marker)[payload][0]))
    if isinstance(result["model"], __import__("subprocess").Popen):
        result["model"].wait()
    assert marker.exists()


@pytest.mark.parametrize("payload", list(_payloads(Path("x"))))
def test_yolov5_loader_refuses_every_payload(images, tmp_path, capsys, monkeypatch, payload):
    marker = tmp_path / "ran"
    _marker_module(tmp_path / "mods", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, "h1_marker_module", raising=False)
    data, refused = _payloads(marker)[payload]
    ckpt = _torch_zip(tmp_path / "evil.pt", _checkpoint(data))
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{ckpt}")) == 2
    _refused(capsys, tmp_path, f"refers to {refused},", "not a YOLOv5 v6 checkpoint", "evil.pt")
    assert not marker.exists()


def test_yolov5_loader_refuses_a_torch_saved_reduce_payload(images, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"model": _Touch(marker)}, tmp_path / "evil.pt")
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{tmp_path / 'evil.pt'}")) == 2
    _refused(capsys, tmp_path, "refers to posix.system,")
    assert not marker.exists()


def test_yolov5_loader_refuses_a_payload_in_the_legacy_file_format(images, tmp_path, capsys):
    """A plain pickle file (no zip): torch.load's legacy path unpickles it with the loader's unpickler too."""
    marker = tmp_path / "ran"
    data, _ = _payloads(marker)["torch.os.system"]
    (tmp_path / "evil.pt").write_bytes(_checkpoint(data))
    assert _run(tmp_path, _recipe(images, tmp_path, f"yolov5:{tmp_path / 'evil.pt'}")) == 2
    _refused(capsys, tmp_path, "refers to torch.os.system,")
    assert not marker.exists()


class _Permissive(pickle.Unpickler):
    """The old loader's behaviour: YOLOv5's classes mapped, every other global admitted."""

    def find_class(self, module, name):
        from workbench.models.yolov5_legacy import _YOLOV5_CLASSES

        return _YOLOV5_CLASSES.get((module, name)) or super().find_class(module, name)


def _unrestricted_output(path: Path, x: torch.Tensor) -> torch.Tensor:
    module = types.SimpleNamespace(Unpickler=_Permissive, load=lambda f, **kw: _Permissive(f, **kw).load(),
                                   __name__="permissive")
    model = torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)["model"].float().eval()
    for m in model.modules():
        if isinstance(m, nn.Upsample):
            m.recompute_scale_factor = None
    with torch.no_grad():
        return model(x)


def test_tiny_yolov5_checkpoint_loads_as_an_unrestricted_unpickler_would(tmp_path):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "t.pt")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = resolve_model(ModelConfig(spec=f"yolov5:{ckpt}"))(x)
    assert out.shape == (2, 3 * (16 * 16 + 8 * 8), 8)
    assert torch.equal(out, _unrestricted_output(ckpt, x))


def test_real_yolov5n_loads_as_an_unrestricted_unpickler_would(assets):
    path = assets / "models/yolov5n.pt"
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = resolve_model(ModelConfig(spec=f"yolov5:{path}"))(x)
    assert out.shape == (1, 3 * (32 * 32 + 16 * 16 + 8 * 8), 85)
    assert torch.equal(out, _unrestricted_output(path, x))


# --- 2. model.pruned: plain data, loaded with weights_only=True ----------------


def _pruned_tiny(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = trained_cnn()
    prune_channels_(model, torch.randn(1, 3, 32, 32), [model.fc], ChannelPruning(ratio=0.5))
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 8  # 16 -> 8: really pruned
    return model, save_pruned(model, tmp_path / "pruned_model.pt")


def test_pruned_model_loads_with_weights_only_and_reproduces_the_outputs(tmp_path):
    model, path = _pruned_tiny(tmp_path)
    saved = torch.load(path, map_location="cpu", weights_only=True)  # would raise on any pickled class
    assert saved["format"] == PRUNED_FORMAT and saved["version"] == 1
    assert saved["attributes"]["conv2"]["out_channels"] == 8 and saved["attributes"]["bn2"]["num_features"] == 8
    reloaded = resolve_model(ModelConfig(spec="import:helpers:trained_cnn", trust_code=True, pruned=str(path)))
    assert reloaded.conv2.out_channels == 8 and reloaded.bn2.running_mean.shape == (8,)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))


def test_pruned_model_of_another_architecture_is_refused(tmp_path):
    _, path = _pruned_tiny(tmp_path)
    with pytest.raises(PruningError, match="not a pruned model of this architecture"):
        load_pruned(nn.Sequential(nn.Conv2d(3, 8, 3)), path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:300])
    with pytest.raises(PruningError, match="model.pruned: cannot read"):
        load_pruned(trained_cnn(), tmp_path / "cut.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(PruningError, match="not a pruned_model.pt written by a prune stage"):
        load_pruned(trained_cnn(), tmp_path / "plain.pt")


def test_pruned_reduce_payload_is_refused_without_running(images, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save(_Touch(marker), tmp_path / "pruned_model.pt")
    extra = f'  pruned: "{tmp_path / "pruned_model.pt"}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, extra=extra)) == 2
    _refused(capsys, tmp_path, "model.pruned:", "holds pickled Python objects", "model.trust_pickle: true")
    assert not marker.exists()


def test_old_pickled_pruned_format_loads_only_with_trust_pickle(images, tmp_path, capsys):
    import torch_pruning as tp

    model, _ = _pruned_tiny(tmp_path)
    old = tmp_path / "old_pruned.pt"
    torch.save(tp.state_dict(model), old)  # what save_pruned wrote before
    extra = f'  pruned: "{old}"\n'
    assert _run(tmp_path, _recipe(images, tmp_path, spec="import:helpers:trained_cnn", extra=extra)) == 2
    _refused(capsys, tmp_path, "older format", "model.trust_pickle: true")
    trusted = resolve_model(ModelConfig(spec="import:helpers:trained_cnn", trust_code=True, pruned=str(old),
                                        trust_pickle=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trusted(x), model.eval()(x))


# --- 3. import: needs trust_code; file: and ultralytics .pt need trust_pickle ----


def test_import_spec_without_trust_code_runs_nothing(images, tmp_path, capsys):
    marker = tmp_path / "ran"
    text = _recipe(images, tmp_path, spec="import:os:system",
                   extra=f'  kwargs: {{command: "touch {marker}"}}\n').replace("  trust_code: true\n", "")
    assert _run(tmp_path, text) == 2
    _refused(capsys, tmp_path, "model.trust_code: true", "imports os and calls system()")
    assert not marker.exists()


_MODULE = """from torch import nn


def net(width=4):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
"""


def test_import_finds_a_module_beside_the_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "h1_beside_recipe.py").write_text(_MODULE)
    recipe = folder / "r.yaml"
    recipe.write_text("name: t\nmodel: {spec: 'import:h1_beside_recipe:net', trust_code: true, kwargs: {width: 6}}\n"
                      "data: {}\nstages: [{export: {}}]\n")
    monkeypatch.chdir(tmp_path)  # the recipe's folder is not the working directory
    monkeypatch.delitem(sys.modules, "h1_beside_recipe", raising=False)
    path_before = list(sys.path)
    config = load_recipe(recipe).model
    assert config.import_path == str(folder)
    assert resolve_model(config)[0].out_channels == 6
    assert sys.path == path_before  # the folder was on the path only for the import


def test_import_finds_a_module_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "h1_in_cwd.py").write_text(_MODULE)
    monkeypatch.chdir(tmp_path)
    # `python -m pytest` puts '' (the current directory) on sys.path; the workbench command does not.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "h1_in_cwd", raising=False)
    assert resolve_model(ModelConfig(spec="import:h1_in_cwd:net", trust_code=True))[0].out_channels == 4
    monkeypatch.delitem(sys.modules, "h1_in_cwd")
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(ModelLoadError, match="cannot import module 'h1_in_cwd'.*looked in"):
        resolve_model(ModelConfig(spec="import:h1_in_cwd:net", trust_code=True))


@pytest.mark.parametrize("spec", ["file", "ultralytics"])
def test_whole_model_pickles_need_trust_pickle(images, tmp_path, capsys, spec):
    marker = tmp_path / "ran"
    torch.save({"model": _Touch(marker)}, tmp_path / "model.pt")
    assert _run(tmp_path, _recipe(images, tmp_path, f"{spec}:{tmp_path / 'model.pt'}")) == 2
    _refused(capsys, tmp_path, "runs code from the file", "model.trust_pickle: true")
    assert not marker.exists()


def test_trusted_ultralytics_pt_loads(tmp_path):
    pytest.importorskip("ultralytics", reason="ultralytics extra not installed")
    from workbench.models.registry import import_ultralytics

    yolo = import_ultralytics().YOLO("yolov8n.yaml", task="detect")
    yolo.save(tmp_path / "yolov8n.pt")
    x = torch.rand(1, 3, 64, 64)
    model = resolve_model(ModelConfig(spec=f"ultralytics:{tmp_path / 'yolov8n.pt'}", trust_pickle=True))
    reference = resolve_model(ModelConfig(spec="ultralytics:yolov8n.yaml"))
    saved = torch.load(tmp_path / "yolov8n.pt", map_location="cpu", weights_only=False)["model"]  # saved as FP16
    reference.model.load_state_dict(saved.float().state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


# --- 4. efficientnet-lite sizes and TorchScript ---------------------------------


def test_efficientnet_lite_larger_sizes_load_with_weights(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="quickstart extra not installed")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    source = EfficientNet.from_name("efficientnet-lite2").eval()
    torch.save(source.state_dict(), tmp_path / "lite2.pth")
    model = resolve_model(ModelConfig(spec="efficientnet_lite:efficientnet-lite2", weights=str(tmp_path / "lite2.pth")))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    with pytest.raises(ModelLoadError, match="lite2 needs model.weights .* only efficientnet-lite0 has its weights"):
        resolve_model(ModelConfig(spec="efficientnet_lite:efficientnet-lite2"))
    with pytest.raises(ModelLoadError, match="no model 'efficientnet-lite9'.*lite0, efficientnet-lite1"):
        resolve_model(ModelConfig(spec="efficientnet_lite:efficientnet-lite9"))


@pytest.mark.parametrize("where", ["file", "yolov5", "ultralytics", "weights", "pruned"])
def test_torchscript_archives_are_named_as_such(images, tmp_path, capsys, where):
    ts = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(tiny_cnn()), ts)
    if where in ("file", "yolov5", "ultralytics"):
        text = _recipe(images, tmp_path, f"{where}:{ts}", extra="  trust_pickle: true\n")
    else:
        text = _recipe(images, tmp_path, extra=f'  {where}: "{ts}"\n')
    assert _run(tmp_path, text) == 2
    _refused(capsys, tmp_path, "is a TorchScript archive", "cannot quantize", "model.weights, a state dict")


# --- 5. torchvision weights: the hub cache, or allow_download -----------------


def _resnet18_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def test_torchvision_weights_name_without_cache_downloads_nothing(images, tmp_path, capsys, monkeypatch):
    cached = _resnet18_cache(tmp_path, monkeypatch)
    text = _recipe(images, tmp_path, "torchvision:resnet18", extra="  weights: DEFAULT\n")
    assert _run(tmp_path, text) == 2
    _refused(capsys, tmp_path, "resnet18-f37072fd.pth", str(cached.parent), "model.allow_download: true")
    assert not cached.parent.exists()  # nothing was fetched into the cache


def test_torchvision_weights_name_loads_from_the_cache(tmp_path, monkeypatch):
    import torchvision

    cached = _resnet18_cache(tmp_path, monkeypatch)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cached)
    model = resolve_model(ModelConfig(spec="torchvision:resnet18", weights="DEFAULT"))
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and torch.equal(model.fc.bias, state["fc.bias"])
    with pytest.raises(ModelLoadError, match="neither a file nor a weights name.*IMAGENET1K_V1"):
        resolve_model(ModelConfig(spec="torchvision:resnet18", weights="IMAGENET9K"))


def test_cached_torchvision_weights_are_read_once_and_still_set_what_they_need(tmp_path, monkeypatch):
    """googlenet's builder sets transform_input and drops the aux heads when given weights: building with
    weights=None and loading the state dict would lose both; loading it twice (ours, then torchvision's
    weights_only=False) is what the cache check used to do."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    member = torchvision.models.GoogLeNet_Weights.DEFAULT
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / Path(member.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(4)
    state = torchvision.models.googlenet(aux_logits=True, init_weights=False).state_dict()
    torch.save(state, cached)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (reads.append((Path(f), k.get("weights_only"))),
                                                             real_load(f, *a, **k))[1])
    model = resolve_model(ModelConfig(spec="torchvision:googlenet", weights="DEFAULT"))
    assert reads == [(cached, True)]
    assert model.transform_input and model.aux1 is None
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_a_pickle_in_the_hub_cache_is_not_unpickled(tmp_path, monkeypatch):
    cached = _resnet18_cache(tmp_path, monkeypatch)
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"fc.bias": _Touch(marker)}, cached)
    with pytest.raises(ModelLoadError, match="holds more than tensors"):
        resolve_model(ModelConfig(spec="torchvision:resnet18", weights="DEFAULT"))
    assert not marker.exists()


# --- 6. NaN/Inf weights are named right after loading ---------------------------


@pytest.mark.parametrize("tensor,value,kind",
                         [("conv2.weight", float("nan"), "NaN"), ("bn1.running_var", float("inf"), "Inf")])
def test_non_finite_weights_name_the_layer(images, tmp_path, capsys, tensor, value, kind):
    state = tiny_cnn().state_dict()
    state[tensor].view(-1)[3] = value
    torch.save(state, tmp_path / "w.pth")
    assert _run(tmp_path, _recipe(images, tmp_path, extra=f'  weights: "{tmp_path / "w.pth"}"\n')) == 2
    layer, attr = tensor.rsplit(".", 1)
    _refused(capsys, tmp_path, f"layer '{layer}' holds {kind} in its {attr} (1 of", "model.weights")


def test_importing_ultralytics_leaves_pil_and_torch_save_alone(tmp_path):
    """Ultralytics patches PIL.Image.open (an unidentifiable file then tries to pip-install pi-heif) and torch.save
    on import; after our import both are the originals, so a corrupt image is still a DataError naming the file."""
    pytest.importorskip("ultralytics")
    import PIL.Image

    from workbench.data.sources import open_image_file
    from workbench.errors import DataError
    from workbench.models.registry import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO  # noqa: F401  (lazily imported parts must not patch either)

    assert PIL.Image.open.__module__ == "PIL.Image" and torch.save.__module__ == "torch.serialization"
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="corrupt.jpg"):
        open_image_file(bad)


def test_builders_called_directly_keep_their_trust_keys(tmp_path):
    """The trust check sits at the load itself, not only in resolve_model: calling a source's builder runs nothing."""
    from workbench.models.registry import MODEL_SOURCES
    from workbench.schema import ModelConfig

    marker = tmp_path / "ran"
    with pytest.raises(ModelLoadError, match="model.trust_code"):
        MODEL_SOURCES["import"].build("os:system", ModelConfig(spec="import:os:system",
                                                               kwargs={"command": f"touch {marker}"}))
    payload = tmp_path / "payload.pt"
    torch.save({"x": 1}, payload)
    with pytest.raises(ModelLoadError, match="model.trust_pickle"):
        MODEL_SOURCES["file"].build(str(payload), ModelConfig(spec=f"file:{payload}"))
    assert not marker.exists()
