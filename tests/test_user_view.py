"""What a user sees: progress in logs, the console table, the plots' axes, the HTML report."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from helpers import TinyCNN, make_image_folder
from PIL import Image
from rich.console import Console

from workbench import api
from workbench.errors import WorkbenchError
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
    # timing every backend reports progress too: one step per backend and batch size, not minutes of silence
    timed = re.search(r"^stage 3/3 evaluate \| latency \(backends x batch sizes\): started, (\d+) steps$", log, re.M)
    assert timed and int(timed[1]) >= 3, log  # PyTorch FP32, fake-quant, ONNX Runtime ... at batch 1
    assert re.search(rf"^stage 3/3 evaluate \| latency \(backends x batch sizes\): 1/{timed[1]} ", log, re.M), log
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
    # ONNX Runtime's sessions get the same count (evaluate opens them through the backend table, as here)
    from workbench.runtime import backends

    make, _ = backends.file_artifact(run.dir / "model.onnx", threads=other)
    assert make().session.get_session_options().intra_op_num_threads == other


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


# ---------------------------------------------------------------------------------------------------------
# the run in short: the INT8 engine against FP32, and agreement where FP32 is confident
# ---------------------------------------------------------------------------------------------------------


def test_agreement_where_fp32_is_confident_leaves_out_its_guesses():
    from workbench.tasks.classification import ClassificationScorer

    reference = np.array([[5.0, 0.0, 0.0],    # confident: class 0
                          [0.1, 0.0, 0.05],   # a guess: class 0 at ~35%
                          [0.0, 0.0, 4.0],    # confident: class 2
                          [0.0, 0.1, 0.05]])  # a guess: class 1
    int8 = np.array([[4.0, 0.0, 0.0],         # agrees
                     [0.0, 0.1, 0.05],        # flips the guess
                     [0.0, 3.0, 0.0],         # disagrees where FP32 is sure
                     [0.1, 0.0, 0.05]])       # flips the guess
    scorer = ClassificationScorer(labeled=False)
    scorer.update(int8, reference=reference)
    result = scorer.result()
    assert result["agreement_top1"] == 25.0
    assert result["confident_samples"] == 2 and result["agreement_confident"] == 50.0


def test_the_console_says_in_short_what_int8_gives(tmp_path):
    run, text = _run(tmp_path, "{latency_repeats: 3, latency_batch_sizes: [1]}")
    rows = run.metrics["stages"]["evaluate"]["backends"]
    assert "in short: INT8 engine `ort_int8_native`" in text
    fp32_mb, int8_mb = rows["ort_fp32"]["size_bytes"] / 1e6, rows["ort_int8_native"]["size_bytes"] / 1e6
    assert f"{int8_mb:.2f} MB against {fp32_mb:.2f} MB in FP32" in text
    # eager PyTorch is the accuracy reference, not a deployment: the exported FP32 graph is what INT8 is timed against
    assert "for the fastest FP32 backend (`ort_fp32`)" in text
    report = (run.dir / "report.md").read_text()
    for reference in ("pytorch_fp32", "ort_int8_faithful", "ort_int8_default"):
        assert f"{reference} (not for deployment)" in text, text
        assert f"- `{reference}` is no deployment candidate: " in report
    assert "ort_int8_native (not for deployment)" not in text and "`ort_int8_native` is no" not in report
    confident = rows["ort_int8_native"]["metrics"]["confident_samples"]
    assert "where FP32 is confident" in text if confident else "of all 18 images" in text
    assert "## In short" in (run.dir / "report.md").read_text()
    # per_image.npz: what a comparison of two runs pairs on, image by image
    per_image = np.load(run.dir / "per_image.npz")
    for backend in ("pytorch_fp32", "ort_int8_native"):
        correct = per_image[f"{backend}.correct"]
        assert len(correct) == 18 and 100 * correct.mean() == pytest.approx(rows[backend]["metrics"]["top1"])
        assert per_image[f"{backend}.predicted"].shape == (18,)


# ---------------------------------------------------------------------------------------------------------
# report.html: one self-contained page, checked in a real browser
# ---------------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No network at all: every host resolves to nothing, background services off.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--no-first-run"]


def _full_run(tmp_path: Path):
    """A run with every section report.html shows: pruning and its curve, calibration, sensitivity, the plan,
    QAT and its curve, the exports, the backend table and its plot."""
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "full.yaml"
    recipe.write_text(f"""name: full
