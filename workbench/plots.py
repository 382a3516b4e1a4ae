"""Every figure the workbench writes: one PNG per function, saved atomically through `save_figure`.

matplotlib is imported by each function (the Agg backend: no display is needed), so importing this
module costs nothing until a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path

from .io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as a PNG, atomically, and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)
    return Path(path)


def plot_throughput(path, results: dict, batch_sizes: list[int]) -> Path:
    """Images/s per artifact and batch size (bench.png, `workbench bench --plot`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(results)
    width = 0.8 / max(1, len(batch_sizes))
    for i, b in enumerate(batch_sizes):
        ax.bar([k + i * width for k in range(len(names))],
               [results[n]["latency"][f"b{b}"]["images_per_s"] for n in names], width, label=f"batch {b}")
    ax.set_xticks([k + width * (len(batch_sizes) - 1) / 2 for k in range(len(names))], names, rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylabel("images / s")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_history(path, history: list[dict], title: str, baselines: dict[str, float] | None = None) -> Path | None:
    """Loss (and the evaluation metric, when measured) per epoch of a training stage; `baselines` (e.g. the PTQ
    model the QAT started from, FP32) are horizontal lines on the metric's panel, measured on the same images."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    has_eval = all("eval" in h for h in history)
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(10 if has_eval else 5, 3.4), squeeze=False)
    axes[0][0].plot(epochs, [h["loss"] for h in history], marker="o")
    axes[0][0].set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss")
    if has_eval:
        ax = axes[0][1]
        ax.plot(epochs, [h["eval"]["value"] for h in history], marker="o", color="#C44E52", label=title)
        for (name, value), style in zip((baselines or {}).items(), ("--", ":", "-.")):
            ax.axhline(value, linestyle=style, color="#555555", label=f"{name}: {value:.2f}")
        ax.set_xlabel("epoch")
        samples = history[0]["eval"].get("samples")
        ax.set_ylabel(history[0]["eval"]["metric"] + (f" ({samples} images)" if samples else ""))
        if baselines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sensitivity(path, rows: list[dict], metric_name: str | None, confidence: float = 0.95) -> Path:
    """The most sensitive layers, in the table's ranking, top to bottom: each one-at-a-time task-metric delta with
    its interval (grey where it holds 0: within noise, ranked by the proxy), and the SQNR proxy."""
    from .quant.sensitivity import proxy_sensitivity

    plt = _pyplot()
    names = [r["layer"] for r in rows]
    has_task = metric_name and any("only_delta" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_task else 1, figsize=(12 if has_task else 6, 0.32 * len(rows) + 1.6),
                             squeeze=False)
    y = list(range(len(rows)))
    if has_task:
        ax = axes[0][0]
        deltas = [r.get("only_delta", 0.0) for r in rows]
        colours = ["#C44E52" if r.get("only_resolved") else "#BBBBBB" for r in rows]
        ax.barh(y, deltas, color=colours)
        if all("only_delta_low" in r for r in rows):
            low = [r["only_delta"] - r["only_delta_low"] for r in rows]
            high = [r["only_delta_high"] - r["only_delta"] for r in rows]
            ax.errorbar(deltas, y, xerr=[low, high], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel(f"{metric_name}, only this layer INT8, vs FP32\n"
                      f"({100 * confidence:.0f}% interval; grey: within noise)")
    ax = axes[0][-1]
    only = "only_sqnr_db" in rows[0]
    values = [max(-proxy_sensitivity(r), 0) if only else proxy_sensitivity(r) for r in rows]
    ax.barh(y, [v if math.isfinite(v) else 0 for v in values], color="#4C72B0")
    ax.set_xlabel("SQNR with only this layer INT8, dB (lower hurts more)" if only
                  else "output SQNR when this layer stays float, dB")
    for ax in axes[0]:
        ax.set_yticks(y, names if ax is axes[0][0] else [""] * len(y), fontsize=8)
        ax.invert_yaxis()
    ranked = sum(1 for r in rows if r.get("ranked_by") == "task")
    fig.suptitle(f"The {len(rows)} most sensitive layers, ranked by the task metric where it resolves them "
                 f"({ranked}) and by the proxy below")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_accuracy_latency(path, names: list[str], values: list[float | None], label: str,
                          latency_ms: list[float | None]) -> Path:
    """Each backend's headline metric beside its batch-1 latency (accuracy_latency.png)."""
    return save_figure(accuracy_latency_figure(names, values, label, latency_ms), path, dpi=110)


def accuracy_latency_figure(names: list[str], values: list[float | None], label: str,
                            latency_ms: list[float | None]):
    """The figure of `plot_accuracy_latency`. The metric's axis spans the values, not 0 to the maximum: 79.6
    against 80.6 must look different. Latency shows only the backends timed, on a log axis where one backend
    (PyTorch eager) is many times slower than the rest, each bar labelled with its value."""
    plt = _pyplot()
    timed = [(n, t) for n, t in zip(names, latency_ms) if t]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 0.45 * len(names) + 1.4),
                             squeeze=False)
    ax = axes[0][0]
    scored = [(n, v) for n, v in zip(names, values) if v is not None]
    ax.barh([n for n, _ in scored], [v for _, v in scored], color="#4C72B0")
    if scored:
        low, high = min(v for _, v in scored), max(v for _, v in scored)
        pad = max(0.25 * (high - low), 1e-3 * abs(high), 1e-4)
        ax.set_xlim(low - 3 * pad, high + 2 * pad)
        for n, v in scored:
            ax.annotate(f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}", (v, n), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel(f"{label} (axis starts at {ax.get_xlim()[0]:.3g}, not 0)")
    ax.invert_yaxis()
    if timed:
        ax = axes[0][1]
        times = [t for _, t in timed]
        ax.barh([n for n, _ in timed], times, color="#DD8452")
        if max(times) / min(times) > 20:
            ax.set_xscale("log")
        for n, t in timed:
            ax.annotate(f"{t:.3g}", (t, n), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlim(right=max(times) * (3 if ax.get_xscale() == "log" else 1.15))
        ax.set_xlabel("latency, batch 1, median ms" + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.invert_yaxis()
    fig.tight_layout()
    return fig
