"""AdaRound (after ranges): learn each quantized Conv2d/Linear layer's weight rounding on calibration images.

The optimisation of one layer is `quant/adaround.py` (the paper's rectified sigmoid, regulariser and annealing,
AIMET's defaults). This file runs it over the model, layer by layer in model order, with asymmetric reconstruction
as AIMET does: the layer's input is what the *quantized* model feeds it (its activations fake-quantized, every
earlier layer already AdaRounded), through the layer's own input quantizer, and the target is the *float* model's
output of that layer. So each layer also makes up for what quantizing everything before it did.

Data and memory. The first `max_images` calibration images are kept (as the model receives them). One float pass
over them, before any weight is rounded, gives every layer's float outputs at `positions` output positions sampled
at random per image; then, per layer, one quantized pass (stopped once the layer has run) gives its inputs at the
same positions: each the input patch that produces that output (im2col, so stride, padding, dilation and groups are
the layer's). Rows are kept on the CPU in float16: the float outputs of every layer (EfficientNet-Lite0, 128 images
x 64 positions: about 0.25 GB) and the inputs of one layer at a time (its widest 1x1 conv, 1152 inputs: 19 MB).
Each optimisation step draws `batch_rows` of them onto `device`. The pipeline's one-pass statistics are not used:
they are per-channel moments, and AdaRound needs raw inputs taken after each earlier layer was rounded.

The rounded weights are exactly on each weight quantizer's grid, with its num_bits (8, or 7 for a CPU target that
needs them) and granularity (per channel or per tensor), and the quantizer's range does not move: re-measuring it
from the rounded weights (restore, QAT) gives the same amax (quant/adaround.py says how). The export therefore
writes ordinary Q/DQ weights whose integers are the AdaRounded ones. The weights are saved in ptq_state.pt by the
pipeline like every algorithm's changes.

What it skips, by name and why, and the run goes on: fewer calibration images than `min_images`; layers that are
not Conv2d/Linear (ConvTranspose, Conv1d/3d), whose weights stay float, that the images never reach, or whose
forward is more than a convolution of its input (checked: the rows must reproduce the float layer's outputs).
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Algorithm, AlgorithmOptions, AlgorithmRecord, register_algorithm

CHUNK_IMAGES = 32  # images per forward pass while caching a layer's rows


class AdaRoundOptions(AlgorithmOptions):
    iterations: int = Field(10_000, ge=1, le=1_000_000, description="Optimisation steps per layer (AIMET: 10,000).")
    reg_param: float = Field(0.01, gt=0, le=1e3, description="Regularisation weight: how hard h(V) is pushed to 0 or "
                                                             "1 against the reconstruction loss (AIMET: 0.01).")
    beta_range: tuple[float, float] = Field((20.0, 2.0), description="The regulariser's exponent, annealed (cosine) "
                                                                     "from the first to the second after the warm "
                                                                     "start.")
    warm_start: float = Field(0.2, ge=0, lt=1, description="Share of the iterations without the regulariser.")
    layers: list[str] = Field(default_factory=list, description="Module-name glob patterns to AdaRound (default: "
                                                                "every quantized Conv2d/Linear layer).")
    max_images: int = Field(256, ge=1, le=100_000, description="Calibration images the rows are taken from.")
    min_images: int = Field(16, ge=1, description="Fewer calibration images than this: AdaRound is skipped (it would "
                                                  "fit the rounding to a handful of images).")
    positions: int = Field(64, ge=1, le=1_000_000, description="Output positions sampled per image and conv layer.")
    batch_rows: int = Field(2048, ge=1, le=10_000_000, description="Rows (sampled output positions) per step.")
    lr: float | None = Field(None, gt=0, description="Adam's learning rate (default: 1e-3 at 10,000 iterations, "
                                                     "proportionally larger for fewer, so that h still ends binary).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the optimisation runs: auto is the "
                                                                       "GPU when there is one, else the CPU.")
    seed: int = Field(0, description="Seeds the sampled positions and batches.")

    @field_validator("beta_range")
    @classmethod
    def _beta(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (v[0] >= v[1] > 0):
            raise ValueError("beta_range is (start, end) with start >= end > 0, e.g. [20, 2]: the regulariser's "
                             "exponent anneals from start down to end")
        return v

    @model_validator(mode="after")
    def _images(self):
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) is above max_images ({self.max_images})")
        return self


@register_algorithm("adaround")
class AdaRound(Algorithm):
    Options = AdaRoundOptions
    phase = "after_ranges"

    def apply(self, ctx, opts: AdaRoundOptions, stats) -> AlgorithmRecord:
        import torch

        from ..adaround import RoundingOptions

        record = AlgorithmRecord(self.name)
        targets = _targets(ctx, opts, record.skipped)
        if not targets:
            record.skipped.setdefault("model", "no quantized Conv2d/Linear layer with a weight quantizer matches")
            return record
        images = ctx.images(opts.max_images)
        if images.shape[0] < opts.min_images:
            record.skipped["model"] = (f"only {images.shape[0]} calibration image(s), AdaRound needs at least "
                                       f"min_images={opts.min_images}: the rounding would be fitted to too few; "
                                       "give data.calibration more images or lower min_images")
            return record
        device = _device(opts.device)
        rounding = RoundingOptions(iterations=opts.iterations, reg_param=opts.reg_param,
                                   beta_range=tuple(opts.beta_range), warm_start=opts.warm_start,
                                   batch_rows=opts.batch_rows, lr=opts.lr, seed=opts.seed)
        seeds = {name: opts.seed * 100_003 + i for i, name in enumerate(targets)}
        # The float model's outputs of every layer, in one pass before any weight is rounded: later layers' targets
        # must not see the earlier layers' rounding (the quantized inputs do, that is the asymmetric part).
        floats = _float_rows(ctx, targets, images, opts, seeds)
        gains = []
        for name, layer in targets.items():
            outcome = _round_layer(ctx, layer, images, opts, rounding, device, seeds[name], floats.pop(name, None))
            if isinstance(outcome, str):
                record.skipped[name] = outcome
                continue
            gains.append(outcome.mse_adaround / max(outcome.mse_nearest, 1e-30))
            record.notes.append(f"{name}: output MSE {outcome.mse_nearest:.3g} -> {outcome.mse_adaround:.3g}, "
                                f"{100 * outcome.changed:.1f}% of weights rounded off nearest, soft h binary "
                                f"{100 * outcome.soft_binary:.1f}%")
        if gains:
            gains.sort()
            record.notes.insert(0, f"{len(gains)} layer(s) on {images.shape[0]} image(s) x {opts.positions} "
                                   f"position(s), {opts.iterations} iterations each on {device}: output MSE against "
                                   f"float (quantized inputs) at {100 * gains[len(gains) // 2]:.0f}% of "
                                   f"round-to-nearest's (median; {100 * gains[0]:.0f}-{100 * gains[-1]:.0f}%)")
        del images
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return record


def _device(choice: str):
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("adaround: device cuda was asked for but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(choice)


def _targets(ctx, opts: AdaRoundOptions, skipped: dict) -> dict:
    from torch import nn

    out = {}
    for name, module in ctx.layers().items():
        if opts.layers and not any(fnmatch.fnmatchcase(name, p) for p in opts.layers):
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            skipped[name] = f"{type(module).__name__}: AdaRound handles Conv2d and Linear layers"
            continue
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None or not quantizer.is_enabled:
            skipped[name] = "its weights stay float (nothing to round)"
            continue
        out[name] = module
    return out


class _Reached(Exception):
    """Raised from a layer's hook to stop the forward once the layer has run (the rest of the model is not needed)."""


