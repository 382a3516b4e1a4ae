"""Bias correction (after ranges): move each quantized layer's mean output back to the float model's.

Quantizing a layer's weights (and its input) shifts the mean of its output channels; the next layers see a
biased input and the shift grows with depth. Bias correction adds the shift back into the layer's bias
(creating one where the layer has none), for Conv and Linear layers:

- `mode: full` (empirical, DFQ/AIMET's empirical correction, NNCF's BiasCorrection): layer by layer in the order
  the model runs them, b += E[y_float] - E[y_quant], where y_quant is the layer's output in the quantized model
  whose upstream layers are already corrected, so each correction also covers what quantizing everything before it
  did. It runs `images` calibration images as ONE batch through the float model (E[y_float] per layer) and then
  through the quantized one, correcting each layer's bias in a forward hook as the batch reaches it and handing the
  corrected output on: every later layer sees its corrected input in the same pass, which is exactly the sequential
  algorithm at the cost of two forward passes (the batch must fit in memory: `images` bounds it).
- `mode: fast` (NNCF's FastBiasCorrection, DFQ's analytic flavour): per layer, with the float model's input and
  only the layer's own weight quantization error: b += (W - Q(W)) E[x], with E[x] the per-channel mean of the
  layer's float input over all calibration batches (one statistics pass, shared with any algorithm asking for the
  same). For a convolution that is exact away from zero-padded borders.

Q(W) is the layer's weight through its own weight quantizer (AlgorithmContext.quantized_weight): the bits,
granularity and scales of the run's arithmetic, whatever profile set them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Algorithm, AlgorithmOptions, AlgorithmRecord, StatisticRequest, register_algorithm


class BiasCorrectionOptions(AlgorithmOptions):
    mode: Literal["full", "fast"] = Field(
        "full", description="full: empirical, sequential over the quantized model; fast: per layer, weight error only.")
    images: int = Field(32, ge=1, le=4096, description="mode full: calibration images run as one batch (memory "
                                                       "grows with it: 32 yolov5n images at 640 px take ~2 GB).")
    layers: list[str] = Field(default_factory=list, description="Module-name glob patterns to correct (default: every "
                                                                "quantized Conv/Linear layer).")


@register_algorithm("bias_correction")
class BiasCorrection(Algorithm):
    Options = BiasCorrectionOptions
    phase = "after_ranges"

    def statistics(self, ctx, opts: BiasCorrectionOptions) -> list[StatisticRequest]:
        if opts.mode != "fast":
            return []
        return [StatisticRequest(name, "input") for name in _targets(ctx, opts, {})]

    def apply(self, ctx, opts: BiasCorrectionOptions, stats) -> AlgorithmRecord:
        record = AlgorithmRecord(self.name)
        targets = _targets(ctx, opts, record.skipped)
        if not targets:
            record.skipped.setdefault("model", "no quantized Conv/Linear layer with a weight quantizer matches")
            return record
        if opts.mode == "fast":
            _fast(ctx, targets, stats, record)
        else:
            _full(ctx, opts, targets, record)
        return record


def _targets(ctx, opts: BiasCorrectionOptions, skipped: dict) -> dict:
    """The layers to correct, by name: quantized, weight quantizer on, Conv (not transposed) or Linear, matching
    opts.layers where given."""
    import fnmatch

    from torch import nn

    out = {}
    for name, module in ctx.layers().items():
        if opts.layers and not any(fnmatch.fnmatchcase(name, p) for p in opts.layers):
            continue
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            skipped[name] = f"{type(module).__name__}: only Conv and Linear layers are corrected"
            continue
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled:
            skipped[name] = "its weights stay float (no weight quantization error to correct)"
            continue
        out[name] = module
    return out


def _ensure_bias(module):
    import torch
    from torch import nn

    if module.bias is None:
        out = module.weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
    return module.bias


def _weight_error_times(module, error, x_mean):
    """sum over input channels and kernel of error[o, i, k] * x_mean[i] (group aware): the mean output shift."""
    out, in_per_group = error.shape[0], error.shape[1]
    groups = getattr(module, "groups", 1)
    summed = error.reshape(out, in_per_group, -1).sum(-1)
    x = x_mean.to(summed).view(groups, in_per_group).repeat_interleave(out // groups, dim=0)
    return (summed * x).sum(1)


def _fast(ctx, targets: dict, stats, record: AlgorithmRecord) -> None:
    import torch

    with torch.no_grad():
        for name, module in targets.items():
            request = StatisticRequest(name, "input")
            if request not in stats or stats[request].count == 0:
                record.skipped[name] = "it saw no calibration input"
                continue
            error = module.weight.detach() - ctx.quantized_weight(module)
            shift = _weight_error_times(module, error, stats[request].mean)
            _ensure_bias(module).add_(shift.to(module.weight.dtype))
    record.notes.append(f"fast: {len(targets)} layer(s), each corrected for its own weight error with the float "
                        "input's per-channel mean")


def _channel_mean(y, module):
    from torch import nn

    axis = y.dim() - 1 if isinstance(module, nn.Linear) else 1
    dims = [d for d in range(y.dim()) if d != axis]
    return y.double().mean(dim=dims), axis


def _full(ctx, opts: BiasCorrectionOptions, targets: dict, record: AlgorithmRecord) -> None:
    import torch

    images = ctx.images(opts.images)
    if images.shape[0] == 0:
        record.skipped["model"] = "the calibration data gave no images"
        return
    float_mean: dict[str, torch.Tensor] = {}

    def float_hook(name):
        def fn(module, args, output):
            if name not in float_mean:  # a layer run twice in one forward is corrected on its first run
                float_mean[name] = _channel_mean(output, module)[0]

        return fn

    handles = [m.register_forward_hook(float_hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad(), ctx.float_mode():
            ctx.model(images)
    finally:
        for h in handles:
            h.remove()
    done: set[str] = set()

    def correct_hook(name):
        def fn(module, args, output):
            if name in done or name not in float_mean:
                return None
            done.add(name)
            mean, axis = _channel_mean(output, module)
            delta = (float_mean[name] - mean).to(output.dtype)
            _ensure_bias(module).add_(delta.to(module.weight.dtype))
            shape = [1] * output.dim()
            shape[axis] = -1
            return output + delta.view(shape)  # the corrected output, as the next layers would now see it

        return fn

    handles = [m.register_forward_hook(correct_hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            ctx.model(images)
    finally:
        for h in handles:
            h.remove()
    for name in targets:
        if name not in done:
            record.skipped[name] = "the calibration images never reach it"
    record.notes.append(f"full: {len(done)} layer(s) corrected in model order on {images.shape[0]} calibration "
                        "image(s) (one float and one quantized pass)")
