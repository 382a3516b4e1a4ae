"""The shared training loop and the finetune stage, on small models and generated images."""

import json

import pytest
import torch
from conftest import tiny_recipe
from helpers import colour_blob_batch, make_image_folder, tiny_cnn, trained_cnn

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.quant.ptq import Int8Config, quantize_, refresh_weight_ranges_
from workbench.tasks.classification import LogitDistiller
from workbench.train.loop import FitSetup, fit
from workbench.train.options import TrainOptions


def _batches(n=4, seed=1):
    x, y = colour_blob_batch(n_per_class=8, seed=seed)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    return [(x[i : i + 6], y[i : i + 6]) for i in range(0, len(x), 6)][:n]


def _kd_loss(teacher):
    def loss_fn(outputs, batch):
        with torch.no_grad():
            t = teacher(batch[0])
        loss = LogitDistiller(temperature=2.0).loss(outputs, t)
        return loss, {"distill": loss.item()}

    return loss_fn


def _agreement(a, b, x):
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def test_distillation_teaches_a_fresh_student_without_labels():
    teacher, student = trained_cnn(), tiny_cnn()
    x, _ = colour_blob_batch(seed=7)
    before = _agreement(student, teacher, x)
    history = fit(student, _batches(), TrainOptions(epochs=6, lr=0.05), _kd_loss(teacher))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["distill"] < 0.5 * history[0]["distill"]
    assert _agreement(student, teacher, x) >= max(0.9, before + 0.2)
    assert history[-1]["lr"] < 0.05 * 0.1  # cosine schedule decayed to near zero


def test_resume_continues_exactly(tmp_path):
    """An interrupted run resumed from its epoch-1 checkpoint ends with the same weights as an uninterrupted one."""
    teacher = trained_cnn()
    opts = TrainOptions(epochs=3, lr=0.05)
    straight = tiny_cnn()
    fit(straight, _batches(), opts, _kd_loss(teacher), FitSetup(checkpoint_dir=tmp_path / "a"))
    resumed = tiny_cnn()
    history = fit(resumed, _batches(), opts.model_copy(update={"resume": str(tmp_path / "a" / "finetune_epoch1.pt")}),
                  _kd_loss(teacher), FitSetup(checkpoint_dir=tmp_path / "b"))
    assert [h["epoch"] for h in history] == [1, 2, 3] and sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "finetune_epoch2.pt", "finetune_epoch3.pt"]
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_resume_from_a_missing_or_foreign_checkpoint(tmp_path):
    opts = TrainOptions(resume=str(tmp_path / "nope.pt"))
    with pytest.raises(WorkbenchError, match="does not exist"):
        fit(tiny_cnn(), _batches(), opts, _kd_loss(trained_cnn()))
    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": {}, "scheduler": {}, "step": 1, "epoch": 1, "history": []},
               tmp_path / "bad.pt")
    with pytest.raises(WorkbenchError, match="does not fit this model|is not a training checkpoint"):
        fit(tiny_cnn(), _batches(), TrainOptions(resume=str(tmp_path / "bad.pt")), _kd_loss(trained_cnn()))


def test_diverging_loss_stops_with_advice():
    def bad_loss(outputs, batch):
        return outputs.sum() * float("nan"), {}

    with pytest.raises(WorkbenchError, match="Lower the learning rate"):
        fit(tiny_cnn(), _batches(), TrainOptions(), bad_loss)


def _finetune_recipe(tmp_path, images, stages: str, finetune_split: str, batch_size: int = 4):
    """A tiny recipe with a finetune split (a YAML flow mapping) and the given stages, written to r.yaml."""
    text = tiny_recipe(images, tmp_path / "runs", stages)
    text = text.replace("  batch_size: 4", f"  finetune: {finetune_split}\n  batch_size: {batch_size}")
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


def test_finetune_stage_with_labels_learns(tmp_path):
    images = make_image_folder(tmp_path / "blobs", per_class=20, seed=4)
    runs = tmp_path / "runs"
    recipe = _finetune_recipe(tmp_path, images,
                              "  - finetune: {epochs: 4, lr: 0.05, distill: false, eval_samples: 30}\n"
                              "  - evaluate: {latency: false}\n",
                              f'{{source: imagefolder, path: "{images}"}}', batch_size=8)
    assert main(["run", str(recipe)]) == 0
    (run_dir,) = runs.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]
    history = metrics["finetune"]["history"]
    assert len(history) == 4 and history[-1]["cross_entropy"] < history[0]["cross_entropy"]
    assert metrics["evaluate"]["backends"]["pytorch_fp32"]["metrics"]["top1"] < 50  # the untrained model
    assert (run_dir / "checkpoints" / "finetune_epoch4.pt").is_file() and (run_dir / "training_curve.png").is_file()
    assert history[-1]["eval"]["metric"] == "top-1 %" and history[-1]["eval"]["value"] > 80


def test_finetune_with_nothing_to_learn_from(tmp_path, capsys):
    images = make_image_folder(tmp_path / "flat", classes=1, per_class=6)
    recipe = _finetune_recipe(tmp_path, images, "  - finetune: {distill: false}\n",
                              f'{{source: files, path: "{images}", pattern: "**/*.png"}}')
    assert main(["run", str(recipe)]) == 2
    assert "nothing to learn from" in capsys.readouterr().err


