"""Issue 14, numbers that must be finite and ONNX files that must be models: NaN/Inf weights at calibrate and in
every exported graph, training that diverges where only the end of an epoch sees it, check-onnx/bench/build on
files that are no model or no quantized model, and no terminal escape codes in output that is not a terminal.

Each hostile case asserts the message, the exit code and what is left on disk. The model factories below are
named by recipes as `import:test_hostile_numeric:...` (tests/ is on the path, as conftest puts it there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_recipe
from helpers import TinyCNN, make_image_folder, trained_cnn
from onnx import helper, numpy_helper

from workbench.cli import main
from workbench.errors import CalibrationError, ExportError
from workbench.qdq.export import export_onnx
from workbench.quant.ptq import Int8Config, quantize_

TESTS = Path(__file__).parent
REPO = TESTS.parent
NAN = float("nan")


# --- models that go non-finite at a chosen moment -------------------------------------------------------------

def inf_fold_cnn(num_classes: int = 3) -> TinyCNN:
    """Finite weights and statistics, but bn2's channel 3 has running_var 0 and a weight of 3e38: folding it into
    conv2 multiplies by 3e38 / sqrt(eps), which is Inf in float32."""
    model = trained_cnn(num_classes)
    with torch.no_grad():
        model.bn2.running_var[3] = 0.0
        model.bn2.weight[3] = 3e38
    return model.eval()


class PoisonedByCalibration(TinyCNN):
    """Its fc weight turns NaN the first time it runs in eval mode once its fc is calibrated (after calibrate
    checked the weights): calibration sees finite activations, the export would not."""

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.poisoned = False

    def forward(self, x):
        out = super().forward(x)
        quantizer = getattr(self.fc, "input_quantizer", None)  # its range is set once calibration has run
        if not self.training and getattr(quantizer, "amax", None) is not None and not self.poisoned:
            self.poisoned = True
            with torch.no_grad():
                self.fc.weight.fill_(NAN)
        return out


def poisoned_by_calibration_cnn(num_classes: int = 3) -> PoisonedByCalibration:
    model = PoisonedByCalibration(num_classes)
    model.load_state_dict(trained_cnn(num_classes).state_dict(), strict=False)
    return model.eval()


STEPS_PER_EPOCH = 3  # 24 fine-tune images in batches of 8
BREAK_AT = 2 * STEPS_PER_EPOCH  # the last step of epoch 2: epoch 1's checkpoint is the last good one


class BreaksAtStep(TinyCNN):
    """Trains normally; right after its training forward number BREAK_AT (so that step's loss is still finite)
    it breaks itself as `how` says: 'overflow' leaves bn3 with finite statistics that overflow in eval mode
    (running_mean -3e38, running_var 0), 'nan_bias' writes NaN into fc.bias."""

    how = "overflow"

    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.training_calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.training_calls += 1
            if self.training_calls == BREAK_AT:  # through .data: autograd's saved tensors must not see it
                if self.how == "overflow":
                    self.bn3.running_mean.data.fill_(-3e38)
                    self.bn3.running_var.data.zero_()
                else:
                    self.fc.bias.data.fill_(NAN)
        return out


class NanBiasAtStep(BreaksAtStep):
    how = "nan_bias"


def overflow_at_step_cnn(num_classes: int = 3) -> BreaksAtStep:
    model = BreaksAtStep(num_classes)
    model.load_state_dict(trained_cnn(num_classes).state_dict(), strict=False)
    return model.eval()


def nan_bias_at_step_cnn(num_classes: int = 3) -> NanBiasAtStep:
    model = NanBiasAtStep(num_classes)
    model.load_state_dict(trained_cnn(num_classes).state_dict(), strict=False)
    return model.eval()


class MaskedPool(torch.nn.Module):
    """Softmax pooling over positions with a registered -inf mask buffer (the border positions never count), as
    attention masks are kept: a legitimate Inf that the finite rule must leave alone."""

    def __init__(self, size: int):
        super().__init__()
        mask = torch.zeros(size, size)
        mask[0], mask[-1], mask[:, 0], mask[:, -1] = (float("-inf"),) * 4
        self.register_buffer("mask", mask)

    def forward(self, x):
        logits = x.mean(1) + self.mask
        weights = torch.softmax(logits.flatten(1), 1).view_as(logits)
        return (x * weights[:, None]).sum((2, 3))


MASKED_BORDER = 4 * 16 - 4  # the -inf values in a 16 x 16 mask


class MaskedPoolCNN(TinyCNN):
    def __init__(self, num_classes: int = 3):
        super().__init__(num_classes)
        self.pool = MaskedPool(16)  # conv2's stride 2 makes 32 x 32 inputs 16 x 16

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)) + x)
        return self.fc(self.pool(x))


def masked_cnn(num_classes: int = 3) -> MaskedPoolCNN:
    model = MaskedPoolCNN(num_classes)
    model.load_state_dict(trained_cnn(num_classes).state_dict(), strict=False)
    return model.eval()


class PadThenOverflow(torch.nn.Module):
    """A -inf padding layer (a deliberate Inf in its output) before a ceil-mode max pool that drops it again, then
    a conv whose finite but huge weights overflow float32: the overflow is the conv's, not the padding's."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.pad = torch.nn.ConstantPad2d((0, 1, 0, 1), float("-inf"))
        self.pool = torch.nn.MaxPool2d(2, ceil_mode=True)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, num_classes)
        with torch.no_grad():
            self.conv.weight.fill_(3e38)

    def forward(self, x):
        return self.fc(self.conv(self.pool(self.pad(x))).mean((2, 3)))


