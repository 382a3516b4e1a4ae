"""The run directory's life under hostile and broken conditions (issue 14, sections 4 and 5).

runs_dir checks before any model is loaded, a full disk while recording a failure, Ctrl-C and SIGKILL,
stale runs, `workbench runs`, `workbench run --resume`, the umask, atomic writes, resume checkpoints
that are not ones. The factories below are `import:` specs of the recipes (this file is importable as
`test_hostile_runs`: tests/ is on sys.path).
"""

import contextlib
import errno
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from helpers import make_image_folder, trained_cnn

from workbench.cli import main
from workbench.errors import ModelLoadError
from workbench.io import atomic_path, write_text
from workbench.schema import ModelConfig

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# import: specs need model.trust_code where the recipe model has it (tiny_recipe may already say it)
TRUST = ("  trust_code: true\n" if "trust_code" in ModelConfig.model_fields
         and "trust_code" not in tiny_recipe(Path("images"), Path("runs")) else "")


def model_that_must_not_load(marker: str):
    """A factory the runs_dir checks must come before: it leaves a marker, then fails with its own error."""
    Path(marker).write_text("the model was loaded")
    raise ModelLoadError("model.spec: this factory refuses to build anything")


def interrupted_while_loading():
    raise KeyboardInterrupt


def _recipe(tmp_path, images, runs, stages=None, model="helpers:trained_cnn", name="tiny", kwargs="") -> Path:
    extra = TRUST + (f"  kwargs: {kwargs}\n" if kwargs else "")
    text = tiny_recipe(images, runs, stages, extra_model=extra).replace("helpers:tiny_cnn", model)
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("name: tiny", f"name: {name}"))
    return path


def _no_load_recipe(tmp_path, images, runs, name="tiny") -> tuple[Path, Path]:
    marker = tmp_path / "model_loaded.txt"
    return _recipe(tmp_path, images, runs, model="test_hostile_runs:model_that_must_not_load", name=name,
                   kwargs=f'{{marker: "{marker}"}}'), marker


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# runs_dir: checked by creating and removing a probe directory, before the model or the data is loaded
# ---------------------------------------------------------------------------------------------------------


def test_runs_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path, images, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a directory")
    recipe, marker = _no_load_recipe(tmp_path, images, runs)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"runs_dir: {runs} is a file, not a directory" in err and "Traceback" not in err
    assert not marker.exists() and runs.read_text() == "not a directory"


def test_runs_dir_under_proc_is_refused(tmp_path, images, capsys):
    recipe, marker = _no_load_recipe(tmp_path, images, Path("/proc/workbench-runs"))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "runs_dir: cannot create a run directory in /proc/workbench-runs" in err
    assert "set runs_dir to a writable" in err
    assert not marker.exists() and not os.path.exists("/proc/workbench-runs")


def test_a_name_too_long_for_the_file_system_is_refused(tmp_path, images, capsys):
    runs = tmp_path / "runs"
    recipe, marker = _no_load_recipe(tmp_path, images, runs, name="n" * 300)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "for a name of 300 characters is longer than" in err and "shorten the recipe's name" in err
    assert not marker.exists() and not runs.exists()  # the probe removed the runs_dir it created