def _qat_recipe(tmp_path, stages, model="outlier_cnn"):
    images = make_image_folder(tmp_path / "blobs", per_class=20, seed=4)
    text = tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", f"helpers:{model}")
    text = text.replace("  batch_size: 4",
                        f'  finetune: {{source: files, path: "{images}", pattern: "**/*.png"}}\n  batch_size: 8')
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml"


def test_qat_brings_per_tensor_int8_closer_to_fp32_without_labels(tmp_path):
    """Per-tensor weights with max ranges: QAT by distillation (no labels) moves the INT8 model towards FP32."""
    stages = ("  - calibrate: {method: max, weights: per_tensor}\n"
              "  - qat: {epochs: 4, lr: 0.0003, eval_samples: 60}\n  - export: {}\n  - evaluate: {latency: false}\n")
    assert main(["run", str(_qat_recipe(tmp_path, stages, model="stretched_cnn"))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    stages = json.loads((run_dir / "metrics.json").read_text())["stages"]
    ev = stages["evaluate"]["backends"]
    kl = {b: e["metrics"]["mean_kl"] for b, e in ev.items()}
    assert kl["pytorch_int8"] < kl["pytorch_int8_ptq"] / 3  # QAT output much closer to FP32 than PTQ's
    # the exported QAT graph is the same model
    assert kl["ort_int8_faithful"] == pytest.approx(kl["pytorch_int8"], rel=1e-3)
    assert kl["ort_int8_ptq"] == pytest.approx(kl["pytorch_int8_ptq"], rel=1e-3)
    assert ev["pytorch_int8"]["metrics"]["top1"] == 100.0
    history = stages["qat"]["history"]
    assert "distill" in history[0] and "cross_entropy" not in history[0]  # unlabeled images: distillation only
    assert history[-1]["loss"] < history[0]["loss"] / 5
    for name in ("qat_model.pt", "training_curve_qat.png", "checkpoints/qat_epoch4.pt", "model_ptq.onnx"):
        assert (run_dir / name).is_file()
    assert "## Quantization-aware training" in (run_dir / "report.md").read_text()
def test_qat_weight_ranges_follow_the_weights():
    model = trained_cnn()
    x = colour_blob_batch()[0]
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    with torch.no_grad():
        model.conv2.weight[3] *= 2  # a channel grows during training
    before = model.conv2.weight_quantizer.amax.flatten()[3].item()
    refresh_weight_ranges_(model, result)
    after = model.conv2.weight_quantizer.amax.flatten()[3].item()
    assert after == pytest.approx(2 * before, rel=1e-5)
    assert after == pytest.approx(model.conv2.weight[3].abs().max().item(), rel=1e-6)


def test_qat_without_calibration(tmp_path, capsys):
    assert main(["run", str(_qat_recipe(tmp_path, "  - qat: {epochs: 1}\n"))]) == 2
    assert "stages[0].qat needs a calibrated model, which no stage before it makes: put calibrate before qat" \
        in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["lr: 5.0", "epochs: 0", "epochs: 5000"])
def test_qat_options_out_of_range(tmp_path, capsys, bad):
    assert main(["run", str(_qat_recipe(tmp_path, f"  - calibrate: {{}}\n  - qat: {{{bad}}}\n"))]) == 2
    assert bad.split(":")[0] in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_nan_loss_stops_and_names_the_step_and_the_last_good_checkpoint(tmp_path, capsys):
    stages = "  - calibrate: {}\n  - qat: {epochs: 3, eval_samples: 10}\n"  # 8 steps an epoch; NaN from step 11
    path = _qat_recipe(tmp_path, stages, model="nan_after_steps_cnn")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the loss became nan at step" in err and "qat.resume" in err
    (failed,) = (tmp_path / "runs").iterdir()
    assert failed.name.endswith(".failed") and (failed / "checkpoints" / "qat_epoch1.pt").is_file()


def test_resume_with_a_changed_recipe_is_refused(tmp_path, capsys):
    stages = "  - calibrate: {}\n  - qat: {epochs: 1, eval_samples: 10}\n"
    path = _qat_recipe(tmp_path, stages)
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = run_dir / "checkpoints" / "qat_epoch1.pt"
    changed = stages.replace("epochs: 1,", f'epochs: 2, lr: 0.001, resume: "{checkpoint}",')
    path.write_text(path.read_text().replace(stages, changed))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "comes from a run with other settings" in err and "options" in err


def test_quantized_efficientnet_blocks_train_with_their_drop_connect():
    """QAT trains EfficientNet-Lite in train mode, where its MBConvBlocks get a drop-connect rate: the quantized
    block (residual Add with quantizers) must apply it as the original does, not refuse to train."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="quickstart extra not installed")
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    assert result.census()["Add (residual)"]["int8"] > 0
    model.train()
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    grad = model._blocks[1]._depthwise_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Stochastic depth: with the rate at 1/2, some samples lose a block's residual branch, so two passes differ.
    block = model._blocks[-2]
    assert block._block_args.stride in (1, [1]) and block._block_args.input_filters == block._block_args.output_filters
    with torch.no_grad():
        inputs = torch.randn(8, block._block_args.input_filters, 2, 2)
        outs = [block(inputs, drop_connect_rate=0.5) for _ in range(2)]
        assert not torch.equal(outs[0], outs[1])
        model.eval()
        assert torch.equal(block(inputs, drop_connect_rate=0.5), block(inputs, drop_connect_rate=0.5))