def pad_then_overflow_cnn(num_classes: int = 3) -> PadThenOverflow:
    return PadThenOverflow(num_classes).eval()


# --- helpers ---------------------------------------------------------------------------------------------------

def _recipe(tmp_path: Path, factory: str, stages: str, finetune: bool = False) -> Path:
    images = make_image_folder(tmp_path / "images", per_class=8, seed=4)
    text = tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", f"test_hostile_numeric:{factory}")
    if finetune:
        split = f'  finetune: {{source: imagefolder, path: "{images}"}}\n'
        text = text.replace("  batch_size: 4", split + "  batch_size: 8")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _failed_run(tmp_path: Path) -> tuple[Path, dict]:
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith(".failed"), run_dir.name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert not list(run_dir.rglob("*.tmp")), "a half-written temporary file was left"
    return run_dir, metrics


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, Path]:
    """A quantized model.onnx, its FP32 model_fp32.onnx, and hostile files: 0 bytes, a truncated model, text."""
    root = tmp_path_factory.mktemp("onnx")
    model = trained_cnn()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    export_onnx(model, x[:1], root / "model_fp32.onnx", clean=True)  # cleaned, as the export stage writes them
    quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    export_onnx(model, x[:1], root / "model.onnx", clean=True)
    good = (root / "model.onnx").read_bytes()
    (root / "empty.onnx").write_bytes(b"")
    (root / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (root / "text.onnx").write_text("this is not a model\n")
    return {p.stem: p for p in root.iterdir()}


def _save_graph(path: Path, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _float_input(name="images", shape=(1, 3, 8, 8)):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))


# --- 1. NaN/Inf weights: calibrate and every export -----------------------------------------------------------

