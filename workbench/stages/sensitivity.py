"""sensitivity: how much each quantized layer costs in accuracy, in a table a user can act on.

Writes sensitivity.csv / sensitivity.json (one row per layer: name, type, MACs,
parameters, its Q/DQ nodes in the exported ONNX, proxy and task-metric deltas
in both modes, rank) and sensitivity.png (the worst layers), and leaves the
model exactly as calibrated.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from ..io import write_json, write_text
from ..progress import track
from ..report_text import fmt as _fmt
from ..report_text import md_name
from ..run_record import bad_field as _bad
from ..run_record import is_number as _is_number
from ..run_record import show_list as _show_list
from .registry import Restorer, StageOptions, register_stage

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


# How the stage comes back from its run directory on --resume (resume.py reads its registration).

def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_measure(v: Any) -> bool:
    """A proxy or a metric: a number (inf: SQNR of a layer INT8 leaves exact), or None where it was not measured."""
    return v is None or _is_number(v)


# A sensitivity row's field -> (accepts its value, what is expected); by the suffix after the last _ where not named.
_SENSITIVITY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rank": (lambda v: _is_count(v) and v > 0, "an integer rank (1 = most sensitive)"),
    "proxy_rank": (lambda v: _is_count(v) and v > 0, "an integer rank (1 = most sensitive)"),
    "layer": (lambda v: isinstance(v, str), "a layer name"),
    "type": (lambda v: isinstance(v, str), "a layer type name"),
    "ranked_by": (lambda v: v in ("proxy", "task"), '"proxy" or "task"'),
    "macs": (_is_count, "an integer count >= 0"),
    "params": (_is_count, "an integer count >= 0"),
    "onnx_qdq_nodes": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of node names"),
    "_resolved": (lambda v: isinstance(v, bool), "true or false"),
    **{f"_{k}": (_is_measure, "a number or null") for k in ("db", "cosine", "kl", "metric", "delta", "low", "high")},
}


_OTHER = (lambda v: v is None or isinstance(v, (str, bool)) or _is_number(v), "a number, a string, true/false or null")


def check_sensitivity(saved: Any, path: Path) -> None:
    """sensitivity.json as the sensitivity stage writes it: a row per layer, ranked 1..n, of plain values."""
    if not isinstance(saved, dict) or not isinstance(saved.get("layers"), list):
        raise _bad(path, "layers", saved.get("layers") if isinstance(saved, dict) else saved,
                   "a list of rows, one per layer (the sensitivity table)")
    rows = saved["layers"]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("layer"), str):
            raise _bad(path, f"layers[{i}].layer", row.get("layer") if isinstance(row, dict) else row, "a layer name")
        if "rank" not in row:
            raise _bad(path, f"layers[{i}].rank", None, "an integer rank (1 = most sensitive)")
        for key, value in row.items():
            accepts, expected = _SENSITIVITY_FIELDS.get(key) or _SENSITIVITY_FIELDS.get("_" + key.rsplit("_", 1)[-1],
                                                                                       _OTHER)
            if not accepts(value):
                raise _bad(path, f"layers[{i}].{key}", value, expected)
    if sorted(row["rank"] for row in rows) != list(range(1, len(rows) + 1)):
        raise _bad(path, "layers[].rank", [row["rank"] for row in rows], f"the ranks 1 to {len(rows)}, each once")


def _sensitivity(run, options, values, loaded) -> bool:
    from ..quant.ptq import quant_units

    path = run.path("sensitivity.json")
    rows = loaded["sensitivity.json"]["layers"]
    if run.artifacts.quant is not None:
        units = quant_units(run.model, run.artifacts.quant)
        if unknown := [(i, r["layer"]) for i, r in enumerate(rows) if r["layer"] not in units]:
            i, layer = unknown[0]
            raise _bad(path, f"layers[{i}].layer", layer,
                       f"a quantized layer of the model, e.g. {_show_list(sorted(units))}")
    run.artifacts.sensitivity = rows
    return True


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _delta_cell(row: dict, prefix: str) -> str:
    if f"{prefix}_delta" not in row:
        return "n/a"
    if f"{prefix}_delta_low" not in row:
        return _fmt(row[f"{prefix}_delta"])
    noise = "" if row.get(f"{prefix}_resolved") else " (noise)"
    return (f"{row[f'{prefix}_delta']:+.2f} [{row[f'{prefix}_delta_low']:+.2f}, {row[f'{prefix}_delta_high']:+.2f}]"
            f"{noise}")


def _sensitivity_section(run_dir: Path, metrics: dict) -> list[str]:
    stages = metrics.get("stages", {})
    lines = []
    sens = stages.get("sensitivity")
    table_path = run_dir / "sensitivity.json"
    if sens and table_path.is_file():
        table = json.loads(table_path.read_text())["layers"]
        lines += ["## Layer sensitivity", ""]
        task = (f", task metric ({sens['metric']}) on {sens['task_samples']} in {sens['task_seconds']:.1f} s"
                if sens.get("metric") else "")
        lines.append(
            f"{sens['units']} layers, modes {', '.join(sens['modes'])}: proxies on {sens['proxy_samples']} samples in "
            f"{sens['proxy_seconds']:.1f} s{task}. `only`: this layer alone in INT8 (change against FP32); `loo`: "
            "every layer but this one in INT8 (gain over all-INT8). Full table: `sensitivity.csv`."
        )
        lines.append("")
        if sens.get("confidence") and sens.get("task_samples"):  # a task-metric sweep ran, with intervals
            spearman = sens.get("proxy_task_spearman") or {}
            rho = (f"; the SQNR proxy's Spearman correlation with the resolved deltas is {spearman['rho']:.2f} over "
                   f"{spearman['layers']} layers" if spearman.get("rho") is not None else
                   f"; too few resolved layers ({spearman.get('layers', 0)}) for the proxy's rank correlation")
            lines += [f"The probe images resolve the task-metric effect ({100 * sens['confidence']:.0f}% paired "
                      f"interval excluding 0) of {sens['resolved_layers']} of {sens['units']} layers: those are "
                      f"ranked by the task metric (a resolved loss first, a resolved gain last), the rest (within "
                      f"noise) by the proxy, between them{rho}.", ""]
        lines += ["| Rank | Layer | Type | MMACs | only Δ [interval] | loo Δ [interval] | only SQNR dB | Proxy rank | "
                  "Ranked by |", "|---|---|---|---|---|---|---|---|---|"]
        for r in table[:10]:
            lines.append(
                f"| {r['rank']} | {md_name(r['layer'])} | {r['type']} | {r['macs'] / 1e6:.1f} | "
                f"{_delta_cell(r, 'only')} | "
                f"{_delta_cell(r, 'loo')} | {_fmt(r.get('only_sqnr_db'), 1)} | {r['proxy_rank']} | "
                f"{r.get('ranked_by', '-')} |"
            )
        lines.append("")
        if (run_dir / "sensitivity.png").is_file():
            lines += ["![layer sensitivity](sensitivity.png)", ""]
    mp = stages.get("mixed_precision")
    if mp:
        budget = ", ".join(f"{k} {v}" for k, v in mp["budget"].items())
        floats = ", ".join(md_name(u) for u in mp["float_layers"]) or "none"
        lines += ["## Mixed precision", ""]
        lines.append(
            f"Budget {budget} ({mp['metric']}): FP32 {_fmt(mp['fp32'])}, every layer INT8 {_fmt(mp['int8_all'])}, "
            f"plan {_fmt(mp['final'])} on {mp['evaluation_samples']} samples. Kept in float "
            f"({len(mp['float_layers'])}): "
            f"{floats}; {mp['int8_layers']} layers and {100 * mp['int8_mac_share']:.1f}% of the MACs in INT8. "
            "`recipe_mixed_precision.yaml` re-runs this plan as plain PTQ."
        )
        exported = mp.get("exported") or {}
        if "low" in exported:
            lines.append(f" Verified on the exported graph run faithfully in ONNX Runtime ({exported['samples']} "
                         f"images): a difference with FP32 of {exported['delta']:+.3f} points, no worse than "
                         f"{exported['low']:+.3f} with {100 * exported['confidence']:.0f}% confidence (one-sided "
                         "paired bootstrap).")
        elif "agreement" in exported:
            lines.append(" Verified on the exported graph run faithfully in ONNX Runtime: "
                         f"{exported['agreement']:.2f}% agreement with FP32.")
        lines.append("")
    return lines


@register_stage("sensitivity", SensitivityOptions, needs=("quantized",), makes=("sensitivity",),
                restorer=Restorer(_sensitivity, lambda o, v: ["sensitivity.json"],
                                  {"sensitivity.json": check_sensitivity}),
                needs_data=("evaluation",),
                report=_sensitivity_section, report_position=40)
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
