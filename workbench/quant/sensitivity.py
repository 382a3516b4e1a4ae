"""Per-layer sensitivity to INT8: which layers hurt when quantized.

Two sweeps over the calibrated model, reusing its ranges (nothing is recalibrated):
  one_at_a_time   only this unit in INT8, everything else float: the damage it does alone;
  leave_one_out   every unit in INT8 except this one: what keeping it in float buys back.
Each configuration is scored by cheap proxies against the FP32 outputs (SQNR,
cosine, KL: `tasks.proxies`) on a small probe set, and optionally by the task
metric (top-1, mAP50-95) on an evaluation subset. A "unit" is a quantized layer
(its input and weight quantizers) or a residual Add (`<block>.residual_add`).
"""

from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import distributed
from ..errors import RecipeError
from ..tasks import Scorer, Task, first_output
from ..tasks.proxies import ProxyMeter
from .ptq import QuantResult, quant_units, set_float_units

MODES = ("one_at_a_time", "leave_one_out")
PREFIX = {"one_at_a_time": "only", "leave_one_out": "loo"}


@dataclass
class Probe:
    """Inputs (on the model's device), their targets and the FP32 model's outputs on them."""

    inputs: list[torch.Tensor]
    targets: list
    references: list[torch.Tensor]

    @property
    def samples(self) -> int:
        return sum(int(x.shape[0]) for x in self.inputs)


def make_probe(reference: nn.Module, batches, samples: int | None, device) -> Probe:
    """The first `samples` samples of `batches` (all when None), with the reference model's outputs."""
    inputs, targets, refs, seen = [], [], [], 0
    with torch.no_grad():
        for images, labels in batches:
            if samples is not None and seen >= samples:
                break
            if samples is not None and seen + images.shape[0] > samples:
                keep = samples - seen
                images, labels = images[:keep], labels[:keep]
            images = images.to(device)
            inputs.append(images)
            targets.append(labels)
            refs.append(first_output(reference(images)).detach())
            seen += images.shape[0]
    return Probe(inputs, targets, refs)


def selected_units(units: list[str], patterns: list[str], field: str) -> list[str]:
    """The units matching any of the glob `patterns` (all units when there are none); `field` names the option."""
    if not patterns:
        return units
    if missing := [p for p in patterns if not any(fnmatch.fnmatchcase(u, p) for u in units)]:
        raise RecipeError(
            f"{field}: pattern(s) {missing} match no quantized layer; quantized layers look like "
            f"{', '.join(repr(u) for u in units[:3])} (sensitivity.csv of a run lists them all)"
        )
    return [u for u in units if any(fnmatch.fnmatchcase(u, p) for p in patterns)]


def layer_costs(model: nn.Module, units: list[str], example: torch.Tensor) -> dict[str, dict]:
    """Per unit: module type, multiply-accumulates for one `example` sample, parameter count."""
    modules = dict(model.named_modules())
    costs: dict[str, dict] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            out = first_output(output)
            per_sample = out[0].numel() if out.dim() > 0 else 1
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear):
                macs = per_sample * module.in_features
            elif weight is not None and weight.dim() > 2:  # conv: every output element reads in/groups x kernel
                macs = per_sample * weight[0].numel() if not isinstance(module, nn.modules.conv._ConvTransposeNd) else (
                    inputs[0][0].numel() * weight[0].numel()
                )
            else:
                macs = 0
            costs[name]["macs"] = int(macs)

        return fn

    for name in units:
        module = modules[name]
        params = sum(p.numel() for p in module.parameters(recurse=False))
        residual = f".{name}".endswith(".residual_add")  # the model's own Add (by pattern) is "residual_add"
        type_name = "Add (residual)" if residual else type(module).__name__.removeprefix("Quant")
        costs[name] = {"type": type_name, "macs": 0, "params": int(params)}
        if not residual:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return costs


@dataclass
class SweepResult:
    rows: list[dict]  # one per unit, ranked (rank 1 = most sensitive)
    baselines: dict[str, dict]  # "fp32" and "int8": proxies (and task metric) with no / every unit in INT8
    metric_name: str | None  # e.g. "top-1 %", "mAP50-95 points"; None without the task-metric sweep
    seconds: dict[str, float] = field(default_factory=dict)  # "proxy", "task"


@dataclass(frozen=True)
class TaskMetric:
    """How a probe set is scored by the task metric: a fresh scorer, and its result read as (name, points)."""

    new_scorer: Callable[[], Scorer]
    points: Callable[[dict], tuple[str, float | None]]


