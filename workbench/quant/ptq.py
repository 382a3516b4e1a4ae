"""INT8 post-training quantization: one verb, `quantize_(model, Int8Config, forward_loop)`.

NVIDIA Model Optimizer inserts the quantizers, fake-quantizes and exports Q/DQ
ONNX; the choice of which layers and the activation ranges are ours:

- our CNN preset: per-channel weights on the output-channel axis, per-tensor
  activations, on Conv/Linear layers only (no LLM name exclusions, nothing on
  BatchNorm or pooling inputs);
- subclasses of nn.Conv2d/nn.Linear (EfficientNet-Lite's padded convolutions)
  are registered with modelopt first, since it matches modules by exact class
  and would silently leave them in float;
- modelopt calibrates the weights (per-channel max); every activation range
  (conv inputs, residual-Add inputs) comes from our histogram calibrators (max,
  entropy, percentile, mse) over one float calibration pass.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import io
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import CalibrationError
from ..models.guards import first_nonfinite
from ..targets import TENSORRT, Arithmetic
from .calibrators import (
    AbsHistogram,
    NonFiniteError,
    SignedHistogram,
    affine_range,
    compute_amax,
    power_of_two_amax,
    power_of_two_weight_amax,
)
from .config import QUANTIZABLE_TYPE_NAMES, Int8Config
from .decode_scope import DecodeScope, find_decode_scope
from .fold import fold_batchnorm_
from .rules import apply_residual_rule, residual_units

QUANTIZABLE_TYPES: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d,
    "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d,
    "Linear": nn.Linear,
}
assert tuple(QUANTIZABLE_TYPES) == QUANTIZABLE_TYPE_NAMES
# Transposed convolutions store weights as (in, out, ...): their output channels are axis 1.
_WEIGHT_AXIS = {"ConvTranspose1d": 1, "ConvTranspose2d": 1, "ConvTranspose3d": 1}
# Smallest range we hand to a quantizer: an all-zero input still needs a positive scale in ONNX.
MIN_AMAX = 1e-6


@dataclass
class QuantResult:
    """What quantize_ did: enough for the report and to reproduce it."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    quantized: dict[str, str] = field(default_factory=dict)  # module name -> type name
    excluded: dict[str, str] = field(default_factory=dict)  # module name -> type name (matched an exclude)
    activation_amax: dict[str, float] = field(default_factory=dict)  # input quantizer -> amax
    # asymmetric ranges (arithmetic.activation_zero_point): input quantizer -> the range's lower end (<= 0)
    activation_min: dict[str, float] = field(default_factory=dict)
    arithmetic: Arithmetic = TENSORRT  # the target's arithmetic every quantizer follows (targets.py)
    residual_quantizers: list[str] = field(default_factory=list)  # added by the residual_add rule
    residual_excluded: list[str] = field(default_factory=list)  # residual Add units the excludes keep float
    # residual blocks the rule left with their own forward and float Add, and why (structure not recognised)
    residual_left_alone: dict[str, str] = field(default_factory=dict)
    residual_by_pattern: list[str] = field(default_factory=list)  # residual units found by graph pattern, not class
    # the output decode found in the traced graph (quant/decode_scope.py); its layers are in `excluded` too
    decode: DecodeScope | None = None
    # units switched back to float after calibration (mixed precision)
    kept_float: list[str] = field(default_factory=list)
    batches: int = 0
    samples: int = 0
    # the PTQ algorithms that ran (quant/algorithms): their records and the state that reproduces their changes
    algorithms: list = field(default_factory=list)  # AlgorithmRecord, in the order they ran
    ptq_state: dict | None = None  # what ptq_state.pt holds (None: no algorithm was asked for)
    algorithm_metric_before: dict = field(default_factory=dict)  # phase -> the run's metric as it began

    def census(self) -> dict[str, dict[str, int]]:
        """Per layer type: how many layers run INT8 and how many stay float."""
        out: dict[str, dict[str, int]] = {}
        kept = set(self.kept_float)
        for name, type_name in [*self.quantized.items(), *self.excluded.items()]:
            key = "int8" if name in self.quantized and name not in kept else "float"
            out.setdefault(type_name, {"int8": 0, "float": 0})[key] += 1
        if self.residual_quantizers or self.residual_excluded or self.residual_left_alone:
            adds = {n.rsplit(".", 1)[0] for n in self.residual_quantizers}
            out["Add (residual)"] = {"int8": len(adds - kept), "float": len(adds & kept) + len(self.residual_excluded)
                                     + len(self.residual_left_alone)}
        return out

    def float_units(self) -> list[str]:
        """Every unit the precision plan keeps float: excluded layers and residual Adds, and those a plan switched
        back (mixed precision). Export writes it into the graph (`workbench.float_layers`)."""
        left_alone = {f"{block}.residual_add" for block in self.residual_left_alone}
        return sorted(set(self.excluded) | set(self.kept_float) | set(self.residual_excluded) | left_alone)


