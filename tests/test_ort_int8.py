"""The ONNX Runtime flavour of a Q/DQ export: integer kernels really used, the same function as the TensorRT-style
graph."""

import numpy as np
import onnx
import pytest
import torch
from helpers import colour_blob_batch
from torch import nn

from workbench.errors import ExportError
from workbench.qdq.export import export_onnx
from workbench.qdq.ort_flavour import optimized_op_counts, to_ort_int8, u8s8_can_saturate
from workbench.qdq.trt_rules import check_qdq
from workbench.quant.ptq import Int8Config, quantize_
from workbench.runtime.runners import OrtRunner


class ReluNet(nn.Module):
    """Conv-BN-ReLU layers, one ReLU6 (a Clip from 0), and a classifier. The last conv's output is averaged
    before any quantizer (as in ResNet and EfficientNet heads), so only the first three can fuse in ORT."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)

        def block(i, o, act):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), act)

        self.features = nn.Sequential(block(3, 16, nn.ReLU()), block(16, 32, nn.ReLU()), block(32, 32, nn.ReLU6()),
                                      block(32, 32, nn.ReLU()))
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(TensorRT-style Q/DQ ONNX, its FP32 ONNX, a batch) for ReluNet calibrated on that batch."""
    tmp = tmp_path_factory.mktemp("ort")
    x, _ = colour_blob_batch(8)
    model = ReluNet().eval()
    with torch.no_grad():  # BN statistics of the data, so activations have realistic ranges
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()(x)
        model.eval()
    fp32 = export_onnx(model, x[:1], tmp / "fp32.onnx")
    quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    return export_onnx(model, x[:1], tmp / "model.onnx"), fp32, x.numpy()


def test_every_conv_runs_on_integer_kernels_and_matches_the_tensorrt_graph(exported, tmp_path):
    trt, _, x = exported
    result = to_ort_int8(trt, tmp_path / "ort.onnx", "exact")
    # In the TensorRT-style graph ONNX Runtime keeps every conv in float (the Relu sits before the Q).
    assert optimized_op_counts(trt).get("QLinearConv", 0) == 0
    assert result.fused.get("QLinearConv") == 3 and result.fused.get("FusedConv") == 1 and "Conv" not in result.fused
    assert result.weights_folded == 5 and result.activations_relu == 2 and result.activations_clip == 1
    assert len(result.absorbed) == 3  # two Relu and the ReLU6's Clip (the last Relu feeds the mean, in float)
    # Weights are stored as 8-bit integers: no FP32 weight tensor is left in the graph.
    types = {t.name: t.data_type for t in onnx.load(str(result.path)).graph.initializer if len(t.dims) >= 2}
    assert types and set(types.values()) <= {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}

    reference = OrtRunner(trt, "trt", "faithful")(x)
    native = OrtRunner(result.path, "native", "default")(x)
    assert (native.argmax(1) == reference.argmax(1)).mean() == 1.0
    assert np.linalg.norm(native - reference) / np.linalg.norm(reference) < 0.05


def test_relu_layers_keep_tensorrts_integers(exported, tmp_path):
    """After a Relu the flavour uses TensorRT's own scale (u8, zero-point 0): executed plainly, it is the
    TensorRT-style graph except where a value exceeds the calibrated amax (which TensorRT clips)."""
    trt, _, x = exported
    result = to_ort_int8(trt, tmp_path / "ort.onnx", "exact")
    reference = OrtRunner(trt, "trt", "faithful")(x)
    plain = OrtRunner(result.path, "plain", "faithful")(x)
    # Only the ReLU6 layer differs by design (255 steps over [0, 6] instead of 127).
    assert np.linalg.norm(plain - reference) / np.linalg.norm(reference) < 0.02


def test_weight_types(exported, tmp_path):
    trt, _, _ = exported
    exact = to_ort_int8(trt, tmp_path / "exact.onnx", "exact")
    s8 = to_ort_int8(trt, tmp_path / "s8.onnx", "s8")
    reduced = to_ort_int8(trt, tmp_path / "rr.onnx", "reduce_range")
    # The first conv reads the signed image and the conv after the ReLU6 reads 0..255; the classifier reads the mean
    # of a Relu output (signed layout): those get unsigned (exact) or 7-bit (reduce_range) weights.
    # The rest read 0..127.
    assert exact.weights_unsigned == 3 and exact.weights_7bit == 0
    assert s8.weights_unsigned == 0 and s8.weights_7bit == 0
    assert reduced.weights_7bit == 3 and reduced.weights_unsigned == 0
    from onnx import numpy_helper

    seven = [numpy_helper.to_array(t) for t in onnx.load(str(reduced.path)).graph.initializer
             if t.name.endswith("_int8")]
    assert any(v.min() >= -64 and v.max() <= 63 for v in seven) and any(v.max() > 63 or v.min() < -64 for v in seven)
    auto = to_ort_int8(trt, tmp_path / "auto.onnx", "auto")
    assert auto.weights == ("exact" if u8s8_can_saturate() else "s8")