@contextlib.contextmanager
def _unprivileged():
    """Run the block as user nobody where the tests run as root (root writes into a 0555 directory anyway)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_read_only_runs_dir_is_refused(tmp_path, images, capsys):
    shared = Path(os.environ.get("TMPDIR", "/tmp")) / f"workbench-ro-{os.getpid()}"  # readable by nobody
    shared.mkdir()
    try:
        shared.chmod(0o755)
        runs = shared / "runs"
        runs.mkdir(mode=0o555)
        runs.chmod(0o555)
        recipe = _recipe(shared, images, runs / "nested")  # runs_dir inside a directory nobody may write
        recipe.chmod(0o644)
        with _unprivileged():
            code = main(["run", str(recipe)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"runs_dir: cannot create a run directory in {runs / 'nested'} (no permission to write there" in err
        assert list(runs.iterdir()) == []
    finally:
        shutil.rmtree(shared)


def test_the_probe_leaves_no_runs_dir_when_the_model_then_fails(tmp_path, images, capsys):
    runs = tmp_path / "deep" / "runs"
    recipe, marker = _no_load_recipe(tmp_path, images, runs)
    assert main(["run", str(recipe)]) == 2
    assert "this factory refuses to build anything" in capsys.readouterr().err
    assert marker.exists()  # the checks passed and the model was loaded: the probe came first and cleaned up
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------------------------------------------------
# Recording a failure on a full disk; Ctrl-C at start-up and during a stage
# ---------------------------------------------------------------------------------------------------------


def test_a_full_disk_while_recording_the_failure_still_leaves_it_failed(tmp_path, images, capsys, monkeypatch):
    runs = tmp_path / "runs"
    stages = "  - calibrate: {method: max, exclude: ['no_such_layer']}\n  - export: {}\n"
    recipe = _recipe(tmp_path, images, runs, stages)
    write = pathlib.Path.write_text

    def disk_full_for_the_failure(self, text, *args, **kwargs):
        if '"status": "failed"' in text:  # the write that records the stage's error
            write(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full_for_the_failure)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "match no module of the model" in err  # the stage's own error, not the disk's
    assert "could not record the failure" in err and "No space left on device" in err
    (run_dir,) = runs.iterdir()
    assert run_dir.name.endswith(".failed")
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "recipe.yaml"]  # no half-written temp file
    assert _metrics(run_dir)["status"] == "running"  # the last write that succeeded
    monkeypatch.undo()
    assert main(["runs", str(runs)]) == 0
    assert "failed (not recorded)" in capsys.readouterr().out


def test_ctrl_c_while_the_model_loads_leaves_nothing(tmp_path, images, capsys):
    runs = tmp_path / "runs"
    recipe = _recipe(tmp_path, images, runs, model="test_hostile_runs:interrupted_while_loading")
    assert main(["run", str(recipe)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert not runs.exists()


def _slow_recipe(tmp_path: Path) -> tuple[Path, Path, Path]:
    """calibrate and export in seconds, then an evaluate that times latency for minutes (killed meanwhile)."""
    images = make_image_folder(tmp_path / "images")
    runs = tmp_path / "runs"
    stages = ("  - calibrate: {method: max}\n  - export: {}\n"
              "  - evaluate: {latency_repeats: 1000000, latency_batch_sizes: [1]}\n")
    return _recipe(tmp_path, images, runs, stages), images, runs


def _start_until_exported(recipe: Path, runs: Path):
    """Start `workbench run` in a process; return it once calibrate and export are recorded, evaluate running."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "WORKBENCH_NO_PROGRESS": "1"}
    out = open(recipe.parent / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(recipe)], cwd=recipe.parent, env=env,
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (recipe.parent / "run.log").read_text()
        for work_dir in runs.glob("*.incomplete"):
            with contextlib.suppress(OSError, ValueError):
                if "export" in _metrics(work_dir).get("timings_s", {}):
                    time.sleep(1.0)  # well inside evaluate's latency loop
                    return proc, work_dir
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the run did not reach its evaluate stage")


def test_ctrl_c_during_a_stage_leaves_the_run_failed_as_interrupted_and_resume_completes_it(tmp_path, capsys):
    recipe, _, runs = _slow_recipe(tmp_path)
    proc, work_dir = _start_until_exported(recipe, runs)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in (tmp_path / "run.log").read_text()
    (failed,) = runs.iterdir()
    assert failed.name == work_dir.name.replace(".incomplete", ".failed")
    metrics = _metrics(failed)
    assert metrics["status"] == "interrupted" and metrics["failed_stage"] == "evaluate"
    assert metrics["error"] == "interrupted (Ctrl-C) during stage evaluate"
    assert [f["stage"] for f in metrics["fingerprints"]] == ["calibrate", "export"]
    calibration = (failed / "calibration.json").read_bytes()
    onnx_mtime = (failed / "model.onnx").stat().st_mtime_ns

    # The run's own recipe with evaluate made short: calibrate and export are reused, evaluate runs.
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.evaluate.latency_repeats=2"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"resuming {failed.name}: reusing calibrate, export; running evaluate" in out
    final = failed.with_name(failed.name.removesuffix(".failed"))
    assert [p.name for p in runs.iterdir()] == [final.name]
    resumed = _metrics(final)
    assert resumed["status"] == "complete" and resumed["resumed"]["reused"] == ["calibrate", "export"]
    assert resumed["timings_s"]["calibrate"] == metrics["timings_s"]["calibrate"]
    assert (final / "calibration.json").read_bytes() == calibration
    assert (final / "model.onnx").stat().st_mtime_ns == onnx_mtime  # not exported again
    backends = resumed["stages"]["evaluate"]["backends"]
    assert backends["ort_int8_faithful"]["metrics"]["top1"] > 80  # the reused ONNX, scored
    assert (final / "report.md").is_file()