# Module classes whose convolutions are part of a detector's box decode, not its features:
# Ultralytics' DFL holds a fixed 1x1 convolution that takes the expectation of a softmax over
# box-distance bins. Quantizing it moves every box; TensorRT deployments keep it in float.
DECODE_MODULES = frozenset({"DFL"})


def decode_layers(model: nn.Module) -> set[str]:
    """Names of the layers inside decode modules (kept in float whatever the config says)."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ in DECODE_MODULES:
            names.update(f"{name}.{child}" if child else name for child, _ in module.named_modules())
    return names


def select_layers(model: nn.Module, config: Int8Config,
                  scope: DecodeScope | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Split the quantizable layers into (quantized, excluded) by type, decode (the traced `scope` and the name
    rules) and exclude patterns."""
    types = {name: QUANTIZABLE_TYPES[name] for name in config.layer_types}
    quantized, excluded = {}, {}
    decode = decode_layers(model) | set(scope.layers if scope is not None else ())
    for name, module in model.named_modules():
        type_name = _type_name(module, types)
        if type_name is None or not name:
            continue
        if name in decode or any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            excluded[name] = type_name
        else:
            quantized[name] = type_name
    return quantized, excluded


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n] + residual_units(model)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _type_name(module: nn.Module, types: dict[str, type[nn.Module]]) -> str | None:
    # Most specific first: ConvTranspose2d is not a Conv2d, but check exact classes before isinstance.
    for name, cls in types.items():
        if type(module) is cls:
            return name
    for name, cls in types.items():
        if isinstance(module, cls):
            return name
    return None


def modelopt_config(model: nn.Module, config: Int8Config, layers: dict[str, str],
                    arithmetic: Arithmetic = TENSORRT) -> dict:
    """The modelopt quant_cfg for exactly these layers: everything else disabled, by name."""
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    per_channel = arithmetic.weights_for(config.weights) == "per_channel"
    for name, type_name in layers.items():
        axis = _WEIGHT_AXIS.get(type_name, 0) if per_channel else None
        # modelopt matches these names as fnmatch patterns: a module named `a[1]` or `x*` must match itself only.
        pattern = glob.escape(name)
        entries.append({"quantizer_name": f"{pattern}.weight_quantizer", "cfg": {"num_bits": 8, "axis": axis},
                        "enable": True})
        entries.append({"quantizer_name": f"{pattern}.input_quantizer", "cfg": {"num_bits": 8, "axis": None},
                        "enable": True})
    return {"quant_cfg": entries, "algorithm": "max"}


