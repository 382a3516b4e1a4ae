"""The run report (report.md + plot) and the one-screen console summary.

Both read only the run directory (metrics.json), so a finished run can be
re-reported, or read by the notebook, without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import write_text
from .plots import plot_accuracy_latency
from .report_html import render_html
from .report_text import fmt as _fmt
from .report_text import md_name, md_text  # noqa: F401  (md_name: the report's readers find it here)
from .runtime import backends
from .stages.registry import results_of
from .tasks import Metric, Task, get_task


def load_metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _task(metrics: dict) -> Task:
    return get_task(metrics.get("task", "classification"))


def backend_rows(metrics: dict) -> list[dict]:
    """One row per evaluated backend: its metrics, size and latency."""
    evaluation = results_of(metrics)
    rows = []
    for name, entry in evaluation.get("backends", {}).items():
        lat = entry.get("latency", {})
        rows.append(
            {
                "backend": name,
                "title": backends.title(name) + (" (unverified)" if entry.get("verified") is False else ""),
                "metrics": entry.get("metrics", {}),
                "size_mb": entry["size_bytes"] / 1e6 if "size_bytes" in entry else None,
                "latency": {k: v["median_ms"] for k, v in lat.items()},
                "latency_p90": {k: v["p90_ms"] for k, v in lat.items()},
                "delta": entry.get("delta_vs_fp32"),
                "delta_ptq": entry.get("delta_vs_ptq"),
                "verified": entry.get("verified"),  # engines: whether the guard passed them when built
                "engine_check": entry.get("engine_check"),  # engines: agreement with their graph, every image
                "conversion_check": entry.get("conversion_check"),  # the graph an engine is compiled from vs faithful
                "not_for_deployment": backends.not_for_deployment(name),
            }
        )
    return rows


def _interval(d: dict | None, digits: int = 2) -> str:
    """'-0.06 [-0.21, +0.09]' (the interval's confidence is in the table's header)."""
    if not d:
        return "n/a"
    return f"{d['delta']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def headline(task: Task, rows: list[dict]) -> Metric | None:
    """The metric summaries and plots show: the task's first headline metric that any backend has."""
    for key in task.headline_keys:
        if any(r["metrics"].get(key) is not None for r in rows):
            return next(m for m in task.metrics if m.key == key)
    return None


