"""Ultralytics versions and forks (issue 27, item 6): the installed Ultralytics is checked against the range the
workbench drives, and a checkpoint pickling classes the installed package lacks (a fork's layers, a newer release's)
is refused naming each missing `module.attribute`, what it was saved with and what to do, before anything is
unpickled; one whose classes are all importable loads."""

import importlib.util
import sys
import types

import pytest
import torch

from workbench.cli import main
from workbench.errors import ModelLoadError
from workbench.models import resolve_model
from workbench.models import ultralytics_checkpoint as uc
from workbench.schema import ModelConfig

# Found, not imported: importing Ultralytics at collection would patch PIL.Image.open for every test that runs after.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                reason="ultralytics extra not installed")


class ForkBlock(torch.nn.Module):
    """A fork's own layer: pickled under a path inside `ultralytics` that the installed package does not have."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)


def _fork_checkpoint(path, module: str, name: str, version: str = "8.1.47",
                     docs: str = "https://github.com/LilianHollard/LeYOLO"):
    """torch.save of an Ultralytics-shaped dict whose model's class is `module.name`, which exists only while the
    file is written (pickle looks the class up by that path to write it)."""
    cls = type(name, (ForkBlock,), {"__module__": module, "__qualname__": name})
    made = module not in sys.modules
    target = sys.modules.setdefault(module, types.ModuleType(module))
    setattr(target, name, cls)
    try:
        torch.save({"date": "2024-05-01", "version": version, "docs": docs, "model": cls(),
                    "train_args": {"model": "LeYOLONano.yaml", "imgsz": 640}}, path)
    finally:
        delattr(target, name)
        if made:
            del sys.modules[module]
    return path


def test_checkpoint_facts_are_read_without_unpickling(tmp_path):
    path = _fork_checkpoint(tmp_path / "fork.pt", "ultralytics.nn.modules.block", "LeYOLOStem")
    facts = uc.checkpoint_facts(path)
    assert ("ultralytics.nn.modules.block", "LeYOLOStem") in facts.globals
    assert (facts.version, facts.docs, facts.model_file) == (
        "8.1.47", "https://github.com/LilianHollard/LeYOLO", "LeYOLONano.yaml")
    assert uc.missing_globals(facts.globals) == [
        "ultralytics.nn.modules.block.LeYOLOStem (ultralytics.nn.modules.block has no attribute 'LeYOLOStem')"]


@pytest.mark.parametrize("module,name,missing", [
    ("ultralytics.nn.modules.block", "LeYOLOStem", "ultralytics.nn.modules.block has no attribute 'LeYOLOStem'"),
    ("ultralytics.nn.modules.leyolo", "DWBlock", "no module ultralytics.nn.modules.leyolo"),
])
def test_a_fork_checkpoint_is_refused_naming_what_is_missing(tmp_path, module, name, missing):
    path = _fork_checkpoint(tmp_path / "fork.pt", module, name)
    with pytest.raises(ModelLoadError) as e:
        resolve_model(ModelConfig(spec=f"ultralytics:{path}", trust_pickle=True))
    message = str(e.value)
    assert f"{module}.{name}" in message and missing in message
    assert "Ultralytics 8.1.47" in message and "github.com/LilianHollard/LeYOLO (a fork)" in message
    assert "LeYOLONano.yaml" in message
    assert "a fork of Ultralytics" in message and "import:package.module:factory" in message


def test_a_checkpoint_from_a_newer_release_says_so(tmp_path):
    path = _fork_checkpoint(tmp_path / "new.pt", "ultralytics.nn.modules.block", "C4k2", version="9.1.0",
                            docs="https://docs.ultralytics.com")
    with pytest.raises(ModelLoadError, match=r"a newer Ultralytics \(9.1.0\) than the installed"):
        resolve_model(ModelConfig(spec=f"ultralytics:{path}", trust_pickle=True))


def test_a_run_refuses_a_fork_checkpoint_with_exit_2_and_no_traceback(tmp_path, capsys):
    from conftest import tiny_recipe
    from helpers import make_image_folder

    path = _fork_checkpoint(tmp_path / "fork.pt", "ultralytics.nn.modules.block", "LeYOLOStem")
    text = tiny_recipe(make_image_folder(tmp_path / "images"), tmp_path / "runs")
    text = text.replace('"import:helpers:tiny_cnn"', f'"ultralytics:{path}"').replace("trust_code: true",
                                                                                      "trust_pickle: true")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "ultralytics.nn.modules.block.LeYOLOStem" in err and "Traceback" not in err


def test_a_checkpoint_whose_classes_the_installed_package_has_loads(tmp_path):
    from workbench.models.registry import import_ultralytics

    import_ultralytics().YOLO("yolov8n.yaml", task="detect").save(tmp_path / "yolov8n.pt")
    facts = uc.checkpoint_facts(tmp_path / "yolov8n.pt")
    assert facts.version == uc.installed_version() and uc.missing_globals(facts.globals) == []
    model = resolve_model(ModelConfig(spec=f"ultralytics:{tmp_path / 'yolov8n.pt'}", trust_pickle=True))
    assert model(torch.rand(1, 3, 64, 64)).shape[0] == 1


@pytest.mark.parametrize("version,ok", [("8.3.0", True), ("8.4.190", True), ("8.2.103", False), ("8.5.0", False),
                                        ("8.0.196", False), ("9.0.0", False)])
def test_the_supported_range(version, ok):
    problem = uc.version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert version in problem and uc.SUPPORTED_TEXT in problem


def test_an_unsupported_installed_version_is_refused_before_import(monkeypatch, tmp_path):
    from workbench.models.registry import spec_problems

    monkeypatch.setattr(uc, "installed_version", lambda: "8.0.196")
    problems = spec_problems(ModelConfig(spec="ultralytics:yolov8n.yaml"))
    assert any("8.0.196" in p and uc.SUPPORTED_TEXT in p for p in problems)
    with pytest.raises(ModelLoadError, match="8.0.196"):
        resolve_model(ModelConfig(spec="ultralytics:yolov8n.yaml"))


def test_a_package_without_the_patch_originals_imports(monkeypatch):
    """A fork or release whose `ultralytics.utils.patches` keeps no `_image_open` (LeYOLO's) is no traceback: the
    functions from before the import stay."""
    import PIL.Image
    from ultralytics.utils import patches

    from workbench.models.registry import import_ultralytics

    before = PIL.Image.open
    monkeypatch.delattr(patches, "_image_open")
    import_ultralytics()
    assert PIL.Image.open is before