def test_an_fp32_graph_or_a_non_model_is_refused(exported, tmp_path):
    _, fp32, _ = exported
    with pytest.raises(ExportError, match="no signed INT8 Q/DQ pairs"):
        to_ort_int8(fp32, tmp_path / "out.onnx")
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    with pytest.raises(ExportError, match="not an ONNX model"):
        to_ort_int8(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_cleaning_keeps_the_function_and_the_tensorrt_rules(exported, tmp_path):
    trt, _, x = exported
    model = ReluNet().eval()
    quantize_(model, Int8Config(method="max"), lambda m: m(torch.from_numpy(x)), torch.from_numpy(x[:1]))
    raw = export_onnx(model, torch.from_numpy(x[:1]), tmp_path / "raw.onnx")
    clean = export_onnx(model, torch.from_numpy(x[:1]), tmp_path / "clean.onnx", clean=True)
    nodes = lambda p: len(onnx.load(str(p)).graph.node)  # noqa: E731
    assert nodes(clean) < nodes(raw)  # modelopt's Constant nodes folded away
    np.testing.assert_array_equal(OrtRunner(clean, "c", "faithful")(x), OrtRunner(raw, "r", "faithful")(x))
    names = {n for n, _ in model.named_modules()}
    assert check_qdq(clean, names) == [] and check_qdq(raw, names) == []


def test_depthwise_convs_keep_signed_weights_in_exact_mode(tmp_path):
    """ORT's depthwise kernel does not saturate, so exact mode keeps its weights signed (the fast kernel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.ReLU6(), nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x, _ = colour_blob_batch(4)
    quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    trt = export_onnx(model, x[:1], tmp_path / "model.onnx")
    result = to_ort_int8(trt, tmp_path / "ort.onnx", "exact")
    from onnx import numpy_helper

    graph = onnx.load(str(result.path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    by_conv = {}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Conv":
            by_conv[node.name] = weights[producer[node.input[1]].input[0]]
    depthwise = [w for w in by_conv.values() if w.shape[1] == 1]
    pointwise = [w for w in by_conv.values() if w.shape[1] == 16]  # reads the ReLU6 output: 0..255
    assert len(depthwise) == 1 and depthwise[0].dtype == np.int8
    assert len(pointwise) == 1 and pointwise[0].dtype == np.uint8
    assert result.fused.get("QLinearConv") == 3  # the last conv writes the graph's float output
    reference = OrtRunner(trt, "trt", "faithful")(x.numpy())
    native = OrtRunner(result.path, "native", "default")(x.numpy())
    assert np.linalg.norm(native - reference) / np.linalg.norm(reference) < 0.05


def _qdq_graph(tmp_path, activation: str, per_channel_activation: bool = False, dq_zero_point: bool = True):
    """x -> activation -> Q/DQ (int8, zero-point 0) -> Conv with a Q/DQ weight, written as an ONNX file."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 4
    act_scale = np.full(c, 0.05, np.float32) if per_channel_activation else np.asarray(0.05, np.float32)
    inits = [numpy_helper.from_array(act_scale, "sx"),
             numpy_helper.from_array(np.zeros(act_scale.shape, np.int8), "zx"),
             numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.full(c, 0.02, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(c, np.int8), "zw"),
             numpy_helper.from_array(np.asarray(0.0, np.float32), "lo")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 4, 4])]
    if activation == "relu":
        nodes = [helper.make_node("Relu", ["x"], ["a"])]
    else:  # a Clip whose upper bound is a graph input, known only at run time
        inputs.append(helper.make_tensor_value_info("hi", TensorProto.FLOAT, []))
        nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["a"])]
    axis = {"axis": 1} if per_channel_activation else {}
    nodes += [helper.make_node("QuantizeLinear", ["a", "sx", "zx"], ["aq"], **axis),
              helper.make_node("DequantizeLinear", ["aq", "sx", "zx"] if dq_zero_point else ["aq", "sx"], ["ad"],
                               **axis),
              helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], axis=0),
              helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
              helper.make_node("Conv", ["ad", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])], inits)
    path = tmp_path / f"{activation}.onnx"
    # IR 9: what ONNX Runtime 1.20+ reads (a newer onnx writes a newer IR by default).
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def _run(path, feeds):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_a_clip_with_a_run_time_bound_stays(tmp_path):
    src = _qdq_graph(tmp_path, "clip")
    result = to_ort_int8(src, tmp_path / "ort.onnx", "exact")
    assert result.absorbed == [] and result.activations_clip == 0
    x = np.random.default_rng(1).uniform(0, 6, (1, 4, 4, 4)).astype(np.float32)
    feeds = {"x": x, "hi": np.asarray(2.0, np.float32)}
    np.testing.assert_allclose(_run(result.path, feeds), _run(src, feeds), atol=1e-5)


def test_per_channel_activations_and_a_dequantize_without_zero_point_are_handled(tmp_path):
    per_channel = to_ort_int8(_qdq_graph(tmp_path, "relu", per_channel_activation=True), tmp_path / "pc.onnx", "exact")
    assert per_channel.activations_relu == 0 and per_channel.activations_shifted == 1  # the Relu stays, values exact
    x = np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(per_channel.path, {"x": x}), _run(tmp_path / "relu.onnx", {"x": x}), atol=1e-5)
    (tmp_path / "b").mkdir()
    no_zp = to_ort_int8(_qdq_graph(tmp_path / "b", "relu", dq_zero_point=False), tmp_path / "nz.onnx", "exact")
    assert no_zp.activations_relu == 0 and no_zp.weights_folded == 1  # that pair is left as it is
