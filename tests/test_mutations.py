"""Assertions that fail on mutations the rest of the suite let pass (issue 14, section 6).

Each test names the mutation it catches: a one-line change to real behaviour that once
left every test green. They run real computation on tiny models, images and graphs.
"""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_recipe
from helpers import biased_conv_bn_net, colour_blob_batch, make_image_folder, tiny_cnn, trained_cnn
from pydantic import ValidationError
from test_detection_task import C, _dataset_and_batch, _fake_v5, _truth
from torch import nn

from workbench.cli import main
from workbench.io import atomic_path
from workbench.qdq.export import export_onnx
from workbench.quant.calibrators import AbsHistogram, amax_percentile
from workbench.quant.fold import fold_batchnorm_
from workbench.quant.ptq import Int8Config, quantize_
from workbench.runtime.runners import OrtRunner
from workbench.stages import STAGES
from workbench.tasks.classification import ClassificationScorer
from workbench.tasks.detection import DetectionScorer

torch.manual_seed(0)
CALIB = [torch.randn(8, 3, 32, 32) for _ in range(3)]


def _loop(batches):
    def loop(model):
        with torch.no_grad():
            for x in batches:
                model(x)

    return loop


def _run(tmp_path, text: str, name: str = "r.yaml") -> int:
    path = tmp_path / name
    path.write_text(text)
    return main(["run", str(path)])


def _only_run_dir(runs):
    (run_dir,) = runs.iterdir()
    assert not run_dir.name.endswith((".incomplete", ".failed")), run_dir.name
    return run_dir


# --- mutation: the recipe's percentile never reaches the calibrator (99.99 is used whatever it says) ---------------


def test_percentile_option_reaches_the_calibrator():
    """quantize_ with percentile 90 sets each range to the 90th-percentile edge of that layer's own |input|
    histogram."""
    model, fp32 = tiny_cnn(), tiny_cnn()
    config = Int8Config(method="percentile", percentile=90.0, fold_batchnorm=False, residual_add=False)
    result = quantize_(model, config, _loop(CALIB), CALIB[0][:1])
    # The calibrator's own numbers, from histograms of the same inputs taken on the untouched FP32 twin.
    hists = {n: AbsHistogram(num_bins=config.num_bins) for n in ("conv1", "conv2", "conv3", "fc")}
    hooks = [getattr(fp32, n).register_forward_pre_hook(lambda m, a, n=n: hists[n].update(a[0])) for n in hists]
    _loop(CALIB)(fp32)
    for h in hooks:
        h.remove()
    for name, hist in hists.items():
        got = result.activation_amax[f"{name}.input_quantizer"]
        assert got == pytest.approx(amax_percentile(hist, 90.0), rel=1e-6), name
        assert got < 0.9 * amax_percentile(hist, 99.99), name  # the default would be far wider


def test_recipe_percentile_changes_the_calibrated_ranges(images, tmp_path):
    """Two runs differing only in stages.calibrate.percentile: 90 gives a narrower range on every layer."""
    amax = {}
    for p in (90, 99.99):
        runs = tmp_path / f"runs{p}"
        text = tiny_recipe(images, runs, f"  - calibrate: {{method: percentile, percentile: {p}}}\n")
        assert _run(tmp_path, text) == 0
        calibration = json.loads((_only_run_dir(runs) / "calibration.json").read_text())
        assert calibration["config"]["percentile"] == p
        amax[p] = calibration["activation_amax"]
    assert amax[90].keys() == amax[99.99].keys() and len(amax[90]) >= 4
    for name in amax[90]:
        assert amax[90][name] < amax[99.99][name], name


# --- mutation: BatchNorm folding drops the convolution's own bias ----------------------------------------------------


def test_fold_keeps_a_biased_convolutions_bias():
    """Convs with their own bias before BN: the fold happens (BN gone) and the function stays."""
    model = biased_conv_bn_net()
    x = colour_blob_batch(4)[0]
    with torch.no_grad():
        ref = model(x)
        pairs = fold_batchnorm_(model, x[:1])
        out = model(x)
    # a fold that lost the bias fails the numerical check, which restores the model: no pair folded
    assert sorted(pairs) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.Identity)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_calibration_records_the_folds_of_biased_convolutions(images, tmp_path):
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs, "  - calibrate: {method: max}\n").replace(
        "helpers:tiny_cnn", "helpers:biased_conv_bn_net")
    assert _run(tmp_path, text) == 0
    run_dir = _only_run_dir(runs)
    assert json.loads((run_dir / "calibration.json").read_text())["folded_batchnorm"] == [
        ["conv1", "bn1"], ["conv2", "bn2"]]
    assert json.loads((run_dir / "metrics.json").read_text())["stages"]["calibrate"]["folded_batchnorm"] == 2


# --- mutation: the faithful ONNX Runtime session is built with graph optimisations on --------------------------------


def test_faithful_runner_runs_the_graph_unoptimised(tmp_path):
    model = tiny_cnn()
    quantize_(model, Int8Config(method="max"), _loop(CALIB), CALIB[0][:1])
    path = export_onnx(model, CALIB[0][:1], tmp_path / "m.onnx")
    faithful, default = OrtRunner(path, "f", "faithful"), OrtRunner(path, "d", "default")
    level = ort.GraphOptimizationLevel
    assert faithful.session.get_session_options().graph_optimization_level == level.ORT_DISABLE_ALL
    assert default.session.get_session_options().graph_optimization_level == level.ORT_ENABLE_ALL
    # and it computes the fake-quant model's function (the arithmetic TensorRT performs on the graph)
    with torch.no_grad():
        fake = model(CALIB[1]).numpy()
    np.testing.assert_allclose(faithful(CALIB[1]), fake, atol=2e-3 * np.abs(fake).max())


