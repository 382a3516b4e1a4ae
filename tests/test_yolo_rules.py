"""TensorRT placement rules on a YOLOv5-style detector, checked on the exported Q/DQ graph."""

import numpy as np
import onnx
import pytest
import torch
from helpers import make_tiny_yolov5_checkpoint

from workbench.models import resolve_model
from workbench.qdq.export import export_onnx
from workbench.quant.ptq import Int8Config, quantize_
from workbench.runtime.runners import OrtRunner, TorchRunner
from workbench.schema import ModelConfig

CALIB = [torch.rand(4, 3, 64, 64) for _ in range(2)]


def _loop(m):
    with torch.no_grad():
        for x in CALIB:
            m(x)


@pytest.fixture
def exported(tmp_path):
    model = resolve_model(ModelConfig(spec=f"yolov5:{make_tiny_yolov5_checkpoint(tmp_path / 't.pt')}"))
    result = quantize_(model, Int8Config(method="mse"), _loop, torch.rand(1, 3, 64, 64))
    path = export_onnx(model, torch.rand(1, 3, 64, 64), tmp_path / "t.onnx", dynamic_size=True)
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    return model, result, path, graph, producer


def _through(producer, name):
    node = producer.get(name)
    while node is not None and node.op_type in ("Identity", "Cast"):
        node = producer.get(node.input[0])
    return node


def test_residual_add_has_both_inputs_quantized(exported):
    model, result, path, graph, producer = exported
    assert result.residual_quantizers == ["model.2.m.0.residual_add.input0_quantizer",
                                          "model.2.m.0.residual_add.input1_quantizer"]
    assert all(result.activation_amax[q] > 0 for q in result.residual_quantizers)
    adds = [n for n in graph.node if n.op_type == "Add" and "residual_add" in n.name]
    assert len(adds) == 1
    assert [_through(producer, i).op_type for i in adds[0].input] == ["DequantizeLinear", "DequantizeLinear"]


def test_concat_and_maxpool_share_one_scale(exported):
    """No Q/DQ on any Concat input: the one Q after each Concat (at the next conv) is the shared scale."""
    _, _, _, graph, producer = exported
    concats = [n for n in graph.node if n.op_type == "Concat" and n.name.startswith("/model.")]
    assert concats, "the C3 and SPPF concats are in the graph"
    for node in concats:
        for i in node.input:
            src = _through(producer, i)
            assert src is None or src.op_type not in ("DequantizeLinear", "QuantizeLinear"), node.name
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 3 and all(_through(producer, p.input[0]).op_type != "DequantizeLinear" for p in pools)


def test_rules_keep_onnx_equal_to_fake_quant(exported):
    model, _, path, _, _ = exported
    x = torch.rand(2, 3, 64, 64)
    fake, faithful = TorchRunner(model, "t")(x), OrtRunner(path, "f", "faithful")(x)
    np.testing.assert_allclose(faithful, fake, atol=1e-2 * np.abs(fake).max())


def test_residual_rule_can_be_turned_off(tmp_path):
    model = resolve_model(ModelConfig(spec=f"yolov5:{make_tiny_yolov5_checkpoint(tmp_path / 't.pt')}"))
    result = quantize_(model, Int8Config(method="max", residual_add=False), _loop, torch.rand(1, 3, 64, 64))
    assert result.residual_quantizers == [] and "Add (residual)" not in result.census()


def test_every_tensor_is_quantized_with_one_scale(exported):
    """A tensor read by several quantizers (C3's cv1/cv2, a shortcut and its cv1) gets one scale in the graph,
    so TensorRT can move that one Q above a Concat or MaxPool without requantizing."""
    _, _, _, graph, producer = exported
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}

    def source(name):  # modelopt's export puts a Cast between a tensor and its Q
        node = producer.get(name)
        while node is not None and node.op_type in ("Identity", "Cast"):
            name, node = node.input[0], producer.get(node.input[0])
        return name

    scales: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and "weight_quantizer" not in node.name:
            scale = inits.get(node.input[1], consts.get(node.input[1]))
            scales.setdefault(source(node.input[0]), []).append(float(np.asarray(scale).reshape(-1)[0]))
    read_twice = {t: s for t, s in scales.items() if len(s) > 1}
    assert len(read_twice) >= 2, ("the tiny detector has tensors read by two quantizers "
                                  "(C3 cv1/cv2, Bottleneck shortcut)")
    assert all(len(set(s)) == 1 for s in read_twice.values()), read_twice