@dataclass(frozen=True)
class SweepSetup:
    """What a sweep measures besides the proxies, and how it reports progress."""

    task: Task
    num_classes: int | None = None  # a detector's, to read its outputs
    modes: tuple[str, ...] = MODES
    task_probe: Probe | None = None  # with `metric`: also score every configuration by the task metric
    metric: TaskMetric | None = None
    progress: Callable = lambda it, desc, total: it
    confidence: float = 0.95  # of the paired interval of each task-metric delta


def measure_proxies(model: nn.Module, probe: Probe, task: Task, num_classes: int | None) -> dict[str, float]:
    meter = ProxyMeter(task, num_classes)
    with torch.no_grad():
        for x, ref in zip(probe.inputs, probe.references):
            meter.update(ref, first_output(model(x)))
    return meter.result()


def score_probe(model: nn.Module, probe: Probe, scorer: Scorer) -> dict[str, float]:
    """The scorer's result for the model's outputs on the probe set (against its targets and FP32 outputs)."""
    with torch.no_grad():
        for x, targets, ref in zip(probe.inputs, probe.targets, probe.references):
            scorer.update(first_output(model(x)).float(), targets, ref.float())
    return scorer.result()


def measure_task(model: nn.Module, probe: Probe, metric: TaskMetric) -> tuple[str, float]:
    """(name, value) of the task metric in points (percent for top-1 and agreement, mAP x 100) on the probe set."""
    return metric.points(score_probe(model, probe, metric.new_scorer()))


def sweep(model: nn.Module, result: QuantResult, units: list[str], proxy_probe: Probe,
          setup: SweepSetup) -> SweepResult:
    """Score every unit in every mode; the model is left as it came (the units float before stay float)."""
    modes, task_probe, progress = setup.modes, setup.task_probe, setup.progress
    all_units = list(quant_units(model, result))
    before = list(result.kept_float)
    configs = {"fp32": all_units, "int8": []}
    for mode in modes:
        for u in units:
            configs[f"{mode}:{u}"] = [v for v in all_units if v != u] if mode == "one_at_a_time" else [u]
    # Under torchrun each process scores its share of the configurations; the parts are gathered after.
    mine = distributed.shard(list(configs))
    scores: dict[str, dict] = {k: {} for k in mine}
    seconds = {}
    metric_name = None
    try:
        # Warm-up, untimed: the first fake-quant forward on a GPU compiles modelopt's CUDA extension (~70 s once).
        set_float_units(model, result, [])
        with torch.no_grad():
            model(proxy_probe.inputs[0][:1])
        start = time.perf_counter()
        for key in progress(mine, "sensitivity (proxies)", len(mine)):
            set_float_units(model, result, configs[key])
            scores[key].update(measure_proxies(model, proxy_probe, setup.task, setup.num_classes))
        seconds["proxy"] = time.perf_counter() - start
        if task_probe is not None:
            start = time.perf_counter()
            metric_name = _task_sweep(model, result, configs, mine, scores, setup)
            seconds["task"] = time.perf_counter() - start
    finally:
        set_float_units(model, result, before)
    scores = distributed.gather_dict(scores)
    per_rank = distributed.gather_dict({distributed.rank(): (seconds, metric_name)})
    seconds = {k: max(s[k] for s, _ in per_rank.values()) for k in seconds}  # wall time: the slowest rank's
    metric_name = next((m for _, m in per_rank.values() if m), None)

    rows = []
    fp32_metric, int8_metric = scores["fp32"].get("metric"), scores["int8"].get("metric")
    for u in units:
        row = {"layer": u}
        for mode in modes:
            s, p = scores[f"{mode}:{u}"], PREFIX[mode]
            row.update({f"{p}_sqnr_db": s["sqnr_db"], f"{p}_cosine": s["cosine"], f"{p}_kl": s["kl"]})
            if "metric" in s:
                row[f"{p}_metric"] = s["metric"]
                # one_at_a_time: change against FP32 (negative hurts); leave_one_out: gain over all-INT8.
                row[f"{p}_delta"] = s["metric"] - (fp32_metric if mode == "one_at_a_time" else int8_metric)
                if s.get("interval"):
                    row[f"{p}_delta_low"], row[f"{p}_delta_high"] = s["interval"]["low"], s["interval"]["high"]
                    row[f"{p}_resolved"] = s["interval"]["resolved"]
        rows.append(row)
    rank_rows(rows)
    return SweepResult(rows, {"fp32": scores["fp32"], "int8": scores["int8"]}, metric_name, seconds)


