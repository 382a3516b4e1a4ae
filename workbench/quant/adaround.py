"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"), one layer at a time.

Round-to-nearest is not the best rounding for a layer's *output*: each weight may instead go down or up to the
grid point next to it, and the choice that keeps the layer's output closest to the float layer's on calibration
inputs wins points back. AdaRound learns the choice through a continuous relaxation: the weight becomes
`scale * (floor(w / scale) + h(V))`, with the rectified sigmoid `h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma,
0, 1)` (zeta 1.1, gamma -0.1, so h reaches exactly 0 and 1), and V minimises the reconstruction loss
`||W x - W~ x||^2` plus `reg_param * sum(1 - |2h - 1|^beta)`, a regulariser that pushes every h to 0 or 1 while
beta anneals from 20 to 2 (cosine) after a warm start of 20% of the iterations without it. At the end h is hardened
(V >= 0 rounds up, as AIMET does); the soft h of a finished run is already binary for nearly every weight
(`RoundingResult.soft_binary`).

This module is the pure core, with no model, data loader or pipeline: the layer is given as its weight, bias and
group count, the calibration data as rows (`layer_rows`: one row per sampled output position, the input patch that
produces it), and the float layer's outputs at the same rows. The defaults are AIMET's (10,000 iterations, Adam at
lr 1e-3, reg_param 0.01, beta (20, 2), warm start 0.2; fewer iterations take a proportionally larger learning rate,
so that h still ends binary); AIMET's batch is 32 images of every output position, ours a
batch of sampled positions (`batch_rows`), which costs the same per step whatever the layer's resolution.

