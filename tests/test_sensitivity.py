"""Per-layer sensitivity and mixed precision on a small trained CNN with one layer INT8 ruins (conv2)."""

import csv
import json

import onnx
import pytest
import torch
from conftest import tiny_recipe
from helpers import make_image_folder

from workbench.cli import main


@pytest.fixture
def blobs(tmp_path):
    # 30 per class: top-1 and agreement resolve 100/90 = 1.1 points.
    return make_image_folder(tmp_path / "blobs", per_class=30, seed=3)


def _recipe(images, runs, stages, model="outlier_cnn"):
    return tiny_recipe(images, runs, stages).replace("helpers:tiny_cnn", f"helpers:{model}")


def _run(tmp_path, text, *overrides):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return main(["run", str(path), *overrides])


def _only_dir(runs):
    (run_dir,) = runs.iterdir()
    return run_dir


SWEEP = "  - calibrate: {method: max}\n  - sensitivity: {proxy_samples: 16}\n"


def test_sensitivity_finds_the_layer_int8_ruins(blobs, tmp_path):
    runs = tmp_path / "runs"
    assert _run(tmp_path, _recipe(blobs, runs, SWEEP + "  - export: {}\n")) == 0
    run_dir = _only_dir(runs)
    table = json.loads((run_dir / "sensitivity.json").read_text())
    rows = table["layers"]
    assert [r["layer"] for r in rows][0] == "conv2" and rows[0]["rank"] == 1 and rows[0]["proxy_rank"] == 1
    # and TinyCNN's residual Add (`relu(bn3(conv3(x)) + x)` in its own forward), found by pattern
    assert {r["layer"] for r in rows} == {"conv1", "conv2", "conv3", "fc", "residual_add"}
    worst = rows[0]
    assert worst["only_delta"] < -20  # conv2 alone in INT8 costs tens of top-1 points
    assert worst["loo_delta"] > 20  # and keeping it float buys them back
    assert all(abs(r["only_delta"]) < 5 for r in rows[1:])
    assert worst["only_sqnr_db"] < min(r["only_sqnr_db"] for r in rows[1:])
    assert worst["type"] == "Conv2d" and worst["macs"] == 16 * 16 * 16 * 8 * 9 and worst["params"] == 16 * 8 * 9 + 16
    assert "/conv2/input_quantizer/QuantizeLinear" in worst["onnx_qdq_nodes"]
    # The same names in the exported graph.
    graph_nodes = {n.name for n in onnx.load(str(run_dir / "model.onnx")).graph.node}
    layers = [r for r in rows if r["type"] != "Add (residual)"]
    assert all(set(r["onnx_qdq_nodes"]) <= graph_nodes and r["onnx_qdq_nodes"] for r in layers)
    # The Add's shortcut input is conv3's input, quantized with the same scale: model.onnx is cleaned by onnxslim,
    # which keeps one of the two identical Q/DQ pairs (the table names both, from an uncleaned probe export).
    add = next(r for r in rows if r["type"] == "Add (residual)")
    assert len(add["onnx_qdq_nodes"]) == 4 and set(add["onnx_qdq_nodes"]) & graph_nodes
    with open(run_dir / "sensitivity.csv") as f:
        assert [r["layer"] for r in csv.DictReader(f)] == [r["layer"] for r in rows]
    assert (run_dir / "sensitivity.png").stat().st_size > 1000
    # The sweep leaves the model as calibrated: every layer in INT8 in the export.
    census = json.loads((run_dir / "metrics.json").read_text())["stages"]["export"]["model.onnx"]["census"]
    assert census["quantized"] == {"Conv": 3, "Gemm": 1}


def test_mixed_precision_keeps_exactly_the_ruined_layer_float(blobs, tmp_path):
    runs = tmp_path / "runs"
    stages = SWEEP + "  - mixed_precision: {max_drop: 2.0}\n  - export: {}\n  - evaluate: {latency: false}\n"
    assert _run(tmp_path, _recipe(blobs, runs, stages)) == 0
    run_dir = _only_dir(runs)
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]
    mp = metrics["mixed_precision"]
    assert mp["float_layers"] == ["conv2"]
    assert mp["fp32"] - mp["int8_all"] > 20 and mp["fp32"] - mp["final"] <= 2.0
    assert 0.5 < mp["int8_mac_share"] < 0.9
    # Accepted on the exported graph run faithfully: its drop's one-sided 90% bound is within the budget.
    assert mp["exported"]["meets"] and mp["exported"]["confidence"] == 0.9 and mp["exported"]["low"] >= -2.0
    assert mp["census"]["Conv2d"] == {"int8": 2, "float": 1}
    # The plan is in the exported graph: conv2 computes in float, the rest on INT8.
    census = metrics["export"]["model.onnx"]["census"]
    assert census["float"] == {"Conv": ["/conv2/Conv"]} and census["quantized"] == {"Conv": 2, "Gemm": 1}
    props = {p.key: p.value for p in onnx.load(str(run_dir / "model.onnx")).metadata_props}
    assert json.loads(props["workbench.float_layers"]) == ["conv2"] and props["workbench.int8_layers"] == "3"
    assert metrics["evaluate"]["backends"]["ort_int8_faithful"]["metrics"]["top1"] >= mp["fp32"] - 2.0
    # ... and in a recipe that reproduces it as plain PTQ.
    plan = run_dir / "recipe_mixed_precision.yaml"
    text = plan.read_text()
    assert "mixed_precision" not in text.split("stages:")[1] and "- conv2" in text
    rerun = tmp_path / "rerun"
    assert main(["run", str(plan), f"runs_dir={rerun}"]) == 0
    again = json.loads((_only_dir(rerun) / "metrics.json").read_text())["stages"]
    assert again["calibrate"]["census"]["Conv2d"] == {"int8": 2, "float": 1}
    assert again["evaluate"]["backends"]["pytorch_int8"]["metrics"]["top1"] == pytest.approx(mp["final"])


