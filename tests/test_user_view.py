"""What a user sees: progress in logs, the console table, the plots' axes, the HTML report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_recipe
from helpers import TinyCNN, make_image_folder
from rich.console import Console

from workbench import api
from workbench.plots import accuracy_latency_figure, plot_history
from workbench.progress import current_stage, track

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# ---------------------------------------------------------------------------------------------------------
# progress off a terminal: a line per step at a steady interval, and a summary that stays in the log
# ---------------------------------------------------------------------------------------------------------


def test_progress_off_a_terminal_prints_stage_counts_elapsed_and_eta(monkeypatch, capsys):
    monkeypatch.delenv("WORKBENCH_NO_PROGRESS", raising=False)
    monkeypatch.setenv("WORKBENCH_PROGRESS_INTERVAL", "0")
    token = current_stage.set("stage 2/3 calibrate")
    try:
        seen = list(track(range(4), "calibrate (mse)", status=lambda: "loss 0.5"))
    finally:
        current_stage.reset(token)
    assert seen == [0, 1, 2, 3]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "stage 2/3 calibrate | calibrate (mse): started, 4 steps"
    for done, line in zip((1, 2, 3), lines[1:4]):
        assert re.fullmatch(rf"stage 2/3 calibrate \| calibrate \(mse\): {done}/4 \({25 * done}%\), "
                            r"elapsed \d+:\d\d, ETA \d+:\d\d, loss 0.5", line), line
    assert re.fullmatch(r"stage 2/3 calibrate \| calibrate \(mse\): 4 steps in \d+:\d\d \(\d+ ms/step\), loss 0.5",
                        lines[4]), lines[4]
    assert len(lines) == 5


def test_progress_interval_spaces_the_lines_and_an_early_stop_is_summarised(monkeypatch, capsys):
    monkeypatch.delenv("WORKBENCH_NO_PROGRESS", raising=False)
    monkeypatch.setenv("WORKBENCH_PROGRESS_INTERVAL", "3600")
    for i in track(range(10), "evaluate"):
        if i == 3:
            break
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "evaluate: started, 10 steps"
    assert re.fullmatch(r"evaluate: 3 of 10 steps in \d+:\d\d \(\d+ ms/step\)", lines[1]), lines
    assert len(lines) == 2  # no per-step lines within the hour-long interval


def test_progress_is_silent_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_NO_PROGRESS", "1")
    assert list(track(range(3), "evaluate")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_run_under_nohup_logs_each_stage_and_its_steps(tmp_path):
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_NO_PROGRESS"}
    env.update(PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", WORKBENCH_PROGRESS_INTERVAL="0")
    done = subprocess.run([sys.executable, "-m", "workbench", "run", str(recipe)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = done.stderr
    assert re.search(r"^stage 1/3 calibrate \| calibrate \(max\): started, 3 steps$", log, re.M), log
    assert re.search(r"^stage 1/3 calibrate \| calibrate \(max\): 3 steps in ", log, re.M), log
    assert re.search(r"^stage 3/3 evaluate \| evaluate fp32: 1/5 \(20%\), elapsed .*, ETA ", log, re.M), log
    assert "No CUDA runtime" not in log and "FutureWarning" not in log


# ---------------------------------------------------------------------------------------------------------
# the numbers a run shows: only what was measured, every backend timed under the same thread count
# ---------------------------------------------------------------------------------------------------------


class ThreadProbe(TinyCNN):
    """TinyCNN that records the stage and PyTorch's intra-op thread count at every forward (timing included)."""

    seen: list[tuple[str, int]] = []

    def forward(self, x):
        ThreadProbe.seen.append((current_stage.get(), torch.get_num_threads()))
        return super().forward(x)


def thread_probe(num_classes: int = 3) -> ThreadProbe:
    return ThreadProbe(num_classes).eval()


