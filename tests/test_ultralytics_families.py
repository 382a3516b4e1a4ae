"""Every Ultralytics detection family the `ultralytics` package builds: quantized by the placement rules, exported,
and checked against TensorRT's Q/DQ rules, with the DFL, the box decode and attention in float."""

import importlib.util

import pytest
import torch

from workbench.qdq.export import export_onnx
from workbench.qdq.graph import qdq_census
from workbench.qdq.trt_rules import check_qdq
from workbench.schema import ModelConfig

# Not imported here: importing ultralytics patches PIL and torch process-wide; workbench's import_ultralytics
# (through resolve_model) undoes that.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                reason="ultralytics extra not installed")

# family -> (int8 convolutions, residual Add units, attention MatMuls left float); random weights: structure only.
FAMILIES = {
    "yolov8n.yaml": (63, 6, 0),
    "yolov5nu.yaml": (75, 7, 0),
    "yolo11n.yaml": (87, 13, 2),  # C3k2, and C2PSA's PSABlock: attention and feed-forward residuals
    "yolov10n.yaml": (107, 10, 2),  # PSA; and two Adds no class rewrite knows, found by pattern
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_quantizes_by_the_rules_and_passes_check_onnx(family, tmp_path):
    from workbench.models import resolve_model
    from workbench.quant.ptq import Int8Config, quantize_
    from workbench.runtime.runners import OrtRunner, TorchRunner

    int8_convs, residual_units, attention = FAMILIES[family]
    model = resolve_model(ModelConfig(spec=f"ultralytics:{family}", input_size=(3, 64, 64))).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    census = result.census()
    assert census["Conv2d"] == {"int8": int8_convs, "float": 1}  # the DFL's fixed convolution
    assert list(result.excluded.values()) == ["Conv2d"] and next(iter(result.excluded)).endswith("dfl.conv")
    assert census["Add (residual)"] == {"int8": residual_units, "float": 0}
    path = export_onnx(model, x[:1], tmp_path / "model.onnx")
    assert check_qdq(path, {n for n, _ in model.named_modules()}) == []
    graph = qdq_census(path)
    assert len(graph["float"].get("MatMul", [])) == attention
    assert len(graph["float"].get("Conv", [])) == 1  # the DFL; the decode after it has no Q/DQ
    # The exported graph run faithfully computes the fake-quant model's function.
    fake = TorchRunner(model, "fake")(x)
    faithful = OrtRunner(path, "faithful", "faithful")(x.numpy())
    assert abs(faithful - fake).max() <= 1e-3 * abs(fake).max() + 1e-3


@pytest.mark.parametrize("family", ["yolov8n.yaml", "yolov10n.yaml"])  # Detect, and v10Detect's one-to-one head
def test_a_graph_exported_with_dynamic_size_decodes_at_every_size(family, tmp_path):
    """Ultralytics' heads cache their anchors for the last input size: traced as cached, a graph exported with dynamic
    height and width (as `workbench quantize` exports these models, for `yolo val`'s rectangular batches) would keep
    the example's anchors and fail, or decode wrongly, at any other size."""
    from workbench.models import resolve_model
    from workbench.runtime.runners import OrtRunner, TorchRunner

    model = resolve_model(ModelConfig(spec=f"ultralytics:{family}", input_size=(3, 64, 64))).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(1, 3, 64, 64, generator=generator)
    model(example)  # the anchors of 64x64 now cached, as after calibration
    path = export_onnx(model, example, tmp_path / "model.onnx", dynamic_size=True, clean=True)
    runner = OrtRunner(path, "faithful", "faithful")
    for shape in ((1, 3, 64, 64), (2, 3, 96, 64), (1, 3, 64, 128)):
        x = torch.rand(*shape, generator=generator)
        want = TorchRunner(model, "fp32")(x)
        got = runner(x.numpy())
        assert got.shape == want.shape, shape
        assert abs(got - want).max() <= 1e-3 * abs(want).max() + 1e-3, shape