def _positions(layer, opts: AdaRoundOptions):
    from torch import nn

    return opts.positions if isinstance(layer, nn.Conv2d) else None


def _float_rows(ctx, targets: dict, images, opts: AdaRoundOptions, seeds: dict) -> dict:
    """One float pass over the images: per layer, its float outputs at its sampled positions (float16, CPU) and, for
    the first chunk, its input rows and outputs in float32 (to check that the rows reproduce the layer)."""
    import torch

    from ..adaround import layer_rows, output_rows

    out: dict[str, dict] = {name: {"targets": [], "check": None} for name in targets}
    generators = {name: torch.Generator().manual_seed(seeds[name]) for name in targets}

    def hook(name):
        def fn(module, args, output):
            entry = out[name]
            if entry.get("seen_chunk") == chunk[0]:
                return  # a layer run twice in one forward: its first run counts (as in the quantized pass)
            entry["seen_chunk"] = chunk[0]
            r, pick = layer_rows(module, args[0], _positions(module, opts), generators[name])
            y = output_rows(module, output, pick) if pick is not None else output.reshape(-1, output.shape[-1])
            entry["targets"].append(y.to("cpu", torch.float16))
            if entry["check"] is None:
                entry["check"] = (r.float(), y.float())

        return fn

    chunk = [0]
    handles = [layer.register_forward_hook(hook(name)) for name, layer in targets.items()]
    try:
        with torch.no_grad(), ctx.float_mode():
            for start in range(0, images.shape[0], CHUNK_IMAGES):
                chunk[0] = start
                ctx.model(images[start:start + CHUNK_IMAGES])
    finally:
        for h in handles:
            h.remove()
    return {name: entry for name, entry in out.items() if entry["targets"]}


def _round_layer(ctx, layer, images, opts: AdaRoundOptions, rounding, device, seed: int, floats: dict | None):
    """Cache the layer's quantized input rows, optimise its rounding against its float outputs (`floats`, from
    _float_rows), write the rounded weight into it. Returns the RoundingResult, or why the layer was skipped."""
    import torch

    from ..adaround import WeightGrid, adaround_weight, apply_rows, layer_rows

    if floats is None:
        return "the calibration images never reach it"
    try:
        grid = WeightGrid.of(layer.weight_quantizer, layer.weight)
    except ValueError as e:
        return str(e)
    groups = getattr(layer, "groups", 1)
    with torch.no_grad():
        w = layer.weight.detach().float()
        b = None if layer.bias is None else layer.bias.detach().float()
        check_rows, expected = floats["check"]
        got = apply_rows(w, b, check_rows.to(w.device), groups)
        if (got - expected.to(w.device)).abs().max() > 1e-3 * expected.abs().max().clamp(min=1e-6):
            return ("its forward computes more than a convolution of its input (the im2col rows do not reproduce "
                    "its float outputs), so its rounding cannot be optimised here")
    rows: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(seed)  # the same positions as the float pass drew

    def hook(module, args, output):
        with torch.no_grad():
            r, _ = layer_rows(module, module.input_quantizer(args[0]), _positions(module, opts), generator)
            rows.append(r.to("cpu", torch.float16))
        raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], CHUNK_IMAGES):
                try:
                    ctx.model(images[start:start + CHUNK_IMAGES])
                except _Reached:
                    pass
    finally:
        handle.remove()
    all_rows, all_targets = torch.cat(rows), torch.cat(floats["targets"])
    rows.clear()
    result = adaround_weight(layer.weight, layer.bias, groups, grid, all_rows, all_targets, rounding, device)
    with torch.no_grad():
        layer.weight.copy_(result.weight.to(layer.weight.device, layer.weight.dtype))
    return result