def _task_sweep(model, result, configs: dict, mine: list[str], scores: dict, setup: SweepSetup) -> str | None:
    """Score this process's configurations by the task metric, each delta with its paired interval against its
    baseline (FP32 for one_at_a_time, all-INT8 for leave_one_out) on the same probe images. Each process scores
    both baselines itself (two configurations more), so the intervals need no scorer from another process."""
    task, probe, metric = setup.task, setup.task_probe, setup.metric
    baselines = {}
    for key in ("fp32", "int8"):
        set_float_units(model, result, configs[key])
        baselines[key] = score_probe_scorer(model, probe, metric.new_scorer())
    name = None
    for key in setup.progress(mine, "sensitivity (task metric)", len(mine)):
        if key in baselines:
            scorer = baselines[key]
        else:
            set_float_units(model, result, configs[key])
            scorer = score_probe_scorer(model, probe, metric.new_scorer())
        name, scores[key]["metric"] = metric.points(scorer.result())
        if ":" in key:
            baseline = baselines["fp32" if key.startswith("one_at_a_time") else "int8"]
            interval = task.delta(scorer, baseline, setup.confidence)
            scores[key]["interval"] = interval.as_dict() if interval is not None else None
    return name


def score_probe_scorer(model: nn.Module, probe: Probe, scorer: Scorer) -> Scorer:
    """The scorer after the model's outputs on the probe set went through it."""
    score_probe(model, probe, scorer)
    return scorer


def proxy_sensitivity(row: dict) -> float:
    """Higher is more sensitive, from the proxies alone: the noise this unit adds alone (low SQNR),
    or else how much SQNR keeping it float buys back."""
    if "only_sqnr_db" in row:
        return -row["only_sqnr_db"]
    return row["loo_sqnr_db"]


def task_sensitivity(row: dict) -> float | None:
    """Higher is more sensitive, in task-metric points: the loss alone plus the gain when left out."""
    parts = [-row["only_delta"]] if "only_delta" in row else []
    parts += [row["loo_delta"]] if "loo_delta" in row else []
    return sum(parts) if parts else None


def resolved(row: dict) -> bool | None:
    """Whether the probe images resolve the layer's task-metric effect (an interval excludes 0 in either mode);
    None without task-metric intervals."""
    flags = [row[k] for k in ("only_resolved", "loo_resolved") if k in row]
    return any(flags) if flags else None


def rank_rows(rows: list[dict]) -> None:
    """Sort in place, most sensitive first; set rank, proxy_rank and ranked_by.

    The task metric orders the layers whose effect it resolves (an interval excluding 0): those it shows losing
    come first, those it shows gaining (INT8 of that layer alone scores higher: the least sensitive) come last.
    Between them, the layers within noise follow the proxies' order (`ranked_by` says which ordered each row).
    Without intervals, the task metric orders all, ties broken by the proxies.
    """
    for i, row in enumerate(sorted(rows, key=lambda r: -proxy_sensitivity(r))):
        row["proxy_rank"] = i + 1

    def group(row: dict) -> int:  # 0: resolved loss (or no intervals), 1: within noise, 2: resolved gain
        is_resolved, task = resolved(row), task_sensitivity(row)
        if task is None or is_resolved is False:
            return 1
        return 2 if is_resolved and task <= 0 else 0

    for row in rows:
        row["ranked_by"] = "proxy" if group(row) == 1 else "task"
    rows.sort(key=lambda r: (group(r), -(task_sensitivity(r) or 0.0) if r["ranked_by"] == "task" else 0.0,
                             -proxy_sensitivity(r)))
    for i, row in enumerate(rows):
        row["rank"] = i + 1


def proxy_task_correlation(rows: list[dict]) -> dict | None:
    """Spearman correlation of the one-at-a-time SQNR proxy with the task delta, over the layers whose task delta
    the probe resolves; None with fewer than 3 such layers."""
    from scipy.stats import spearmanr

    chosen = [r for r in rows if r.get("only_resolved") and "only_sqnr_db" in r]
    if len(chosen) < 3:
        return {"rho": None, "layers": len(chosen)}
    rho = float(spearmanr([r["only_sqnr_db"] for r in chosen], [r["only_delta"] for r in chosen]).statistic)
    # Low SQNR (noisy layer) should go with a negative delta: a good proxy gives a positive rho here. All deltas
    # (or all SQNRs) tied give NaN: no ranking to compare, said as None (metrics.json stays strict JSON).
    return {"rho": rho if math.isfinite(rho) else None, "layers": len(chosen)}