def register_subclasses(model: nn.Module) -> list[str]:
    """Register subclasses of nn.Conv*/nn.Linear with modelopt (it matches exact classes only)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    registered = []
    for module in model.modules():
        cls = type(module)
        if cls in QuantModuleRegistry or not isinstance(module, tuple(QUANTIZABLE_TYPES.values())):
            continue
        base = next(c for c in QUANTIZABLE_TYPES.values() if isinstance(module, c))
        if cls is base:
            continue
        quant_cls = type(f"_Quant{cls.__name__}", (QuantLinearConvBase,), {})
        QuantModuleRegistry.register({cls: f"{cls.__module__}.{cls.__qualname__}"})(quant_cls)
        registered.append(cls.__qualname__)
    return registered


def quantize_(
    model: nn.Module,
    config: Int8Config,
    forward_loop: Callable[[nn.Module], None],
    example_input: torch.Tensor,
    arithmetic: Arithmetic = TENSORRT,
    algorithms: list | tuple = (),
    evaluate: Callable[[nn.Module], float] | None = None,
) -> QuantResult:
    """Quantize `model` in place to INT8 fake-quant and calibrate it with `forward_loop`.

    `arithmetic` is the target's (targets.py): TensorRT's by default; with asymmetric activations the ranges
    come from signed histograms, with power-of-two scales each range is the nearer power of two (by error).

    `forward_loop(model)` runs the calibration batches through the model. `example_input` is a few calibration
    images: BatchNorm pairs are found on them, and each rewrite of the model (BatchNorm folding, the residual_add rule)
    is proved on them to keep the float model's outputs (a RewriteError where it does not).

    `algorithms` (AlgorithmStep, quant/algorithms) run in two slots: the "before_ranges" ones after folding and
    quantizer insertion, every quantizer off, before the activation-range pass (the weight ranges are re-measured
    after them); the "after_ranges" ones on the calibrated model. `evaluate(model)`, where given, is the run's metric
    after each algorithm. Their records and state are `result.algorithms` and `result.ptq_state`.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    result, activation_quantizers = _insert_quantizers(model, config, example_input, arithmetic)
    pipeline = ctx = None
    if algorithms:
        from .algorithms.base import AlgorithmContext, PipelineResult, run_phase

        pipeline = PipelineResult()
        ctx = AlgorithmContext(model, config, result, forward_loop, example_input, arithmetic)
        run_phase("before_ranges", list(algorithms), ctx, pipeline, evaluate,
                  after_each=lambda: refresh_weight_ranges_(model, result))
    # One calibration pass in float (every quantizer passes data through), collecting |x| histograms (signed ones
    # where ranges may be asymmetric).
    histograms: dict[str, AbsHistogram | SignedHistogram] = {}
    counter = {"batches": 0, "samples": 0}
    quantizers = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled]
    for q in quantizers:
        q.disable_quant()
    histogram = SignedHistogram if arithmetic.activation_zero_point else AbsHistogram
    handles = _attach_collectors(model, activation_quantizers, histograms, config.num_bins, counter, histogram)
    try:
        forward_loop(model)
    except NonFiniteError as e:
        raise CalibrationError(
            f"calibrate: {e}. Check the input data and normalisation (data.transform) and the model's weights; "
            "a NaN/Inf activation cannot be given an INT8 range."
        ) from None
    finally:
        for h in handles:
            h.remove()
        for q in quantizers:
            q.enable_quant()
    if counter["batches"] == 0:
        raise CalibrationError("calibrate: the calibration data produced no batches: data.calibration is empty")
    result.batches, result.samples = counter["batches"], counter["samples"]
    if never := [name for name in activation_quantizers if name not in histograms]:
        layer = never[0].removesuffix(".input_quantizer")
        raise CalibrationError(
            f"calibrate: {len(never)} quantizer(s) never saw an input during calibration, e.g. {never[0]!r}: the "
            f"model's forward does not run '{layer}' on these images, so it has no range. Exclude it (exclude: "
            f"['{layer}']) if it is unused, or calibrate on images that reach it"
        )
    lower: dict[str, float] = {}
    if arithmetic.activation_zero_point:
        ranges = {name: affine_range(histograms[name], config.method, percentile=config.percentile,
                                     num_bits=arithmetic.activation_bits) for name in activation_quantizers}
        amax = {name: hi for name, (_, hi) in ranges.items()}
        lower = {name: lo for name, (lo, _) in ranges.items()}
    else:
        amax = {
            name: (histograms[name].amax if config.method == "max"
                   else compute_amax(histograms[name], config.method, percentile=config.percentile,
                                     num_bits=arithmetic.activation_bits))
            for name in activation_quantizers
        }
        if arithmetic.power_of_two_scales:  # the power of two nearer by error (above the range for method max)
            amax = {name: power_of_two_amax(histograms[name], value, num_bits=arithmetic.activation_bits,
                                            nearest=config.method != "max") for name, value in amax.items()}
    _set_ranges(model, result, activation_quantizers, amax, lower)
    if pipeline is not None:
        run_phase("after_ranges", list(algorithms), ctx, pipeline, evaluate)
        result.algorithms, result.ptq_state = pipeline.records, pipeline.state()
        result.algorithm_metric_before = pipeline.metric_before
    return result