def test_inf_created_by_batchnorm_folding_is_refused_before_quantizing(tmp_path, capsys):
    """Without the check modelopt's weight calibration ends in an AssertionError traceback (exit 1)."""
    recipe = _recipe(tmp_path, "inf_fold_cnn", "  - calibrate: {method: max}\n  - export: {}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "calibrate: conv2.weight holds 0 NaN and 72 Inf values after folding BatchNorm 'bn2' into 'conv2'" in err
    assert "bn2.running_var + eps is zero or negative, or bn2.weight is too large" in err and "Traceback" not in err
    run_dir, metrics = _failed_run(tmp_path)
    assert "after folding BatchNorm 'bn2'" in metrics["error"]
    assert not (run_dir / "calibration.json").exists() and not list(run_dir.glob("*.onnx"))


def test_nan_weight_reaching_quantize_is_named_by_layer():
    """The Python API: a NaN weight (from whatever trained it) is a CalibrationError naming the parameter."""
    model = trained_cnn()
    with torch.no_grad():
        model.conv3.weight[0, 0, 0, 0] = NAN
        model.fc.weight[0, 0] = float("inf")  # a later layer too: the first one is named
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(CalibrationError, match=r"conv3\.weight \(layer 'conv3'\) holds 1 NaN and 0 Inf values"):
        quantize_(model, Int8Config(method="max", fold_batchnorm=False), lambda m: m(x), x[:1])


def test_weights_gone_nan_after_calibrate_fail_the_export_and_leave_no_nan_onnx(tmp_path, capsys):
    """The fake-quant model's fc weight is NaN by export time: model.onnx is refused (onnx.checker passes it)."""
    recipe = _recipe(tmp_path, "poisoned_by_calibration_cnn", "  - calibrate: {method: max}\n  - export: {}\n"
                     "  - evaluate: {latency: false}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "export: model.onnx has 48 NaN and 0 Inf values in its constant 'fc.weight'" in err
    assert "(read by node /fc/weight_quantizer/" in err and "Nothing was written" in err
    run_dir, metrics = _failed_run(tmp_path)
    assert "model.onnx has 48 NaN" in metrics["error"] and "evaluate" not in metrics["stages"]
    assert not (run_dir / "model.onnx").exists() and not (run_dir / "model_int8_ort.onnx").exists()
    fp32 = onnx.load(run_dir / "model_fp32.onnx")  # the FP32 baseline was finite and is kept
    assert all(np.isfinite(numpy_helper.to_array(i)).all() for i in fp32.graph.initializer)


def test_finite_weights_that_overflow_name_the_layer_at_evaluate(tmp_path, capsys):
    """FP32 evaluation of the same model (no calibrate): before, a FloatingPointError traceback (exit 1)."""
    recipe = _recipe(tmp_path, "inf_fold_cnn", "  - evaluate: {latency: false}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert ("evaluate: pytorch_fp32: the model produced NaN/Inf logits; the first layer whose output holds NaN/Inf is "
            "'bn2'") in err and "Traceback" not in err
    run_dir, metrics = _failed_run(tmp_path)
    assert "'bn2'" in metrics["error"] and "evaluate" not in metrics["stages"] and not (run_dir / "report.md").exists()


def test_export_names_the_first_layer_holding_nan(tmp_path):
    model = trained_cnn()
    with torch.no_grad():
        model.conv2.weight[1, 0, 0, 0] = NAN
        model.fc.bias[0] = float("inf")  # first in the file's initializer order, last in the graph's
    with pytest.raises(ExportError, match=r"export: m\.onnx has 1 NaN and 0 Inf values .* \(read by node /conv2/Conv"):
        export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


class _NegInfPadPool(torch.nn.Module):
    """A 'same' max pool padded with -inf, as timm and TF ports write it: a legitimate Inf constant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = torch.nn.functional.pad(self.conv(x), (0, 1, 0, 1), value=float("-inf"))
        return torch.nn.functional.max_pool2d(x, 2)


def test_export_keeps_a_legitimate_inf_bound_and_refuses_an_inf_weight(tmp_path):
    model = _NegInfPadPool().eval()
    path = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "pad.onnx")
    assert any(n.op_type == "Pad" for n in onnx.load(str(path)).graph.node)  # the -inf fill is in the graph
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ExportError, match=r"has 0 NaN and 1 Inf values .*read by node /conv/Conv"):
        export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "inf.onnx")
    assert not (tmp_path / "inf.onnx").exists()


def test_onnx_runtime_flavour_with_a_nan_scale_is_not_written(onnx_files, tmp_path):
    """model_int8_ort.onnx goes through the same check: a NaN activation scale in the Q/DQ graph is refused."""
    from workbench.qdq.ort_flavour import to_ort_int8

    model = onnx.load(onnx_files["model"])
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and "conv2/input_quantizer" in n.name)
    scale = next(i for i in model.graph.initializer if i.name == q.input[1])
    scale.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(scale), NAN), scale.name))
    onnx.save(model, tmp_path / "src.onnx")
    with pytest.raises(ExportError, match=r"model_int8_ort\.onnx: the ONNX Runtime flavour has 1 NaN and 0 Inf"):
        to_ort_int8(tmp_path / "src.onnx", tmp_path / "model_int8_ort.onnx", "exact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.onnx"]


# --- 2. training divergence first seen at the end of an epoch -------------------------------------------------

def test_finetune_divergence_seen_by_the_epoch_evaluation_names_step_epoch_and_checkpoint(tmp_path, capsys):
    """Training losses stay finite; the end-of-epoch evaluation is the first to see Inf. Before: FloatingPointError
    traceback, no step named, exit 1."""
    recipe = _recipe(tmp_path, "overflow_at_step_cnn", "  - finetune: {epochs: 3, lr: 0.001, eval_samples: 9}\n"
                     "  - evaluate: {latency: false}\n", finetune=True)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (f"finetune: the end-of-epoch evaluation failed: the model produced NaN/Inf logits at step {BREAK_AT} "
            "(epoch 2); training stopped and the last good checkpoint is checkpoints/finetune_epoch1.pt") in err
    assert "Lower the learning rate (lr: 0.001)" in err and "Traceback" not in err
    run_dir, metrics = _failed_run(tmp_path)
    assert f"at step {BREAK_AT} (epoch 2)" in metrics["error"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["finetune_epoch1.pt"]
    saved = torch.load(run_dir / "checkpoints" / "finetune_epoch1.pt", weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())


def test_qat_weights_gone_nan_in_the_last_step_of_an_epoch_get_no_checkpoint(tmp_path, capsys):
    """The step that wrote NaN into fc.bias had a finite loss and was the epoch's last, and no evaluation split
    scores the epochs: before, qat_epoch2.pt was saved with the NaN and the next step's loss guard named it as the
    last good checkpoint."""
    recipe = _recipe(tmp_path, "nan_bias_at_step_cnn", "  - calibrate: {method: max}\n"
                     "  - qat: {epochs: 3, lr: 0.0003}\n  - export: {}\n", finetune=True)
    text = recipe.read_text()
    recipe.write_text("\n".join(line for line in text.splitlines() if not line.startswith("  evaluation:")) + "\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (f"qat: the weights became NaN/Inf (fc.bias) at step {BREAK_AT} (epoch 2); training stopped and the last "
            "good checkpoint is checkpoints/qat_epoch1.pt (resume from it with qat.resume)") in err
    run_dir, metrics = _failed_run(tmp_path)
    assert "fc.bias" in metrics["error"] and "export" not in metrics["stages"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["qat_epoch1.pt"]
    assert not (run_dir / "model.onnx").exists()


def test_divergence_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.train.loop import FitSetup, fit
    from workbench.train.options import TrainOptions

    model = overflow_at_step_cnn()
    x = torch.randn(8 * STEPS_PER_EPOCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [(x[i : i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, len(x), 8)] * 2  # epoch 1 breaks
    loss = lambda out, batch: (torch.nn.functional.cross_entropy(out, batch[1]), {})  # noqa: E731

    def evaluate(m):
        if not torch.isfinite(m(x)).all():
            raise FloatingPointError("the model produced NaN/Inf logits")
        return {}

    with pytest.raises(WorkbenchError, match=r"at step 6 \(epoch 1\); training stopped and no epoch had finished, so "
                       r"there is no checkpoint"):
        fit(model, batches, TrainOptions(epochs=2), loss, FitSetup(checkpoint_dir=tmp_path / "ck", evaluate=evaluate))
    assert not (tmp_path / "ck").exists()


# --- 2b. the finite rule: NaN anywhere, Inf only in parameters, BatchNorm statistics and quantization ranges --

def test_an_inf_mask_buffer_loads_finetunes_calibrates_and_exports(tmp_path, capsys):
    """Before: refused at load ("holds Inf in its mask"), and every fine-tune epoch counted as diverged."""
    recipe = _recipe(tmp_path, "masked_cnn", "  - finetune: {epochs: 2, lr: 0.001}\n  - calibrate: {method: max}\n"
                     "  - export: {}\n  - evaluate: {latency: false}\n", finetune=True)
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "complete", metrics.get("error")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["finetune_epoch1.pt", "finetune_epoch2.pt"]
    saved = torch.load(run_dir / "checkpoints" / "finetune_epoch2.pt", weights_only=True)["model"]
    assert int(torch.isneginf(saved["pool.mask"]).sum()) == MASKED_BORDER  # kept as it was, not "repaired"
    graph = onnx.load(run_dir / "model.onnx").graph
    constants = [numpy_helper.to_array(t) for t in graph.initializer]
    constants += [numpy_helper.to_array(a.t) for n in graph.node for a in n.attribute if a.type == a.TENSOR]
    assert any(np.isneginf(c).sum() == MASKED_BORDER for c in constants if c.dtype.kind == "f")
    scores = {b: v["metrics"] for b, v in metrics["stages"]["evaluate"]["backends"].items()}
    assert scores["ort_fp32"]["mean_kl"] < 1e-6  # ONNX Runtime computes the masked softmax as PyTorch does
    assert {s["top1"] for s in scores.values()} == {scores["pytorch_fp32"]["top1"]}


def test_nan_in_a_buffer_is_still_refused_at_load(tmp_path, capsys):
    state = masked_cnn().state_dict()
    state["pool.mask"][5, 5] = NAN
    torch.save(state, tmp_path / "w.pth")
    recipe = _recipe(tmp_path, "masked_cnn", "  - calibrate: {method: max}\n")
    weights = f'  weights: "{tmp_path / "w.pth"}"\n'
    recipe.write_text(recipe.read_text().replace("  trust_code: true\n", "  trust_code: true\n" + weights))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "layer 'pool' holds NaN in its mask (1 of 256 values)" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_calibrate_applies_the_same_rule():
    """The Python API: the -inf mask calibrates; NaN in it, or Inf in a BatchNorm statistic, is refused."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = Int8Config(method="max", fold_batchnorm=False)
    quantize_(masked_cnn(), config, lambda m: m(x), x[:1])
    model = masked_cnn()
    model.pool.mask[5, 5] = NAN
    with pytest.raises(CalibrationError, match=rf"pool\.mask \(layer 'pool'\) holds 1 NaN and {MASKED_BORDER} Inf"):
        quantize_(model, config, lambda m: m(x), x[:1])
    model = masked_cnn()
    model.bn3.running_var[2] = float("inf")
    with pytest.raises(CalibrationError, match=r"bn3\.running_var \(layer 'bn3'\) holds 0 NaN and 1 Inf"):
        quantize_(model, config, lambda m: m(x), x[:1])


def test_the_rule_covers_quantization_ranges_and_training():
    from workbench.errors import WorkbenchError
    from workbench.models.guards import first_nonfinite
    from workbench.train.loop import FitSetup, fit
    from workbench.train.options import TrainOptions

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = masked_cnn()
    quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    assert first_nonfinite(model) is None
    model.conv2.input_quantizer.amax = torch.tensor(float("inf"))  # a range of Inf is no range
    assert first_nonfinite(model).name == "conv2.input_quantizer._amax"

    model = masked_cnn()
    batches = [(x, torch.zeros(8, dtype=torch.long))] * 2
    loss = lambda out, batch: (torch.nn.functional.cross_entropy(out, batch[1]), {})  # noqa: E731
    assert len(fit(model, batches, TrainOptions(epochs=1), loss)) == 1

    steps = []

    def nan_after_the_last_step():  # only the end-of-epoch check can see it
        steps.append(len(steps) + 1)
        if len(steps) == len(batches):
            model.pool.mask[3, 3] = NAN

    with pytest.raises(WorkbenchError, match=r"the weights became NaN/Inf \(pool\.mask\) at step 2 \(epoch 1\)"):
        fit(model, batches, TrainOptions(epochs=1), loss, FitSetup(after_step=nan_after_the_last_step))


def test_an_inf_padding_layer_is_not_named_as_where_the_model_overflows(tmp_path, capsys):
    """Before: 'pad' was named, the first layer with an Inf in its output, though it is meant to hold one."""
    recipe = _recipe(tmp_path, "pad_then_overflow_cnn", "  - evaluate: {latency: false}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "evaluate: pytorch_fp32: the model produced NaN/Inf logits; the first layer whose output holds NaN/Inf is " \
           "'conv'" in err and "Traceback" not in err
    _, metrics = _failed_run(tmp_path)
    assert "'conv'" in metrics["error"]


# --- 3. check-onnx: no model, or no quantized model -----------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("empty", "empty.onnx is empty (0 bytes), so it is not an ONNX model"),
    ("truncated", "truncated.onnx is not an ONNX model (DecodeError"),
    ("text", "text.onnx is not an ONNX model (DecodeError"),
    ("missing", "missing.onnx: no such file"),
])
def test_check_onnx_refuses_a_file_that_is_not_a_model(onnx_files, name, message, capsys):
    path = onnx_files["model"].with_name(f"{name}.onnx")
    assert main(["check-onnx", str(path)]) == 2
    out, err = capsys.readouterr()
    assert message in err and "violation" not in out  # before: "0 violation(s)", exit 0 for the 0-byte file


def test_check_onnx_refuses_a_graph_without_input(tmp_path, capsys):
    const = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    path = _save_graph(tmp_path / "noinput.onnx", [const], [], [helper.make_tensor_value_info("y", 1, [2])])
    assert main(["check-onnx", str(path)]) == 2
    assert "noinput.onnx holds no graph (no nodes or no input), so it is not an ONNX model" in capsys.readouterr().err


def test_check_onnx_reports_an_fp32_graph_as_not_quantized(onnx_files, capsys):
    assert main(["check-onnx", str(onnx_files["model_fp32"])]) == 1
    out = capsys.readouterr().out
    assert "[not_quantized]" in out and "no Q/DQ: this graph is not quantized" in out
    assert out.strip().endswith("model_fp32.onnx: not quantized, 0 violation(s) of TensorRT's Q/DQ rules")
    assert main(["check-onnx", str(onnx_files["model_fp32"]), "--json"]) == 1
    assert [v["rule"] for v in json.loads(capsys.readouterr().out)] == ["not_quantized"]


def test_check_onnx_reports_qdq_that_quantizes_no_compute_node(tmp_path, capsys):
    """Q/DQ on an Add only, and a float Conv: TensorRT runs no layer in INT8."""
    s, zp = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "zp")
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("QuantizeLinear", ["images", "s", "zp"], ["q"], name="/in/QuantizeLinear"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], name="/in/DequantizeLinear"),
             helper.make_node("Add", ["dq", "images"], ["a"], name="/add/Add"),
             helper.make_node("Conv", ["a", "w"], ["y"], name="/conv/Conv")]
    path = _save_graph(tmp_path / "addonly.onnx", nodes, [_float_input()],
                       [helper.make_tensor_value_info("y", 1, [1, 4, 8, 8])], [s, zp, w])
    assert main(["check-onnx", str(path)]) == 1
    out = capsys.readouterr().out
    assert ("this graph is not quantized: it has 2 Q/DQ nodes, but none of its 1 Conv/Gemm/MatMul nodes reads INT8 "
            "data and weights through them") in out