def write_report(run_dir: str | Path) -> Path:
    """report.md and report.html (and the plots) from the run directory, one section per stage that ran."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    warnings = [md_text(warning_text(w)) for w in metrics.get("warnings", [])]
    status = metrics.get("status") + (f", with {len(warnings)} warning(s)" if warnings else "")
    lines = [f"# Run report: {metrics.get('recipe')}", "",
             f"Status: **{status}**, device `{metrics.get('device')}`, torch {metrics.get('torch')}, "
             f"started {metrics.get('started')}.", ""]
    lines += [f"**Warning:** {w}" for w in warnings] + ([""] if warnings else [])
    short = in_short(metrics)
    lines += ["## In short", "", " ".join(short), ""] if short else []
    from .stages import STAGES

    # The results tables first, then each stage's own section (its registration's, in report_position order).
    shown = sorted((s for s in STAGES.values() if s.report), key=lambda s: s.report_position)
    for section in (_backends_section, _per_class_section, *(s.report for s in shown), _timings_section):
        lines += section(run_dir, metrics)
    path = run_dir / "report.md"
    text = "\n".join(lines)
    write_text(path, text)
    write_text(run_dir / "report.html", render_html(text, run_dir))  # the same, one file with its plots inlined
    return path


def warning_text(warning: dict | str) -> str:
    """A warning of metrics.json: {"stage", "message"} (runs before the stage was recorded: the message alone)."""
    return warning["message"] if isinstance(warning, dict) else warning


def deployment_choice(metrics: dict) -> tuple[dict | None, dict | None]:
    """The rows (backend_rows) of the INT8 backend a deployment would use and of the FP32 one it is timed against:
    the fastest at batch 1 among the deployable ones evaluated (eager PyTorch only where no FP32 graph was timed)."""
    rows = {r["backend"]: r for r in backend_rows(metrics)}

    def deployed(precision: str) -> list[dict]:
        found = [r for name, r in rows.items() if name in backends.BACKENDS and backends.BACKENDS[name].deploys
                 == precision]
        # eager PyTorch only where no exported graph of that precision was timed
        return [r for r in found if not r["not_for_deployment"]] or found

    def fastest(candidates: list[dict]) -> dict | None:
        timed = [r for r in candidates if r["latency"].get("b1")]
        return min(timed, key=lambda r: r["latency"]["b1"]) if timed else None

    int8_rows = deployed("int8")
    return fastest(int8_rows) or (int8_rows[0] if int8_rows else None), fastest(deployed("fp32"))


def in_short(metrics: dict) -> list[str]:
    """The run in a few sentences: the INT8 engine a deployment would use against FP32, by size, speed and how
    closely it follows FP32 (the console prints them under the table, the report above it)."""
    rows = {r["backend"]: r for r in backend_rows(metrics)}
    task = _task(metrics)
    int8, fp32 = deployment_choice(metrics)
    if int8 is None:
        return []
    lines = []
    # the FP32 artifact's size: a deployable FP32 file where one was made, else the reference model's parameters
    fp32_sized = [r for r in rows.values() if r["backend"] in backends.BACKENDS
                  and backends.BACKENDS[r["backend"]].deploys == "fp32" and r["size_mb"]]
    fp32_file = (next((r for r in fp32_sized if not r["not_for_deployment"]), None)
                 or rows.get(backends.reference_name()))
    size = ""
    if int8["size_mb"] and fp32_file and fp32_file["size_mb"]:
        ratio = fp32_file["size_mb"] / int8["size_mb"]
        size = (f": {int8['size_mb']:.2f} MB against {fp32_file['size_mb']:.2f} MB in FP32 ("
                + (f"{ratio:.1f}x smaller)" if ratio >= 1 else f"{1 / ratio:.1f}x larger)"))
    deployed_files = metrics.get("deploy", {}).get("files") if isinstance(metrics.get("deploy"), dict) else None
    where = f" (the file to deploy: {', '.join(f'`{f}`' for f in deployed_files)})" if deployed_files else ""
    lines.append(f"INT8 engine `{int8['backend']}`{size}{where}.")
    if int8["latency"].get("b1") and fp32 is not None:
        ratio = fp32["latency"]["b1"] / int8["latency"]["b1"]
        lines.append(f"At batch 1 it takes {int8['latency']['b1']:.2f} ms against {fp32['latency']['b1']:.2f} ms for "
                     f"the fastest FP32 backend (`{fp32['backend']}`): "
                     + (f"{ratio:.2f}x faster." if ratio >= 1 else f"{1 / ratio:.2f}x slower."))
    metric = headline(task, list(rows.values()))
    reference = rows.get(backends.reference_name())
    samples = results_of(metrics).get("samples", 0)
    if fidelity := task.fidelity_headline(int8["metrics"], samples):
        lines.append(fidelity)
    elif metric is not None and metric.key in int8["metrics"] and reference and metric.key in reference["metrics"]:
        d = int8["delta"]
        delta = (f" (a difference of {_interval(d)} points, {100 * d['confidence']:.0f}% interval)" if d else "")
        # A sentence starts with a capital, except a name written with its own case (mAP50-95, not MAP50-95).
        name = metric.short if metric.short[1:2].isupper() else metric.short[:1].upper() + metric.short[1:]
        lines.append(f"{name}: {_fmt(int8['metrics'][metric.key], metric.digits)} "
                     "against FP32's "
                     f"{_fmt(reference['metrics'][metric.key], metric.digits)}{delta}.")
    return lines + task.fidelity_sentences(int8["metrics"], samples)


def _backends_section(run_dir: Path, metrics: dict) -> list[str]:
    rows = backend_rows(metrics)
    if not rows:
        return []
    evaluation = results_of(metrics)
    task = _task(metrics)
    batch_keys = _latency_keys(rows)
    columns = [m for m in task.metrics if any(m.key in r["metrics"] for r in rows)]
    confidence = next((r["delta"]["confidence"] for r in rows if r["delta"]), None)
    deltas = [f"Δ vs FP32, points [{100 * confidence:.0f}% CI]"] if confidence else []
    head = (["Backend"] + [m.title for m in columns] + deltas + ["Size MB"]
            + [f"Latency {k} median (p90) ms" for k in batch_keys])
    title = "Accuracy, size, latency" if batch_keys else "Accuracy and size (latency not measured)"
    lines = [f"## {title} ({evaluation['samples']} evaluation samples)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["title"]] + [_fmt(r["metrics"].get(m.key), m.digits) for m in columns]
        cells += [_interval(r["delta"]) if r["backend"] != backends.reference_name() else "-"] if deltas else []
        cells += [_fmt(r["size_mb"])]
        cells += [f"{_fmt(r['latency'].get(k))} ({_fmt(r['latency_p90'].get(k))})" if k in r["latency"] else "-"
                  for k in batch_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{r['backend']}` is no deployment candidate: {r['not_for_deployment']}." for r in rows
              if r["not_for_deployment"]] + [""]
    if confidence:
        samples = next(r["delta"]["samples"] for r in rows if r["delta"])
        lines += [f"Each difference is the headline metric minus FP32's on the same {samples} images, with a paired "
                  "bootstrap interval over them: an interval that holds 0 says these images cannot tell the two "
                  "apart.", ""]
    for row in rows:
        if row["delta_ptq"]:
            lines += [f"{row['title']} after training against the PTQ model it started from: "
                      f"{_interval(row['delta_ptq'])} points.", ""]
    for key, sentence in backends.comparison_sentences().items():
        cmp = evaluation.get(key)
        if cmp:
            if "agreement_top1" in cmp:
                what = f"on {cmp['agreement_top1']:.2f}% of top-1 predictions"
            elif cmp.get("box_agreement") is not None:
                what = (f"on {cmp['box_agreement']:.2f}% of the {cmp['box_agreement_compared']} boxes the reference "
                        "finds (score >= 0.25; same class, IoU >= 0.5)")
            else:
                what = "(agreement not measurable: the reference finds no box with score >= 0.25 on these images)"
            lines += [f"{sentence} {what} (max |output difference| {cmp['max_abs_diff']:.4f}).", ""]
    for row in rows:
        for key, what in (("engine_check", "the graph it was compiled from"),
                          ("conversion_check", "the faithful graph")):
            check = row[key]
            if check:
                verdict = "within" if check["within"] else "**outside**"
                lines += [f"{row['title']} against {what} (`{check['against']}`), the guard's way on every "
                          f"evaluation image: {check['criterion']} {check['value']:.1f}% [{check['low']:.1f}, "
                          f"{check['high']:.1f}] ({100 * check['confidence']:.0f}% {check['method']} interval, "
                          f"{check['samples']} images), {verdict} the guard's threshold of "
                          f"{check['min_agreement']:g}%.", ""]
    lines += _not_measurable_lines(rows)
    speed = evaluation.get("speed_ms_per_image")
    if speed:
        lines += [f"Per image, split as detectors report speed: pre-process {speed['preprocess']:.2f} ms "
                  f"({task.preprocess_steps}), inference the backend's batch-1 latency above, post-process "
                  f"{speed['postprocess']:.2f} ms ({task.postprocess_steps}), on {speed['images']} images.", ""]
    if batch_keys:
        lines += [_latency_caption(metrics, rows) + ".", ""]
    for r in rows:  # what a timed row's latency means, where the backend table says
        note = backends.BACKENDS[r["backend"]].timed_note if r["backend"] in backends.BACKENDS else None
        if note and any(k in r["latency"] for k in batch_keys):
            lines += [note, ""]
    metric = headline(task, rows)
    if metric is not None:
        plot_accuracy_latency(run_dir / "accuracy_latency.png", [r["backend"] for r in rows],
                              [r["metrics"].get(metric.key) for r in rows], metric.short,
                              [r["latency"].get("b1") for r in rows])
        lines += ["![accuracy and latency](accuracy_latency.png)", ""]
    return lines


def _latency_keys(rows: list[dict]) -> list[str]:
    """The batch sizes some backend was timed at, 'b1' before 'b8'."""
    return sorted({k for r in rows for k in r["latency"]}, key=lambda k: int(k[1:]))


def _latency_caption(metrics: dict, rows: list[dict]) -> str:
    """How the latencies were measured: the machine, threads and repeats shared by every backend, which were not
    timed and why."""
    setup = results_of(metrics).get("latency_setup")
    cpu = (setup or {}).get("cpu")
    machine = f"{cpu['model']} ({', '.join(cpu['flags']) or 'no AVX2'})" if cpu else "this machine's CPU"
    threads = setup and f"{setup['threads']} CPU thread{'s' if setup['threads'] != 1 else ''}"
    how = (f"median of {setup['repeats']} timed runs, {threads} for every backend"
           if setup else "median of the timed runs")
    if setup and setup.get("pytorch_device", "cpu") != "cpu":
        how += f" (PyTorch on {setup['pytorch_device']})"
    untimed = [r["backend"] for r in rows if not r["latency"]]
    return (f"Latency in ms on {machine}: {how}"
            + (f"; not timed (-): {', '.join(untimed)} (fake-quant models measure accuracy, not speed)"
               if untimed else ""))


def _not_measurable_lines(rows: list[dict]) -> list[str]:
    """A detector whose FP32 model finds no confident box: every agreement is unmeasurable, and so are its mAPs'
    meaning (an untrained model); say so rather than show 100% agreement."""
    reference = backends.reference_name()
    fp32 = next((r for r in rows if r["backend"] == reference), None)
    compared = [r["metrics"]["box_agreement_compared"] for r in rows
                if r["backend"] != reference and "box_agreement_compared" in r["metrics"]]
    if fp32 is None or not compared or any(compared):
        return []
    return ["**Box agreement is not measurable:** the FP32 model finds no box with score >= 0.25 on these images, "
            "so there is nothing for INT8 to agree with. A model with random weights (a model .yaml without "
            "trained weights) does this: its mAP and agreement say nothing about quantization.", ""]


def _per_class_section(run_dir: Path, metrics: dict) -> list[str]:
    """Per class mAP50-95 of FP32 and each INT8 backend, the classes that lose most first (detectors)."""
    backends_metrics = results_of(metrics).get("backends", {})
    fp32 = backends_metrics.get(backends.reference_name(), {}).get("metrics", {}).get("per_class")
    if not fp32:
        return []
    int8 = [b for b, row in backends.BACKENDS.items()
            if row.per_class and backends_metrics.get(b, {}).get("metrics", {}).get("per_class")]
    if not int8:
        return []
    per = {b: backends_metrics[b]["metrics"]["per_class"] for b in int8}

    def delta(name: str, b: str) -> float:
        return 100 * (per[b].get(name, {}).get("map50_95", 0.0) - fp32[name]["map50_95"])

    order = sorted(fp32, key=lambda name: min(delta(name, b) for b in int8))
    shown = order[:PER_CLASS_ROWS]
    head = ["Class", "Instances", "FP32 mAP50-95", "FP32 mAP50"] + [f"{backends.title(b)} Δ" for b in int8]
    lines = [f"## Per class (mAP50-95 change in points, x 100; the {len(shown)} of {len(fp32)} classes that lose most "
             "first; all in metrics.json)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in shown:
        cells = [md_text(name), str(fp32[name]["instances"]), f"{fp32[name]['map50_95']:.4f}",
                 f"{fp32[name]['map50']:.4f}"]
        cells += [f"{delta(name, b):+.2f}" for b in int8]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "A class with few instances moves by whole points when one box is found or missed.", ""]


PER_CLASS_ROWS = 20


def _timings_section(run_dir: Path, metrics: dict) -> list[str]:
    timings, peaks = metrics.get("timings_s", {}), metrics.get("peak_rss_mb", {})
    if not timings:
        return []
    lines = ["## Stage times and memory", "", "| Stage | Seconds | Peak memory after it, MB |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {_fmt(peaks.get(k), 0)} |" for k, v in timings.items()]
    if peaks:
        lines += ["", f"Peak resident memory of the run: {max(peaks.values()):.0f} MB (reused stages of a resumed run "
                      "are not measured again)."]
    return lines + [""]


def deploy_line(manifest: dict) -> str:
    """The console's last word on a run: the file to deploy (deploy.py's manifest), its size and speed-up."""
    speed = f", {manifest['speedup_b1']:.2f}x the speed of {manifest['fp32_backend']} at batch 1" if (
        manifest.get("speedup_b1")) else ""
    size = f", {manifest['size_mb']:.2f} MB" if manifest.get("size_mb") else ""
    checked = "" if manifest.get("verified") is not False else " (UNVERIFIED: built with the guard off)"
    return f"deploy: {manifest['files'][0]} ({manifest['backend']}{size}{speed}){checked}"


def print_summary(run_dir: str | Path, console) -> None:
    from rich.table import Table

    metrics = load_metrics(run_dir)
    rows = backend_rows(metrics)
    metric = headline(_task(metrics), rows)
    table = Table(title=f"{metrics.get('recipe')}: {metrics.get('status')}")
    table.add_column("backend")
    table.add_column(metric.short if metric else "metric", justify="right")
    confidence = next((r["delta"]["confidence"] for r in rows if r["delta"]), None)
    if confidence:
        table.add_column(f"Δ vs FP32 [{100 * confidence:.0f}% CI]", justify="right")
    table.add_column("size MB", justify="right")
    batch_keys = _latency_keys(rows)  # only the batch sizes timed: no column of n/a
    for key in batch_keys:
        table.add_column(f"{key} ms", justify="right")
    for r in rows:
        value = r["metrics"].get(metric.key) if metric else None
        delta = [_interval(r["delta"]) if r["backend"] != backends.reference_name() else "-"] if confidence else []
        name = r["backend"] + (" (unverified)" if r["verified"] is False else "") + (
            " (not for deployment)" if r["not_for_deployment"] else "")
        table.add_row(name, _fmt(value, metric.digits if metric else 2), *delta, _fmt(r["size_mb"]),
                      *[_fmt(r["latency"].get(k)) if k in r["latency"] else "-" for k in batch_keys])
    if batch_keys:
        table.caption = _latency_caption(metrics, rows)
    if rows:
        console.print(table)
        for r in rows:
            if r["not_for_deployment"]:
                console.print(f"  {r['backend']}: {r['not_for_deployment']}", markup=False, highlight=False)
    for line in _not_measurable_lines(rows):
        if line:
            console.print(line.replace("**", ""))
    short = in_short(metrics)
    if short:
        console.print("in short: " + " ".join(short), markup=False, highlight=False)
    if isinstance(metrics.get("deploy"), dict):
        console.print(deploy_line(metrics["deploy"]), markup=False, highlight=False)
    for warning in map(warning_text, metrics.get("warnings", [])):
        console.print(f"warning: {warning}", markup=False)
    from .stages import STAGES

    for stage in STAGES.values():  # each stage's own lines, by its registration
        for line in stage.console(metrics) if stage.console else []:
            console.print(line)
    console.print(f"run directory: {run_dir}")