def restore_(model: nn.Module, config: Int8Config, activation_amax: dict[str, float],
             example_input: torch.Tensor, arithmetic: Arithmetic = TENSORRT,
             activation_min: dict[str, float] | None = None, ptq_state: dict | None = None) -> QuantResult:
    """Rebuild a calibrated fake-quant model from saved ranges (a run's calibration.json), without data.

    Folding, layer choice and weight ranges are deterministic functions of the weights, the config and the
    arithmetic, so only the activation ranges need saving (and their lower ends, where they are asymmetric), and
    what the PTQ algorithms changed (`ptq_state`, a run's ptq_state.pt: re-applied after the ranges, as its values
    are final ones).
    """
    result, activation_quantizers = _insert_quantizers(model, config, example_input, arithmetic)
    if arithmetic.activation_zero_point and (
            missing := sorted(set(activation_quantizers) - set(activation_min or {}))):
        raise CalibrationError(
            f"the saved ranges have no lower end (activation_min) for {len(missing)} quantizer(s), e.g. "
            f"{missing[0]!r}, which the {arithmetic.target} target's asymmetric ranges need; calibrate again")
    if missing := sorted(set(activation_quantizers) - set(activation_amax)):
        raise CalibrationError(
            f"the saved ranges have no entry for {len(missing)} quantizer(s), e.g. {missing[0]!r}: they were "
            "calibrated "
            "for another model or another config; calibrate again"
        )
    _set_ranges(model, result, activation_quantizers, {n: activation_amax[n] for n in activation_quantizers},
                {n: activation_min[n] for n in activation_quantizers} if arithmetic.activation_zero_point else {})
    if ptq_state is not None:
        from .algorithms.base import apply_state

        apply_state(model, ptq_state)
        result.ptq_state = ptq_state
    return result