The rounded weight is exactly on the weight quantizer's grid (`WeightGrid`, modelopt's arithmetic: `q / (qmax /
amax)`), so the fake-quant model computes it unchanged and the exported Q/DQ weight quantizes to the same integers
in TensorRT, OpenVINO and ONNX Runtime. Two rules keep the quantizer's range where it was, so that re-measuring it
from the weights (restore, QAT's refresh) finds the same amax: weights within half a step of the range's edge keep
round-to-nearest (they could otherwise fall off the edge, to -qmax - 1, or leave no weight at +-qmax), and a weight
at +-qmax is written as +-amax itself rather than `qmax / (qmax / amax)`, which can differ from amax in the last
bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (paper section 4.1, AIMET's AdaroundConstants)


@dataclass(frozen=True)
class RoundingOptions:
    """How one layer's rounding is optimised (AIMET's defaults; `batch_rows` is ours, see the module note)."""

    iterations: int = 10_000
    reg_param: float = 0.01
    beta_range: tuple[float, float] = (20.0, 2.0)
    warm_start: float = 0.2
    batch_rows: int = 2048
    lr: float | None = None  # None: 1e-3 (AIMET's) at 10,000 iterations, scaled up for fewer (see learning_rate)
    seed: int = 0

    def learning_rate(self) -> float:
        # V starts at the logit of the fractional part (|V| up to ~5) and must cross to +-2.4 for h to reach 0 or 1;
        # Adam moves it about lr per step, so fewer iterations need a larger step to end binary (measured: 1,500
        # iterations at 1e-3 left a quarter of h soft; at 1e-2 none).
        return self.lr if self.lr is not None else 1e-3 * max(1.0, 10_000 / self.iterations)


@dataclass(frozen=True)
class WeightGrid:
    """The integer grid a weight quantizer puts a weight on, in modelopt's arithmetic.

    modelopt fake-quantizes `clamp(round(w * (qmax / amax)), qmin, qmax) / (qmax / amax)`: `amax` here is broadcast to
    the weight's shape (one value per output channel or one for the tensor).
    """

    amax: torch.Tensor
    num_bits: int
    unsigned: bool = False
    narrow_range: bool = False

    @classmethod
    def of(cls, quantizer: nn.Module, weight: torch.Tensor) -> WeightGrid:
        """The grid of a calibrated modelopt TensorQuantizer for this weight (its own num_bits: 8, or 7 for a CPU
        target whose int8 dot product saturates). A ValueError says why a quantizer has no integer grid."""
        bits = quantizer.num_bits
        if not isinstance(bits, int):
            raise ValueError(f"the weight quantizer is not an integer quantizer (num_bits {bits!r})")
        if getattr(quantizer, "block_sizes", None):
            raise ValueError("the weight quantizer is block-wise; AdaRound handles per-channel and per-tensor ranges")
        amax = quantizer.amax
        if amax is None:
            raise ValueError("the weight quantizer has no range (amax): calibrate first")
        amax = amax.detach().float().to(weight.device)
        if amax.numel() == 1:
            amax = amax.reshape([1] * weight.dim())
        else:
            axis = quantizer.axis if isinstance(quantizer.axis, int) else quantizer.axis[0]
            axis %= weight.dim()
            if amax.numel() != weight.shape[axis]:
                raise ValueError(f"the weight quantizer has {amax.numel()} ranges for {weight.shape[axis]} channels")
            shape = [1] * weight.dim()
            shape[axis] = -1
            amax = amax.reshape(shape)
        return cls(amax=amax, num_bits=bits, unsigned=bool(quantizer.unsigned),
                   narrow_range=bool(getattr(quantizer, "_narrow_range", False)))

    @property
    def qmax(self) -> float:
        return float(2 ** (self.num_bits - 1 + int(self.unsigned)) - 1)

    @property
    def qmin(self) -> float:
        if self.unsigned:
            return 0.0
        return -self.qmax if self.narrow_range else -self.qmax - 1

    def inverse_scale(self) -> torch.Tensor:
        # The same float32 operation as modelopt's `max_bound / amax`, so both give the same integers.
        return torch.tensor(self.qmax, dtype=torch.float32, device=self.amax.device) / self.amax

    def nearest(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest integers (as float), what plain PTQ computes."""
        return torch.clamp(torch.round(weight.float() * self.inverse_scale()), self.qmin, self.qmax)

    def to_weight(self, q: torch.Tensor) -> torch.Tensor:
        """Integers -> float weights on the grid; +-qmax as +-amax exactly, so max|w| re-measures as amax."""
        w = q / self.inverse_scale()
        edge = self.amax.expand_as(q) * torch.sign(q)
        return torch.where(q.abs() == self.qmax, edge, w)


@dataclass
class RoundingResult:
    """One layer's AdaRound: the integers, what they do on the optimisation rows, and how binary h ended."""

    q: torch.Tensor  # the chosen integers (float dtype), the weight's shape
    weight: torch.Tensor  # grid.to_weight(q): the float weight to put into the layer
    mse_nearest: float  # output MSE (per output value) against the float layer, round-to-nearest weights
    mse_adaround: float  # the same with the AdaRounded weights
    changed: float  # share of weights rounded otherwise than to nearest
    soft_binary: float  # share of soft h(V) within 1e-3 of 0 or 1 before hardening
    pinned: int  # weights kept at nearest because they sit within half a step of the range's edge


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def beta_at(options: RoundingOptions, iteration: int) -> float:
    """The regulariser's exponent: cosine from beta_range[0] at the end of the warm start to beta_range[1]."""
    start, end = options.beta_range
    warm = options.warm_start * options.iterations
    rel = (iteration - warm) / max(options.iterations - warm, 1)
    return end + 0.5 * (start - end) * (1 + math.cos(rel * math.pi))


def layer_rows(layer: nn.Module, x: torch.Tensor, positions: int | None, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's input batch as rows: (rows, groups, inputs per group), one row per output value position.

    Conv2d: the im2col patch of each output position (F.unfold, so stride, padding, dilation and groups are the
    layer's), `positions` of them drawn at random per image (None: all); Linear: one row per input vector. Also
    returns the chosen flat output positions (None for Linear), to take the float outputs at the same places.
    """
    if isinstance(layer, nn.Conv2d):
        x, padding = _padded(layer, x)
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        n, k, length = cols.shape
        if positions is not None and positions < length:
            pick = torch.stack([torch.randperm(length, generator=generator)[:positions] for _ in range(n)])
            cols = torch.gather(cols, 2, pick.to(cols.device).unsqueeze(1).expand(n, k, positions))
        else:
            pick = torch.arange(length).expand(n, length)
        rows = cols.transpose(1, 2).reshape(-1, layer.groups, k // layer.groups)
        return rows, pick
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1]), None
    raise ValueError(f"AdaRound handles Conv2d and Linear layers, not {type(layer).__name__}")


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
    """The input as the convolution itself sees it, and the padding left to unfold: TensorFlow-style 'same'
    convolutions (EfficientNet-Lite's, which pad in their forward, statically or from the input's size), other
    padding modes, or plain zero padding. A forward that does something else is caught by the caller's check that
    the rows reproduce the float layer's outputs."""
    if isinstance(getattr(layer, "static_padding", None), nn.Module):
        return layer.static_padding(x), layer.padding
    if any("DynamicSamePadding" in c.__name__ for c in type(layer).__mro__):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2]), layer.padding
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return x, 0
        raise ValueError("padding='same' convolutions are not supported by AdaRound")
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
    return x, layer.padding


def output_rows(layer: nn.Module, y: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """The layer's output at the rows `layer_rows` chose: (rows, out_channels)."""
    if isinstance(layer, nn.Conv2d):
        n, c = y.shape[:2]
        flat = y.reshape(n, c, -1)
        taken = torch.gather(flat, 2, pick.to(y.device).unsqueeze(1).expand(n, c, pick.shape[1]))
        return taken.transpose(1, 2).reshape(-1, c)
    return y.reshape(-1, y.shape[-1])


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in/groups, ...) -> (groups, out/groups, inputs per group), the layout `layer_rows` matches."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def apply_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, groups: int) -> torch.Tensor:
    """The layer on rows: (rows, groups, k) -> (rows, out_channels)."""
    out = torch.einsum("ngk,gok->ngo", rows, _grouped(weight, groups)).reshape(rows.shape[0], -1)
    return out if bias is None else out + bias


def _mse(weight, bias, rows, targets, groups, chunk: int = 8192) -> float:
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], chunk):
        x = rows[i:i + chunk].to(weight.device, torch.float32)
        y = targets[i:i + chunk].to(weight.device, torch.float32)
        total += float(((apply_rows(weight, bias, x, groups) - y) ** 2).sum())
        count += y.numel()
    return total / max(count, 1)


def adaround_weight(weight: torch.Tensor, bias: torch.Tensor | None, groups: int, grid: WeightGrid,
                    rows: torch.Tensor, targets: torch.Tensor, options: RoundingOptions,
                    device: torch.device | str | None = None) -> RoundingResult:
    """Learn the rounding of `weight` onto `grid` so that the layer on `rows` gives `targets` (the float layer's
    outputs at those rows; the rows may come from the quantized model: asymmetric reconstruction).

    Rows and targets may be stored in float16 on the CPU; each step moves one batch to `device` in float32.
    Returns the hardened rounding; the layer itself is not touched.
    """
    device = torch.device(device) if device is not None else weight.device
    w = weight.detach().to(device, torch.float32)
    b = None if bias is None else bias.detach().to(device, torch.float32)
    grid = WeightGrid(grid.amax.to(device), grid.num_bits, grid.unsigned, grid.narrow_range)
    inv = grid.inverse_scale()
    scaled = w * inv
    nearest = grid.nearest(w)
    floor = torch.floor(scaled)
    # Weights within half a step of the range's edge keep nearest (see the module note); so does a channel with no
    # range (amax 0: every weight is 0).
    pinned = (scaled.abs() >= grid.qmax - 0.5) | (grid.amax.expand_as(w) <= 1.0 / (1 << 24))
    if grid.unsigned:
        pinned |= scaled < 0.5
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)  # AIMET's init: h(V) = the fractional part, so step 0 is w itself
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=options.learning_rate())
    n = rows.shape[0]
    resident = device.type == "cuda" or rows.device == device
    x_all = rows.to(device) if resident else rows
    y_all = targets.to(device) if resident else targets
    generator = torch.Generator(device=x_all.device).manual_seed(options.seed)  # batches drawn where the rows are
    warm_end = options.warm_start * options.iterations
    for iteration in range(options.iterations):
        idx = torch.randint(n, (min(options.batch_rows, n),), generator=generator, device=x_all.device)
        x = x_all[idx].to(device, torch.float32)
        y = y_all[idx].to(device, torch.float32)
        h = rectified_sigmoid(v)
        soft = torch.where(pinned, nearest, floor + h) / inv
        out = apply_rows(soft, b, x, groups)
        loss = ((out - y) ** 2).sum(1).mean()  # AIMET: squared norm over channels, mean over positions
        if iteration >= warm_end:
            beta = beta_at(options, iteration)
            loss = loss + options.reg_param * (1 - (2 * h - 1).abs().pow(beta))[~pinned].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        h = rectified_sigmoid(v)
        free = ~pinned
        soft_binary = float(((h < 1e-3) | (h > 1 - 1e-3))[free].float().mean()) if free.any() else 1.0
        q = torch.where(pinned, nearest, floor + (v >= 0).float()).clamp(grid.qmin, grid.qmax)
        rounded = grid.to_weight(q)
        mse_nearest = _mse(grid.to_weight(nearest), b, rows, targets, groups)
        mse_adaround = _mse(rounded, b, rows, targets, groups)
    return RoundingResult(q=q, weight=rounded.to(weight.dtype), mse_nearest=mse_nearest, mse_adaround=mse_adaround,
                          changed=float((q != nearest).float().mean()), soft_binary=soft_binary,
                          pinned=int(pinned.sum()))
