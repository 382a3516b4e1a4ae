"""workbench.qdq: one look-through rule and one scope mapper, the same answer for the census, the graph index and
TensorRT's rules, on hand-built graphs where the old rules (census: any Pad, Reshape, Transpose; GraphIndex: zero
Pads only) disagreed."""

import importlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from workbench.cli import main
from workbench.qdq.graph import GraphIndex, qdq_census, scope_to_module
from workbench.qdq.trt_rules import check_qdq, check_quantized


def _qdq(name: str, scale: str, zp: str, axis: int | None = None) -> list:
    kw = {} if axis is None else {"axis": axis}
    scope = name.rsplit("/", 1)[0]
    return [helper.make_node("QuantizeLinear", [name, scale, zp], [f"{name}_q"], name=f"{scope}/QuantizeLinear", **kw),
            helper.make_node("DequantizeLinear", [f"{name}_q", scale, zp], [f"{name}_dq"],
                             name=f"{scope}/DequantizeLinear", **kw)]


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)  # a graph ONNX accepts: the rules see a real model
    return model


def _padded_conv(pad_value: float | None, mode: str = "constant"):
    """x -> Q/DQ -> Pad -> Conv, the weight through per-channel Q/DQ: TF-style 'same' padding before a conv."""
    x = "/block/conv/input_quantizer/x"
    w = "/block/conv/weight_quantizer/w"
    pad_inputs = [f"{x}_dq", "pads"] + (["pad_value"] if pad_value is not None else [])
    nodes = _qdq(x, "x_scale", "zp") + _qdq(w, "w_scale", "w_zp", axis=0) + [
        helper.make_node("Pad", pad_inputs, ["padded"], name="/block/pad/Pad", mode=mode),
        helper.make_node("Conv", ["padded", f"{w}_dq"], ["y"], name="/block/conv/Conv"),
    ]
    inits = [
        numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), w),
        numpy_helper.from_array(np.full(4, 0.02, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.int8(0), "zp"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    if pad_value is not None:
        inits.append(numpy_helper.from_array(np.float32(pad_value), "pad_value"))
    return _model(nodes, [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)


def _transposed_matmul(weight_axis: int):
    """x -> Q/DQ -> MatMul(x, Transpose(DQ(Q(W)))): a Linear's (out, in) weight, quantized per output channel."""
    x = "/fc/input_quantizer/x"
    w = "/fc/weight_quantizer/w"
    nodes = _qdq(x, "x_scale", "zp") + _qdq(w, "w_scale", "w_zp", axis=weight_axis) + [
        helper.make_node("Transpose", [f"{w}_dq"], ["wt"], name="/fc/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", [f"{x}_dq", "wt"], ["y"], name="/fc/MatMul"),
    ]
    inits = [
        numpy_helper.from_array(np.random.default_rng(1).standard_normal((5, 5)).astype(np.float32), w),
        numpy_helper.from_array(np.full(5, 0.02, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(5, np.int8), "w_zp"),
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.int8(0), "zp"),
    ]
    return _model(nodes, [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 5])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


@pytest.mark.parametrize("pad_value, mode, int8", [
    (0.0, "constant", True),  # zero padding commutes with symmetric dequantization: TensorRT moves the DQ past it
    (None, "constant", True),  # no value given: zeros
    (float("-inf"), "constant", False),  # a -inf fill has no INT8 value: the conv reads float
    (1.5, "constant", False),
    (None, "reflect", False),  # not a zero Pad: TensorRT's rule this package keeps is zeros only
])
def test_census_graph_index_and_rules_agree_on_a_pad_between_dq_and_conv(tmp_path, pad_value, mode, int8):
    """Before: the census looked through any Pad and called the -inf padded conv INT8, while GraphIndex (and so
    check-onnx) said it reads float. Now one rule answers for all three."""
    model = _padded_conv(pad_value, mode)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    census = qdq_census(path)
    g = GraphIndex(model)
    conv = _node(model, "Conv")
    assert g.from_dq(conv.input[0]) is int8
    assert g.source(conv.input[0]).op_type == ("DequantizeLinear" if int8 else "Pad")
    if int8:
        assert census["quantized"] == {"Conv": 1} and census["float"] == {}
        assert check_qdq(model) == [] and check_quantized(model) is None
    else:
        assert census["quantized"] == {} and census["float"] == {"Conv": ["/block/conv/Conv"]}
        violations = check_qdq(model)
        assert [(v.rule, v.module) for v in violations] == [("quantized_inputs", "block.conv")]
        assert "the data input is not" in violations[0].message
        assert check_quantized(model).rule == "not_quantized"


def test_a_transposed_weight_is_looked_through_and_its_channel_axis_followed(tmp_path):
    """Before: GraphIndex stopped at the Transpose, so check-onnx called this graph 'not quantized' while the census
    counted the MatMul INT8. Now both see the INT8 MatMul, and the per-channel axis is checked after the Transpose."""
    good = _transposed_matmul(weight_axis=0)  # W's axis 0 (output channels) is axis 1 of the (K, N) MatMul input
    onnx.save(good, tmp_path / "good.onnx")
    assert qdq_census(tmp_path / "good.onnx")["quantized"] == {"MatMul": 1}
    assert GraphIndex(good).source(_node(good, "MatMul").input[1]).op_type == "DequantizeLinear"
    assert check_qdq(good) == [] and check_quantized(good) is None
    bad = _transposed_matmul(weight_axis=1)  # the scales run along the input channels
    violations = check_qdq(bad)
    assert [(v.rule, v.module) for v in violations] == [("weight_per_channel_axis", "fc")]
    assert ("per-channel weight scales on axis 1 (axis 0 where the layer reads it) with 5 entries; MatMul needs "
            "axis 1") in violations[0].message


def test_cli_check_onnx_reports_the_float_conv_behind_a_neg_inf_pad(tmp_path, capsys):
    onnx.save(_padded_conv(float("-inf")), tmp_path / "pad.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["check-onnx", str(tmp_path / "pad.onnx")]) == 1
    out = capsys.readouterr().out
    assert "[quantized_inputs] /block/conv/Conv (module block.conv)" in out and "not quantized" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # a check writes nothing


def test_one_scope_mapper_with_and_without_the_model():
    """A quantizer's nodes belong to the layer it quantizes, whether or not the model's module names are known
    (before: with names a Q node mapped to '...conv.input_quantizer', without them to '...conv')."""
    names = {"model", "model.2", "model.2.m", "model.2.m.0", "model.2.m.0.cv1", "model.2.m.0.cv1.conv",
             "model.2.m.0.cv1.conv.input_quantizer"}
    q = "/model.2/m/m.0/cv1/conv/input_quantizer/QuantizeLinear"
    assert scope_to_module(q, names) == scope_to_module(q) == "model.2.m.0.cv1.conv"
    assert scope_to_module("/model.2/m/m.0/cv1/conv/Conv", names) == "model.2.m.0.cv1.conv"
    # With the names, the deepest scope that is a module; without them, the whole scope
    assert scope_to_module("/model.2/m/m.0/residual_add/Add", names) == "model.2.m.0"
    assert scope_to_module("/model.2/m/m.0/residual_add/Add") == "model.2.m.0.residual_add"
    assert scope_to_module("/other/conv/Conv", names) is None and scope_to_module("/Concat_3") is None


@pytest.mark.parametrize("old", ["workbench.onnx_tools", "workbench.qdq_check", "workbench.ort_int8",
                                 "workbench.qdq.compare"])
def test_the_loose_onnx_modules_are_gone(old):
    """One package: no second copy of the ONNX layer left behind under the old names."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