# ---------------------------------------------------------------------------------------------------------
# SIGKILL: stale runs, `workbench runs`
# ---------------------------------------------------------------------------------------------------------


def test_a_sigkilled_run_is_marked_interrupted_by_workbench_runs(tmp_path, capsys):
    recipe, _, runs = _slow_recipe(tmp_path)
    proc, work_dir = _start_until_exported(recipe, runs)
    assert _metrics(work_dir)["pid"] == proc.pid
    proc.kill()
    proc.wait(timeout=60)
    assert _metrics(work_dir)["status"] == "running"  # nothing could record the kill
    unmarked = tmp_path / "elsewhere" / work_dir.name  # a copy that `workbench runs` below does not see
    shutil.copytree(work_dir, unmarked)
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    failed = work_dir.with_name(work_dir.name.replace(".incomplete", ".failed"))
    assert f"marked {failed.name} as interrupted" in out
    assert failed.name in out and "interrupted" in out and "2/3 calibrate, export" in out
    assert not work_dir.exists()
    metrics = _metrics(failed)
    assert metrics["status"] == "interrupted" and f"pid {proc.pid}" in metrics["error"]
    # A killed run not yet marked resumes as it is: its process is gone.
    assert main(["run", "--resume", str(unmarked), "model.trust_code=true", "stages.evaluate.latency_repeats=2"]) == 0
    final = unmarked.with_name(unmarked.name.removesuffix(".incomplete"))
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    assert _metrics(final)["status"] == "complete" and _metrics(final)["resumed"]["reused"] == ["calibrate", "export"]


def _fake_run(runs: Path, name: str, pid: int, host: str | None = None, **identity) -> Path:
    run_dir = runs / f"{name}.incomplete"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: x\n")
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "running", "started": "2026-01-01T00:00:00", "pid": pid, "host": host or socket.gethostname(),
        "stage_names": ["calibrate", "export"], "timings_s": {"calibrate": 1.0}, "fingerprints": [], "stages": {},
        **identity}))
    return run_dir


def test_the_next_run_marks_a_dead_run_and_leaves_live_and_foreign_ones(tmp_path, images, capsys):
    runs = tmp_path / "runs"
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = _fake_run(runs, "dead-20260101-000000", gone.pid)
    live = _fake_run(runs, "live-20260101-000000", os.getpid())
    foreign = _fake_run(runs, "foreign-20260101-000000", gone.pid, host="another-host.example")
    assert main(["run", str(_recipe(tmp_path, images, runs, "  - calibrate: {method: max}\n"))]) == 0
    assert not dead.exists() and _metrics(runs / "dead-20260101-000000.failed")["status"] == "interrupted"
    assert live.is_dir() and _metrics(live)["status"] == "running"
    assert foreign.is_dir() and _metrics(foreign)["status"] == "running"
    capsys.readouterr()
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "running? (pid" in out and "another-host.example" in out  # cannot be checked from here
    assert "1/2 calibrate" in out


def test_runs_of_a_missing_directory(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "is not a directory: give the runs_dir" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# --resume: what may be resumed, and a changed recipe or input refused
# ---------------------------------------------------------------------------------------------------------

# Fails at run time, after validation: build makes no engine without TensorRT, and evaluate asks for it.
# residual_add: false keeps TinyCNN's residual Add float, which check-onnx reports: a warning for resume to carry.
FAILING_EVALUATE = ("  - calibrate: {method: max, residual_add: false}\n  - export: {}\n  - build: {engine: tensorrt}\n"
                    "  - evaluate: {backends: [tensorrt], latency: false}\n")
needs_no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                       reason="the failing recipe relies on build making no engine without TensorRT")


