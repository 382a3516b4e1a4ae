"""Detection end to end: a tiny YOLOv5-format detector through calibrate -> export -> evaluate on generated COCO
data."""

import json
import math

import pytest
from helpers import make_tiny_yolov5_checkpoint
from test_detection_data import write_detection_set

from workbench.cli import main


def _recipe(tmp_path, ckpt, images, ann, stages):
    text = f"""name: tinyyolo
task: detection
model: {{spec: "yolov5:{ckpt}", input_size: [3, 64, 64]}}
data:
  transform: {{letterbox: [64, 64], stride: 8}}
  calibration: {{source: coco, path: "{images}", annotations: "{ann}"}}
  evaluation: {{source: coco, path: "{images}", annotations: "{ann}"}}
  batch_size: 2
runs_dir: "{tmp_path / 'runs'}"
stages:
{stages}"""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_detection_run_scores_every_backend_with_map(tmp_path):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    stages = ("  - calibrate: {method: max}\n  - export: {dynamic_size: true}\n"
              "  - evaluate: {latency_repeats: 2, latency_batch_sizes: [1]}\n")
    assert main(["run", str(_recipe(tmp_path, ckpt, images, ann, stages))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stages"]["calibrate"]["census"] == {"Conv2d": {"int8": 12, "float": 0},
                                                        "Add (residual)": {"int8": 1, "float": 0}}
    backends = metrics["stages"]["evaluate"]["backends"]
    assert set(backends) == {"pytorch_fp32", "pytorch_int8", "ort_fp32", "ort_int8_faithful", "ort_int8_default",
                             "ort_int8_native"}
    # SiLU (Sigmoid, Mul) follows every conv, not a quantizer, so ONNX Runtime keeps the convs in float even in its
    # own flavour; that graph still computes the TensorRT-style graph's function.
    native = metrics["stages"]["export"]["model_int8_ort.onnx"]
    assert native["fused"].get("QLinearConv", 0) == 0 and native["weights_folded"] == 12
    assert metrics["stages"]["evaluate"]["ort_native_vs_faithful"]["box_agreement"] >= 95.0
    # The random detector finds a few objects (mAP50-95 about 0.01, mAP50 about 0.06); every backend scores within a
    # fifth of that of FP32, and ONNX Runtime's FP32 graph finds FP32's boxes.
    fp32 = backends["pytorch_fp32"]["metrics"]
    assert fp32["map50"] > fp32["map50_95"] > 0.005
    for name, b in backends.items():
        assert b["metrics"]["samples"] == 4
        assert b["metrics"]["map50_95"] == pytest.approx(fp32["map50_95"], rel=0.2), name
    assert backends["ort_fp32"]["metrics"]["box_agreement"] >= 99.0
    # the box decode stays float: the exported graph quantizes the convolutions and nothing after them
    census = metrics["stages"]["export"]["model.onnx"]["census"]
    assert census["quantized"] == {"Conv": 12} and census["float"] == {}
    report = (run_dir / "report.md").read_text()
    assert "mAP50-95" in report and "Box agreement" in report
    assert "12 convolution(s) still run in float in ONNX Runtime" in report and "`model_fp32.onnx` is faster" in report


def test_detection_source_without_letterbox(tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    path = _recipe(tmp_path, ckpt, images, ann, "  - evaluate: {latency: false}\n")
    path.write_text(path.read_text().replace("  transform: {letterbox: [64, 64], stride: 8}\n", ""))
    assert main(["run", str(path)]) == 2
    assert "data.transform.letterbox" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_annotations_that_do_not_match_the_images(tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    (images / "a.png").unlink()
    assert main(["run", str(_recipe(tmp_path, ckpt, images, ann, "  - evaluate: {latency: false}\n"))]) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_classifier_is_not_a_detector(tmp_path, capsys, images):
    _, ann, _ = write_detection_set(tmp_path / "set")
    path = _recipe(tmp_path, "x", tmp_path / "set" / "images", ann, "  - evaluate: {latency: false}\n")
    path.write_text(path.read_text().replace(
        'spec: "yolov5:x", input_size: [3, 64, 64]',
        'spec: "import:helpers:tiny_cnn", input_size: [3, 64, 64], trust_code: true'))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a detector the adapter knows: its output has shape (1, 3)" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_labels_beyond_the_models_classes(tmp_path, capsys):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=2)  # the data has 3 classes
    images, ann, _ = write_detection_set(tmp_path / "set")
    assert main(["run", str(_recipe(tmp_path, ckpt, images, ann, "  - evaluate: {latency: false}\n"))]) == 2
    err = capsys.readouterr().err
    assert "instances.json lists 3 categories but the model has 2 classes" in err
    assert not (tmp_path / "runs").exists()


def test_exported_detector_runs_at_other_sizes(tmp_path):
    import numpy as np
    import torch

    from workbench.models import resolve_model
    from workbench.qdq.export import export_onnx
    from workbench.quant.ptq import Int8Config, quantize_
    from workbench.runtime.runners import OrtRunner, TorchRunner
    from workbench.schema import ModelConfig

    model = resolve_model(ModelConfig(spec=f"yolov5:{make_tiny_yolov5_checkpoint(tmp_path / 't.pt')}"))
    quantize_(model, Int8Config(method="max"), lambda m: m(torch.rand(4, 3, 64, 64)), torch.rand(1, 3, 64, 64))
    path = export_onnx(model, torch.rand(1, 3, 64, 64), tmp_path / "t.onnx", dynamic_size=True)
    for shape in [(2, 3, 64, 64), (1, 3, 48, 64)]:  # square and non-square (like 480x640 at full size)
        x = torch.rand(*shape)
        faithful, fake = OrtRunner(path, "f", "faithful")(x), TorchRunner(model, "t")(x)
        assert faithful.shape == fake.shape == (
            shape[0], 3 * ((shape[2] // 4) * (shape[3] // 4) + (shape[2] // 8) * (shape[3] // 8)), 8)
        np.testing.assert_allclose(faithful, fake, atol=1e-2 * np.abs(fake).max())


def test_yolo_txt_labels_run_end_to_end(tmp_path):
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, labels = write_detection_set(tmp_path / "set")
    path = _recipe(tmp_path, ckpt, images, ann, "  - calibrate: {method: percentile}\n  - evaluate: {latency: false}\n")
    text = path.read_text().replace(f'source: coco, path: "{images}", annotations: "{ann}"',
                                    f'source: yolo_txt, path: "{images}", label_dir: "{labels}"')
    path.write_text(text)
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    backends = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]["backends"]
    assert set(backends) == {"pytorch_fp32", "pytorch_int8"}
    assert backends["pytorch_int8"]["metrics"]["samples"] == 4 and "map50_95" in backends["pytorch_int8"]["metrics"]


def test_detector_sensitivity_and_mixed_precision(tmp_path):
    """The sweep covers every convolution and the residual Add; a plan keeps named units float in the graph."""
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    stages = (
        "  - calibrate: {method: max}\n  - sensitivity: {proxy_samples: 4}\n"
        "  - mixed_precision: {min_agreement: 99.5}\n  - export: {}\n"
    )
    assert main(["run", str(_recipe(tmp_path, ckpt, images, ann, stages))]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    table = json.loads((run_dir / "sensitivity.json").read_text())
    rows = table["layers"]
    assert table["metric"] == "mAP50-95 points" and len(rows) == 13
    assert {r["type"] for r in rows} == {"Conv2d", "Add (residual)"}
    add = next(r for r in rows if r["type"] == "Add (residual)")
    assert add["layer"] == "model.2.m.0.residual_add" and len(add["onnx_qdq_nodes"]) == 4
    assert all(math.isfinite(r["only_sqnr_db"]) and 0 <= r["only_kl"] for r in rows)
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]
    mp = metrics["mixed_precision"]
    # random weights: INT8 moves boxes. 100 % is out of reach for the exported graph: ONNX Runtime's float
    # arithmetic alone moves a box edge (the all-float graph agrees 99.9 %).
    assert mp["metric"] == "agreement %" and mp["final"] >= 99.5 and mp["int8_all"] < 99.5
    assert mp["exported"]["meets"] and mp["exported"]["agreement"] >= 99.5
    # Some units must go float; how many depends on the device's arithmetic (on an H100 all 13 do).
    assert 1 <= len(mp["float_layers"]) <= 13
    census = metrics["export"]["model.onnx"]["census"]
    assert census["quantized"].get("Conv", 0) == 12 - sum(u != "model.2.m.0.residual_add" for u in mp["float_layers"])


def test_detector_prune_finetune_calibrate_qat_export(tmp_path):
    """YOLOv5 checkpoints freeze their parameters; pruning (which traces autograd) and distillation still work."""
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt", nc=3)
    images, ann, _ = write_detection_set(tmp_path / "set")
    stages = ("  - prune: {method: structured, ratio: 0.4, scope: layer, latency: false}\n"
              "  - finetune: {epochs: 1, lr: 0.001, eval_samples: 4}\n"
              "  - calibrate: {method: max}\n  - qat: {epochs: 1, lr: 0.00001, eval_samples: 4}\n"
              "  - export: {}\n  - evaluate: {latency: false}\n")
    path = _recipe(tmp_path, ckpt, images, ann, stages)
    path.write_text(path.read_text().replace("  batch_size: 2",
                                             f'  finetune: {{source: files, path: "{images}"}}\n  batch_size: 2'))
    assert main(["run", str(path)]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    stages = json.loads((run_dir / "metrics.json").read_text())["stages"]
    prune = stages["prune"]
    assert prune["macs_after"] < 0.8 * prune["macs_before"]
    assert prune["out_channels"]["model.1.conv"] == 8 and prune["out_channels"]["model.5.m.0"] == 24  # head kept
    assert stages["finetune"]["history"][0]["distill"] > 0
    backends = stages["evaluate"]["backends"]
    assert {"pytorch_fp32_pruned", "ort_fp32_pruned", "pytorch_int8_ptq", "ort_int8_ptq",
            "ort_int8_faithful"} <= set(backends)
    assert stages["qat"]["history"][0]["distill"] > 0  # QAT on the pruned detector, by head distillation
    # the pruned, QAT-trained graph keeps TensorRT's rules
    assert stages["export"]["model.onnx"]["tensorrt_rules"] == []
    # the exported pruned FP32 graph finds the pruned PyTorch model's boxes (both scored against the unpruned FP32)
    pruned = backends["pytorch_fp32_pruned"]["metrics"]["box_agreement"]
    assert backends["ort_fp32_pruned"]["metrics"]["box_agreement"] == pytest.approx(pruned, abs=2.0) and pruned < 100
