"""The run report (report.md + plot) and the one-screen console summary.

Both read only the run directory (metrics.json), so a finished run can be
re-reported, or read by the notebook, without re-running anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import printable
from .io import write_text
from .plots import plot_accuracy_latency
from .report_html import render_html
from .runtime import backends
from .tasks import Metric, Task, get_task

MARKDOWN_SPECIAL = "\\`*_|<>[]#"


def md_text(text: object) -> str:
    """Text from the user's files (a class, layer or node name) as literal markdown: its special characters
    backslash-escaped, so a `|` cannot add a table column, nor `<script>` or `**` change the page; newlines and
    control characters (ESC) written as escapes, so a name cannot end a table row or recolour a terminal."""
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in printable(str(text), keep=""))


def md_name(name: object) -> str:
    """A name as inline code where it can be (no backtick or pipe in it), else as escaped text."""
    name = printable(str(name), keep="")
    return f"`{name}`" if not any(c in name for c in "`|") else md_text(name)


def load_metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _task(metrics: dict) -> Task:
    return get_task(metrics.get("task", "classification"))


def backend_rows(metrics: dict) -> list[dict]:
    """One row per evaluated backend: its metrics, size and latency."""
    evaluation = metrics.get("stages", {}).get("evaluate", {})
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
                "verified": entry.get("verified"),  # engines: whether the build's guard passed it
                "engine_check": entry.get("engine_check"),  # engines: agreement with their graph, every image
                "conversion_check": entry.get("conversion_check"),  # the graph an engine is compiled from vs faithful
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
    for section in (_backends_section, _per_class_section, _calibration_section, _prune_section, _qat_section,
                    _sensitivity_section, _export_section, _bench_section, _build_section, _timings_section):
        lines += section(run_dir, metrics)
    path = run_dir / "report.md"
    text = "\n".join(lines)
    write_text(path, text)
    write_text(run_dir / "report.html", render_html(text, run_dir))  # the same, one file with its plots inlined
    return path


def warning_text(warning: dict | str) -> str:
    """A warning of metrics.json: {"stage", "message"} (runs before the stage was recorded: the message alone)."""
    return warning["message"] if isinstance(warning, dict) else warning


def in_short(metrics: dict) -> list[str]:
    """The run in a few sentences: the INT8 engine a deployment would use against FP32, by size, speed and how
    closely it follows FP32 (the console prints them under the table, the report above it)."""
    rows = {r["backend"]: r for r in backend_rows(metrics)}
    task = _task(metrics)

    def deployed(precision: str) -> list[dict]:
        return [r for name, r in rows.items() if name in backends.BACKENDS and backends.BACKENDS[name].deploys
                == precision]

    def fastest(candidates: list[dict]) -> dict | None:
        timed = [r for r in candidates if r["latency"].get("b1")]
        return min(timed, key=lambda r: r["latency"]["b1"]) if timed else None

    int8_rows, fp32_rows = deployed("int8"), deployed("fp32")
    int8 = fastest(int8_rows) or (int8_rows[0] if int8_rows else None)
    if int8 is None:
        return []
    fp32 = fastest(fp32_rows)
    lines = []
    fp32_file = rows.get("ort_fp32") or rows.get("pytorch_fp32")
    size = ""
    if int8["size_mb"] and fp32_file and fp32_file["size_mb"]:
        ratio = fp32_file["size_mb"] / int8["size_mb"]
        size = (f": {int8['size_mb']:.2f} MB against {fp32_file['size_mb']:.2f} MB in FP32 ("
                + (f"{ratio:.1f}x smaller)" if ratio >= 1 else f"{1 / ratio:.1f}x larger)"))
    lines.append(f"INT8 engine `{int8['backend']}`{size}.")
    if int8["latency"].get("b1") and fp32 is not None:
        ratio = fp32["latency"]["b1"] / int8["latency"]["b1"]
        lines.append(f"At batch 1 it takes {int8['latency']['b1']:.2f} ms against {fp32['latency']['b1']:.2f} ms for "
                     f"the fastest FP32 backend (`{fp32['backend']}`): "
                     + (f"{ratio:.2f}x faster." if ratio >= 1 else f"{1 / ratio:.2f}x slower."))
    metric = headline(task, list(rows.values()))
    reference = rows.get("pytorch_fp32")
    if metric is not None and metric.key in int8["metrics"] and reference and metric.key in reference["metrics"]:
        d = int8["delta"]
        delta = (f" (a difference of {_interval(d)} points, {100 * d['confidence']:.0f}% interval)" if d else "")
        # A sentence starts with a capital, except a name written with its own case (mAP50-95, not MAP50-95).
        name = metric.short if metric.short[1:2].isupper() else metric.short[:1].upper() + metric.short[1:]
        lines.append(f"{name}: {_fmt(int8['metrics'][metric.key], metric.digits)} "
                     "against FP32's "
                     f"{_fmt(reference['metrics'][metric.key], metric.digits)}{delta}.")
    samples = metrics.get("stages", {}).get("evaluate", {}).get("samples", 0)
    return lines + task.fidelity_sentences(int8["metrics"], samples)


def _backends_section(run_dir: Path, metrics: dict) -> list[str]:
    rows = backend_rows(metrics)
    if not rows:
        return []
    evaluation = metrics["stages"]["evaluate"]
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
        cells += [_interval(r["delta"]) if r["backend"] != "pytorch_fp32" else "-"] if deltas else []
        cells += [_fmt(r["size_mb"])]
        cells += [f"{_fmt(r['latency'].get(k))} ({_fmt(r['latency_p90'].get(k))})" if k in r["latency"] else "-"
                  for k in batch_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if confidence:
        samples = next(r["delta"]["samples"] for r in rows if r["delta"])
        lines += [f"Each difference is the headline metric minus FP32's on the same {samples} images, with a paired "
                  "bootstrap interval over them: an interval that holds 0 says these images cannot tell the two "
                  "apart.", ""]
    for row in rows:
        if row["delta_ptq"]:
            lines += [f"{row['title']} after QAT against the PTQ model it started from: "
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
        lines += [f"Per image, as Ultralytics splits it: pre-process {speed['preprocess']:.2f} ms "
                  f"({task.preprocess_steps}), inference the backend's batch-1 latency above, post-process "
                  f"{speed['postprocess']:.2f} ms ({task.postprocess_steps}), on {speed['images']} images.", ""]
    if batch_keys:
        lines += [_latency_caption(metrics, rows) + ".", ""]
    if any(k in r["latency"] for r in rows for k in batch_keys if r["backend"] == "ort_int8_default"):
        lines += ["The TensorRT-style Q/DQ graph keeps FP32 weights behind DequantizeLinear and Relu between Conv and "
                  "QuantizeLinear, which ONNX Runtime cannot fuse into its integer kernels: it is the artifact for "
                  "TensorRT, and its ONNX Runtime latency is not an INT8 engine's."
                  + (" The CPU deployment artifacts are the ONNX Runtime flavour (`ort_int8_native`)"
                     + (" and the OpenVINO engine (`openvino_int8`)." if "openvino_int8" in evaluation["backends"]
                        else ".") if "ort_int8_native" in evaluation["backends"] else ""), ""]
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
    setup = metrics.get("stages", {}).get("evaluate", {}).get("latency_setup")
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
    fp32 = next((r for r in rows if r["backend"] == "pytorch_fp32"), None)
    compared = [r["metrics"]["box_agreement_compared"] for r in rows
                if r["backend"] != "pytorch_fp32" and "box_agreement_compared" in r["metrics"]]
    if fp32 is None or not compared or any(compared):
        return []
    return ["**Box agreement is not measurable:** the FP32 model finds no box with score >= 0.25 on these images, "
            "so there is nothing for INT8 to agree with. A model with random weights (an Ultralytics .yaml without "
            "trained weights) does this: its mAP and agreement say nothing about quantization.", ""]


def _per_class_section(run_dir: Path, metrics: dict) -> list[str]:
    """Per class mAP50-95 of FP32 and each INT8 backend, the classes that lose most first (detectors)."""
    backends_metrics = metrics.get("stages", {}).get("evaluate", {}).get("backends", {})
    fp32 = backends_metrics.get("pytorch_fp32", {}).get("metrics", {}).get("per_class")
    if not fp32:
        return []
    int8 = [b for b in ("pytorch_int8", "ort_int8_faithful", "ort_int8_native", "openvino_int8", "tensorrt")
            if backends_metrics.get(b, {}).get("metrics", {}).get("per_class")]
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
        + _algorithms_lines(cal)


def _algorithms_lines(cal: dict) -> list[str]:
    """The PTQ algorithms that ran in calibrate (quant/algorithms): in order, their time, what they changed (the
    largest relative L2 change of a layer's weight and bias), what they skipped and the metric after each."""
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


def _export_section(run_dir: Path, metrics: dict) -> list[str]:
    exp = metrics.get("stages", {}).get("export")
    if not exp:
        return []
    lines = ["## Exported ONNX", ""]
    for name, entry in exp.items():
        if "error" in entry:  # the ONNX Runtime flavour could not be written
            lines.append(f"- `{name}`: not written: {md_text(entry['error'])}")
        elif "skipped" in entry:  # not written for this target (quant/targets.py)
            lines.append(f"- `{name}`: not written: {md_text(entry['skipped'])}")
        elif "census" not in entry:
            lines += _ort_flavour_lines(name, entry)
        else:
            c = entry["census"]
            quantized = ", ".join(f"{v} {k}" for k, v in c["quantized"].items()) or "none"
            floating = ", ".join(f"{len(v)} {k}" for k, v in c["float"].items()) or "none"
            lines.append(
                f"- `{name}`: {entry['bytes'] / 1e6:.2f} MB, opset {c['opset']}, {c['QuantizeLinear']} QuantizeLinear "
                "/ "
                f"{c['DequantizeLinear']} DequantizeLinear; INT8 compute nodes: {quantized}; float compute nodes: "
                f"{floating}."
            )
            rules = entry.get("tensorrt_rules")
            if rules is not None:
                lines.append(f"  TensorRT Q/DQ rules (`workbench check-onnx`): {len(rules)} violation(s)"
                             + ("." if not rules else ":"))
                lines += [f"  - [{v['rule']}] {md_name(v['node'])}"
                          + (f" (module {md_name(v['module'])})" if v["module"] else "") + f": {md_text(v['message'])}"
                          for v in rules[:20]]
    return lines + [""]


def _ort_flavour_lines(name: str, entry: dict) -> list[str]:
    fused = ", ".join(f"{n} {op}" for op, n in entry["fused"].items())
    lines = [f"- `{name}`: {entry['bytes'] / 1e6:.2f} MB, the ONNX Runtime flavour: {entry['weights_folded']} "
             f"weights stored as 8-bit ({entry['weights']}: {entry['weights_unsigned']} unsigned, "
             f"{entry['weights_7bit']} 7-bit), {entry['absorbed']} Relu/Clip absorbed into quantization; "
             f"ONNX Runtime runs: {fused}."]
    in_float = entry["fused"].get("Conv", 0) + entry["fused"].get("FusedConv", 0)
    if in_float:
        lines.append(f"  {in_float} convolution(s) still run in float in ONNX Runtime: their outputs do not go "
                     "straight to a quantizer (an activation such as SiLU, a pooling head, the graph output), "
                     "so ONNX Runtime cannot make them QLinearConv."
                     + (" No convolution runs on integer kernels: for a CPU deployment `model_fp32.onnx` is faster."
                        if not entry["fused"].get("QLinearConv") else ""))
    return lines


def _bench_section(run_dir: Path, metrics: dict) -> list[str]:
    bench = metrics.get("stages", {}).get("bench")
    if not bench:
        return []
    keys = [f"b{b}" for b in bench["batch_sizes"]]
    lines = ["## Latency and size on this machine", "",
             f"{bench['repeats']} timed runs per batch size, {bench['threads']} CPU threads; "
             "median ms (p90), images/s.",
             "", "| Artifact | Size MB | " + " | ".join(f"{k} ms | {k} img/s" for k in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    for name, entry in bench["backends"].items():
        cells = [f"{_fmt(entry['latency'][k]['median_ms'])} ({_fmt(entry['latency'][k]['p90_ms'])}) | "
                 f"{entry['latency'][k]['images_per_s']:.0f}" for k in keys]
        unverified = " (unverified)" if entry.get("verified") is False else ""
        lines.append(f"| {backends.title(name)}{unverified} | {entry['bytes'] / 1e6:.2f} | " + " | ".join(cells)
                     + " |")
    return lines + ["", "![throughput](bench.png)", ""]


def _build_section(run_dir: Path, metrics: dict) -> list[str]:
    b = metrics.get("stages", {}).get("build")
    if not b:
        return []
    engine = b.get("engine", "tensorrt")
    title = "## TensorRT engine" if engine == "tensorrt" else "## OpenVINO (CPU)"
    if not b.get("built"):
        return [title, "", f"Not built: {b['reason']}", ""]
    if engine == "tensorrt":
        text = [f"`{b['engine_file']}`: TensorRT {b['tensorrt']} on {b['gpu']} (compute capability "
                f"{b['compute_capability']}), {'strongly' if b['strongly_typed'] else 'weakly'} typed, profile "
                f"{b['profile']}; layers by output precision: {b['layer_precisions']}. Sidecar: "
                f"`{b['engine_file']}.json`."]
    else:
        cpu = (b.get("int8") or b.get("fp32"))["cpu"]
        text = [f"OpenVINO {b['openvino']} on {cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags'])})."]
        for key in ("int8", "fp32"):
            if key in b:
                side = b[key]
                text.append(f"- `{side['ir']}` (from `{Path(side['onnx']).name}`): {side['int8']}."
                            + (f" {side['graph_note']}" if side.get("graph_note") else ""))
    guard = b.get("guard")
    if guard:
        text += ["", f"Guard: {_guard_sentence(guard)}"]
    elif b.get("verified") is False:
        text += ["", "Guard: off (guard: false): the engine is **unverified**; nothing checked that it computes its "
                 "graph's function."]
    return [title, ""] + text + [""]


def _guard_sentence(guard: dict) -> str:
    """What the build's guard measured and decided (older runs' records have no interval)."""
    drawn = " and ".join(f"{n} {split}" for split, n in guard.get("sources", {}).items() if n) or "calibration"
    if guard.get("agreement") is None:
        agree = "no agreement measurable"
    elif guard.get("low") is not None:
        agree = (f"{guard.get('criterion', 'agreement')} {guard['agreement']:.1f}% [{guard['low']:.1f}, "
                 f"{guard['high']:.1f}] ({100 * guard['confidence']:.0f}% interval; needs {guard['min_agreement']:g}%)")
    else:
        agree = f"{guard['agreement']:.2f}% agreement over {guard['compared']} compared"
    verdict = guard.get("verdict") or ("passed" if guard["passed"] else "refused")
    return (f"against `{guard.get('reference', 'the faithful graph')}` on {guard['samples']} images ({drawn}), "
            f"{agree}, output SQNR {guard['sqnr_db']:.1f} dB: {verdict}.")


def _timings_section(run_dir: Path, metrics: dict) -> list[str]:
    timings = metrics.get("timings_s", {})
    if not timings:
        return []
    return (["## Stage times", "", "| Stage | Seconds |", "|---|---|"]
            + [f"| {k} | {v:.1f} |" for k, v in timings.items()] + [""])


def _prune_section(run_dir: Path, metrics: dict) -> list[str]:
    stages = metrics.get("stages", {})
    p = stages.get("prune")
    if not p:
        return []
    lines = ["## Pruning", ""]
    if p["method"] == "structured":
        lines += ["| | Parameters | MMACs | ONNX MB | ORT latency b1 ms |", "|---|---|---|---|---|"]
        for key in ("before", "after"):
            size = p.get(f"onnx_bytes_{key}")
            lat = p.get(f"ort_latency_b1_ms_{key}")
            lines.append(f"| {key} | {p[f'params_{key}']:,} | {p[f'macs_{key}'] / 1e6:.1f} | "
                         f"{_fmt(size / 1e6 if size else None)} | {_fmt(lat)} |")
        lines += ["", f"Structured ({p['importance']} importance, channels rounded to {p['round_to']}): MACs "
                      f"x{p['macs_ratio']:.2f}"
                  + (f", ONNX Runtime {p['ort_speedup_b1']:.2f}x faster at batch 1." if "ort_speedup_b1" in p
                     else "."), ""]
    else:
        lines += [f"{p['method']}: {100 * p['sparsity']:.1f}% of {p['weights']:,} weights are zero ({p['layers']} "
                  f"layers). {p['note']}.", ""]
    ft = stages.get("finetune")
    if ft and ft.get("eval"):
        start = f"{_fmt(ft['eval_before']['value'])} after pruning, " if ft.get("eval_before") else ""
        fp32 = f", FP32 before pruning {_fmt(ft['eval_fp32']['value'])}" if ft.get("eval_fp32") else ""
        lines += [f"{ft['eval']['metric']} after each epoch, on {_subset(ft, metrics)}: {start}"
                  f"{_fmt(ft['eval']['value'])} after fine-tuning ({ft['epochs']} epochs){fp32}.", ""]
    if ft and (run_dir / "training_curve.png").is_file():
        lines += ["![fine-tuning curve](training_curve.png)", ""]
    return lines


def _subset(stage: dict, metrics: dict) -> str:
    """Which images a training stage's per-epoch score is on, against the evaluate stage's table."""
    samples = stage["eval"].get("samples")
    table = metrics.get("stages", {}).get("evaluate", {}).get("samples")
    if samples is None:
        return "the evaluation subset"
    if table is not None and table != samples:
        return (f"{samples} evaluation images drawn with seed 0 (the table above uses all {table}, so its numbers "
                "differ)")
    return f"the {samples} evaluation images"


def _qat_section(run_dir: Path, metrics: dict) -> list[str]:
    q = metrics.get("stages", {}).get("qat")
    if not q:
        return []
    lines = ["## Quantization-aware training", ""]
    if q.get("eval") and q.get("eval_before"):
        lines.append(f"{q['eval']['metric']} after each epoch, on {_subset(q, metrics)}: PTQ "
                     f"{_fmt(q['eval_before']['value'])}, after {q['epochs']} QAT epochs {_fmt(q['eval']['value'])}"
                     + (f", FP32 {_fmt(q['eval_fp32']['value'])}" if q.get("eval_fp32") else "") + ".")
    per_epoch = q.get("seconds_per_epoch") or []
    if per_epoch:
        lines.append(f"{sum(per_epoch) / len(per_epoch):.1f} s per epoch. FP32, PTQ and QAT side by side, in PyTorch "
                     "and "
                     "ONNX Runtime: the accuracy table above. Loss and metric per epoch: `training_curve_qat.png`.")
    lines += ["", "![QAT training curve](training_curve_qat.png)", ""]
    return lines


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
        delta = [_interval(r["delta"]) if r["backend"] != "pytorch_fp32" else "-"] if confidence else []
        name = r["backend"] + (" (unverified)" if r["verified"] is False else "")
        table.add_row(name, _fmt(value, metric.digits if metric else 2), *delta, _fmt(r["size_mb"]),
                      *[_fmt(r["latency"].get(k)) if k in r["latency"] else "-" for k in batch_keys])
    if batch_keys:
        table.caption = _latency_caption(metrics, rows)
    if rows:
        console.print(table)
    for line in _not_measurable_lines(rows):
        if line:
            console.print(line.replace("**", ""))
    short = in_short(metrics)
    if short:
        console.print("in short: " + " ".join(short), markup=False, highlight=False)
    for warning in map(warning_text, metrics.get("warnings", [])):
        console.print(f"warning: {warning}", markup=False)
    cal = metrics.get("stages", {}).get("calibrate")
    if cal:
        plan = metrics.get("stages", {}).get("mixed_precision", {}).get("census")  # as the report's census
        census = ", ".join(f"{t}: {c['int8']} INT8 / {c['float']} float" for t, c in (plan or cal["census"]).items())
        console.print(f"quantized layers: {census}")
    console.print(f"run directory: {run_dir}")
