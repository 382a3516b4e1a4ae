"""mixed_precision: keep the fewest layers (by MACs) in float so the model meets an accuracy budget.

The budget is `max_drop` (task-metric points below FP32: top-1 %, or mAP50-95 x 100)
or `min_agreement` (percent agreement with the FP32 model). Layers are tried in
the sensitivity ranking (the sensitivity stage's table, or a proxy sweep run
here): the shortest prefix of the ranking that meets the budget is found by
bisection, then each chosen layer, largest MACs first, is put back into INT8
if the budget still holds without it. The plan is verified on the full
evaluation split, written into `recipe_mixed_precision.yaml` (the run's recipe
with the plan as calibrate excludes, so it re-runs as plain PTQ) and applied
to the model, so the export stage writes it into the Q/DQ ONNX.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import yaml
from pydantic import Field, model_validator

from ..errors import CalibrationError, RecipeError
from ..io import write_json, write_text
from ..progress import track
from ..schema import dump_recipe
from ..yaml_io import dump_yaml
from .registry import StageOptions, register_stage


class MixedPrecisionOptions(StageOptions):
    max_drop: float | None = Field(
        None, ge=0, le=100,
        description="Largest allowed drop of the task metric below FP32, in points (top-1 %, mAP50-95 x 100).")
    min_agreement: float | None = Field(None, gt=0, le=100,
                                        description="Smallest allowed agreement with the FP32 model, in percent.")
    candidates: list[str] = Field(default_factory=list,
                                  description="Glob patterns of the layers allowed to stay float (default: any).")
    search_samples: int | None = Field(None, gt=0, description="Search on N evaluation samples drawn with a seed "
                                       "(default: all); the final plan is always verified on all.")
    proxy_samples: int = Field(16, gt=0, description="Without a sensitivity stage before: samples of the proxy sweep "
                               "that ranks the layers.")
    confidence: float = Field(0.9, gt=0.5, lt=1, description="max_drop: the plan is accepted when, on the exported "
                              "graph run faithfully over the whole evaluation split, the drop is within the budget "
                              "with this confidence (one-sided paired bootstrap); else the next layer stays float.")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.max_drop is None) == (self.min_agreement is None):
            raise ValueError("give exactly one budget: max_drop (points below FP32) or min_agreement (percent)")
        return self


class Budget:
    """Measures a plan on a probe set and says whether it meets the budget."""

    def __init__(self, run, opts: MixedPrecisionOptions, probe):
        from ..quant.ptq import quant_units
        from ..quant.sensitivity import TaskMetric

        self.run, self.opts, self.probe = run, opts, probe
        task, dataset = run.task, run.dataset("evaluation")
        points = task.headline_points if opts.max_drop is not None else (
            lambda m: ("agreement %", task.agreement_points(m)))
        self.metric = TaskMetric(lambda: task.scorer(run.recipe, dataset), points)
        self.units = list(quant_units(run.model, run.artifacts.quant))
        self.fp32 = self.measure(self.units)
        self.log: list[dict] = []

    def measure(self, float_units: list[str]) -> float:
        from ..quant.ptq import set_float_units
        from ..quant.sensitivity import measure_task

        set_float_units(self.run.model, self.run.artifacts.quant, float_units)
        name, value = measure_task(self.run.model, self.probe, self.metric)
        if value is None and self.opts.max_drop is None:
            raise RecipeError("stages.mixed_precision.min_agreement: agreement with FP32 is not measurable here: the "
                              "FP32 model makes no confident prediction on the evaluation images (an untrained model?)")
        if value is None:
            raise RecipeError(f"stages.mixed_precision.max_drop needs a labeled evaluation split (it measures {name}); "
                              "use min_agreement")
        self.name = name
        return value

    def meets(self, value: float) -> bool:
        if self.opts.max_drop is not None:
            return self.fp32 - value <= self.opts.max_drop + 1e-9
        return value >= self.opts.min_agreement - 1e-9

    def check(self, float_units: list[str], step: str) -> tuple[bool, float]:
        value = self.measure(float_units)
        ok = self.meets(value)
        self.log.append({"step": step, "float_layers": len(float_units), "value": value, "meets": ok})
        return ok, value


def resolution_check(run, opts: MixedPrecisionOptions, samples: int) -> None:
    """A top-1 or agreement on N samples moves in steps of 100/N points: it must resolve the budget."""
    step = run.task.metric_step(samples)
    if step is None:  # no fixed step (mAP)
        return
    slack = opts.max_drop if opts.max_drop is not None else 100.0 - opts.min_agreement
    if slack and step > slack:
        need = math.ceil(100.0 / slack)
        field = "search_samples" if opts.search_samples else "data.evaluation"
        raise RecipeError(
            f"stages.mixed_precision: {samples} evaluation samples measure the metric in steps of {step:.3g} points, "
            f"coarser than the budget ({slack:g} points); it needs at least {need} samples ({field})"
        )


@register_stage("mixed_precision", MixedPrecisionOptions, needs=("quantized",), needs_data=("evaluation",))
def mixed_precision(run, opts: MixedPrecisionOptions) -> None:
    """Keep the fewest layers (by MACs) in float so the accuracy budget holds; verified on the full evaluation."""
    from ..data import subset_loader
    from ..quant.ptq import quant_units, set_float_units
    from ..quant.sensitivity import layer_costs, make_probe, selected_units

    result = run.artifacts.quant
    units = list(quant_units(run.model, result))
    candidates = selected_units(units, opts.candidates, "stages.mixed_precision.candidates")
    ranking = _ranking(run, opts, candidates)
    costs = layer_costs(run.model, units, run.example_input())

    dataset = run.dataset("evaluation")
    full = make_probe(run.reference, run.loader("evaluation"), None, run.device)
    search = make_probe(run.reference, subset_loader(dataset, run.recipe.data, opts.search_samples), None,
                        run.device) if opts.search_samples else full
    resolution_check(run, opts, search.samples)
    budget = Budget(run, opts, search)
    ok, int8_value = budget.check([], "every layer INT8")
    plan: list[str] = []
    if not ok:
        ok_all, best = budget.check(ranking, "every candidate float")
        if not ok_all:
            set_float_units(run.model, result, [])
            raise CalibrationError(
                f"stages.mixed_precision: the budget cannot be met even with all {len(ranking)} candidate layers in "
                "float: "
                f"FP32 scores {budget.fp32:.3f} {budget.name}, the best plan {best:.3f}. Loosen the budget, widen "
                "`candidates`, or improve the calibration (method, data)"
            )
        plan = _shortest_prefix(budget, ranking)
        plan = _put_back(budget, plan, costs)

    verified = budget if search is full else Budget(run, opts, full)
    while True:
        ok, final = verified.check(plan, "verify on the full evaluation")
        exported = _exported_check(run, opts, plan, full) if ok else None
        if exported is not None:
            verified.log.append({"step": "exported graph, faithful", "float_layers": len(plan), **exported})
            ok = exported["meets"]
        rest = [u for u in ranking if u not in plan]
        if ok or not rest:
            break
        plan.append(rest[0])  # the search subset or the fake-quant model was optimistic: the next layer stays float
    if not ok:
        set_float_units(run.model, result, [])
        hint = ""
        if exported and not rest and len(plan) == len(units):
            hint = (". With every layer float the exported graph differs from PyTorch FP32 by its runtime's float "
                    "arithmetic alone: the budget is finer than that; loosen it")
        raise CalibrationError("stages.mixed_precision: no plan meets the budget on the full evaluation split (best "
                               f"{final:.3f} {verified.name}"
                               + (f"; the exported graph: {exported['describe']}" if exported else "") + ")" + hint)

    int8_full = int8_value if verified is budget else verified.measure([])
    set_float_units(run.model, result, plan)
    total = sum(costs[u]["macs"] for u in units)
    int8_macs = sum(costs[u]["macs"] for u in units if u not in plan)
    summary = {
        "budget": {"max_drop": opts.max_drop} if opts.max_drop is not None else {"min_agreement": opts.min_agreement},
        "metric": verified.name,
        "fp32": verified.fp32,
        "int8_all": int8_full,
        "final": final,
        "float_layers": plan,
        "int8_layers": len(units) - len(plan),
        "int8_mac_share": int8_macs / total if total else 1.0,
        "search_samples": search.samples,
        "evaluation_samples": full.samples,
        "log": budget.log + (verified.log if verified is not budget else []),
    }
    summary["exported"] = {k: v for k, v in (exported or {}).items() if k != "describe"}
    summary["census"] = result.census()
    write_json(run.path("mixed_precision.json"), summary)
    write_text(run.path("recipe_mixed_precision.yaml"), _plan_recipe(run, plan))
    run.record("mixed_precision", {k: v for k, v in summary.items() if k != "log"})


def _exported_check(run, opts: MixedPrecisionOptions, plan: list[str], probe) -> dict | None:
    """The plan as the deployment runs it: the model exported to Q/DQ ONNX and executed faithfully (ORT with
    optimisations off: TensorRT's arithmetic), scored on the whole evaluation split against FP32 on the same
    images. A max_drop budget holds when the one-sided lower bound of the paired difference (at `confidence`) is
    within it; a min_agreement budget when the agreement is. None for a budget the task cannot measure."""
    import tempfile

    from ..qdq.export import export_onnx
    from ..quant.ptq import set_float_units
    from ..runtime.runners import OrtRunner

    task, dataset = run.task, run.dataset("evaluation")
    set_float_units(run.model, run.artifacts.quant, plan)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(run.model, run.example_input(), Path(tmp) / "plan.onnx")
        runner = OrtRunner(path, "plan", "faithful")
        scorer, fp32 = task.scorer(run.recipe, dataset), task.scorer(run.recipe, dataset)
        for x, targets, ref in zip(probe.inputs, probe.targets, probe.references):
            scorer.update(runner(x), targets, ref)
            fp32.update(ref, targets, ref)
    if opts.max_drop is not None:
        # A one-sided bound at `confidence` is the low end of the two-sided interval at 2 * confidence - 1.
        interval = task.delta(scorer, fp32, confidence=2 * opts.confidence - 1)
        if interval is None:
            return None
        meets = interval.low >= -opts.max_drop - 1e-9
        return {"delta": interval.delta, "low": interval.low, "confidence": opts.confidence, "meets": meets,
                "samples": interval.samples,
                "describe": f"drop {-interval.delta:.3f} points, at most {-interval.low:.3f} with "
                            f"{100 * opts.confidence:.0f}% confidence"}
    agreement = task.agreement_points(scorer.result())
    if agreement is None:
        return None
    meets = agreement >= opts.min_agreement - 1e-9
    return {"agreement": agreement, "meets": meets, "describe": f"agreement {agreement:.2f}%"}


def _ranking(run, opts: MixedPrecisionOptions, candidates: list[str]) -> list[str]:
    """Candidates, most sensitive first: from the sensitivity stage's table, or a quick proxy sweep."""
    from ..data import subset_loader
    from ..quant.sensitivity import SweepSetup, make_probe, sweep

    table = run.artifacts.sensitivity
    if table is None:
        dataset = run.dataset("evaluation")
        probe = make_probe(run.reference, subset_loader(dataset, run.recipe.data, opts.proxy_samples), None, run.device)
        found = sweep(run.model, run.artifacts.quant, candidates, probe, SweepSetup(
            run.task, run.num_classes(), ("one_at_a_time",),
            progress=lambda it, desc, total: track(it, desc, total=total)))
        table = found.rows
    ranked = [r["layer"] for r in table if r["layer"] in set(candidates)]
    return ranked + [u for u in candidates if u not in set(ranked)]  # layers the sweep skipped go last


def _shortest_prefix(budget: Budget, ranking: list[str]) -> list[str]:
    """The shortest prefix of the ranking that meets the budget (bisection; the full ranking meets it)."""
    lo, hi = 0, len(ranking)  # prefix lo fails, prefix hi meets
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, _ = budget.check(ranking[:mid], f"first {mid} of the ranking float")
        lo, hi = (lo, mid) if ok else (mid, hi)
    return ranking[:hi]


def _put_back(budget: Budget, plan: list[str], costs: dict) -> list[str]:
    """Try each float layer back in INT8, largest MACs first; keep it INT8 where the budget still holds."""
    plan = list(plan)
    for unit in sorted(plan, key=lambda u: -costs[u]["macs"]):
        if len(plan) == 1:
            break  # an empty plan is every layer INT8, which already failed
        trial = [u for u in plan if u != unit]
        ok, _ = budget.check(trial, f"{unit} back to INT8")
        if ok:
            plan = trial
    return plan


def _plan_recipe(run, plan: list[str]) -> str:
    """The run's recipe with the plan as calibrate excludes and without the search stages: plain PTQ that
    reproduces it."""
    data = yaml.safe_load(dump_recipe(run.recipe))
    stages = []
    for entry in data["stages"]:
        name, options = next(iter(entry.items()))
        if name in ("sensitivity", "mixed_precision"):
            continue
        if name == "calibrate":
            # excludes are glob patterns: each planned layer escaped, so it matches its own name only
            options["exclude"] = list(dict.fromkeys((options.get("exclude") or []) + [glob.escape(u) for u in plan]))
        stages.append({name: options})
    data["stages"] = stages
    return dump_yaml(data, comment=f"{run.recipe.name}: the mixed-precision plan of run "
                                   f"{run.dir.name.removesuffix('.incomplete')} ({len(plan)} layers in float)")
