"""sensitivity: how much each quantized layer costs in accuracy, in a table a user can act on.

Writes sensitivity.csv / sensitivity.json (one row per layer: name, type, MACs,
parameters, its Q/DQ nodes in the exported ONNX, proxy and task-metric deltas
in both modes, rank) and sensitivity.png (the worst layers), and leaves the
model exactly as calibrated.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..errors import CalibrationError, RecipeError
from ..data import subset_loader
from ..io import atomic_path, write_json, write_text
from ..qdq.export import export_onnx
from ..qdq.graph import nodes_by_module
from ..progress import track
from ..quant.ptq import quant_units
from ..quant.sensitivity import MODES, layer_costs, make_probe, proxy_sensitivity, sweep, task_sensitivity
from ..tasks import metric_points, new_scorer
from .registry import StageOptions, register_stage

Mode = Literal["one_at_a_time", "leave_one_out"]


class SensitivityOptions(StageOptions):
    modes: list[Mode] = Field(default_factory=lambda: list(MODES), min_length=1, description="Sweeps to run.")
    proxy_samples: int | None = Field(
        None, gt=0, description="Evaluation samples (drawn with a seed) the proxies (SQNR, cosine, KL) are measured on (default: 16 for classifiers, 8 for detectors)."
    )
    task_metric: bool = Field(True, description="Also score every configuration by the task metric (slower).")
    task_samples: int | None = Field(
        None, gt=0, description="Evaluation samples for the task-metric sweep, drawn with a seed (default: 2000 for classifiers, all for detectors)."
    )
    layers: list[str] = Field(default_factory=list, description="Glob patterns: sweep only these units (default: every quantized one).")
    top: int = Field(20, gt=0, description="Layers shown in sensitivity.png.")


def selected_units(units: list[str], patterns: list[str], field: str) -> list[str]:
    if not patterns:
        return units
    if missing := [p for p in patterns if not any(fnmatch.fnmatchcase(u, p) for u in units)]:
        raise RecipeError(
            f"{field}: pattern(s) {missing} match no quantized layer; quantized layers look like "
            f"{', '.join(repr(u) for u in units[:3])} (sensitivity.csv of a run lists them all)"
        )
    return [u for u in units if any(fnmatch.fnmatchcase(u, p) for p in patterns)]


def qdq_nodes(run, units: list[str]) -> dict[str, list[str]]:
    """Unit -> names of its QuantizeLinear/DequantizeLinear nodes, from an export of the model as it is now."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(run.model, run.example_input(), Path(tmp) / "probe.onnx")
        by_module = nodes_by_module(path, run.model, ("QuantizeLinear", "DequantizeLinear"))
    out: dict[str, list[str]] = {u: [] for u in units}
    for module, nodes in by_module.items():
        owner = max((u for u in units if module == u or module.startswith(u + ".")), key=len, default=None)
        if owner is not None:
            out[owner] += nodes
    return out


@register_stage("sensitivity", SensitivityOptions, needs_data=("evaluation",))
def sensitivity(run, opts: SensitivityOptions) -> None:
    """Per-layer INT8 sensitivity (one-at-a-time and leave-one-out), by proxies and by the task metric."""
    result = run.state.get("quant")
    if result is None:
        raise CalibrationError("stages.sensitivity needs a calibrated model: put a calibrate stage before it")
    units = selected_units(list(quant_units(run.model, result)), opts.layers, "stages.sensitivity.layers")
    dataset = run.dataset("evaluation")
    num_classes = run.num_classes()  # a detector's own, not its labels'
    # A detector's output holds thousands of boxes per image: 8 images give the proxies plenty of values.
    proxy_samples = opts.proxy_samples or (8 if run.recipe.task == "detection" else 16)
    proxy_probe = make_probe(run.reference, subset_loader(dataset, run.recipe.data, proxy_samples), None, run.device)
    task_probe = None
    if opts.task_metric:
        default = None if run.recipe.task == "detection" else 2000
        samples = opts.task_samples or default
        task_probe = make_probe(run.reference, subset_loader(dataset, run.recipe.data, samples), None, run.device)
    found = sweep(
        run.model,
        result,
        units,
        proxy_probe,
        run.recipe.task,
        num_classes,
        tuple(opts.modes),
        task_probe,
        lambda: new_scorer(run.recipe, dataset),
        metric_points,
        progress=lambda it, desc, total: track(it, desc, total=total),
    )
    costs = layer_costs(run.model, units, run.example_input())
    nodes = qdq_nodes(run, units)
    metric_name = found.metric_name
    table = [
        {"rank": r["rank"], "layer": r["layer"], **costs[r["layer"]], "onnx_qdq_nodes": nodes[r["layer"]],
         **{k: v for k, v in r.items() if k not in ("rank", "layer")}}
        for r in found.rows
    ]
    total_macs = sum(c["macs"] for c in costs.values())
    run.state["sensitivity"] = table
    write_json(run.path("sensitivity.json"), {
        "metric": metric_name,
        "modes": opts.modes,
        "proxy_samples": proxy_probe.samples,
        "task_samples": task_probe.samples if task_probe else 0,
        "baselines": found.baselines,
        "seconds": found.seconds,
        "layers": table,
    })
    write_text(run.path("sensitivity.csv"), _csv(table))
    _plot(run.path("sensitivity.png"), table, opts.top, metric_name)
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


def _plot(path: Path, table: list[dict], top: int, metric_name: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[:top]
    names = [r["layer"] for r in rows]
    panels = []
    if metric_name and task_sensitivity(rows[0]) is not None:
        panels.append(([task_sensitivity(r) for r in rows], f"sensitivity, {metric_name}\n(loss alone + gain when kept float)", "#C44E52"))
    panels.append(([max(-proxy_sensitivity(r), 0) if "only_sqnr_db" in r else proxy_sensitivity(r) for r in rows],
                   "SQNR with only this layer INT8, dB (lower hurts more)" if "only_sqnr_db" in rows[0]
                   else "output SQNR when this layer stays float, dB", "#4C72B0"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.32 * len(rows) + 1.5), squeeze=False)
    for ax, (values, label, color) in zip(axes[0], panels):
        ax.barh(names, [v if math.isfinite(v) else 0 for v in values], color=color)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"The {len(rows)} most sensitive layers")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
