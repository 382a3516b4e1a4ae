"""What a newcomer meets first: the README's recipes as written, YAML quoting, ImageNet-style class folders."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from workbench.cli import main
from workbench.data import build_dataset
from workbench.data.sources import imagenet_wnids
from workbench.errors import DataError, RecipeError
from workbench.schema import DataConfig, DataSplit, TransformConfig
from workbench.yaml_io import load_yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", ROOT.parent / "shared" / "assets"))


def _readme_yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_every_readme_recipe_validates_as_written(tmp_path, monkeypatch, capsys):
    """The first block is a whole recipe, copied out as a user would; the others show `stages:` and are validated
    in its place. Catches quoting the README forgets and stage options the code no longer takes."""
    if not (ASSETS / "models" / "cifar10_resnet20.th").is_file():
        pytest.skip(f"needs the shared assets (ResNet-20 weights and CIFAR-10) under {ASSETS}")
    monkeypatch.setenv("WORKBENCH_ASSETS", str(ASSETS))
    first, *fragments = _readme_yaml_blocks()
    assert fragments, "the README shows stage lists after its first recipe"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(first)
    assert main(["validate", str(recipe), f"runs_dir={tmp_path / 'runs'}"]) == 0, capsys.readouterr().err
    base = yaml.safe_load(first)
    base["data"]["finetune"] = base["data"]["calibration"]  # the pruning and QAT sections say to add a finetune split
    for i, fragment in enumerate(fragments):
        stages = yaml.safe_load(fragment)
        assert set(stages) == {"stages"}, f"README yaml block {i + 2} is neither a recipe nor a stage list"
        (tmp_path / f"r{i}.yaml").write_text(yaml.safe_dump({**base, **stages}))
        code = main(["validate", str(tmp_path / f"r{i}.yaml"), f"runs_dir={tmp_path / 'runs'}"])
        assert code == 0, f"README yaml block {i + 2}:\n{fragment}\n{capsys.readouterr().err}"


def test_an_unquoted_variable_in_a_flow_mapping_says_to_quote_it():
    text = "data:\n  evaluation: {source: imagefolder, path: ${WORKBENCH_ASSETS}/data/x}\n"
    with pytest.raises(RecipeError, match=r"must be quoted, e.g. path: \"\$\{WORKBENCH_ASSETS\}"):
        load_yaml(text, "r.yaml")
    quoted = text.replace("${WORKBENCH_ASSETS}/data/x", '"${WORKBENCH_ASSETS}/data/x"')
    assert load_yaml(quoted, "r.yaml")[0]["data"]["evaluation"]["path"] == "${WORKBENCH_ASSETS}/data/x"


def test_other_yaml_errors_get_no_quoting_advice():
    with pytest.raises(RecipeError) as caught:
        load_yaml("data: {source: imagefolder, path: x\n", "r.yaml")
    assert "quoted" not in str(caught.value)


def _data(**splits) -> DataConfig:
    return DataConfig(transform=TransformConfig(), **{k: DataSplit(**v) for k, v in splits.items()})


def _folders(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name / "a.png")


def test_imagefolder_with_wnid_labels_numbers_folders_by_the_full_imagenet_list(tmp_path):
    wnids = list(imagenet_wnids())
    chosen = [wnids[900], wnids[17], wnids[500]]  # two of 1000 would be 0 and 1 numbered among themselves
    _folders(tmp_path, chosen)
    ds = build_dataset(_data(evaluation={"source": "imagefolder", "path": str(tmp_path), "labels": "wnid"}),
                       "evaluation")
    assert {Path(s.key).parent.name: s.label for s in ds.samples} == {chosen[0]: 900, chosen[1]: 17, chosen[2]: 500}
    by_folder = build_dataset(_data(evaluation={"source": "imagefolder", "path": str(tmp_path)}), "evaluation")
    assert sorted(s.label for s in by_folder.samples) == [0, 1, 2]


def test_wnid_labels_name_the_folder_that_is_not_a_wordnet_id(tmp_path):
    _folders(tmp_path, [list(imagenet_wnids())[3], "cats"])
    with pytest.raises(DataError, match=r"data.evaluation.labels: wnid .* 1 folder\(s\) .* 'cats'"):
        build_dataset(_data(evaluation={"source": "imagefolder", "path": str(tmp_path), "labels": "wnid"}),
                      "evaluation")
    with pytest.raises(DataError, match="'wnid' labels need source: imagefolder"):
        build_dataset(_data(evaluation={"source": "files", "path": str(tmp_path), "labels": "wnid"}), "evaluation")


def test_quantize_names_a_mistyped_data_path_before_opening_anything(tmp_path):
    """Checked before torch is imported or the checkpoint opened: the answer comes in a fraction of a second."""
    import subprocess
    import sys

    model = tmp_path / "best.pt"
    model.write_bytes(b"not opened")
    probe = ("import sys; from workbench.cli import main; "
             f"code = main(['quantize', {str(model)!r}, '--data', {str(tmp_path / 'dat.yaml')!r}]); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert done.stderr.count("does not exist") == 1 and f"--data: {tmp_path / 'dat.yaml'} does not exist" in done.stderr


def test_one_missing_file_read_by_two_splits_is_one_problem(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\ntask: detection\nmodel: {{spec: 'torchvision:resnet18'}}\n"
                      f"data: {tmp_path / 'data.yaml'}\nstages:\n  - calibrate: {{}}\n  - evaluate: {{}}\n")
    assert main(["validate", str(recipe), f"runs_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "(1 problem)" in err and err.count("does not exist") == 1
    assert f"data.calibration.yaml and data.evaluation.yaml: {tmp_path / 'data.yaml'} does not exist" in err


def test_every_stage_records_the_peak_memory_and_the_report_shows_it(tmp_path, images):
    import json

    from conftest import tiny_recipe

    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    peaks = metrics["peak_rss_mb"]
    assert list(peaks) == list(metrics["timings_s"]) == ["calibrate", "export", "evaluate"]
    assert list(peaks.values()) == sorted(peaks.values())  # a high-water mark: it never falls
    status = Path("/proc/self/status")
    if status.exists():  # the kernel's own high-water mark of this process, in kB: the same number, in MB
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        hwm_mb = int(hwm.split()[1]) / 1024
        assert 0.5 * hwm_mb <= peaks["evaluate"] <= hwm_mb + 1, (peaks, hwm_mb)
    assert f"Peak resident memory of the run: {max(peaks.values()):.0f} MB" in (run_dir / "report.md").read_text()


def test_on_unlabeled_images_the_headline_is_agreement_where_fp32_is_confident():
    """The quickstart's texture crops: 78% raw agreement reads as "INT8 loses 22 points"; on the 36 images where FP32
    is confident a correct engine agrees on 35."""
    from workbench.stats import wilson_interval
    from workbench.tasks.classification import ClassificationTask

    task = ClassificationTask()
    unlabeled = {"agreement_top1": 78.125, "confident_samples": 36, "agreement_confident": 100 * 35 / 36,
                 "mean_kl": 0.0123}
    said = task.fidelity_headline(unlabeled, 128)
    est = wilson_interval(35, 36)
    assert said.startswith(f"Fidelity: it picks FP32's top class on 97.2% [{est.low:.1f}, {est.high:.1f}] of the 36 "
                           "images where FP32 is confident")
    assert "on all 128 images 78.1%" in said
    assert not any("78.1" in s for s in task.fidelity_sentences(unlabeled, 128))  # said once, in the headline
    # labeled images: top-1 against FP32's is the headline; too few confident images: no confident headline
    assert task.fidelity_headline({**unlabeled, "top1": 70.0}, 128) is None
    assert task.fidelity_headline({**unlabeled, "confident_samples": 12}, 128) is None
    assert "78.1% of all 128" in task.fidelity_sentences({**unlabeled, "confident_samples": 12}, 128)[0]


def test_a_run_ends_with_the_one_file_to_deploy(tmp_path, images, capsys):
    """deploy/ holds the fastest INT8 deployment candidate's files and nothing else, with a manifest; the console's
    last line before the report names it."""
    import json

    from conftest import tiny_recipe

    (tmp_path / "r.yaml").write_text(tiny_recipe(images, tmp_path / "runs"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = metrics["stages"]["evaluate"]["backends"]
    manifest = json.loads((run_dir / "deploy" / "deploy.json").read_text())
    assert manifest == metrics["deploy"]
    # the tiny recipe exports; without an engine the ONNX Runtime flavour is the INT8 file a CPU deployment runs
    assert manifest["backend"] == "ort_int8_native" and manifest["files"] == ["deploy/model_int8_ort.onnx"]
    assert sorted(p.name for p in (run_dir / "deploy").iterdir()) == ["deploy.json", "model_int8_ort.onnx"]
    assert (run_dir / "deploy" / "model_int8_ort.onnx").read_bytes() == (run_dir / "model_int8_ort.onnx").read_bytes()
    assert rows["ort_int8_native"]["files"] == ["model_int8_ort.onnx"]  # relative: true after the rename
    fp32 = rows[manifest["fp32_backend"]]["latency"]["b1"]["median_ms"]
    # deploy.json rounds the ratio to 3 decimals
    assert manifest["speedup_b1"] == pytest.approx(fp32 / rows["ort_int8_native"]["latency"]["b1"]["median_ms"],
                                                   abs=5e-4)
    assert "deploy: deploy/model_int8_ort.onnx (ort_int8_native, " in out
    assert "(the file to deploy: `deploy/model_int8_ort.onnx`)" in (run_dir / "report.md").read_text()


def _text_files(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory that reads as text (JSON, YAML, Markdown, HTML, sidecars), by relative name."""
    texts = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        try:
            texts[str(path.relative_to(run_dir))] = path.read_text()
        except UnicodeDecodeError:  # an ONNX graph, weights, a blob, a PNG
            pass
    return texts


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the run builds an OpenVINO engine")
def test_no_file_of_a_run_names_the_directory_it_was_built_in(tmp_path, monkeypatch):
    """The run directory is built as `….incomplete`, renamed `.failed` or final, and may be moved: the paths its
    files record (the OpenVINO sidecars' source graph, metrics.json's build record) are relative to it, so a run
    moved elsewhere resumes and benches from its own files."""
    import json
    import shutil

    from conftest import tiny_recipe
    from helpers import make_image_folder

    images = make_image_folder(tmp_path / "images36", per_class=12)
    import workbench.stages.evaluate as evaluate_stage
    from workbench.errors import WorkbenchError

    stages = ("  - calibrate: {method: max}\n  - export: {}\n  - build: {engine: openvino}\n"
              "  - evaluate: {backends: [openvino_int8], latency: false}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", "helpers:trained_cnn"))

    def interrupted(*_):  # the run fails after build, so that it is resumed from a directory moved elsewhere
        raise WorkbenchError("evaluate interrupted by the test")

    monkeypatch.setattr(evaluate_stage, "_evaluate", interrupted)
    assert main(["run", str(recipe)]) == 2
    monkeypatch.undo()
    (failed,) = (tmp_path / "runs").iterdir()
    assert failed.name.endswith(".failed")
    moved = tmp_path / "elsewhere" / failed.name
    shutil.move(failed, moved)
    assert main(["run", "--resume", str(moved), "model.trust_code=true"]) == 0
    final = moved.with_name(moved.name.removesuffix(".failed"))
    metrics = json.loads((final / "metrics.json").read_text())
    assert "build" in metrics["resumed"]["reused"]  # restored from the moved directory's own files
    assert metrics["stages"]["build"]["int8"]["onnx"] == "model_openvino_int8.onnx"
    assert json.loads((final / "model_openvino_int8.xml.json").read_text())["onnx"] == "model_openvino_int8.onnx"
    texts = _text_files(final)
    assert "metrics.json" in texts and "model_openvino_fp32.xml.json" in texts
    stale = {name for name, text in texts.items()
             if ".incomplete" in text or str(tmp_path / "runs" / failed.name.removesuffix(".failed")) in text}
    assert not stale
    out = tmp_path / "bench.json"
    assert main(["bench", str(final), "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--json", str(out)]) == 0
    assert "model_openvino_int8.xml" in json.loads(out.read_text())["backends"]


