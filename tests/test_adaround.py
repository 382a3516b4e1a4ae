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
