"""The fake-quantizer for arithmetics modelopt cannot export: unsigned 8-bit with a zero point (asymmetric ranges),
7-bit weights, power-of-two scales.

modelopt 0.47's TensorQuantizer has `unsigned` and `num_bits`, but its ONNX export asserts 8 bits and writes zero
point 0 only, and its affine `bias` is a float offset subtracted before a symmetric quantizer, which its export drops
(no integer zero point in the graph). So the quantizers modelopt inserted are turned into `AffineQuantizer`s (same
object, same amax buffer, same enable/disable, a subclass whose fake-quant is ours): everything that reads
TensorQuantizers (sensitivity, mixed precision, QAT's weight refresh, the summaries) works on them unchanged, and the
TensorRT target never meets this module.

The arithmetic, for a tensor x with range [lo, hi] (symmetric: lo = -hi) and b bits:

    symmetric signed  scale = hi / (2^(b-1) - 1), zero point 0, q in [-2^(b-1), 2^(b-1) - 1]
    asymmetric u8     scale = (hi - lo) / 255, zero point = round(-lo / scale) in [0, 255], q in [0, 255]
    power of two      scale = 2^ceil(log2(scale)): the smallest power of two whose grid covers the range

    y = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale   (round half to even)

which is ONNX's QuantizeLinear followed by DequantizeLinear, the pair the export writes (uint8 zero points for
asymmetric ranges, int8 otherwise; 7-bit weights are int8 values within [-63, 63], since a weight's range is its
largest magnitude). Gradients pass straight through inside the range and stop outside it, as modelopt's do.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from torch.onnx import symbolic_helper

from .targets import Arithmetic


class AffineQuantizer(TensorQuantizer):
    """A modelopt TensorQuantizer whose fake-quant and export follow `bits`, `asymmetric` and `power_of_two`.

    `amax` is the upper end of the range; `range_min` (asymmetric only) the lower end, <= 0.
    """

    wb_bits: int = 8
    wb_asymmetric: bool = False
    wb_power_of_two: bool = False

    @classmethod
    def convert_(cls, quantizer: TensorQuantizer, bits: int, asymmetric: bool, power_of_two: bool) -> "AffineQuantizer":
        """Turn a modelopt quantizer into this class in place (its buffers and switches are kept)."""
        quantizer.__class__ = cls
        quantizer.wb_bits, quantizer.wb_asymmetric, quantizer.wb_power_of_two = bits, asymmetric, power_of_two
        if asymmetric and not hasattr(quantizer, "_range_min"):
            quantizer.register_buffer("_range_min", torch.tensor(0.0))
        return quantizer

    @property
    def range_min(self) -> float:
        return float(self._range_min) if self.wb_asymmetric else -float(self.amax.max())

    @range_min.setter
    def range_min(self, value: float) -> None:
        self._range_min.fill_(min(float(value), 0.0))  # zero stays inside the range: padding is exact

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        if self.wb_asymmetric:
            return 0, (1 << self.wb_bits) - 1
        return -(1 << (self.wb_bits - 1)), (1 << (self.wb_bits - 1)) - 1

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point), both shaped like amax (float32, and integer-valued float32)."""
        amax = self.amax.float()
        qmin, qmax = self.qmin_qmax
        if self.wb_asymmetric:
            lo = self._range_min.float().to(amax.device)
            scale = (amax - lo) / (qmax - qmin)
            zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
        else:
            scale = amax / qmax
            zero_point = torch.zeros_like(scale)
        if self.wb_power_of_two:
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        return scale, zero_point

    def _fake_quantize(self, inputs):
        scale, zero_point = self.scale_zero_point()
        qmin, qmax = self.qmin_qmax
        scale, zero_point = scale.to(inputs.device), zero_point.to(inputs.device)
        if torch.onnx.is_in_onnx_export():
            axis = _axis(self, scale)
            scale_c, zero_point_c = _export_constants(scale, zero_point, self.wb_asymmetric, axis)
            return _QDQExport.apply(inputs, scale_c.to(inputs.device), zero_point_c.to(inputs.device), qmin, qmax,
                                    NO_AXIS if axis is None else axis)
        return _FakeQuant.apply(inputs, scale.to(inputs.dtype), zero_point.to(inputs.dtype), qmin, qmax)

    def extra_repr(self) -> str:
        kind = "u8 asymmetric" if self.wb_asymmetric else f"s{self.wb_bits} symmetric"
        return f"{kind}{', power-of-two' if self.wb_power_of_two else ''}, {super().extra_repr()}"


def _axis(quantizer: TensorQuantizer, scale: torch.Tensor) -> int | None:
    if scale.numel() == 1:
        return None
    axis = quantizer.axis
    return axis if isinstance(axis, int) else axis[0]


def _fake_quant(x, scale, zero_point, qmin: int, qmax: int):
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class _FakeQuant(torch.autograd.Function):
    """Fake quantization with the straight-through estimator, zero gradient where the value is clipped."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        q = torch.round(x / scale) + zero_point
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _QDQExport(torch.autograd.Function):
    """QuantizeLinear -> DequantizeLinear in the ONNX graph; the same fake quantization when traced. `scale` and
    `zero_point` (uint8 or int8) are constants of the trace, flattened to one value per channel along `axis`
    (NO_AXIS: per tensor)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis: int):
        shape = [1] * x.dim()
        if axis != NO_AXIS:
            shape[axis] = -1
        return _fake_quant(x, scale.reshape(shape), zero_point.float().reshape(shape), qmin, qmax)

    @staticmethod
    @symbolic_helper.parse_args("v", "v", "v", "i", "i", "i")
    def symbolic(g, x, scale, zero_point, qmin: int, qmax: int, axis: int):
        kwargs = {"axis_i": axis} if axis != NO_AXIS else {}
        quantized = g.op("QuantizeLinear", x, scale, zero_point, **kwargs)
        return g.op("DequantizeLinear", quantized, scale, zero_point, **kwargs)


NO_AXIS = -(1 << 20)


def _export_constants(scale: torch.Tensor, zero_point: torch.Tensor, unsigned: bool,
                      axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point as fresh tensors (constants in the ONNX trace, not expressions of the amax buffer)."""
    flat = (lambda t: t.reshape(-1)) if axis is not None else (lambda t: t.reshape(()))
    scale_np = flat(scale.detach().float().cpu()).numpy().copy()
    zp_np = flat(zero_point.detach().cpu()).numpy().astype("uint8" if unsigned else "int8")
    return torch.from_numpy(scale_np), torch.from_numpy(zp_np)


def convert_quantizers_(weight_quantizers: list, activation_quantizers: list, arithmetic: Arithmetic) -> None:
    """Every quantizer of a calibrated layer set to the target's arithmetic (a no-op for modelopt-native targets)."""
    if arithmetic.modelopt_native:
        return
    for q in weight_quantizers:
        AffineQuantizer.convert_(q, arithmetic.weight_bits, False, arithmetic.power_of_two_scales)
    for q in activation_quantizers:
        AffineQuantizer.convert_(q, arithmetic.activation_bits, arithmetic.activation_zero_point,
                                 arithmetic.power_of_two_scales)