def test_a_detection_runs_recipe_shows_no_imagenet_mean_it_never_used(tmp_path):
    """A detector's images are letterboxed and scaled to 0..1, nothing else: the run's recipe.yaml lists no ImageNet
    mean/std beside letterbox (a user would think them applied), yet reads back to the recipe that ran."""
    from test_yolo_users import _recipe, ultralytics_set

    from workbench.recipe import load_recipe, parse_recipe
    from workbench.schema import dump_recipe

    data_yaml = ultralytics_set(tmp_path / "set")
    assert main(["run", str(_recipe(tmp_path, str(data_yaml), "  - calibrate: {method: max}\n"))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    dumped = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert dumped["task"] == "detection" and dumped["data"]["transform"]["letterbox"] == [64, 64]
    assert not {"mean", "std"} & set(dumped["data"]["transform"])
    ran = load_recipe(tmp_path / "r.yaml")
    assert load_recipe(run_dir / "recipe.yaml").model_dump() == ran.model_dump()  # resume hashes this: unchanged
    # another mean is kept (read back, the recipe must be the one that ran); a classifier's defaults are written
    written = ran.model_copy(update={"data": ran.data.model_copy(update={"transform": TransformConfig(
        letterbox=(64, 64), mean=(0.5, 0.5, 0.5))})})
    assert yaml.safe_load(dump_recipe(written))["data"]["transform"]["mean"] == [0.5, 0.5, 0.5]
    classifier = parse_recipe(f"name: c\nmodel: {{spec: 'torchvision:resnet18'}}\ndata:\n  calibration: "
                              f"{{source: imagefolder, path: '{tmp_path}'}}\nstages: [{{calibrate: {{}}}}]\n")
    assert yaml.safe_load(dump_recipe(classifier))["data"]["transform"]["std"] == [0.229, 0.224, 0.225]


def test_the_quick_commands_import_neither_rich_nor_an_engine(tmp_path):
    """`workbench stages` answers at interpreter speed, `schema` at pydantic's: rich (the console), torch and the ONNX
    packages are for the commands that run something. In a fresh interpreter, as the command starts."""
    import subprocess
    import sys

    probe = ("import contextlib, io, sys\nfrom workbench.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    assert main([sys.argv[1]]) == 0\n"
             "heavy = ('rich', 'torch', 'onnx', 'onnxruntime', 'openvino', 'numpy')\n"
             "print(sorted(m for m in heavy if m in sys.modules))")
    # stages reads the stage modules' source: not even pydantic; schema is pydantic's, but nothing heavier
    for command, check in (("stages", probe.replace("'numpy')", "'numpy', 'pydantic')")), ("schema", probe)):
        done = subprocess.run([sys.executable, "-c", check, command], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]", (command, done.stdout)


def test_stages_lists_what_the_registry_holds(capsys):
    """`workbench stages` reads names and summaries from the stage modules' source; they must be the registry's, in
    its order (a stage registered another way, or a summary changed, fails here)."""
    from workbench.stage_summaries import stage_summaries
    from workbench.stages import STAGES

    assert list(stage_summaries().items()) == [(name, spec.summary) for name, spec in STAGES.items()]
    assert main(["stages"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(STAGES)
