"""calibrate: INT8 post-training quantization of the run's model (fake-quant, modelopt quantizers)."""

from __future__ import annotations

from pydantic import Field, field_validator

from ..errors import CalibrationError
from ..io import write_json
from ..progress import track
from ..quant.algorithms import AlgorithmStep
from ..quant.algorithms.base import STATE_FILE, order_problem
from ..quant.config import Int8Config
from ..schema import StrictModel
from .registry import register_stage


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


@register_stage("calibrate", CalibrateOptions, makes=("quantized",), refuses=("quantized",),
                refusal_hint=" (a recipe calibrates once)",
                needs_data=lambda o: ("calibration", "evaluation") if o.algorithms and o.algorithm_eval_samples
                else ("calibration",))
def calibrate(run, opts: CalibrateOptions) -> None:
    """INT8 PTQ: per-channel weights, per-tensor activations, ranges by max/entropy/percentile/mse."""
    import copy
    import time

    import torch

    from ..quant.ptq import quantize_, quantizer_summary, unmatched_patterns

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
    arithmetic = run.arithmetic  # the recipe's target (quant/targets.py): what every quantizer computes
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
            "residual_left_alone": result.residual_left_alone,
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