def test_check_onnx_does_not_call_a_quantized_graph_unquantized(onnx_files, capsys):
    code = main(["check-onnx", str(onnx_files["model"])])
    out = capsys.readouterr().out
    assert "not quantized" not in out and "not_quantized" not in out
    assert code == (0 if " 0 violation(s)" in out else 1)


# --- 4. bench and build on files that are no model -------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("empty", "empty.onnx is empty (0 bytes), so it is not an ONNX model"),
    ("truncated", "truncated.onnx is not an ONNX model (DecodeError"),
])
def test_bench_and_build_refuse_a_file_that_is_not_a_model(onnx_files, tmp_path, name, message, capsys):
    """Before: IndexError traceback (exit 1) for the 0-byte file. build reports the file before TensorRT's absence."""
    path = onnx_files[name]
    assert main(["bench", str(path), "--batch-sizes", "1", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "b.json").exists()
    assert main(["build", str(path), "--out", str(tmp_path / "m.engine")]) == 2
    err = capsys.readouterr().err
    assert message in err and "TensorRT" not in err and not (tmp_path / "m.engine").exists()


def test_bench_of_a_directory_names_the_bad_file_in_it(onnx_files, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_fp32.onnx").write_bytes(onnx_files["model_fp32"].read_bytes())
    (run_dir / "model.onnx").write_bytes(b"")
    assert main(["bench", str(run_dir), "--batch-sizes", "1", "--repeats", "1", "--json", str(tmp_path / "b.json")]) \
        == 2
    assert f"{run_dir / 'model.onnx'} is empty (0 bytes)" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
    (tmp_path / "nothing").mkdir()
    assert main(["bench", str(tmp_path / "nothing")]) == 2
    assert "nothing: no .onnx, .engine or .xml files to time" in capsys.readouterr().err


# --- 5. no terminal escape codes where there is no terminal ----------------------------------------------------

def _cli(args: list[str], cwd: Path, out: Path, env_extra: dict) -> int:
    """`python -m workbench ARGS` with stdout and stderr redirected to files (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), **env_extra}
    env.pop("NO_COLOR", None)
    with open(out / "stdout.txt", "wb") as so, open(out / "stderr.txt", "wb") as se:
        return subprocess.run([sys.executable, "-m", "workbench", *args], cwd=cwd, env=env, stdout=so, stderr=se,
                              timeout=600).returncode


# What CI systems set: rich then styles output that is not a terminal (before: 8 escape sequences in stdout).
FORCE = {"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}


def test_output_to_files_holds_no_escape_codes_even_under_force_color(tmp_path):
    images = make_image_folder(tmp_path / "images")
    ok = tmp_path / "ok.yaml"
    ok.write_text(tiny_recipe(images, tmp_path / "runs", "  - calibrate: {method: max}\n  - export: {}\n"
                              "  - evaluate: {latency_repeats: 1, latency_batch_sizes: [1]}\n"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_recipe(images, tmp_path / "bad_runs", "  - calibrate: {method: max}\n").replace(
        "helpers:tiny_cnn", "test_hostile_numeric:inf_fold_cnn"))
    for recipe, code, expect in ((ok, 0, "stage 3/3: evaluate"), (bad, 2, "error: calibrate: conv2.weight holds")):
        out = tmp_path / recipe.stem
        out.mkdir()
        assert _cli(["run", str(recipe)], tmp_path, out, FORCE) == code
        stdout, stderr = (out / "stdout.txt").read_bytes(), (out / "stderr.txt").read_bytes()
        assert expect.encode() in stdout + stderr
        assert b"\x1b[" not in stdout and b"\x1b[" not in stderr
    assert "ort_int8_faithful" in (tmp_path / "ok" / "stdout.txt").read_text()  # the summary table was printed


def test_a_terminal_still_gets_styled_output(onnx_files, tmp_path):
    """The plain-text rule is for files and pipes only: on a pseudo-terminal the bench table is styled."""
    import pty

    main_fd, sub_fd = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "TERM": "xterm-256color"}
    for key in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "workbench", "bench", str(onnx_files["model_fp32"]), "--batch-sizes",
                           "1", "--repeats", "1", "--warmup", "0"], cwd=tmp_path, env=env, stdout=sub_fd,
                          stderr=subprocess.DEVNULL, timeout=600)
    os.close(sub_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert proc.returncode == 0
    text = b"".join(chunks)
    assert b"model_fp32.onnx" in text and b"\x1b[" in text
