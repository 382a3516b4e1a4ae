"""INT8 PTQ on small models: real fake-quant, real ONNX export, real ONNX Runtime execution."""

import copy

import numpy as np
import pytest
import torch
from helpers import nan_cnn, tiny_cnn
from torch import nn

from workbench.errors import CalibrationError
from workbench.qdq.export import export_onnx
from workbench.qdq.graph import qdq_census
from workbench.quant.fold import fold_batchnorm_
from workbench.quant.ptq import Int8Config, quantize_
from workbench.runtime.runners import OrtRunner, TorchRunner

torch.manual_seed(0)
CALIB = [torch.randn(8, 3, 32, 32) for _ in range(4)]
TEST = torch.randn(16, 3, 32, 32)


def _loop(model):
    with torch.no_grad():
        for x in CALIB:
            model(x)


def _quantized(method="max", **kw):
    model = tiny_cnn()
    result = quantize_(model, Int8Config(method=method, **kw), _loop, torch.randn(1, 3, 32, 32))
    return model, result


def test_fold_batchnorm_keeps_the_function():
    model = tiny_cnn()
    ref = model(TEST)
    pairs = fold_batchnorm_(model, TEST[:1])
    assert sorted(pairs) == [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    assert isinstance(model.bn1, torch.nn.Identity)
    torch.testing.assert_close(model(TEST), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["max", "entropy", "percentile", "mse"])
def test_every_calibrator_quantizes_every_layer(method):
    fp32 = tiny_cnn()
    model, result = _quantized(method)
    # TinyCNN's `relu(bn3(conv3(x)) + x)` is a residual Add between quantized convolutions, found by pattern.
    assert result.census() == {"Conv2d": {"int8": 3, "float": 0}, "Linear": {"int8": 1, "float": 0},
                               "Add (residual)": {"int8": 1, "float": 0}}
    assert result.samples == 32 and result.batches == 4
    assert len(result.activation_amax) == 6 and all(a > 0 for a in result.activation_amax.values())  # 4 + the Add's 2
    for name in ("conv1", "conv2", "conv3", "fc"):  # both quantizers of every layer are on, with ranges
        layer = getattr(model, name)
        assert layer.input_quantizer.is_enabled and layer.weight_quantizer.is_enabled
        assert float(layer.input_quantizer.amax) == pytest.approx(result.activation_amax[f"{name}.input_quantizer"])
    out, ref = model(TEST), fp32(TEST)  # the same model before quantization (TinyCNN is seeded before its layers)
    assert (out - ref).abs().max() > 1e-3 * ref.abs().max()  # really quantized: more than float rounding apart
    # Clipping calibrators may clip this random model's narrow pooled features hard (see the
    # benchmarks for trained models); with max ranges nothing is clipped, so it stays close.
    if method == "max":
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_clipping_calibrators_choose_smaller_ranges_than_max():
    _, by_max = _quantized("max")
    _, by_pct = _quantized("percentile", percentile=99.0)
    for name, amax in by_pct.activation_amax.items():
        assert amax <= by_max.activation_amax[name] + 1e-6
    assert any(by_pct.activation_amax[n] < 0.9 * by_max.activation_amax[n] for n in by_max.activation_amax)


def test_exclude_keeps_layers_float():
    model, result = _quantized(exclude=["fc", "conv1"])
    assert result.census() == {"Conv2d": {"int8": 2, "float": 1}, "Linear": {"int8": 0, "float": 1},
                               "Add (residual)": {"int8": 1, "float": 0}}  # conv3's Add, between INT8 conv2/conv3
    assert not model.fc.input_quantizer.is_enabled and model.conv2.input_quantizer.is_enabled


def test_conv_subclass_is_quantized_not_silently_skipped():
    model, fp32 = tiny_cnn(subclass_conv=True), tiny_cnn(subclass_conv=True)
    result = quantize_(model, Int8Config(method="max", layer_types=["Conv2d"]), _loop, torch.randn(1, 3, 32, 32))
    assert result.census()["Conv2d"] == {"int8": 3, "float": 0}
    assert model.conv1.weight_quantizer.is_enabled
    # max range
    assert float(model.conv1.input_quantizer.amax) == pytest.approx(max(float(x.abs().max()) for x in CALIB))
    # only the padded convs are quantized: had modelopt skipped them, the output would be FP32's to float rounding
    out, ref = model(TEST), fp32(TEST)
    assert (out - ref).abs().max() > 1e-3 * ref.abs().max()


def test_census_sees_through_zero_padding(tmp_path):
    model = tiny_cnn(subclass_conv=True)
    quantize_(model, Int8Config(method="max"), _loop, torch.randn(1, 3, 32, 32))
    census = qdq_census(export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "pad.onnx"))
    assert census["op_counts"].get("Pad", 0) == 3  # DQ -> Pad -> Conv
    assert census["quantized"] == {"Conv": 3, "Gemm": 1} and census["float"] == {}


