"""sensitivity: how much each quantized layer costs in accuracy, in a table a user can act on.

Writes sensitivity.csv / sensitivity.json (one row per layer: name, type, MACs,
parameters, its Q/DQ nodes in the exported ONNX, proxy and task-metric deltas
in both modes, rank) and sensitivity.png (the worst layers), and leaves the
model exactly as calibrated.
"""

from __future__ import annotations

import csv
import io
from typing import Literal

from pydantic import Field

from ..io import write_json, write_text
from ..progress import track
from .registry import StageOptions, register_stage

Mode = Literal["one_at_a_time", "leave_one_out"]


class SensitivityOptions(StageOptions):
    modes: list[Mode] = Field(default_factory=lambda: ["one_at_a_time", "leave_one_out"], min_length=1,
                              description="Sweeps to run.")
    proxy_samples: int | None = Field(
        None, gt=0, description="Evaluation samples (drawn with a seed) the proxies (SQNR, cosine, KL) are measured "
        "on (default: the task's, 16 for classifiers, 8 for detectors)."
    )
    task_metric: bool = Field(True, description="Also score every configuration by the task metric (slower).")
    task_samples: int | None = Field(
        None, gt=0, description="Evaluation samples for the task-metric sweep, drawn with a seed (default: the "
        "task's, 2000 for classifiers, all for detectors)."
    )
    layers: list[str] = Field(default_factory=list,
                              description="Glob patterns: sweep only these units (default: every quantized one).")
    top: int = Field(20, gt=0, description="Layers shown in sensitivity.png.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Of the paired interval of each layer's task-metric "
                              "delta: a layer whose interval holds 0 is within noise, ranked by the proxies.")


def qdq_nodes(run, units: list[str]) -> dict[str, list[str]]:
    """Unit -> names of its QuantizeLinear/DequantizeLinear nodes, from an export of the model as it is now."""
    import tempfile
    from pathlib import Path

    from ..qdq.export import export_onnx
    from ..qdq.graph import nodes_by_module

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(run.model, run.example_input(), Path(tmp) / "probe.onnx")
        by_module = nodes_by_module(path, run.model, ("QuantizeLinear", "DequantizeLinear"))
    out: dict[str, list[str]] = {u: [] for u in units}
    for module, nodes in by_module.items():
        owner = max((u for u in units if module == u or module.startswith(u + ".")), key=len, default=None)
        if owner is not None:
            out[owner] += nodes
    return out


@register_stage("sensitivity", SensitivityOptions, needs=("quantized",), makes=("sensitivity",),
                needs_data=("evaluation",))
def sensitivity(run, opts: SensitivityOptions) -> None:
    """Per-layer INT8 sensitivity (one-at-a-time and leave-one-out), by proxies and by the task metric."""
    from ..data import subset_loader
    from ..plots import plot_sensitivity
    from ..quant.ptq import quant_units
    from ..quant.sensitivity import (
        SweepSetup,
        TaskMetric,
        layer_costs,
        make_probe,
        proxy_task_correlation,
        resolved,
        selected_units,
        sweep,
    )

    result = run.artifacts.quant
    task = run.task
    units = selected_units(list(quant_units(run.model, result)), opts.layers, "stages.sensitivity.layers")
    dataset = run.dataset("evaluation")
    proxy_samples = opts.proxy_samples or task.proxy_samples
    proxy_probe = make_probe(run.reference, subset_loader(dataset, run.recipe.data, proxy_samples), None, run.device)
    task_probe = metric = None
    if opts.task_metric:
        samples = opts.task_samples or task.task_samples
        task_probe = make_probe(run.reference, subset_loader(dataset, run.recipe.data, samples), None, run.device)
        metric = TaskMetric(lambda: task.scorer(run.recipe, dataset), task.headline_points)
    found = sweep(run.model, result, units, proxy_probe, SweepSetup(
        task, run.num_classes(), tuple(opts.modes), task_probe, metric,
        progress=lambda it, desc, total: track(it, desc, total=total), confidence=opts.confidence))
    costs = layer_costs(run.model, units, run.example_input())
    nodes = qdq_nodes(run, units)
    metric_name = found.metric_name
    table = [
        {"rank": r["rank"], "layer": r["layer"], **costs[r["layer"]], "onnx_qdq_nodes": nodes[r["layer"]],
         **{k: v for k, v in r.items() if k not in ("rank", "layer")}}
        for r in found.rows
    ]
    total_macs = sum(c["macs"] for c in costs.values())
    correlation = proxy_task_correlation(table) if task_probe else None
    resolved_layers = sum(1 for r in table if resolved(r))  # an interval excluding 0, not a task rank without one
    run.artifacts.sensitivity = table
    write_json(run.path("sensitivity.json"), {
        "metric": metric_name,
        "modes": opts.modes,
        "proxy_samples": proxy_probe.samples,
        "task_samples": task_probe.samples if task_probe else 0,
        "baselines": found.baselines,
        "seconds": found.seconds,
        "confidence": opts.confidence,
        "resolved_layers": resolved_layers,
        "proxy_task_spearman": correlation,
        "layers": table,
    })
    write_text(run.path("sensitivity.csv"), _csv(table))
    plot_sensitivity(run.path("sensitivity.png"), table[:opts.top], metric_name, opts.confidence)
    run.record("sensitivity", {
        "units": len(units),
        "modes": opts.modes,
        "metric": metric_name,
        "proxy_samples": proxy_probe.samples,
        "task_samples": task_probe.samples if task_probe else 0,
        "proxy_seconds": round(found.seconds.get("proxy", 0.0), 2),
        "task_seconds": round(found.seconds.get("task", 0.0), 2),
        "total_macs": total_macs,
        "baselines": found.baselines,
        "confidence": opts.confidence,
        "resolved_layers": resolved_layers,
        "proxy_task_spearman": correlation,
        "most_sensitive": [r["layer"] for r in table[:5]],
    })


def _csv(table: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in table for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in table:
        writer.writerow({k: (" ".join(v) if isinstance(v, list) else v) for k, v in row.items()})
    return buf.getvalue()
