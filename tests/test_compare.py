"""Layer-by-layer comparison of a fake-quant model with its exported ONNX."""

import onnx
import pytest
import torch
from helpers import make_tiny_yolov5_checkpoint
from onnx import numpy_helper

from workbench.models import resolve_model
from workbench.qdq.export import export_onnx
from workbench.qdq.graph import nodes_by_module, scope_to_module
from workbench.quant.ptq import Int8Config, quantize_
from workbench.runtime.compare import layer_divergence
from workbench.schema import ModelConfig


@pytest.fixture
def quantized(tmp_path):
    model = resolve_model(ModelConfig(spec=f"yolov5:{make_tiny_yolov5_checkpoint(tmp_path / 't.pt')}"))

    def loop(m):
        with torch.no_grad():
            m(torch.rand(4, 3, 64, 64))

    quantize_(model, Int8Config(method="max"), loop, torch.rand(1, 3, 64, 64))
    return model, export_onnx(model, torch.rand(1, 3, 64, 64), tmp_path / "t.onnx", dynamic_size=True)


def test_scope_names_resolve_through_containers():
    names = {"model", "model.2", "model.2.m", "model.2.m.0", "model.2.m.0.cv1", "model.2.m.0.cv1.conv"}
    assert scope_to_module("/model.2/m/m.0/cv1/conv/Conv", names) == "model.2.m.0.cv1.conv"
    assert scope_to_module("/model.2/m/m.0/cv1/conv/input_quantizer/QuantizeLinear", names) == "model.2.m.0.cv1.conv"
    assert scope_to_module("/Concat_3", names) is None


def test_every_conv_is_found_and_agrees(quantized):
    model, path = quantized
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    rows = layer_divergence(model, path, torch.rand(2, 3, 64, 64))
    assert sorted(r["layer"] for r in rows) == sorted(convs)  # the C3's inner m.0 convs included
    assert rows[0]["rel_error"] < 1e-5
    assert nodes_by_module(path, model, ("Conv",))["model.2.m.0.cv1.conv"] == ["/model.2/m/m.0/cv1/conv/Conv"]


def test_a_wrong_scale_in_the_graph_is_located(quantized, tmp_path):
    model, path = quantized
    proto = onnx.load(str(path))
    target = "/model.3/conv/input_quantizer/"
    for node in proto.graph.node:  # triple the input scale of model.3.conv
        if node.op_type == "Constant" and node.name.startswith(target):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.dtype.kind == "f":
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(value * 3, node.attribute[0].t.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    rows = layer_divergence(model, broken, torch.rand(2, 3, 64, 64))
    first_bad = next(r["layer"] for r in rows if r["rel_error"] > 1e-2)
    assert first_bad == "model.3.conv"