def test_budget_that_no_plan_meets(blobs, tmp_path, capsys):
    runs = tmp_path / "runs"
    stages = SWEEP + "  - mixed_precision: {max_drop: 2.0, candidates: [fc, conv3]}\n"
    assert _run(tmp_path, _recipe(blobs, runs, stages)) == 2
    err = capsys.readouterr().err
    assert "cannot be met even with all 2 candidate layers in float" in err and "Loosen the budget" in err
    assert _only_dir(runs).name.endswith(".failed")


def test_evaluation_too_small_for_the_budget(images, tmp_path, capsys):
    stages = "  - calibrate: {method: max}\n  - mixed_precision: {max_drop: 0.5}\n"
    assert _run(tmp_path, _recipe(images, tmp_path / "runs", stages)) == 2
    assert "18 evaluation samples measure the metric in steps of 5.56 points" in capsys.readouterr().err


def test_layer_pattern_matching_nothing(images, tmp_path, capsys):
    stages = "  - calibrate: {method: max}\n  - sensitivity: {layers: ['conv9*']}\n"
    assert _run(tmp_path, _recipe(images, tmp_path / "runs", stages)) == 2
    err = capsys.readouterr().err
    assert "stages.sensitivity.layers" in err and "conv9*" in err


def test_sensitivity_needs_calibration(images, tmp_path, capsys):
    assert _run(tmp_path, _recipe(images, tmp_path / "runs", "  - sensitivity: {}\n")) == 2
    assert "stages[0].sensitivity needs a calibrated model, which no stage before it makes: put calibrate before " \
           "sensitivity" in capsys.readouterr().err


def test_two_budgets_are_rejected(images, tmp_path, capsys):
    stages = "  - calibrate: {method: max}\n  - mixed_precision: {max_drop: 1, min_agreement: 99}\n"
    assert _run(tmp_path, _recipe(images, tmp_path / "runs", stages)) == 2
    assert "exactly one budget" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sensitivity_and_mixed_precision_on_cuda(blobs, tmp_path):
    runs = tmp_path / "runs"
    stages = SWEEP + "  - mixed_precision: {max_drop: 2.0}\n"
    text = _recipe(blobs, runs, stages).replace("runs_dir:", "device: cuda\nruns_dir:")
    assert _run(tmp_path, text) == 0
    metrics = json.loads((_only_dir(runs) / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda")
    assert metrics["stages"]["sensitivity"]["most_sensitive"][0] == "conv2"
    assert metrics["stages"]["mixed_precision"]["float_layers"] == ["conv2"]


def test_open_run_without_calibration(images, tmp_path):
    from workbench import api
    from workbench.errors import CalibrationError

    runs = tmp_path / "runs"
    assert _run(tmp_path, _recipe(images, runs, "  - evaluate: {latency: false}\n", model="tiny_cnn")) == 0
    with pytest.raises(CalibrationError, match="has no calibration.json: that run was not calibrated"):
        api.open_run(_only_dir(runs))
    with pytest.raises(Exception, match="not a run directory"):
        api.open_run(tmp_path)


def test_open_run_rebuilds_the_calibrated_model(blobs, tmp_path):
    """The explorer's model, rebuilt from calibration.json without data, scores as the run's did."""
    from workbench import api

    runs = tmp_path / "runs"
    stages = SWEEP + "  - evaluate: {latency: false}\n"
    assert _run(tmp_path, _recipe(blobs, runs, stages)) == 0
    run_dir = _only_dir(runs)
    run_top1 = json.loads(
        (run_dir / "metrics.json").read_text()
    )["stages"]["evaluate"]["backends"]["pytorch_int8"]["metrics"]["top1"]
    explorer = api.open_run(run_dir, trust_code=True)  # the test's own model code
    assert explorer.evaluate(samples=None)["value"] == pytest.approx(run_top1)
    explorer.set_float(["conv2"])
    assert explorer.evaluate(samples=None)["value"] > run_top1 + 20
    assert "- conv2" in explorer.plan_snippet()


def test_a_layer_int8_reliably_helps_ranks_least_sensitive():
    """Seen on ResNet-20 (10,000 images): the one resolved layer was a gain (+0.06 [+0.01, +0.12]) and was ranked
    first, so mixed precision kept it float first. Resolved losses lead, noise follows the proxy, resolved gains
    come last."""
    from workbench.quant.sensitivity import rank_rows

    def row(layer, delta, resolved, sqnr):
        return {"layer": layer, "only_sqnr_db": sqnr, "only_delta": delta, "only_resolved": resolved}

    rows = [row("gain", +0.06, True, 30.0), row("noise_low_sqnr", -0.01, False, 35.0),
            row("loss", -0.07, True, 50.0), row("noise_high_sqnr", +0.02, False, 45.0),
            row("bigger_loss", -0.30, True, 60.0)]
    rank_rows(rows)
    assert [r["layer"] for r in rows] == ["bigger_loss", "loss", "noise_low_sqnr", "noise_high_sqnr", "gain"]
    assert [r["ranked_by"] for r in rows] == ["task", "task", "proxy", "proxy", "task"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["proxy_rank"] == 1  # the proxy alone would have kept it float first
