"""AdaRound: the per-layer core (quant/adaround.py) on real modelopt quantizers, and the pipeline algorithm."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workbench.quant.adaround import (
    RoundingOptions,
    WeightGrid,
    adaround_weight,
    apply_rows,
    beta_at,
    layer_rows,
    output_rows,
    rectified_sigmoid,
)
from workbench.quant.ptq import Int8Config, quantize_


class DynamicSamePaddingConv(nn.Conv2d):
    """EfficientNet-Lite's TensorFlow-'same' convolution: pads in its forward, from the input's size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _correlated_images(n: int, seed: int, channels: int = 8, size: int = 12) -> torch.Tensor:
    # Smooth, channel-correlated inputs (as real feature maps are): round-to-nearest is then far from the best
    # rounding for the output, which is what AdaRound exploits. Independent noise would leave little to win.
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 2, size, size, generator=g)
    mix = torch.randn(channels, 2, generator=torch.Generator().manual_seed(99))
    x = torch.einsum("nchw,kc->nkhw", base, mix) + 0.3 * torch.randn(n, channels, size, size, generator=g)
    return F.avg_pool2d(x, 3, 1, 1)


def _quantized_layer(layer: nn.Module, weights: str, example: torch.Tensor) -> nn.Module:
    """The layer as the workbench quantizes it (modelopt quantizers, weight range = max |w| per channel/tensor)."""
    model = nn.Sequential(layer)

    def loop(m):
        with torch.no_grad():
            m(example)

    quantize_(model, Int8Config(method="max", weights=weights, fold_batchnorm=False, residual_add=False), loop,
              example[:1])
    return model[0]


def _rows(layer, x, positions=None, seed=0):
    """(rows, float targets): the layer's input rows (through its input quantizer, where on) and its float outputs
    at the same positions."""
    with torch.no_grad():
        q_in = layer.input_quantizer(x)
        rows, pick = layer_rows(layer, q_in, positions, torch.Generator().manual_seed(seed))
        was = layer.input_quantizer.is_enabled
        layer.weight_quantizer.disable()
        layer.input_quantizer.disable()
        y = layer(x)
        layer.weight_quantizer.enable()
        if was:
            layer.input_quantizer.enable()
    return rows, output_rows(layer, y, pick) if pick is not None else y.reshape(-1, y.shape[-1])


