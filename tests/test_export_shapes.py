"""Export checks the shapes it declares (issue 27, item 4): a graph declared dynamic-batch (or -size) runs at two
batches (and two sizes) before it is written; a Reshape pinning the batch (ShuffleNet's channel_shuffle written
with `x.data.size()`) is fixed, anything else is refused naming the node, with nothing written."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from workbench.errors import ExportError
from workbench.qdq.export import export_onnx, shape_fixes
from workbench.qdq.shapes import pinned_batch_reshapes


def channel_shuffle(x, groups):
    # As ShuffleNetV2 (and FastestDet) write it: x.data.size() is a Python tuple, so the tracer writes constants.
    batch_size, c, h, w = x.data.size()
    x = x.view(batch_size, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch_size, -1, h, w)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(channel_shuffle(torch.relu(self.conv1(x)), 2))


class ZerosConcat(ShuffleNet):
    """A batch pinned where no rewrite can prove the fix: a constant tensor of the export's batch, concatenated."""

    def forward(self, x):
        y = self.conv1(x)
        return torch.cat([y, torch.zeros(x.data.size(0), 1, y.shape[2], y.shape[3])], 1)


class FlattenSpatial(ShuffleNet):
    """Height and width pinned by a view: fine for the batch once fixed, not for a second size."""

    def forward(self, x):
        y = self.conv1(x)
        b, c, h, w = y.data.size()
        return y.view(b, c, h * w).mean(2)


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("clean", [False, True])
def test_channel_shuffle_with_a_traced_batch_is_fixed_and_computes_each_image(tmp_path, clean):
    torch.manual_seed(0)
    model = ShuffleNet().eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", clean=clean)
    fixes = shape_fixes(path)
    assert len(fixes) == 2 and all("Reshape" in f for f in fixes)  # both views of the shuffle
    assert pinned_batch_reshapes(onnx.load(str(path)), 1) == []
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(path, x), expected, atol=1e-5)
    dims = onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"  # the output declares the batch again (onnxslim had made it 1)


def test_the_same_graph_without_a_dynamic_batch_is_left_as_traced(tmp_path):
    path = export_onnx(ShuffleNet().eval(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=False)
    assert shape_fixes(path) == []
    assert len(pinned_batch_reshapes(onnx.load(str(path)), 1)) == 2


def test_quantized_channel_shuffle_is_fixed_too(tmp_path):
    from workbench.qdq.trt_rules import check_qdq
    from workbench.quant.ptq import Int8Config, quantize_

    torch.manual_seed(0)
    model = ShuffleNet().eval()
    x = torch.randn(4, 3, 16, 16)
    quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    path = export_onnx(model, x[:1], tmp_path / "q.onnx")
    assert len(shape_fixes(path)) == 2
    out = _run(path, x)
    for i in range(len(x)):  # each image as it computes alone
        np.testing.assert_allclose(out[i:i + 1], _run(path, x[i:i + 1]), atol=1e-5)
    assert check_qdq(path) == []


def test_a_batch_pinned_outside_a_reshape_is_refused_naming_the_node(tmp_path):
    with pytest.raises(ExportError) as e:
        export_onnx(ZerosConcat().eval(), torch.randn(1, 3, 16, 16), tmp_path / "bad.onnx")
    message = str(e.value)
    assert "bad.onnx" in message and "Concat" in message and "(2, 3, 16, 16)" in message
    assert "dynamic_batch: false" in message and "Nothing was written" in message
    assert list(tmp_path.iterdir()) == []  # no half-written file


def test_a_pinned_size_is_refused_when_the_size_is_declared_dynamic(tmp_path):
    example = torch.randn(1, 3, 16, 16)
    path = export_onnx(FlattenSpatial().eval(), example, tmp_path / "b.onnx")  # batch only: fixed
    assert len(shape_fixes(path)) == 1
    with pytest.raises(ExportError) as e:
        export_onnx(FlattenSpatial().eval(), example, tmp_path / "s.onnx", dynamic_size=True)
    assert "height/width" in str(e.value) and "Reshape" in str(e.value) and "(1, 3, 80, 80)" in str(e.value)
    assert not (tmp_path / "s.onnx").exists()


class ShuffleClassifier(nn.Module):
    """A classifier with the pinned channel_shuffle, for a whole run (`import:test_export_shapes:ShuffleClassifier`)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv2(channel_shuffle(torch.relu(self.conv1(x)), 2)).mean((2, 3)))


def test_a_run_exports_the_fixed_graph_says_so_and_evaluates_it_in_batches(tmp_path, capsys):
    import json

    from conftest import tiny_recipe
    from helpers import make_image_folder

    from workbench.cli import main

    text = tiny_recipe(make_image_folder(tmp_path / "images"), tmp_path / "runs")
    text = text.replace('"import:helpers:tiny_cnn"', '"import:test_export_shapes:ShuffleClassifier"')
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 0  # evaluate runs the ONNX graphs at batch_size 4
    run_dir = next((tmp_path / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("model.onnx", "model_fp32.onnx"):
        assert len(metrics["stages"]["export"][name]["shape_fixes"]) == 2
    assert "Fixed to run at the declared dynamic batch: Reshape" in (run_dir / "report.md").read_text()
