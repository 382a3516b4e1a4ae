"""`workbench check-onnx`: TensorRT's Q/DQ rules on exported graphs, and each rule caught on a corrupted one."""

import numpy as np
import onnx
import pytest
import torch
from helpers import make_tiny_yolov5_checkpoint
from onnx import helper, numpy_helper

from workbench.cli import main
from workbench.models import resolve_model
from workbench.models.cifar_resnet import cifar_resnet
from workbench.qdq.export import export_onnx
from workbench.qdq.trt_rules import check_qdq
from workbench.quant.ptq import Int8Config, quantize_
from workbench.schema import ModelConfig


def _quantized_onnx(model, x, path):
    quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    return export_onnx(model, x[:1], path)


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    return _quantized_onnx(cifar_resnet("resnet20").eval(), torch.randn(4, 3, 32, 32),
                           tmp_path_factory.mktemp("r") / "r.onnx")


def test_exported_resnet_and_yolo_graphs_have_no_violations(resnet_onnx, tmp_path):
    assert check_qdq(resnet_onnx) == []
    ckpt = make_tiny_yolov5_checkpoint(tmp_path / "tiny.pt")
    yolo = resolve_model(ModelConfig(spec=f"yolov5:{ckpt}", input_size=[3, 64, 64]))
    assert check_qdq(_quantized_onnx(yolo, torch.rand(4, 3, 64, 64), tmp_path / "y.onnx")) == []


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnets_pass_the_rules(tmp_path, name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    assert check_qdq(_quantized_onnx(model, torch.randn(2, 3, 64, 64), tmp_path / f"{name}.onnx")) == []


def _node(model, op, contains=""):
    return next(n for n in model.graph.node if n.op_type == op and contains in n.name)


def _const(model, name):
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return n.attribute[0].t
    return next(i for i in model.graph.initializer if i.name == name)


def _set(tensor, array):
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(array, dtype=numpy_helper.to_array(tensor).dtype), tensor.name))


def _rules(model):
    return {(v.rule, v.module) for v in check_qdq(model)}


def test_zero_point_scale_and_axis_errors_name_the_module(resnet_onnx):
    m = onnx.load(resnet_onnx)
    q = _node(m, "QuantizeLinear", "layer1.0/conv1/input_quantizer")
    _set(_const(m, q.input[2]), 3)
    _set(_const(m, _node(m, "QuantizeLinear", "layer2.1/conv2/input_quantizer").input[1]), -0.5)
    dq = _node(m, "DequantizeLinear", "layer3.0/conv1/weight_quantizer")
    next(a for a in dq.attribute if a.name == "axis").i = 1
    rules = _rules(m)
    assert ("int8_zero_point", "layer1.0.conv1") in rules
    assert ("positive_scale", "layer2.1.conv2") in rules
    assert ("weight_per_channel_axis", "layer3.0.conv1") in rules


def test_missing_zero_point_means_uint8(resnet_onnx):
    m = onnx.load(resnet_onnx)
    q = _node(m, "QuantizeLinear", "layer1.1/conv1/input_quantizer")
    del q.input[2]
    assert ("int8_zero_point", "layer1.1.conv1") in _rules(m)


def test_per_channel_activation_scale(resnet_onnx):
    m = onnx.load(resnet_onnx)
    q = _node(m, "QuantizeLinear", "layer1.2/conv1/input_quantizer")
    _set(_const(m, q.input[1]), np.full(16, 0.05, dtype=np.float32))
    assert ("activation_per_tensor", "layer1.2.conv1") in _rules(m)


def test_float_input_to_an_int8_conv_and_a_float_residual_input(resnet_onnx):
    m = onnx.load(resnet_onnx)
    conv = _node(m, "Conv", "layer2.2/conv1/Conv")
    q = _node(m, "QuantizeLinear", "layer2.2/conv1/input_quantizer")
    conv.input[0] = q.input[0]  # bypass the activation Q/DQ
    add = _node(m, "Add", "layer1.2/")
    dq = _node(m, "DequantizeLinear", "layer1.2/residual_add/input1_quantizer")
    add.input[1] = _node(m, "QuantizeLinear", "layer1.2/residual_add/input1_quantizer").input[0]
    rules = _rules(m)
    assert ("quantized_inputs", "layer2.2.conv1") in rules
    assert ("residual_add", "layer1.2.residual_add") in rules
    assert dq.name  # the bypassed DQ still exists, now feeding nothing: not an error in itself


def test_orphan_quantize_and_low_opset(resnet_onnx):
    m = onnx.load(resnet_onnx)
    q = _node(m, "QuantizeLinear", "layer3.1/conv2/input_quantizer")
    m.graph.node.append(helper.make_node("Relu", [q.output[0]], ["stray"], name="/stray/Relu"))
    m.opset_import[0].version = 11
    rules = {v.rule for v in check_qdq(m)}
    assert {"qdq_pair", "opset"} <= rules