def _failed_run(tmp_path, images, capsys) -> tuple[Path, Path]:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("the failing recipe relies on build making no engine without TensorRT")
    runs = tmp_path / "runs"
    recipe = _recipe(tmp_path, images, runs, FAILING_EVALUATE)
    assert main(["run", str(recipe)]) == 2
    assert "not available at this point" in capsys.readouterr().err
    (failed,) = runs.iterdir()
    assert failed.name.endswith(".failed") and _metrics(failed)["failed_stage"] == "evaluate"
    return recipe, failed


def _snapshot(run_dir: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}


def test_resume_reuses_a_restored_calibration_that_scores_as_the_original(tmp_path, images, capsys):
    recipe, failed = _failed_run(tmp_path, images, capsys)
    before = _snapshot(failed)
    fixed = "stages.evaluate.backends=[pytorch_int8, ort_int8_faithful]"
    assert main(["run", "--resume", str(failed), str(recipe), fixed]) == 0
    final = failed.with_name(failed.name.removesuffix(".failed"))
    resumed = _metrics(final)
    first_started = json.loads(before["metrics.json"][0])["started"]
    assert resumed["resumed"] == {"from": failed.name, "started_first": first_started,
                                  "reused": ["calibrate", "export", "build"], "rerun": ["evaluate"]}
    # The reused export's warning (TinyCNN's residual Add fails check-onnx) comes with it, once: never a silent
    # "complete" because the stage that found it was not run again.
    first_warnings = [w for w in json.loads(before["metrics.json"][0])["warnings"] if w["stage"] == "export"]
    assert len(first_warnings) == 1 and [w for w in resumed["warnings"] if w["stage"] == "export"] == first_warnings
    for name in ("calibration.json", "model.onnx", "model_fp32.onnx", "model_int8_ort.onnx"):
        assert _snapshot(final)[name] == before[name], name
    # An uninterrupted run of the same recipe: the restored fake-quant model scores exactly as a calibrated one.
    straight = tmp_path / "straight"
    assert main(["run", str(recipe), f"runs_dir={straight}", fixed]) == 0
    (straight_dir,) = straight.iterdir()
    for backend in ("pytorch_int8", "ort_int8_faithful"):
        got = resumed["stages"]["evaluate"]["backends"][backend]["metrics"]
        want = _metrics(straight_dir)["stages"]["evaluate"]["backends"][backend]["metrics"]
        assert got == want, backend
    assert resumed["stages"]["evaluate"]["backends"]["pytorch_int8"]["metrics"]["top1"] > 80


@needs_no_tensorrt
def test_resume_restores_a_pruned_and_fine_tuned_model_under_its_calibration(tmp_path, capsys):
    images = make_image_folder(tmp_path / "blobs", per_class=10, seed=4)
    runs = tmp_path / "runs"
    stages = ("  - prune: {method: structured, ratio: 0.5, latency: false}\n"
              "  - finetune: {epochs: 1, lr: 0.01, eval_samples: 10}\n  - calibrate: {method: max}\n  - export: {}\n"
              # no engine: fails
              "  - build: {engine: tensorrt}\n  - evaluate: {backends: [tensorrt], latency: false}\n")
    recipe = _recipe(tmp_path, images, runs, stages)
    recipe.write_text(recipe.read_text().replace(
        "  batch_size: 4", f'  finetune: {{source: imagefolder, path: "{images}"}}\n  batch_size: 4'))
    assert main(["run", str(recipe)]) == 2
    (failed,) = runs.iterdir()
    pruned = (failed / "pruned_model.pt").read_bytes()
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.evaluate.backends=null"]) == 0
    final = failed.with_name(failed.name.removesuffix(".failed"))
    resumed = _metrics(final)
    assert resumed["resumed"]["reused"] == ["prune", "finetune", "calibrate", "export", "build"]
    assert (final / "pruned_model.pt").read_bytes() == pruned
    straight = tmp_path / "straight"
    assert main(["run", str(recipe), f"runs_dir={straight}", "stages.evaluate.backends=null"]) == 0
    (straight_dir,) = straight.iterdir()
    want = _metrics(straight_dir)["stages"]["evaluate"]["backends"]
    got = resumed["stages"]["evaluate"]["backends"]
    assert set(got) == set(want) and "pytorch_fp32_pruned" in got  # the pruned FP32 model is back in the run
    for backend in ("pytorch_fp32_pruned", "pytorch_int8", "ort_int8_faithful"):
        assert got[backend]["metrics"] == want[backend]["metrics"], backend