LAYERS = {
    "conv_per_channel": (lambda: nn.Conv2d(8, 16, 3, padding=1), "per_channel"),
    "conv_per_tensor": (lambda: nn.Conv2d(8, 16, 3, padding=1), "per_tensor"),
    "grouped_conv": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4), "per_channel"),
    "depthwise_same_conv": (lambda: DynamicSamePaddingConv(8, 8, 3, stride=2, groups=8), "per_tensor"),
    "linear": (lambda: nn.Linear(8 * 12 * 12 // 16, 10), "per_channel"),
}


def _setup(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    make, weights = LAYERS[kind]
    layer = make()
    train, held_out = _correlated_images(48, seed=1), _correlated_images(48, seed=2)
    if isinstance(layer, nn.Linear):  # a Linear on pooled, flattened features
        train, held_out = (F.avg_pool2d(t, 4).flatten(1) for t in (train, held_out))
    layer = _quantized_layer(layer, weights, train)
    return layer, train, held_out


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_adaround_beats_round_to_nearest_on_held_out_inputs_and_lands_on_the_grid(kind):
    layer, train, held_out = _setup(kind)
    # The question here is the weights' rounding alone: float inputs, so the input quantizer's error (which no
    # rounding can remove) does not blur the comparison. The pipeline test covers quantized inputs.
    layer.input_quantizer.disable()
    grid = WeightGrid.of(layer.weight_quantizer, layer.weight)
    rows, targets = _rows(layer, train, positions=None)
    options = RoundingOptions(iterations=1000, batch_rows=512)
    result = adaround_weight(layer.weight, layer.bias, getattr(layer, "groups", 1), grid, rows, targets, options)
    # Held-out inputs: the learned rounding generalises, it does not only fit the optimisation rows.
    test_rows, test_targets = _rows(layer, held_out, positions=None)
    groups = getattr(layer, "groups", 1)
    with torch.no_grad():
        nearest_w = layer.weight_quantizer(layer.weight)  # what plain PTQ computes
        mse_nearest = float(((apply_rows(nearest_w, layer.bias, test_rows, groups) - test_targets) ** 2).mean())
        mse_ada = float(((apply_rows(result.weight, layer.bias, test_rows, groups) - test_targets) ** 2).mean())
    # Measured with this seed: AdaRound's held-out MSE is 14-63% of round-to-nearest's (the depthwise conv, 9 weights
    # a channel, has the least freedom); 0.8 leaves room for other CPUs' float arithmetic.
    assert mse_ada < 0.8 * mse_nearest, (mse_ada, mse_nearest)
    assert 0 < result.changed < 0.5  # it changed some roundings, and every change is one step (below)
    # h(V) ended binary: the regulariser, annealed to beta 2, drove every free h to 0 or 1 before hardening.
    assert result.soft_binary == 1.0
    _assert_on_grid(layer, grid, result)


def _assert_on_grid(layer, grid, result):
    """On the grid: the quantizer computes exactly the chosen integers times its step from the rounded weight (which
    stores them so, except +-qmax, stored as +-amax itself), each integer is within one step of the float weight
    (floor or ceil), and the range re-measured from the new weight is bit for bit the same amax."""
    with torch.no_grad():
        inv = grid.inverse_scale()
        fake = layer.weight_quantizer(result.weight)
        assert torch.equal(fake, result.q / inv)
        inner = result.q.abs() < grid.qmax
        assert torch.equal(result.weight[inner], fake[inner])
        assert torch.equal(torch.round(result.weight * inv), result.q)
        assert ((result.q - layer.weight.detach() * inv).abs() < 1).all()
        w = result.weight.abs()
        dims = [d for d in range(w.dim()) if grid.amax.shape[d] == 1]
        assert torch.equal(w.amax(dim=dims, keepdim=True), grid.amax)


def test_seven_bit_weights_use_the_quantizers_own_grid():
    layer, train, _ = _setup("conv_per_channel")
    layer.weight_quantizer.num_bits = 7  # the openvino target on a CPU without VNNI
    grid = WeightGrid.of(layer.weight_quantizer, layer.weight)
    assert (grid.qmin, grid.qmax) == (-64, 63)
    rows, targets = _rows(layer, train)
    result = adaround_weight(layer.weight, layer.bias, 1, grid, rows, targets, RoundingOptions(iterations=300))
    assert result.q.abs().max() == 63 and result.q.min() >= -63
    _assert_on_grid(layer, grid, result)


def test_rows_reproduce_the_layer_with_sampled_positions():
    # The im2col rows (sampled positions, stride, groups, the layer's own 'same' padding) times the weight are the
    # layer's outputs at those positions: the optimisation sees exactly the layer's arithmetic.
    for kind in ("grouped_conv", "depthwise_same_conv", "linear"):
        layer, train, _ = _setup(kind)
        with torch.no_grad():
            layer.weight_quantizer.disable()
            layer.input_quantizer.disable()
            rows, pick = layer_rows(layer, train, 5, torch.Generator().manual_seed(0))
            y = layer(train)
            expected = output_rows(layer, y, pick) if pick is not None else y
            torch.testing.assert_close(apply_rows(layer.weight, layer.bias, rows, getattr(layer, "groups", 1)),
                                       expected, atol=1e-5, rtol=1e-5)
            if pick is not None:
                assert rows.shape[0] == train.shape[0] * 5


def test_schedule_matches_the_paper():
    options = RoundingOptions(iterations=1000, warm_start=0.2, beta_range=(20.0, 2.0))
    assert beta_at(options, 200) == pytest.approx(20.0)
    assert beta_at(options, 600) == pytest.approx(11.0)
    assert beta_at(options, 1000) == pytest.approx(2.0)
    v = torch.tensor([-100.0, 0.0, 100.0])
    assert rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]  # the stretch makes exact 0 and 1 reachable


# ---------------------------------------------------------------------------------------------------------------
# The pipeline algorithm (quant/algorithms/adaround.py) on a whole model: quantize_, export, restore_
# ---------------------------------------------------------------------------------------------------------------

CALIB = [_correlated_images(16, seed=10 + i, channels=3, size=16) for i in range(3)]  # 48 images


def _calib_loop(images):
    def loop(model):
        with torch.no_grad():
            for x in images:
                model(x)
    return loop


def _adarounded(weights="per_channel", images=CALIB, subclass_conv=False, **options):
    from helpers import tiny_cnn

    from workbench.quant.algorithms import AlgorithmStep

    step = AlgorithmStep.model_validate({"name": "adaround", "iterations": 200, "max_images": 48, "min_images": 8,
                                         "positions": 16, "batch_rows": 256, **options})
    config = Int8Config(method="max", weights=weights)
    model = tiny_cnn(subclass_conv=subclass_conv)
    result = quantize_(model, config, _calib_loop(images), images[0][:2], algorithms=[step])
    plain = tiny_cnn(subclass_conv=subclass_conv)
    plain_result = quantize_(plain, config, _calib_loop(images), images[0][:2])
    return model, result, plain, plain_result, config


def _weight_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("weights", ["per_channel", "per_tensor"])
def test_pipeline_rounds_every_layer_on_the_grid_and_keeps_the_ranges(weights):
    model, result, plain, _, _ = _adarounded(weights)
    (record,) = result.algorithms
    assert record.name == "adaround" and record.skipped == {}
    assert set(record.changes) == {"conv1", "conv2", "conv3", "fc"}  # every layer's weight changed
    plain_layers = _weight_layers(plain)
    moved = 0
    for name, layer in _weight_layers(model).items():
        ref = plain_layers[name]
        # The range did not move: the same amax as plain PTQ measured on the same (folded) weights.
        assert torch.equal(layer.weight_quantizer.amax, ref.weight_quantizer.amax)
        grid = WeightGrid.of(layer.weight_quantizer, layer.weight)
        with torch.no_grad():
            q = torch.round(layer.weight * grid.inverse_scale())
            assert torch.equal(layer.weight_quantizer(layer.weight), q / grid.inverse_scale())  # on the grid
            nearest = grid.nearest(ref.weight)
            assert ((q - nearest).abs() <= 1).all()  # each weight one step at most from round-to-nearest
            moved += int((q != nearest).sum())
        # what refresh_weight_ranges_ (QAT) and restore_ measure from the weights is the same range
    assert moved > 0
    from workbench.quant.ptq import refresh_weight_ranges_

    before = {n: m.weight_quantizer.amax.clone() for n, m in _weight_layers(model).items()}
    refresh_weight_ranges_(model, result)
    for name, layer in _weight_layers(model).items():
        assert torch.equal(layer.weight_quantizer.amax, before[name])
    assert record.notes and "layer(s) on 48 image(s)" in record.notes[0]


def test_export_writes_the_adarounded_integers(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from workbench.qdq.export import export_onnx

    model, result, plain, _, _ = _adarounded("per_channel")
    path = export_onnx(model, CALIB[0][:1], tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inits.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    # the integers each exported weight quantizes to (QuantizeLinear: round half to even, as numpy)
    exported = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits and inits[node.input[0]].ndim >= 2:
            w, scale = inits[node.input[0]], inits[node.input[1]]
            scale = scale.reshape([-1] + [1] * (w.ndim - 1)) if scale.ndim else scale
            exported.append((w, np.clip(np.round(w / scale), -128, 127)))
    layers = _weight_layers(model)
    assert len(exported) == len(layers)
    for name, layer in layers.items():
        weight = layer.weight.detach().numpy()
        (ints,) = [i for w, i in exported if w.shape == weight.shape and np.array_equal(w, weight)]
        grid = WeightGrid.of(layer.weight_quantizer, layer.weight)
        with torch.no_grad():
            q = torch.round(layer.weight * grid.inverse_scale()).numpy()
            nearest = grid.nearest(_weight_layers(plain)[name].weight).numpy()
        assert np.array_equal(ints, q)  # export(weights) == round(w / scale) of the AdaRounded weights
        assert not np.array_equal(ints, nearest)  # and those are not round-to-nearest's


def test_restore_reproduces_the_adarounded_model(tmp_path):
    from helpers import tiny_cnn

    from workbench.quant.algorithms.base import load_state, save_state
    from workbench.quant.ptq import restore_

    model, result, _, _, config = _adarounded("per_tensor")
    save_state(result.ptq_state, tmp_path / "ptq_state.pt")
    restored = tiny_cnn()
    restore_(restored, config, result.activation_amax, CALIB[0][:2], ptq_state=load_state(tmp_path / "ptq_state.pt"))
    held_out = _correlated_images(8, seed=77, channels=3, size=16)
    with torch.no_grad():
        assert torch.equal(restored(held_out), model(held_out))
    for (name, a), (_, b) in zip(_weight_layers(model).items(), _weight_layers(restored).items()):
        assert torch.equal(a.weight, b.weight), name
        assert torch.equal(a.weight_quantizer.amax, b.weight_quantizer.amax), name


def test_too_few_images_is_skipped_by_name_and_the_run_goes_on():
    few = [CALIB[0][:4]]
    model, result, plain, _, _ = _adarounded(images=few, min_images=8, max_images=48)
    (record,) = result.algorithms
    assert "only 4 calibration image(s)" in record.skipped["model"] and "min_images=8" in record.skipped["model"]
    assert record.changes == {}
    with torch.no_grad():
        assert torch.equal(model(CALIB[1]), plain(CALIB[1]))


def test_a_conv_whose_forward_pads_itself_unknowingly_is_skipped_not_misrounded():
    # PaddedConv2d pads in its forward through an attribute AdaRound does not know: the rows would not be the
    # convolution's, and the check that they reproduce its float outputs skips it with the reason.
    model, result, _, _, _ = _adarounded(subclass_conv=True, layers=["conv*"])
    (record,) = result.algorithms
    assert set(record.skipped) == {"conv1", "conv2", "conv3"}
    assert all("more than a convolution" in why for why in record.skipped.values())


def test_options_are_validated():
    from pydantic import ValidationError

    from workbench.quant.algorithms import AlgorithmStep

    step = AlgorithmStep.model_validate("adaround")
    assert step.options["iterations"] == 10_000 and step.options["reg_param"] == 0.01
    assert tuple(step.options["beta_range"]) == (20.0, 2.0) and step.options["warm_start"] == 0.2
    for bad, words in [({"beta_range": [2, 20]}, "start >= end"), ({"iterations": 0}, "iterations"),
                       ({"warm_start": 1.0}, "warm_start"), ({"device": "tpu"}, "device"),
                       ({"min_images": 64, "max_images": 32}, "min_images"), ({"iteration": 5}, "iteration")]:
        with pytest.raises(ValidationError, match=words):
            AlgorithmStep.model_validate({"name": "adaround", **bad})