def test_nan_activation_stops_calibration_with_the_layer_name():
    with pytest.raises(CalibrationError, match=r"NaN/Inf values in the input of layer 'conv2'"):
        quantize_(nan_cnn(), Int8Config(method="entropy", fold_batchnorm=False), _loop, torch.randn(1, 3, 32, 32))


def test_onnx_faithful_matches_fake_quant_and_census(tmp_path):
    model, _ = _quantized("entropy")
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    census = qdq_census(path)
    assert census["quantized"] == {"Conv": 3, "Gemm": 1} and census["float"] == {}
    # one Q/DQ pair per activation and per weight (FP32 weights behind Q/DQ: the TensorRT style)
    # 4 layers x (input, weight) + the residual Add's two inputs (found by pattern: quant/residual_pattern.py)
    assert census["QuantizeLinear"] == 10 and census["DequantizeLinear"] == 10 and census["opset"] == 17
    fake = TorchRunner(model, "fq")(TEST)
    faithful = OrtRunner(path, "ort", "faithful")(TEST.numpy())
    np.testing.assert_allclose(faithful, fake, atol=2e-3 * np.abs(fake).max())
    # dynamic batch
    assert OrtRunner(path, "ort", "default")(TEST[:3].numpy()).shape == (3, 3)
    assert not list(tmp_path.glob("*.tmp"))


def test_fp32_export_has_no_qdq(tmp_path):
    model = tiny_cnn()
    census = qdq_census(export_onnx(copy.deepcopy(model), torch.randn(1, 3, 32, 32), tmp_path / "f.onnx"))
    assert census["QuantizeLinear"] == 0 and census["float"]["Conv"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")
def test_quantize_on_cuda_matches_onnx(tmp_path):
    model = tiny_cnn().cuda()
    calib = [x.cuda() for x in CALIB]

    def loop(m):
        with torch.no_grad():
            for x in calib:
                m(x)

    result = quantize_(model, Int8Config(method="entropy"), loop, torch.randn(1, 3, 32, 32, device="cuda"))
    assert result.census()["Conv2d"]["int8"] == 3
    path = export_onnx(model, torch.randn(1, 3, 32, 32, device="cuda"), tmp_path / "cuda.onnx")
    fake = TorchRunner(model, "fq", "cuda")(TEST)
    faithful = OrtRunner(path, "ort", "faithful")(TEST.numpy())
    np.testing.assert_allclose(faithful, fake, atol=5e-3 * np.abs(fake).max())


def test_module_names_with_glob_characters_quantize_themselves_only():
    """modelopt matches quantizer names as fnmatch patterns: `a[l]b` would match `alb` and not itself."""
    model = nn.Sequential()
    model.add_module("a[l]b", nn.Conv2d(3, 4, 3))
    model.add_module("alb", nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 12, 12)
    quantize_(model, Int8Config(method="max", exclude=["alb"]), lambda m: m(x), x[:1])
    bracketed, decoy = model.get_submodule("a[l]b"), model.get_submodule("alb")
    assert bracketed.weight_quantizer.is_enabled and bracketed.input_quantizer.is_enabled
    assert not decoy.weight_quantizer.is_enabled and not decoy.input_quantizer.is_enabled