def _insert_quantizers(model: nn.Module, config: Int8Config, example_input: torch.Tensor,
                       arithmetic: Arithmetic = TENSORRT) -> tuple[QuantResult, dict]:
    """Fold BN, choose the layers, insert modelopt quantizers (weights calibrated) and the rules' quantizers; turn
    them into the target's quantizers where modelopt cannot express its arithmetic (quant/affine.py)."""
    import modelopt.torch.quantization as mtq

    result = QuantResult(arithmetic=arithmetic.for_weights(config.weights))
    model.eval()
    if config.fold_batchnorm:
        result.folded = fold_batchnorm_(model, example_input)
    _check_finite_weights(model, dict(result.folded))
    if config.decode_float:
        result.decode = find_decode_scope(model, example_input)
    result.quantized, result.excluded = select_layers(model, config, result.decode)
    if not result.quantized:
        raise CalibrationError(
            "calibrate: no layer to quantize: the model has no "
            f"{'/'.join(config.layer_types)} layers outside the exclude patterns {config.exclude}"
        )
    register_subclasses(model)
    mt_cfg = modelopt_config(model, config, result.quantized, arithmetic)

    # modelopt inserts the quantizers and calibrates the weights (per-channel max); without a
    # forward loop it leaves the activation ranges unset, and those are ours to compute.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq.quantize(model, mt_cfg, forward_loop=None)
    if config.residual_add:
        rewrite = apply_residual_rule(model, example_input, config.exclude,
                                      result.decode.decoding_heads() if result.decode is not None else ())
        result.residual_quantizers, result.residual_excluded = rewrite.quantizers, rewrite.excluded
        result.residual_left_alone, result.residual_by_pattern = rewrite.left_alone, rewrite.by_pattern
    modules = dict(model.named_modules())
    activation_quantizers = {f"{n}.input_quantizer": modules[n].input_quantizer for n in result.quantized}
    activation_quantizers.update({n: modules[n] for n in result.residual_quantizers})
    if not arithmetic.modelopt_native:
        from .affine import convert_quantizers_

        convert_quantizers_([modules[n].weight_quantizer for n in result.quantized],
                            list(activation_quantizers.values()), arithmetic)
    return result, activation_quantizers


def _check_finite_weights(model: nn.Module, folded: dict[str, str]) -> None:
    """A CalibrationError naming the first tensor that breaks the finite rule (models.guards.first_nonfinite, as at
    load): no INT8 range can be given to a NaN/Inf weight (modelopt's weight calibration would end in an assertion).
    `folded` maps a conv to the BatchNorm folded into it, since folding creates Inf from a BatchNorm whose
    running_var + eps is 0 or whose weight is huge."""
    if (found := first_nonfinite(model)) is not None:
        name = found.name
        layer = name.rpartition(".")[0]
        bad = f"{found.nan} NaN and {found.inf} Inf values"
        if layer in folded:
            bn = folded[layer]
            raise CalibrationError(
                f"calibrate: {name} holds {bad} after folding BatchNorm '{bn}' into '{layer}': {bn}.running_var + eps "
                f"is zero or negative, or {bn}.weight is too large for float32 (the model computes Inf/NaN there, "
                "folded or not). Fix those statistics in the checkpoint, e.g. re-estimate them on data in train mode"
            )
        raise CalibrationError(
            f"calibrate: {name} (layer '{layer}') holds {bad}, so its layer cannot be given an INT8 range: the model's "
            "weights are broken (a diverged training stage or a bad checkpoint); check them, or lower the learning "
            "rate of the stage that trained them"
        )


def _set_ranges(model: nn.Module, result: QuantResult, activation_quantizers: dict, amax: dict[str, float],
                lower: dict[str, float] | None = None) -> None:
    """Activation ranges set (upper ends `amax`; lower ends `lower` where asymmetric) and weight ranges kept
    positive; per-tensor power-of-two weight ranges chosen by their error on the weights."""
    device = _device_of(model)
    for name, quantizer in activation_quantizers.items():
        value = max(float(amax[name]), MIN_AMAX)
        quantizer.amax = torch.tensor(value, device=device)
        quantizer.enable()
        result.activation_amax[name] = value
        if lower:
            quantizer.range_min = min(float(lower[name]), 0.0)
            result.activation_min[name] = quantizer.range_min
    modules = dict(model.named_modules())
    for name in result.quantized:
        weight_q = modules[name].weight_quantizer
        if weight_q.amax is not None:
            if result.arithmetic.power_of_two_scales and weight_q.amax.numel() == 1:
                value = power_of_two_weight_amax(modules[name].weight, result.arithmetic.weight_bits)
                weight_q.amax = torch.full_like(weight_q.amax, value)
            # A channel of all-zero weights gets amax 0 and a zero scale, which ONNX cannot express.
            weight_q.amax = weight_q.amax.clamp(min=MIN_AMAX)


