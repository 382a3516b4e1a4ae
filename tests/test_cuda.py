"""What can break on a GPU and not on the CPU: the device and dtype of every parameter and buffer after bfloat16
autocast, checkpoints written on one device and read on the other, quantizer state during QAT, the calibrators on
CUDA tensors against the same data on the CPU, and a whole recipe with loader worker processes and `device: cuda`.

Each test skips without CUDA. scripts/test_gpu.sh runs these and every other `cuda`-marked test on the GPU machine,
where a skip for want of CUDA counts as a failure. WORKBENCH_TEST_DEVICE=cpu runs the same steps on the CPU (the
script's --dry-run), which checks the tests themselves where no GPU is lent.
"""

import json
import os
from itertools import chain

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from helpers import colour_blob_batch, make_image_folder, tiny_cnn, trained_cnn

from workbench.cli import main
from workbench.qdq.export import export_onnx
from workbench.quant.ptq import Int8Config, quantize_, refresh_weight_ranges_
from workbench.runtime.runners import OrtRunner, TorchRunner
from workbench.tasks.classification import LogitDistiller
from workbench.train.loop import FitSetup, fit
from workbench.train.options import TrainOptions

CUDA = torch.device(os.environ.get("WORKBENCH_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                                   reason="needs a CUDA device")]


def _batches(n=4, seed=1):
    """CPU batches, as a DataLoader yields them: fit moves the images, the loss the rest."""
    x, y = colour_blob_batch(n_per_class=8, seed=seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return [(x[i:i + 6], y[i:i + 6]) for i in range(0, len(x), 6)][:n]


def _kd_loss(teacher):
    def loss_fn(outputs, batch):
        with torch.no_grad():
            t = teacher(batch[0].to(outputs.device))
        loss = LogitDistiller(temperature=2.0).loss(outputs, t)
        return loss, {"distill": loss.item()}

    return loss_fn


def _tensors(model):
    return chain(model.named_parameters(), model.named_buffers())


def test_amp_training_on_cuda_keeps_float32_state_on_the_gpu_and_its_checkpoint_resumes_on_the_cpu(tmp_path):
    teacher, student = trained_cnn().to(CUDA), tiny_cnn().to(CUDA)
    bn_before = student.bn1.running_mean.clone()
    opts = TrainOptions(epochs=4, lr=0.05, amp=True)
    history = fit(student, _batches(), opts, _kd_loss(teacher), FitSetup(device=CUDA, checkpoint_dir=tmp_path))
    assert history[-1]["distill"] < 0.5 * history[0]["distill"]
    for name, t in _tensors(student):  # autocast computes in bfloat16 but must leave no bfloat16 state behind
        assert t.device.type == CUDA.type, name
        assert t.dtype == (torch.long if name.endswith("num_batches_tracked") else torch.float32), name
    assert not torch.equal(student.bn1.running_mean, bn_before)  # BatchNorm statistics updated under autocast

    # The epoch-2 checkpoint (CUDA tensors, optimizer state included) resumes on a machine without a GPU.
    cpu_student = tiny_cnn()
    resumed = fit(cpu_student, _batches(), opts.model_copy(update={"resume": str(tmp_path / "finetune_epoch2.pt")}),
                  _kd_loss(trained_cnn()), FitSetup(device=torch.device("cpu")))
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]
    assert all(t.device.type == "cpu" for _, t in _tensors(cpu_student))
    x = colour_blob_batch(seed=7)[0]
    with torch.no_grad():  # the same training, two devices: the same predictions
        agree = (cpu_student(x).argmax(1) == student(x.to(CUDA)).argmax(1).cpu()).float().mean()
    assert agree >= 0.9


def test_amp_training_reaches_what_float32_training_reaches():
    """bfloat16 autocast is an 8-bit mantissa: it must not stall a fine-tune that float32 finishes."""
    x = colour_blob_batch(seed=7)[0].to(CUDA)
    teacher = trained_cnn().to(CUDA)
    for amp in (False, True):
        student = tiny_cnn().to(CUDA)
        fit(student, _batches(), TrainOptions(epochs=6, lr=0.05, amp=amp), _kd_loss(teacher), FitSetup(device=CUDA))
        with torch.no_grad():
            assert (student(x).argmax(1) == teacher(x).argmax(1)).float().mean() >= 0.9, f"amp={amp}"


def test_qat_on_cuda_keeps_quantizers_on_the_gpu_and_weight_ranges_follow_the_weights(tmp_path):
    model = trained_cnn().to(CUDA)
    x = colour_blob_batch()[0].to(CUDA)
    result = quantize_(model, Int8Config(method="max", weights="per_tensor"), lambda m: m(x), x[:1])
    fit(model, _batches(), TrainOptions(epochs=2, lr=1e-3, optimizer="adamw", amp=True),
        _kd_loss(trained_cnn().to(CUDA)), FitSetup(device=CUDA, label="qat",
                                                    after_step=lambda: refresh_weight_ranges_(model, result)))
    for name, t in _tensors(model):
        assert t.device.type == CUDA.type, name
        assert t.dtype != torch.bfloat16, name
    for name in result.quantized:
        layer = dict(model.named_modules())[name]
        assert layer.weight_quantizer.amax.item() == pytest.approx(layer.weight.abs().max().item(), rel=1e-6), name
    # The QAT model exported from the GPU is the graph ONNX Runtime executes on the CPU.
    test = colour_blob_batch(seed=9)[0]
    path = export_onnx(model, test[:1].to(CUDA), tmp_path / "qat.onnx")
    fake = TorchRunner(model, "fq", CUDA.type)(test)
    faithful = OrtRunner(path, "ort", "faithful")(test.numpy())
    np.testing.assert_allclose(faithful, fake, atol=5e-3 * np.abs(fake).max())


@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_every_calibrator_on_cuda_matches_the_cpu(method):
    """The same images calibrated on either device give the same ranges (histogram edges may round apart by a bin)."""
    x = torch.cat([colour_blob_batch(seed=s)[0] for s in (1, 2, 3)])
    ranges = {}
    for device in ("cpu", CUDA.type):
        model = trained_cnn().to(device)
        data = x.to(device)

        def loop(m, data=data):
            with torch.no_grad():
                for i in range(0, len(data), 16):
                    m(data[i:i + 16])

        result = quantize_(model, Int8Config(method=method), loop, data[:1])
        weights = {n: m.weight_quantizer.amax.detach().cpu() for n, m in model.named_modules() if n in result.quantized}
        ranges[device] = (result.activation_amax, weights, result.samples)
    (cpu_act, cpu_w, cpu_n), (gpu_act, gpu_w, gpu_n) = ranges["cpu"], ranges[CUDA.type]
    assert gpu_n == cpu_n == len(x) and set(gpu_act) == set(cpu_act)
    tolerance = 1e-5 if method == "max" else 2e-3  # a histogram method's range moves by at most a bin or two
    for name, value in cpu_act.items():
        assert gpu_act[name] == pytest.approx(value, rel=tolerance), name
    for name, value in cpu_w.items():
        torch.testing.assert_close(gpu_w[name], value, rtol=1e-5, atol=0)


def test_recipe_on_cuda_prune_finetune_calibrate_qat_export_evaluate_with_loader_workers(tmp_path):
    """The whole chain with `device: cuda` and two DataLoader worker processes: each stage runs on the GPU and the
    exported INT8 graph, executed by ONNX Runtime on the CPU, is the model the GPU trained."""
    images = make_image_folder(tmp_path / "blobs", per_class=20, seed=4)
    runs = tmp_path / "runs"
    stages = ("  - prune: {method: structured, ratio: 0.5}\n"
              "  - finetune: {epochs: 2, lr: 0.01, eval_samples: 30}\n"
              "  - calibrate: {method: mse}\n"
              "  - qat: {epochs: 2, lr: 0.0003, eval_samples: 30}\n"
              "  - export: {}\n  - evaluate: {latency: false}\n")
    text = tiny_recipe(images, runs, stages).replace("helpers:tiny_cnn", "helpers:trained_cnn")
    text = text.replace("  batch_size: 4", f'  finetune: {{source: imagefolder, path: "{images}"}}\n'
                                           "  batch_size: 8\n  workers: 2")
    text = text.replace("runs_dir:", f"device: {CUDA.type}\nruns_dir:")
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = runs.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["device"].startswith(CUDA.type)
    stages = metrics["stages"]
    assert stages["prune"]["out_channels"]["conv2"] == 8
    assert len(stages["finetune"]["history"]) == 2 and len(stages["qat"]["history"]) == 2
    ev = stages["evaluate"]["backends"]
    kl = {b: e["metrics"]["mean_kl"] for b, e in ev.items()}
    assert kl["ort_int8_faithful"] == pytest.approx(kl["pytorch_int8"], rel=1e-2, abs=1e-4)
    assert ev["pytorch_int8"]["metrics"]["top1"] >= 90
    for name in ("model.onnx", "qat_model.pt", "checkpoints/qat_epoch2.pt", "checkpoints/finetune_epoch2.pt"):
        assert (run_dir / name).is_file(), name