def _run(tmp_path: Path, evaluate: str, model: str = "helpers:tiny_cnn"):
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    stages = f"  - calibrate: {{method: max}}\n  - export: {{}}\n  - evaluate: {evaluate}\n"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", model))
    console = Console(record=True, width=200)
    run = api.run(recipe, console=console)
    return run, " ".join(console.export_text().split())  # the caption wraps at the table's width


def test_every_backend_is_timed_under_the_same_thread_count_and_the_table_says_so(tmp_path):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    ThreadProbe.seen.clear()
    run, text = _run(tmp_path, f"{{latency_repeats: 3, latency_batch_sizes: [1], threads: {other}}}",
                     model="test_user_view:thread_probe")
    # scoring and timing alike, not PyTorch's own default
    assert {threads for stage, threads in ThreadProbe.seen if stage.endswith("evaluate")} == {other}
    assert torch.get_num_threads() == before  # and restored after the stage
    setup = run.metrics["stages"]["evaluate"]["latency_setup"]
    assert setup["threads"] == other and setup["repeats"] == 3
    assert f"median of 3 timed runs, {other} CPU thread{'s' if other > 1 else ''} for every backend" in text
    assert "b1 ms" in text and "b8 ms" not in text  # only the batch size timed gets a column
    assert "not timed (-): pytorch_int8" in text
    report = (run.dir / "report.md").read_text()
    assert f"{other} CPU thread{'s' if other > 1 else ''} for every backend" in report


def test_a_run_without_latency_shows_no_latency_column_or_sentence(tmp_path):
    run, text = _run(tmp_path, "{latency: false}")
    assert " ms" not in text.split("run directory")[0]
    report = (run.dir / "report.md").read_text()
    assert "Accuracy and size (latency not measured)" in report
    assert "Latency in ms" not in report and "median (p90) ms" not in report
    assert "latency_setup" not in run.metrics["stages"]["evaluate"]


# ---------------------------------------------------------------------------------------------------------
# plots: axes that show the differences measured, and only what was measured
# ---------------------------------------------------------------------------------------------------------


def test_accuracy_axis_spans_the_values_and_latency_omits_untimed_backends():
    names = ["pytorch_fp32", "pytorch_int8", "ort_fp32", "ort_int8_native"]
    fig = accuracy_latency_figure(names, [80.6, 79.6, 80.6, 79.8], "top-1 %", [164.0, None, 0.56, 0.4])
    accuracy, latency = fig.axes
    low, high = accuracy.get_xlim()
    assert 78.0 < low < 79.6 and 80.6 < high < 82.0  # 79.6 against 80.6 is a visible difference, not 0..80
    assert [t.get_text() for t in latency.get_yticklabels()] == ["pytorch_fp32", "ort_fp32", "ort_int8_native"]
    assert latency.get_xscale() == "log"  # PyTorch's 164 ms does not flatten the others' bars
    fig = accuracy_latency_figure(names[2:], [0.354, 0.367], "mAP50-95", [1.0, 1.3])
    assert fig.axes[0].get_xlim()[0] > 0.3 and fig.axes[1].get_xscale() == "linear"
    assert len(accuracy_latency_figure(names[:2], [80.0, 79.0], "top-1 %", [None, None]).axes) == 1


def test_training_curve_draws_its_baselines(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: drawn.update(lines=[(ln.get_label(), list(ln.get_ydata()))
                                                                 for ax in fig.axes for ln in ax.get_lines()]))
    history = [{"epoch": e, "loss": 1.0 / e, "eval": {"metric": "top-1 %", "value": v, "samples": 500}}
               for e, v in ((1, 89.0), (2, 90.5))]
    plot_history(tmp_path / "curve.png", history, "QAT", {"PTQ (before QAT)": 88.1, "FP32": 91.7})
    labels = dict(drawn["lines"])
    assert labels["PTQ (before QAT): 88.10"] == [88.1, 88.1]
    assert labels["FP32: 91.70"] == [91.7, 91.7]
    assert labels["QAT"] == [89.0, 90.5]
