"""End to end: `workbench run` on a tiny model and generated images; failures leave no half-written output."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from helpers import trained_cnn
from PIL import Image

from workbench.cli import main


def _run(tmp_path, text, *overrides):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return main(["run", str(recipe), *overrides])


def _fp32_top1(folder) -> float:
    """trained_cnn's top-1 on an image folder, computed without workbench: class index = sorted folder name."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images, labels = [], []
    for label, cls in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(cls.glob("*.png")):
            images.append((np.asarray(Image.open(path).convert("RGB")) / 255.0 - mean) / std)
            labels.append(label)
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    with torch.no_grad():
        predicted = trained_cnn()(x).argmax(1)
    return 100.0 * float((predicted == torch.tensor(labels)).float().mean())


def test_run_writes_a_complete_run_directory(images, tmp_path, capsys):
    runs = tmp_path / "runs"
    # a trained model: its top-1 (100% here, 33% with the labels or normalisation wrong) says the data flowed right
    text = tiny_recipe(images, runs).replace("helpers:tiny_cnn", "helpers:trained_cnn")
    assert _run(tmp_path, text, "stages.calibrate.method=percentile") == 0
    (run_dir,) = runs.iterdir()
    assert run_dir.name.startswith("tiny-") and not run_dir.name.endswith((".incomplete", ".failed"))
    files = {p.name for p in run_dir.iterdir()}
    assert {"recipe.yaml", "metrics.json", "calibration.json", "model.onnx", "model_fp32.onnx", "report.md",
            "accuracy_latency.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["stages"]["calibrate"]["method"] == "percentile"
    assert metrics["stages"]["calibrate"]["census"] == {"Conv2d": {"int8": 3, "float": 0},
                                                        "Linear": {"int8": 1, "float": 0},
                                                        "Add (residual)": {"int8": 1, "float": 0}}
    backends = metrics["stages"]["evaluate"]["backends"]
    assert set(backends) == {"pytorch_fp32", "pytorch_int8", "ort_fp32", "ort_int8_faithful", "ort_int8_default",
                             "ort_int8_native"}
    # FP32 top-1 as computed here from the image files; ONNX Runtime's FP32 and faithful INT8 scores equal PyTorch's
    assert backends["pytorch_fp32"]["metrics"]["top1"] == pytest.approx(_fp32_top1(images))
    assert backends["ort_fp32"]["metrics"]["agreement_top1"] == 100.0
    assert backends["ort_fp32"]["metrics"]["top1"] == backends["pytorch_fp32"]["metrics"]["top1"]
    assert backends["ort_int8_faithful"]["metrics"]["top1"] == backends["pytorch_int8"]["metrics"]["top1"]
    assert backends["ort_int8_faithful"]["latency"]["b1"]["median_ms"] > 0
    assert metrics["stages"]["evaluate"]["ort_faithful_vs_fakequant"]["agreement_top1"] == 100.0
    native = metrics["stages"]["export"]["model_int8_ort.onnx"]
    assert native["fused"].get("QLinearConv", 0) >= 1 and native["weights_folded"] == 4
    assert metrics["stages"]["evaluate"]["ort_native_vs_faithful"]["agreement_top1"] >= 90.0
    report = (run_dir / "report.md").read_text()
    assert "INT8 Q/DQ (ONNX Runtime, faithful" in report and "| Conv2d | 3 | 0 |" in report
    assert "percentile" in (run_dir / "recipe.yaml").read_text()
    assert "run directory" in capsys.readouterr().out


def test_bad_input_before_the_run_writes_nothing(images, tmp_path, capsys):
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs).replace(f'path: "{images}"}}\n  batch',
                                             f'path: "{tmp_path / "nowhere"}"}}\n  batch')
    assert _run(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert "data.evaluation.path" in err and "does not exist" in err and "Traceback" not in err
    assert not runs.exists()


def test_unreadable_image_fails_before_writing(images, tmp_path, capsys):
    (images / "class0" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    runs = tmp_path / "runs"
    assert _run(tmp_path, tiny_recipe(images, runs)) == 2
    assert "zz_corrupt.jpg cannot be read" in capsys.readouterr().err
    assert not runs.exists()


def test_exclude_pattern_matching_nothing(images, tmp_path, capsys):
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs, stages="  - calibrate: {exclude: ['head.*']}\n")
    assert _run(tmp_path, text) == 2
    assert "'head.*'" in capsys.readouterr().err
    (failed,) = runs.iterdir()
    assert failed.name.endswith(".failed")
    metrics = json.loads((failed / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "head.*" in metrics["error"]
    assert not list(failed.glob("*.tmp")) and not (failed / "model.onnx").exists()


def test_nan_during_calibration_fails_cleanly(images, tmp_path, capsys):
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs, stages="  - calibrate: {fold_batchnorm: false}\n  - export: {}\n").replace(
        "import:helpers:tiny_cnn", "import:helpers:nan_cnn"
    )
    assert _run(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and "conv2" in err and "Traceback" not in err
    (failed,) = runs.iterdir()
    assert failed.name.endswith(".failed") and not (failed / "model.onnx").exists()


def test_evaluate_without_quantization_scores_fp32_only(images, tmp_path):
    runs = tmp_path / "runs"
    assert _run(tmp_path, tiny_recipe(images, runs, stages="  - evaluate: {latency: false}\n")) == 0
    (run_dir,) = runs.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["stages"]["evaluate"]["backends"]) == ["pytorch_fp32"]


def test_backend_not_available_yet(images, tmp_path, capsys):
    """A backend whose artifacts no earlier stage makes is refused before anything runs, naming what to add."""
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs, stages="  - evaluate: {backends: [ort_int8_faithful]}\n")
    assert _run(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert "stages[0].evaluate needs a calibrated model, which no stage before it makes: put calibrate before" in err
    assert "put export before evaluate" in err
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("stages, expected", [
    ("  - sensitivity: {}\n  - calibrate: {}\n",
     "stages[0].sensitivity needs a calibrated model, which no stage before it makes: "
     "put calibrate before sensitivity"),
    ("  - calibrate: {}\n  - prune: {method: magnitude}\n",
     "stages[1].prune cannot follow stages[0].calibrate, which made a calibrated model: put prune before calibrate"),
    ("  - calibrate: {}\n  - calibrate: {}\n", "stages[1].calibrate cannot follow stages[0].calibrate"),
    ("  - calibrate: {}\n  - finetune: {}\n", "training a quantized model is the qat stage"),
    ("  - calibrate: {}\n  - build: {}\n", "stages[1].build needs an exported ONNX graph"),
    ("  - calibrate: {}\n  - export: {fp32: false}\n  - build: {precision: fp16}\n",
     "stages[2].build needs the FP32 graph"),
])
def test_validate_refuses_an_impossible_stage_order(images, tmp_path, capsys, stages, expected):
    """`workbench validate` walks the stages' declared hand-overs and names the stage that cannot run."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages=stages))
    assert main(["validate", str(recipe)]) == 2
    assert expected in capsys.readouterr().err


def test_validate_accepts_export_without_fp32_when_unquantized(images, tmp_path, capsys):
    """An unquantized model.onnx is itself the FP32 graph, so an FP16 build may follow it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages="  - export: {fp32: false}\n"
                                  "  - build: {precision: fp16}\n  - evaluate: {backends: [ort_fp32]}\n"))
    assert main(["validate", str(recipe)]) == 0