def test_concat_inputs_with_two_scales():
    def qdq(name, scale):
        return [
            helper.make_node("QuantizeLinear", [name, f"{name}_s", "zp"], [f"{name}_q"],
                             name=f"/{name}/QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", "zp"], [f"{name}_dq"],
                             name=f"/{name}/DequantizeLinear"),
        ], numpy_helper.from_array(np.float32(scale), f"{name}_s")

    nodes_a, sa = qdq("a", 0.1)
    nodes_b, sb = qdq("b", 0.2)
    concat = helper.make_node("Concat", ["a_dq", "b_dq"], ["y"], axis=1, name="/neck/Concat")
    graph = helper.make_graph(
        nodes_a + nodes_b + [concat], "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [sa, sb, numpy_helper.from_array(np.int8(0), "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [(v.rule, v.module) for v in check_qdq(model)] == [("concat_shared_scale", "neck")]
    _set(next(i for i in model.graph.initializer if i.name == "b_s"), 0.1)
    assert check_qdq(model) == []


def test_cli_check_onnx(resnet_onnx, tmp_path, capsys):
    assert main(["check-onnx", str(resnet_onnx)]) == 0
    assert "0 violation(s)" in capsys.readouterr().out
    m = onnx.load(resnet_onnx)
    _set(_const(m, _node(m, "QuantizeLinear", "layer1.0/conv1/input_quantizer").input[2]), 3)
    onnx.save(m, tmp_path / "bad.onnx")
    assert main(["check-onnx", str(tmp_path / "bad.onnx")]) == 1
    out = capsys.readouterr().out
    # Q and DQ share the zero point
    assert "[int8_zero_point]" in out and "(module layer1.0.conv1)" in out and "2 violation(s)" in out
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    assert main(["check-onnx", str(tmp_path / "junk.onnx")]) == 2
    assert "is not an ONNX model" in capsys.readouterr().err
    assert main(["check-onnx", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_efficientnet_lite_skip_adds_are_quantized_and_the_graph_has_no_violations(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="quickstart extra not installed")
    from workbench.quant.ptq import quant_units, set_float_units

    spec = ModelConfig(spec="efficientnet_lite:efficientnet-lite0", input_size=[3, 224, 224])
    model, reference = resolve_model(spec), resolve_model(spec)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    assert result.census()["Add (residual)"] == {"int8": 9, "float": 0}  # the 9 blocks with an identity skip
    set_float_units(model, result, list(quant_units(model, result)))
    with torch.no_grad():  # the rewritten block forward computes the package's function
        assert torch.allclose(model(x), reference(x), atol=1e-4)
    set_float_units(model, result, [])
    assert check_qdq(export_onnx(model, x[:1], tmp_path / "e.onnx")) == []


def _resnet_recipe(images, tmp_path, calibrate: str) -> str:
    return f"""name: res
model: {{spec: "cifar_resnet:resnet20", input_size: [3, 32, 32]}}
data:
  calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}
  evaluation: {{source: imagefolder, path: "{images}", labels: none}}
  batch_size: 4
runs_dir: "{tmp_path / 'runs'}"
stages:
  - calibrate: {calibrate}
  - export: {{}}
  - evaluate: {{latency: false, backends: [pytorch_fp32, ort_int8_faithful]}}
"""


def test_a_failed_check_of_the_export_is_said_and_a_planned_float_add_is_not_a_failure(images, tmp_path, capsys):
    """Residual Adds left float against the rule: the run completes but the console and the report say check-onnx
    failed. The same Add kept float by the precision plan (an exclude) is a declared exemption: no violation, and
    the census counts it float."""
    import json

    from workbench.cli import main

    (tmp_path / "a.yaml").write_text(_resnet_recipe(images, tmp_path / "a", "{method: max, residual_add: false}"))
    assert main(["run", str(tmp_path / "a.yaml")]) == 0
    out = capsys.readouterr().out
    assert "warning: export: model.onnx fails check-onnx" in out and "residual_add" in out
    run_dir = next((tmp_path / "a" / "runs").iterdir())
    report = (run_dir / "report.md").read_text()
    assert "with 1 warning(s)" in report and "**Warning:** export: model.onnx fails check-onnx" in report

    planned = "{method: max, exclude: ['layer1.0.residual_add']}"
    (tmp_path / "b.yaml").write_text(_resnet_recipe(images, tmp_path / "b", planned))
    assert main(["run", str(tmp_path / "b.yaml")]) == 0
    assert "warning" not in capsys.readouterr().out
    run_dir = next((tmp_path / "b" / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stages"]["export"]["model.onnx"]["tensorrt_rules"] == []
    assert metrics["stages"]["calibrate"]["census"]["Add (residual)"] == {"int8": 8, "float": 1}
    assert main(["check-onnx", str(run_dir / "model.onnx")]) == 0
