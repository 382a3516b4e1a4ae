"""calibrate: INT8 post-training quantization of the run's model (fake-quant, modelopt quantizers)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ..errors import CalibrationError
from ..io import write_json
from ..progress import track
from ..quant.algorithms import AlgorithmStep
from ..quant.algorithms.base import STATE_FILE, order_problem
from ..quant.config import Int8Config
from ..run_record import bad_field as _bad
from ..run_record import is_number as _is_number
from ..run_record import show_list as _show_list
from ..schema import StrictModel
from .registry import Restorer, register_stage


class CalibrateOptions(Int8Config, StrictModel):
    max_batches: int | None = Field(None, gt=0, description="Stop after this many calibration batches (default: all).")
    algorithms: list[AlgorithmStep] = Field(
        default_factory=list,
        description="PTQ algorithms, in order: a name or a mapping with `name` and its options, e.g. [cle, {name: "
                    "bias_correction, mode: full}] (quant/algorithms). Weight-changing ones (cle) come first.",
    )

    algorithm_eval_samples: int | None = Field(
        None, gt=0, description="Score the task metric on this many evaluation samples before and after each PTQ "
                                "algorithm (needs data.evaluation; default: not scored).")

    @field_validator("algorithms")
    @classmethod
    def _algorithm_order(cls, v: list[AlgorithmStep]) -> list[AlgorithmStep]:
        if problem := order_problem(v):
            raise ValueError(problem)
        return v


# How the stage comes back from its run directory on --resume (resume.py reads its registration).

def check_calibration(saved: Any, path: Path) -> None:
    """calibration.json as calibrate writes it: every activation range a finite number > 0 (one per quantizer,
    per tensor; calibrate never writes less than quant.ptq.MIN_AMAX), the layer lists lists of names."""
    if not isinstance(saved, dict):
        raise _bad(path, "", saved, "an object with config, activation_amax and quantized_layers (calibrate's ranges)")
    if not isinstance(saved.get("config"), dict):
        raise _bad(path, "config", saved.get("config"), "an object (the calibrate stage's options)")
    amax = saved.get("activation_amax")
    if not isinstance(amax, dict) or not amax:
        raise _bad(path, "activation_amax", amax, "an object of quantizer name -> activation range")
    for quantizer, value in amax.items():
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise _bad(path, f"activation_amax[{json.dumps(quantizer)}]", value,
                       "a finite number > 0 (the quantizer's activation range, one per tensor)")
    if "target" in saved:
        from ..targets import Arithmetic

        try:
            Arithmetic.from_dict(saved["target"])
        except (ValueError, TypeError) as e:
            raise _bad(path, "target", saved["target"], str(e)) from None
    lower = saved.get("activation_min", {})
    if not isinstance(lower, dict):
        raise _bad(path, "activation_min", lower, "an object of quantizer name -> lower end of its range")
    for quantizer, value in lower.items():
        if not _is_number(value) or not math.isfinite(value) or value > 0:
            raise _bad(path, f"activation_min[{json.dumps(quantizer)}]", value,
                       "a finite number <= 0 (the lower end of the quantizer's asymmetric range)")
    for key in ("quantized_layers", "float_layers"):
        layers = saved.get(key)
        if not isinstance(layers, dict) or not all(isinstance(t, str) for t in layers.values()):
            raise _bad(path, key, layers, "an object of layer name -> layer type")


def _without_why(arithmetic: dict) -> dict:
    # `why` names the CPU model; the arithmetic is the rest (the same on another CPU of the same variant).
    return {k: v for k, v in arithmetic.items() if k != "why"} if isinstance(arithmetic, dict) else arithmetic


def task_options(run, opts: CalibrateOptions) -> CalibrateOptions:
    """The options as calibrate uses them: decode_float, unless the recipe sets it, only for a detector (a
    classifier's logits come straight from its last layer: no decode to find, no trace to pay for)."""
    if run.recipe.task != "detection" and "decode_float" not in opts.model_fields_set:
        return opts.model_copy(update={"decode_float": False})
    return opts


def _calibrated(run, options, values, loaded) -> bool:
    from ..errors import CalibrationError
    from ..quant.ptq import restore_
    from ..targets import TENSORRT

    saved = loaded["calibration.json"]
    options = task_options(run, options)
    if saved["config"] != options.model_dump(mode="json"):
        return False  # written by a workbench whose calibrate options differ: calibrate again
    path = run.path("calibration.json")
    if run.artifacts.pruned_fp32 is run.model:  # as the calibrate stage: keep the pruned FP32 model apart
        run.artifacts.pruned_fp32 = copy.deepcopy(run.model)
    amax = saved["activation_amax"]
    arithmetic = run.arithmetic
    calibrated_for = _without_why(saved["target"]) if "target" in saved else TENSORRT.target
    wanted = _without_why(arithmetic.for_weights(options.weights).as_dict()) if "target" in saved else arithmetic.target
    if calibrated_for != wanted:
        return False  # calibrated for another target (or CPU variant): calibrate again
    from ..quant.algorithms.base import StateError, read_run_state

    try:  # what the PTQ algorithms changed (ptq_state.pt, its hash checked), re-applied by restore_
        state = read_run_state(run.dir, options)
        run.artifacts.quant = result = restore_(run.model, options, amax, run.example_input(), arithmetic,
                                                saved.get("activation_min"), ptq_state=state)
    except StateError as e:
        raise _bad(run.path(STATE_FILE), "", "a state", f"one that fits the model ({e})")
    except CalibrationError as e:  # a quantizer of the model without a range
        raise _bad(path, "activation_amax", f"{len(amax)} ranges", f"a range for every quantizer of the model ({e})")
    if extra := sorted(set(amax) - set(result.activation_amax)):
        raise _bad(path, f"activation_amax[{json.dumps(extra[0])}]", amax[extra[0]],
                   f"no range for a quantizer the model does not have ({len(extra)} such name(s)); the model's "
                   f"quantizers are e.g. {sorted(result.activation_amax)[:3]}")
    if saved["quantized_layers"] != result.quantized:
        raise _bad(path, "quantized_layers", saved["quantized_layers"],
                   f"the layers calibrate quantizes in this model, {_show_list(list(result.quantized))}")
    return True


def _console(metrics: dict) -> list[str]:
    """The console summary's census of quantized layers (after the mixed-precision plan, as the report's)."""
    cal = metrics.get("stages", {}).get("calibrate")
    if not cal:
        return []
    plan = metrics.get("stages", {}).get("mixed_precision", {}).get("census")  # as the report's census
    census = ", ".join(f"{t}: {c['int8']} INT8 / {c['float']} float" for t, c in (plan or cal["census"]).items())
    return [f"quantized layers: {census}"]


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _calibration_section(run_dir: Path, metrics: dict) -> list[str]:
    cal = metrics.get("stages", {}).get("calibrate")
    if not cal:
        return []
    method = cal["method"] + (f" ({cal['percentile']})" if cal.get("percentile") else "")
    plan = metrics.get("stages", {}).get("mixed_precision", {}).get("census")
    lines = ["## Calibration", "",
             f"Method **{method}** on {cal['samples']} samples in {cal['seconds']:.1f} s; {cal['folded_batchnorm']} "
             "BatchNorm layers folded into convolutions."
             + (" Layers by precision after the mixed-precision plan:" if plan else ""), "",
             "| Layer type | INT8 | float |", "|---|---|---|"]
    for type_name, counts in (plan or cal["census"]).items():
        lines.append(f"| {type_name} | {counts['int8']} | {counts['float']} |")
    q = cal.get("enabled_quantizers", {})
    if (target := cal.get("target")) and target.get("target", "tensorrt") != "tensorrt":
        lines += ["", f"Target **{target.get('summary', target.get('target'))}**: {target.get('why', '')}."]
    return lines + ["", f"Enabled quantizers: {q.get('input', 0)} on inputs, {q.get('weight', 0)} on weights, "
                    f"{q.get('residual_add', 0)} on residual Add inputs, {q.get('output', 0)} on outputs.", ""] \
        + _decode_lines(cal) + _algorithms_lines(cal)


def _decode_lines(cal: dict) -> list[str]:
    """What the traced graph's output decode kept float (quant/decode_scope.py): shown when there is a decode."""
    decode = cal.get("decode_float")
    if not isinstance(decode, dict) or not isinstance(decode.get("summary"), str):
        return []
    if decode.get("traced") and not decode.get("ops") and not decode.get("layers_float"):
        return []  # a classifier's logits straight from its last layer: nothing after it
    return [f"Output decode, kept float: {decode['summary']}.", ""]


def _algorithms_lines(cal: dict) -> list[str]:
    """The PTQ algorithms that ran in calibrate (quant/algorithms): in order, their time, what they changed (the
    largest relative L2 change of a layer's weight and bias), what they skipped and the metric after each."""
    from ..report_text import fmt as _fmt
    from ..report_text import md_name

    algorithms = cal.get("algorithms")
    if not algorithms:
        return []
    before = cal.get("algorithm_metric_before") or {}
    lines = ["### PTQ algorithms", "", "Per-layer changes are in calibration.json; the metric is the task's on the "
             "evaluation subset (before_ranges: the float model; after_ranges: INT8)."
             + (f" Before them: float {_fmt(before.get('before_ranges'))}, INT8 (ranges only) "
                f"{_fmt(before.get('after_ranges'))}." if before else ""), "",
             "| Algorithm | Phase | Seconds | Layers changed | Max weight change | Max bias change | Skipped | "
             "Metric after |", "|---|---|---|---|---|---|---|---|"]
    for a in algorithms:
        lines.append(f"| {md_name(a['name'])} | {a['phase']} | {a['seconds']:.1f} | {a['layers_changed']} | "
                     f"{a['max_weight_change']:.3g} | {a['max_bias_change']:.3g} | {a['skipped']} | "
                     f"{_fmt(a.get('metric_after'))} |")
    return lines + [""]


@register_stage("calibrate", CalibrateOptions, makes=("quantized",), refuses=("quantized",),
                restorer=Restorer(_calibrated, lambda o, v: ["calibration.json", *([STATE_FILE] if getattr(
                    o, "algorithms", None) else [])], {"calibration.json": check_calibration}),
                refusal_hint=" (a recipe calibrates once)",
                needs_data=lambda o: ("calibration", "evaluation") if o.algorithms and o.algorithm_eval_samples
                else ("calibration",),
                report=_calibration_section, report_position=10,
                console=_console)
def calibrate(run, opts: CalibrateOptions) -> None:
    """INT8 PTQ: per-channel weights, per-tensor activations, ranges by max/entropy/percentile/mse."""
    import copy
    import time

    import torch

    from ..quant.ptq import quantize_, quantizer_summary, unmatched_patterns

    opts = task_options(run, opts)
    if missing := unmatched_patterns(run.model, opts.exclude):
        raise CalibrationError(
            f"stages.calibrate.exclude: pattern(s) {missing} match no module of the model; "
            "module names look like 'layer1.0.conv1' (see calibration.json of a run, or model.named_modules())"
        )
    loader = run.loader("calibration")
    total = len(loader) if opts.max_batches is None else min(len(loader), opts.max_batches)

    def forward_loop(model) -> None:
        with torch.no_grad():
            for i, (images, _) in enumerate(track(loader, f"calibrate ({opts.method})", total=total)):
                if opts.max_batches is not None and i >= opts.max_batches:
                    break
                model(images.to(run.device))

    if run.artifacts.pruned_fp32 is run.model:  # keep the pruned FP32 model: quantize_ works in place
        run.artifacts.pruned_fp32 = copy.deepcopy(run.model)
    start = time.perf_counter()
    arithmetic = run.arithmetic  # the recipe's target (targets.py): what every quantizer computes
    evaluate = _algorithm_metric(run, opts.algorithm_eval_samples) if opts.algorithms and \
        opts.algorithm_eval_samples else None
    result = quantize_(run.model, opts, forward_loop, _check_images(loader, run), arithmetic,
                       algorithms=opts.algorithms, evaluate=evaluate)
    seconds = time.perf_counter() - start
    run.artifacts.quant = result
    if result.ptq_state is not None:  # what the algorithms changed: restore_ re-applies it on --resume/open_run
        from ..quant.algorithms.base import save_state

        save_state(result.ptq_state, run.path(STATE_FILE))
    for record in result.algorithms:
        if record.skipped:
            shown = "; ".join(f"{what}: {why}" for what, why in list(record.skipped.items())[:3])
            run.warn(f"calibrate: algorithm {record.name} skipped {len(record.skipped)} item(s) ({shown}"
                     f"{'; ...' if len(record.skipped) > 3 else ''})")
    if left := result.residual_left_alone:
        shown = "; ".join(f"{block}: {why}" for block, why in list(left.items())[:3])
        run.warn(f"residual_add left {len(left)} residual block(s) with their own forward and a float Add ({shown}"
                 f"{'; ...' if len(left) > 3 else ''}): the rule could not prove its rewrite keeps their output. "
                 "TensorRT runs those Adds on their own, outside the INT8 convolution before them.")
    write_json(
        run.path("calibration.json"),
        {
            "config": opts.model_dump(mode="json"),
            "batches": result.batches,
            "samples": result.samples,
            "folded_batchnorm": [list(p) for p in result.folded],
            "quantized_layers": result.quantized,
            "float_layers": result.excluded,
            **({"decode_float": result.decode.as_dict()} if result.decode is not None else {}),
            "activation_amax": result.activation_amax,
            # The target's arithmetic, and the lower ends of its asymmetric ranges (restore_ needs both).
            **({"target": result.arithmetic.as_dict()} if arithmetic.target != "tensorrt" else {}),
            **({"activation_min": result.activation_min} if result.activation_min else {}),
            **({"algorithms": [r.as_dict() for r in result.algorithms],
                "algorithm_metric_before": result.algorithm_metric_before} if opts.algorithms else {}),
        },
    )
    run.record(
        "calibrate",
        {
            "method": opts.method,
            "percentile": opts.percentile if opts.method == "percentile" else None,
            "samples": result.samples,
            "seconds": round(seconds, 3),
            "folded_batchnorm": len(result.folded),
            "layers_int8": len(result.quantized),
            "layers_float": len(result.excluded),
            "census": result.census(),
            # the output decode found in the traced graph and kept float (quant/decode_scope.py)
            **({"decode_float": {"summary": result.decode.summary(), **result.decode.as_dict()}}
               if result.decode is not None else {}),
            "residual_left_alone": result.residual_left_alone,
            "residual_by_pattern": result.residual_by_pattern,
            "enabled_quantizers": quantizer_summary(run.model),
            "target": {**result.arithmetic.as_dict(), "summary": result.arithmetic.describe()},
            # per algorithm: seconds, how many layers it changed and the largest change, what it skipped
            **({"algorithms": [{"name": r.name, "phase": r.phase, "seconds": round(r.seconds, 3),
                            "layers_changed": len(r.changes),
                            "max_weight_change": max((c.get("weight", 0.0) for c in r.changes.values()), default=0.0),
                            "max_bias_change": max((c.get("bias", 0.0) for c in r.changes.values()), default=0.0),
                            "skipped": len(r.skipped), "metric_after": r.metric_after}
                           for r in result.algorithms],
                "algorithm_metric_before": result.algorithm_metric_before} if opts.algorithms else {}),
        },
    )


# How many calibration images each model rewrite (BatchNorm folding, the residual_add rule) is proved on: a rewrite
# that changes the function shows on any image; a few keep the check to a fraction of calibration's time.
CHECK_IMAGES = 4


def _check_images(loader, run):
    """The first calibration images, on the run's device (the run's example input if the split is empty: calibration
    then refuses it)."""
    for images, _ in loader:
        return images[:CHECK_IMAGES].to(run.device)
    return run.example_input()


def _algorithm_metric(run, samples: int):
    """model -> the task's headline metric (points) on the first `samples` evaluation samples."""
    from ..data import subset_loader
    from ..quant.sensitivity import TaskMetric, make_probe, measure_task

    dataset = run.dataset("evaluation")
    probe = make_probe(run.reference, subset_loader(dataset, run.recipe.data, samples), None, run.device)
    metric = TaskMetric(lambda: run.task.scorer(run.recipe, dataset), run.task.headline_points)
    return lambda model: measure_task(model, probe, metric)[1]