# --- mutation: an atomic write moves its half-written temp file into place when the write fails ----------------------


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("existing", [True, False])
def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path, existing):
    target = tmp_path / "model.pt"
    if existing:
        target.write_bytes(b"the previous, complete file")
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        with atomic_path(target) as tmp:
            # torch.save writes the tensor's bytes, then fails on the second entry: a half-written file
            torch.save({"weights": torch.arange(1000.0), "bad": _Unpicklable()}, tmp)
    if existing:
        assert target.read_bytes() == b"the previous, complete file"
    else:
        assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.pt"] if existing else [])


def test_successful_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


# --- mutation: one stage's options accept unknown keys (extra="forbid" removed from one Options model) --------------


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_options_model_forbids_unknown_keys(stage):
    options = STAGES[stage].options
    assert options.model_config.get("extra") == "forbid", stage
    with pytest.raises(ValidationError) as info:
        options(no_such_option=1)
    # (stages with required options also report those missing)
    assert {"type": "extra_forbidden", "loc": ("no_such_option",)} in [
        {"type": e["type"], "loc": e["loc"]} for e in info.value.errors()]


def test_misspelt_export_option_is_refused_by_validate(images, tmp_path, capsys):
    runs = tmp_path / "runs"
    path = tmp_path / "r.yaml"
    path.write_text(tiny_recipe(images, runs, "  - calibrate: {method: max}\n  - export: {opsett: 13}\n"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "opsett" in err and "opset" in err.replace("opsett", "") and "Traceback" not in err
    assert not runs.exists()


# --- mutation: top-5 computed as top-1 (or over the wrong k) --------------------------------------------------------


def test_top5_counts_labels_ranked_two_to_five():
    # 10 classes; the label of sample i sits at rank ranks[i] (1 = the argmax)
    ranks = [1, 2, 5, 6]
    logits = np.tile(np.arange(10, 0, -1, dtype=np.float32), (4, 1))  # class k has rank k + 1
    labels = np.array([r - 1 for r in ranks])
    scorer = ClassificationScorer(labeled=True)
    scorer.update(logits, labels)
    metrics = scorer.result()
    assert metrics["top1"] == 25.0  # rank 1 only
    assert metrics["top5"] == 75.0  # ranks 1, 2, 5; not 6


# --- mutation: detection box agreement ignores the class ------------------------------------------------------------


def test_box_agreement_needs_the_same_class(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path)
    truth = _truth(targets)
    reference = _fake_v5(targets, truth, C)
    n_ref = sum(len(b) for b, _ in truth)
    # the same boxes, but the first image's first box is called another class
    relabelled = [(boxes.copy(), labels.copy()) for boxes, labels in truth]
    relabelled[0][1][0] = (relabelled[0][1][0] + 1) % C
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    scorer.update(_fake_v5(targets, relabelled, C), targets, reference=reference)
    metrics = scorer.result()
    assert metrics["box_agreement"] == pytest.approx(100 * (n_ref - 1) / n_ref)
    assert metrics["box_agreement_f1"] == pytest.approx(100 * (n_ref - 1) / n_ref)


# --- mutation: QAT never refreshes the weight ranges through the qat stage ------------------------------------------


def _qat_weight_ranges(tmp_path, freeze_ranges: bool) -> dict[str, torch.Tensor]:
    images = make_image_folder(tmp_path / "blobs", per_class=8, seed=4)
    runs = tmp_path / "runs"
    stages = (f"  - calibrate: {{method: max}}\n  - qat: {{epochs: 1, lr: 0.01, eval_samples: 6, "
              f"freeze_ranges: {str(freeze_ranges).lower()}}}\n")
    text = tiny_recipe(images, runs, stages).replace("helpers:tiny_cnn", "helpers:trained_cnn")
    text = text.replace("  batch_size: 4", f'  finetune: {{source: imagefolder, path: "{images}"}}\n  batch_size: 6')
    assert _run(tmp_path, text) == 0
    return torch.load(_only_run_dir(runs) / "qat_model.pt", weights_only=True)


def _calibrated_weight_amax() -> dict[str, torch.Tensor]:
    """Per-channel max |W| of the folded trained_cnn: the weight ranges calibration gives it, before QAT."""
    model = trained_cnn()
    fold_batchnorm_(model, colour_blob_batch(1)[0][:1])
    return {n: getattr(model, n).weight.detach().abs().flatten(1).amax(1) for n in ("conv1", "conv2", "conv3", "fc")}


@pytest.mark.parametrize("freeze_ranges", [False, True])
def test_qat_stage_weight_ranges_follow_the_trained_weights(tmp_path, freeze_ranges):
    state = _qat_weight_ranges(tmp_path, freeze_ranges)
    before = _calibrated_weight_amax()
    for name, pre in before.items():
        amax = state[f"{name}.weight_quantizer._amax"].flatten()
        trained = state[f"{name}.weight"].abs().flatten(1).amax(1)
        assert not torch.allclose(trained, pre, rtol=1e-3), f"{name}: QAT did not move the weights"
        expected, other = (pre, trained) if freeze_ranges else (trained, pre)
        torch.testing.assert_close(amax, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(amax, other, rtol=1e-3), name