@pytest.mark.slow
def test_quickstart_recipe_pieces_resolve():
    """The quickstart's model and calibration set resolve offline (the full run is the README's main job)."""
    pytest.importorskip("skimage", reason="quickstart extra not installed")
    pytest.importorskip("efficientnet_lite_pytorch", reason="quickstart extra not installed")
    from pathlib import Path

    from workbench.recipe import load_recipe
    from workbench.run import preflight

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")
    model, datasets = preflight(recipe)
    assert len(datasets["calibration"]) >= 64 and len(datasets["evaluation"]) >= 64
    assert datasets["calibration"][0][0].shape == (3, 224, 224)


def test_quickstart_end_to_end_small(tmp_path, capsys):
    """The README's main job, on 16 calibration and 16 evaluation crops: real EfficientNet-Lite0, all backends."""
    pytest.importorskip("skimage", reason="quickstart extra not installed")
    pytest.importorskip("efficientnet_lite_pytorch", reason="quickstart extra not installed")
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    code = main(["run", str(recipe), f"runs_dir={tmp_path}", "data.calibration.count=16", "data.evaluation.count=16",
                 "data.batch_size=8", "stages.evaluate.latency=false"])
    assert code == 0
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cal = metrics["stages"]["calibrate"]
    # EfficientNet-Lite's padded convolutions must be quantized, not silently left in float.
    assert cal["census"] == {"Conv2d": {"int8": 49, "float": 0}, "Linear": {"int8": 1, "float": 0},
                             "Add (residual)": {"int8": 9, "float": 0}}
    assert cal["folded_batchnorm"] == 49
    assert metrics["stages"]["export"]["model.onnx"]["tensorrt_rules"] == []
    backends = metrics["stages"]["evaluate"]["backends"]
    assert backends["ort_int8_faithful"]["metrics"]["samples"] == 16
    assert backends["pytorch_int8"]["metrics"]["mean_kl"] < 0.5