@torch.no_grad()
def refresh_weight_ranges_(model: nn.Module, result: QuantResult) -> None:
    """Re-measure every weight quantizer's range (absolute max, per channel or per tensor) from the current weights.

    Calibration measured the weights before training; during QAT they move, and a range
    left behind would clip the channels that grew.
    """
    modules = dict(model.named_modules())
    for name in result.quantized:
        layer = modules[name]
        q = layer.weight_quantizer
        if q.amax is None or not q.is_enabled:
            continue
        w = layer.weight.detach().abs()
        if q.amax.numel() == 1 and result.arithmetic.power_of_two_scales:  # the target's 2^-k scales, as calibrated
            amax = torch.tensor(power_of_two_weight_amax(layer.weight, result.arithmetic.weight_bits))
        elif q.amax.numel() == 1:
            amax = w.amax()
        else:
            axis = q.axis if isinstance(q.axis, int) else q.axis[0]
            amax = w.amax(dim=[d for d in range(w.dim()) if d != axis % w.dim()], keepdim=True)
        q.amax = amax.reshape(q.amax.shape).clamp(min=MIN_AMAX).to(q.amax.dtype)


def quant_units(model: nn.Module, result: QuantResult) -> dict[str, list]:
    """Every unit that can be switched between INT8 and float, with its quantizers.

    Units are the quantized layers (input and weight quantizer) and, under the
    residual_add rule, each block's `<block>.residual_add` (both Add inputs).
    Switching a unit keeps its calibrated ranges: nothing is recalibrated.
    """
    modules = dict(model.named_modules())
    units = {name: [modules[name].input_quantizer, modules[name].weight_quantizer] for name in result.quantized}
    for name in result.residual_quantizers[::2]:
        block = name.rsplit(".", 1)[0]  # "<block>.residual_add"
        units[block] = [modules[f"{block}.input0_quantizer"], modules[f"{block}.input1_quantizer"]]
    return units


def set_float_units(model: nn.Module, result: QuantResult, float_units: list[str] | set[str]) -> None:
    """Run exactly `float_units` in float (their quantizers off) and every other unit in INT8."""
    units = quant_units(model, result)
    if unknown := sorted(set(float_units) - set(units)):
        raise CalibrationError(f"{unknown} are not quantized layers of this model; quantized units look like "
                               f"{next(iter(units))!r}")
    for name, quantizers in units.items():
        for q in quantizers:
            q.disable() if name in float_units else q.enable()
    result.kept_float = [n for n in units if n in set(float_units)]


def _attach_collectors(model, quantizers: dict, histograms: dict, num_bins: int, counter: dict,
                       histogram: type = AbsHistogram) -> list:
    """Hooks on activation quantizers that count batches, reject NaN/Inf and build histograms (of |x|, or signed)."""
    handles = []
    first = next(iter(quantizers))

    for name, quantizer in quantizers.items():

        def pre_hook(module, args, name=name):
            x = args[0]
            if name == first:
                counter["batches"] += 1
                counter["samples"] += int(x.shape[0]) if x.dim() > 0 else 1
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).sum())
                layer = name.removesuffix(".input_quantizer")
                raise NonFiniteError(
                    f"{bad} NaN/Inf values in the input of layer '{layer}' in calibration batch {counter['batches']}"
                )
            histograms.setdefault(name, histogram(num_bins=num_bins)).update(x.detach())

        handles.append(quantizer.register_forward_pre_hook(pre_hook))
    return handles


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def quantizer_summary(model: nn.Module) -> dict[str, int]:
    """How many TensorQuantizers are enabled, by role (input/weight/output/residual_add): catches silent no-ops."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    counts = {"input": 0, "weight": 0, "output": 0, "residual_add": 0, "other": 0}
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            role = name.rsplit(".", 1)[-1].removesuffix("_quantizer")
            role = "residual_add" if ".residual_add." in f".{name}" else role  # the model's own Add: "residual_add.*"
            counts[role if role in counts else "other"] += 1
    return counts