model: {{spec: "import:helpers:trained_cnn", input_size: [3, 32, 32], trust_code: true}}
data:
  calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}
  evaluation: {{source: imagefolder, path: "{images}"}}
  finetune: {{source: imagefolder, path: "{images}"}}
  batch_size: 6
runs_dir: "{tmp_path / 'runs'}"
stages:
  - prune: {{method: structured, ratio: 0.25, latency: false}}
  - finetune: {{epochs: 2, eval_samples: 18}}
  - calibrate: {{method: max}}
  - sensitivity: {{proxy_samples: 4, task_samples: 18}}
  - mixed_precision: {{max_drop: 10}}
  - qat: {{epochs: 2, eval_samples: 18}}
  - export: {{}}
  - evaluate: {{latency_repeats: 2, latency_batch_sizes: [1]}}
""")
    return api.run(recipe, console=Console(quiet=True))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs Debian's chromium "
                                              "package; it could not here)")
def test_report_html_renders_its_tables_and_plots_in_headless_chromium(tmp_path):
    run = _full_run(tmp_path)
    page = run.dir / "report.html"
    url = page.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    headings = re.findall(r"<h2>([^<]*)</h2>", dom)
    for section in ("In short", "Pruning", "Calibration", "Layer sensitivity", "Mixed precision",
                    "Quantization-aware training", "Exported ONNX"):
        assert section in headings, headings
    assert any(h.startswith("Accuracy, size, latency") for h in headings)
    tables = re.findall(r"<table>.*?</table>", dom, re.S)
    backend_table = next(t for t in tables if "FP32 (PyTorch)" in t)
    assert "INT8 ONNX Runtime flavour" in backend_table and backend_table.count("<tr>") >= 8
    assert any("conv1" in t and "SQNR" in t for t in tables)  # the per-layer sensitivity table
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', dom)
    assert set(images) >= {"accuracy and latency", "fine-tuning curve", "QAT training curve", "layer sensitivity"}
    assert not re.search(r'(src|href)="(?!data:)', dom)  # nothing loaded from a file or the network

    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, "--window-size=1280,7000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)

    def share(rgb):  # of the page's pixels within a few levels of a colour
        return float((np.abs(pixels - rgb).max(1) <= 6).mean())

    assert share((0x4C, 0x72, 0xB0)) > 0.002  # the plots' blue bars were decoded and drawn
    assert share((0xDD, 0x84, 0x52)) > 0.0005  # the latency panel's orange bars
    assert share((0xEE, 0xF2, 0xF8)) > 0.0005  # table header cells: the page's own style was applied


def test_report_html_escapes_text_and_inlines_only_the_runs_own_pngs(tmp_path):
    from workbench.report_html import render_html

    (tmp_path / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 16)
    (tmp_path / "fake.png").write_bytes(b"<script>alert(1)</script>")
    outside = tmp_path.parent / "outside.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n")
    text = ("# Run report: <script>alert(1)</script>\n\n| class | mAP |\n|---|---|\n| <img src=x onerror=alert(1)> "
            "| 0.5 |\n\n![ok](plot.png)\n\n![fake](fake.png)\n\n![up](../outside.png)\n\n`<b>` and **bold**\n")
    page = render_html(text, tmp_path)
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("data:image/png;base64,") == 1  # plot.png only
    assert "fake.png is not a PNG of the run" in page and "../outside.png is not in the run directory" in page
    assert "<code>&lt;b&gt;</code>" in page and "<strong>bold</strong>" in page


# ---------------------------------------------------------------------------------------------------------
# optional tracking: TensorBoard and MLflow get the per-epoch metrics and the final table
# ---------------------------------------------------------------------------------------------------------

QAT_STAGES = ("  - calibrate: {method: max}\n  - qat: {epochs: 2, eval_samples: 18}\n  - export: {}\n"
              "  - evaluate: {latency_repeats: 2, latency_batch_sizes: [1]}\n")


def _qat_run(tmp_path: Path, log_to: str):
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    text = tiny_recipe(images, tmp_path / "runs", QAT_STAGES).replace("helpers:tiny_cnn", "helpers:trained_cnn")
    finetune = f'  finetune: {{source: imagefolder, path: "{images}"}}\n'
    text = text.replace("  batch_size: 4\n", "  batch_size: 6\n" + finetune)
    recipe.write_text(text + f"log_to: [{log_to}]\n")
    return api.run(recipe, console=Console(quiet=True))


def test_log_to_tensorboard_writes_each_epoch_and_the_final_table(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (the dev extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _qat_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run.dir / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"qat/loss", "qat/lr", "qat/eval_top_1", "evaluate/ort_int8_native/top1",
            "evaluate/ort_int8_native/latency_b1_ms"} <= scalars, scalars
    history = run.metrics["stages"]["qat"]["history"]
    assert [e.step for e in events.Scalars("qat/loss")] == [1, 2]
    assert [round(e.value, 5) for e in events.Scalars("qat/loss")] == [round(h["loss"], 5) for h in history]
    top1 = run.metrics["stages"]["evaluate"]["backends"]["ort_int8_native"]["metrics"]["top1"]
    assert events.Scalars("evaluate/ort_int8_native/top1")[0].value == pytest.approx(top1)


def test_log_to_mlflow_records_params_epochs_table_and_report(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (the dev extra installs mlflow-skinny)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder does for a test
    run = _qat_run(tmp_path, "mlflow")
    client = mlflow.tracking.MlflowClient()
    [found] = client.search_runs(["0"])  # the default experiment
    assert found.info.status == "FINISHED" and found.info.run_name == run.dir.name
    assert found.data.params["calibrate.method"] == "max" and found.data.params["stages"].startswith("calibrate")
    assert [m.step for m in client.get_metric_history(found.info.run_id, "qat.loss")] == [1, 2]
    top1 = run.metrics["stages"]["evaluate"]["backends"]["ort_int8_native"]["metrics"]["top1"]
    assert found.data.metrics["ort_int8_native.top1"] == pytest.approx(top1)
    assert {a.path for a in client.list_artifacts(found.info.run_id)} >= {"report.html", "metrics.json"}


def test_log_to_without_its_package_is_a_recipe_problem(tmp_path, monkeypatch):
    import workbench.tracking as tracking

    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs") + "log_to: [mlflow]\n")
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(WorkbenchError, match=r"log_to: mlflow needs the mlflow package \(pip install mlflow\)"):
        api.validate(recipe)


class _FakeTracker:
    def __init__(self, log: list, name: str, fail_on: str = ""):
        self.log, self.name, self.fail_on = log, name, fail_on

    def _call(self, what):
        self.log.append((self.name, what))
        if what == self.fail_on:
            raise ConnectionError(f"{self.name} is gone")

    def epoch(self, stage, entry):
        self._call("epoch")

    def finish(self, metrics, run_dir, failed):
        try:
            self._call("finish")
        finally:
            self.close(failed)

    def close(self, failed):
        self.log.append((self.name, "close failed" if failed else "close"))


def test_a_failing_tracker_is_closed_and_never_stops_the_others(tmp_path, capsys):
    from workbench.tracking import Trackers

    log = []
    trackers = Trackers([_FakeTracker(log, "a", fail_on="epoch"), _FakeTracker(log, "b", fail_on="finish"),
                         _FakeTracker(log, "c")])
    trackers.epoch("qat", {"epoch": 1, "loss": 0.5})
    trackers.epoch("qat", {"epoch": 2, "loss": 0.4})
    trackers.finish({}, tmp_path, failed=False)
    assert log == [("a", "epoch"), ("a", "close failed"), ("b", "epoch"), ("c", "epoch"),  # a dropped, closed
                   ("b", "epoch"), ("c", "epoch"),
                   ("b", "finish"), ("b", "close"), ("c", "finish"), ("c", "close")]  # b's failure stops not c
    err = capsys.readouterr().err
    assert "log_to: FakeTracker failed (ConnectionError: a is gone); the run goes on" in err
    assert "(ConnectionError: b is gone); the run's results are in its directory all the same" in err


def test_a_tracker_that_cannot_start_closes_those_already_open(tmp_path, monkeypatch):
    import workbench.tracking as tracking

    log = []
    monkeypatch.setattr(tracking, "_TensorBoard", lambda run_dir, recipe: _FakeTracker(log, "tb"))

    def broken_mlflow(run_dir, recipe):
        raise ConnectionError("no tracking server at http://mlflow:5000")

    monkeypatch.setattr(tracking, "_MLflow", broken_mlflow)
    with pytest.raises(WorkbenchError, match=r"log_to: mlflow could not start \(ConnectionError: no tracking server"):
        tracking.Trackers.open(["tensorboard", "mlflow"], tmp_path, recipe=None)
    assert log == [("tb", "close failed")]


def test_names_from_the_users_files_stay_literal_in_report_md_and_html(tmp_path):
    from workbench.report import md_name, md_text
    from workbench.report_html import render_html

    hostile = "a|b<script>x</script>`c` **d** # e"
    text = (f"# R\n\n| Rank | Layer | MMACs |\n|---|---|---|\n| 1 | {md_name(hostile)} | 0.2 |\n"
            f"| 2 | {md_name('layer1.0.conv1')} | 0.1 |\n\n{md_text('warning: <img src=http://x/i> [a] **b**')}\n")
    assert "<script>" not in text and "| 1 | a\\|b" in text  # report.md: the pipe cannot add a column
    page = render_html(text, tmp_path)
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    assert [r.count("<th>") + r.count("<td>") for r in rows] == [3, 3, 3]
    assert f"<td>{html.escape(hostile, quote=False)}</td>" in page.replace("&#x27;", "'")  # shown as written
    assert "<td><code>layer1.0.conv1</code></td>" in page
    assert "<p>warning: &lt;img src=http://x/i&gt; [a] **b**</p>" in page and "<strong>" not in page


def test_progress_environment_switches_read_as_a_user_means_them(monkeypatch, capsys):
    from workbench import progress

    monkeypatch.setenv("WORKBENCH_PROGRESS_INTERVAL", "0")
    for off_value in ("0", "false", "no", ""):
        monkeypatch.setenv("WORKBENCH_NO_PROGRESS", off_value)
        monkeypatch.setenv("RANK", "")  # torchrun's variable, set but empty: rank 0
        assert list(track(range(2), "evaluate")) == [0, 1]
        assert "evaluate: 2 steps in" in capsys.readouterr().err, off_value
    monkeypatch.setenv("WORKBENCH_NO_PROGRESS", "1")
    list(track(range(2), "evaluate"))
    assert capsys.readouterr().err == ""
    for raw, interval in (("abc", 15.0), ("nan", 15.0), ("-5", 15.0), ("inf", 15.0), ("2.5", 2.5), ("0", 0.0)):
        monkeypatch.setenv("WORKBENCH_PROGRESS_INTERVAL", raw)
        assert progress._interval() == interval, raw


def test_overrides_may_follow_options_and_name_a_stage_whole(tmp_path):
    from workbench.cli import main

    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    assert api.validate(recipe, ["stages.calibrate={method: entropy}"]).stage_list()[0][1].method == "entropy"
    runs = tmp_path / "other_runs"
    assert main(["run", str(recipe), "--device", "cpu", "stages.calibrate.method=mse", f"runs_dir={runs}",
                 "stages.evaluate.latency=false"]) == 0
    (run_dir,) = runs.iterdir()
    ran = (run_dir / "recipe.yaml").read_text()
    assert "method: mse" in ran and "device: cpu" in ran
    with pytest.raises(SystemExit) as exit_:  # what is neither an option nor key=value is still refused
        main(["validate", str(recipe), "--no-such-option"])
    assert exit_.value.code == 2


def test_log_to_names_each_tracker_once(tmp_path):
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs") + "log_to: [tensorboard, tensorboard]\n")
    with pytest.raises(WorkbenchError, match="names one twice"):
        api.validate(recipe)


def test_a_run_piped_into_head_completes(tmp_path):
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs"))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}
    done = subprocess.run(["bash", "-c", f'"{sys.executable}" -m workbench run "{recipe}" | head -1; '
                                         'echo "rc=${PIPESTATUS[0]}"'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines() == ["stage 1/3: calibrate", "rc=0"], done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()  # complete: not .failed for want of a reader
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "complete"