def test_resume_runs_again_from_a_stage_whose_files_are_gone(tmp_path, images, capsys):
    recipe, failed = _failed_run(tmp_path, images, capsys)
    (failed / "model.onnx").unlink()
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.evaluate.backends=null"]) == 0
    final = failed.with_name(failed.name.removesuffix(".failed"))
    resumed = _metrics(final)
    assert resumed["resumed"]["reused"] == ["calibrate"] and resumed["resumed"]["rerun"] == ["export", "build",
                                                                                          "evaluate"]
    assert (final / "model.onnx").is_file() and "ort_int8_faithful" in resumed["stages"]["evaluate"]["backends"]


def test_resume_with_a_changed_stage_is_refused_naming_it(tmp_path, images, capsys):
    _, failed = _failed_run(tmp_path, images, capsys)
    before = _snapshot(failed)
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.calibrate.method=entropy"]) == 2
    err = capsys.readouterr().err
    assert "--resume: stage 1 (calibrate) finished under another recipe" in err
    assert "stages.0.calibrate.method: max -> entropy" in err
    assert _snapshot(failed) == before  # not renamed, not rewritten


def test_resume_with_a_changed_input_file_is_refused_naming_it(tmp_path, images, capsys):
    _, failed = _failed_run(tmp_path, images, capsys)
    before = _snapshot(failed)
    image = next((images / "class0").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.evaluate.backends=null"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: data.calibration.path ({images}) changed since {failed.name} ran" in err
    assert _snapshot(failed) == before


def test_resume_of_a_complete_run_is_refused(tmp_path, images, capsys):
    runs = tmp_path / "runs"
    assert main(["run", str(_recipe(tmp_path, images, runs, "  - calibrate: {method: max}\n"))]) == 0
    (done,) = runs.iterdir()
    before = _snapshot(done)
    assert main(["run", "--resume", str(done)]) == 2
    assert f"--resume: {done} is a complete run, nothing to resume" in capsys.readouterr().err
    assert _snapshot(done) == before and [p.name for p in runs.iterdir()] == [done.name]


def test_resume_of_what_is_not_a_run_or_still_runs_is_refused(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert f"--resume: {tmp_path} is not a run directory" in capsys.readouterr().err
    live = _fake_run(tmp_path / "runs", "live-20260101-000000", os.getpid())
    assert main(["run", "--resume", str(live)]) == 2
    assert f"is still running (pid {os.getpid()}" in capsys.readouterr().err
    assert live.is_dir() and _metrics(live)["status"] == "running"


# ---------------------------------------------------------------------------------------------------------
# File modes and atomic writes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_artifacts_honour_the_umask(tmp_path, images, umask, mode):
    runs = tmp_path / "runs"
    recipe = _recipe(tmp_path, images, runs, "  - calibrate: {method: max}\n  - export: {ort_int8: false}\n")
    old = os.umask(umask)
    try:
        assert main(["run", str(recipe)]) == 0
    finally:
        os.umask(old)
    (run_dir,) = runs.iterdir()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"metrics.json", "calibration.json", "model.onnx", "report.md"} <= {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


def test_write_text_mode_follows_the_umask_of_the_moment(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640


def test_a_write_that_fails_inside_atomic_path_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old content")
    with pytest.raises(ValueError, match="half way"):
        with atomic_path(target) as tmp:
            tmp.write_text("new half")
            raise ValueError("half way")
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file behind


def test_a_failing_write_text_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("old report")
    write = pathlib.Path.write_text

    def half_then_full(self, text, *args, **kwargs):
        write(self, text[:3], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        write_text(target, "a new report")
    with pytest.raises(OSError, match="No space left"):
        write_text(tmp_path / "new.md", "never there")
    monkeypatch.undo()
    assert target.read_text() == "old report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


# ---------------------------------------------------------------------------------------------------------
# A finetune `resume:` checkpoint that is not one
# ---------------------------------------------------------------------------------------------------------


def _not_checkpoints(tmp_path: Path) -> dict:
    files = {"random": tmp_path / "random.pt", "text": tmp_path / "notes.pt", "state_dict": tmp_path / "weights.pt",
             "tensor": tmp_path / "tensor.pt"}
    files["random"].write_bytes(os.urandom(4096))
    files["text"].write_text("epoch 3, loss 0.1\n")
    torch.save(trained_cnn().state_dict(), files["state_dict"])
    torch.save(torch.zeros(3), files["tensor"])
    return files


@pytest.mark.parametrize("kind, message", [
    ("random", "is not a checkpoint torch can read"),
    ("text", "is not a checkpoint torch can read"),
    ("state_dict", "is not a training checkpoint (a dict without model, optimizer"),
    ("tensor", "is not a training checkpoint (a Tensor"),
])
def test_finetune_resume_from_a_file_that_is_no_checkpoint(tmp_path, images, capsys, kind, message):
    path = _not_checkpoints(tmp_path)[kind]
    runs = tmp_path / "runs"
    stages = f'  - finetune: {{epochs: 1, eval_samples: 4, resume: "{path}"}}\n'
    recipe = _recipe(tmp_path, images, runs, stages)
    split = f'  finetune: {{source: imagefolder, path: "{images}"}}\n'
    recipe.write_text(recipe.read_text().replace("  batch_size: 4", split + "  batch_size: 4"))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"error: finetune.resume: {path} {message}" in err and "give a checkpoints/finetune_epoch<N>.pt" in err
    assert "Traceback" not in err
    (failed,) = runs.iterdir()
    assert failed.name.endswith(".failed") and not (failed / "checkpoints").exists()
    assert _metrics(failed)["failed_stage"] == "finetune"


def test_a_training_checkpoint_without_its_rng_state_is_refused(tmp_path, images, capsys):
    """A real finetune checkpoint less the RNG state it is resumed with (before: 'does not fit ... ('rng')')."""
    runs = tmp_path / "runs"
    split = f'  finetune: {{source: imagefolder, path: "{images}"}}\n  batch_size: 4'
    recipe = _recipe(tmp_path, images, runs, "  - finetune: {epochs: 1, eval_samples: 4}\n")
    recipe.write_text(recipe.read_text().replace("  batch_size: 4", split))
    assert main(["run", str(recipe)]) == 0
    (done,) = runs.iterdir()
    state = torch.load(done / "checkpoints" / "finetune_epoch1.pt", weights_only=True)
    del state["rng"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    recipe.write_text(recipe.read_text().replace("eval_samples: 4}", f'eval_samples: 4, resume: "{old}"}}'))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"finetune.resume: {old} is not a training checkpoint (a dict without rng;" in err
    assert "Traceback" not in err
    failed = next(p for p in runs.iterdir() if p.name.endswith(".failed"))
    assert _metrics(failed)["failed_stage"] == "finetune" and not (failed / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------
# The resume fingerprint of the inputs: bounded cost, calibration sets, and runs of another pid namespace
# ---------------------------------------------------------------------------------------------------------


def test_the_input_fingerprint_stats_a_bounded_number_of_files_and_follows_the_samples(tmp_path, monkeypatch):
    from workbench.data import build_dataset
    from workbench.recipe import parse_recipe
    from workbench.resume import SAMPLED_FILES, describe_inputs

    images = make_image_folder(tmp_path / "many", classes=2, per_class=400, size=4)
    recipe = parse_recipe(tiny_recipe(images, tmp_path / "runs").replace(", count: 12", ""), "r.yaml")
    datasets = {"calibration": build_dataset(recipe.data, "calibration")}
    stat, calls = os.stat, []

    def counted(path, *args, **kwargs):
        if str(path).startswith(str(images)):
            calls.append(path)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counted)
    before = describe_inputs(recipe, datasets)["data.calibration.path"]
    assert before["samples"] == 800 and before["path"] == str(images)
    assert 0 < len(calls) <= SAMPLED_FILES  # not one per image, as walking the folder did
    # An image renamed (whether or not it is among the files stat'ed) is another sample list.
    stat_ed = {str(p) for p in calls}
    name = next(s.key for s in datasets["calibration"].samples if s.key not in stat_ed)
    os.rename(name, name.replace(".png", "b.png"))
    monkeypatch.undo()
    after = describe_inputs(recipe, {"calibration": build_dataset(recipe.data, "calibration")})
    assert after["data.calibration.path"]["sha256"] != before["sha256"]
    assert after["data.calibration.path"]["samples"] == 800


@needs_no_tensorrt
def test_resume_after_the_calibration_set_changed_is_refused_naming_it(tmp_path, images, capsys, monkeypatch):
    sets = tmp_path / "sets"
    sets.mkdir()
    definition = sets / "mine.yaml"
    definition.write_text(f'source: imagefolder\npath: "{images}"\ncount: 12\nseed: 0\n')
    monkeypatch.setenv("WORKBENCH_CALIBRATION_DATA", str(sets))
    runs = tmp_path / "runs"
    recipe = _recipe(tmp_path, images, runs, FAILING_EVALUATE)
    text = recipe.read_text()
    recipe.write_text(text.replace(f'{{source: imagefolder, path: "{images}", count: 12, seed: 0}}',
                                   "{calib_set: mine}"))
    assert "calib_set: mine" in recipe.read_text()
    assert main(["run", str(recipe)]) == 2
    (failed,) = runs.iterdir()
    assert [f["stage"] for f in _metrics(failed)["fingerprints"]] == ["calibrate", "export", "build"]
    before = _snapshot(failed)
    capsys.readouterr()
    definition.write_text(definition.read_text().replace("seed: 0", "seed: 1"))  # other calibration images
    assert main(["run", "--resume", str(failed), "model.trust_code=true", "stages.evaluate.backends=null"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: data.calibration.calib_set ({definition}) changed since {failed.name} ran" in err
    assert _snapshot(failed) == before and [p.name for p in runs.iterdir()] == [failed.name]


def test_workbench_runs_leaves_a_run_of_another_boot_or_pid_namespace_alone(tmp_path, capsys):
    from workbench.rundir import process_identity

    here = process_identity()
    assert here["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert here["pid_namespace"] == os.stat("/proc/self/ns/pid").st_ino
    runs = tmp_path / "runs"
    gone = subprocess.Popen(["true"])
    gone.wait()
    space = {"boot_id": here["boot_id"], "pid_namespace": here["pid_namespace"]}
    dead = _fake_run(runs, "dead-20260101-000000", gone.pid, **space)
    other_boot = _fake_run(runs, "boot-20260101-000000", gone.pid, **{**space, "boot_id": "another-boot"})
    other_ns = _fake_run(runs, "ns-20260101-000000", gone.pid,
                         **{**space, "pid_namespace": here["pid_namespace"] + 1})  # another container's pids
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "marked dead-20260101-000000.failed as interrupted" in out
    assert not dead.exists() and _metrics(runs / "dead-20260101-000000.failed")["status"] == "interrupted"
    for run_dir in (other_boot, other_ns):
        assert run_dir.is_dir() and _metrics(run_dir)["status"] == "running", run_dir.name
        assert f"marked {run_dir.name.replace('.incomplete', '.failed')}" not in out
    assert out.count(f"running? (pid {gone.pid}") == 2


def test_runs_dir_that_is_a_dangling_symlink_is_refused_naming_it(tmp_path, images, capsys):
    runs = tmp_path / "runs"
    runs.symlink_to(tmp_path / "nowhere")
    recipe, marker = _no_load_recipe(tmp_path, images, runs)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert (f"runs_dir: cannot create a run directory in {runs} ({runs} is a symbolic link to {tmp_path / 'nowhere'}, "
            "which does not exist") in err
    assert not marker.exists() and not (tmp_path / "nowhere").exists() and runs.is_symlink()


def test_resume_does_not_take_trust_from_the_run_directory(tmp_path, images, capsys):
    """A tampered recipe.yaml in a run directory cannot turn on trust_code: it must be given on the command line."""
    run_dir = tmp_path / "evil.failed"
    run_dir.mkdir()
    marker = tmp_path / "PWNED"
    (run_dir / "metrics.json").write_text('{"status": "failed", "stages": {}, "fingerprints": []}')
    (run_dir / "recipe.yaml").write_text(
        "name: evil\nmodel: {spec: 'import:os:system', trust_code: true, kwargs: {command: 'touch " + str(marker)
        + "'}}\ndata: {evaluation: {source: imagefolder, path: '" + str(images) + "'}}\nstages:\n  - evaluate: {}\n")
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert "model.trust_code=true" in capsys.readouterr().err
    assert not marker.exists()
