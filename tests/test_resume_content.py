"""`workbench run --resume` and `workbench runs` trust a run directory's content, never its file names (issue 24
item 4, issue 28's run-directory cases).

One small failed run (calibrate, sensitivity, export, build without TensorRT, then an evaluate that needs an
engine) is made once per module; each test tampers with a copy of it. A file present but not what its stage wrote,
or that fails its own check, or metrics.json with a field of the wrong type: exit 2 naming the file and the field,
the run directory as it was. The unchanged copy resumes reusing every finished stage.
"""

import importlib.util
import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_recipe
from helpers import make_image_folder
from onnx import numpy_helper

from workbench.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                reason="the failing run relies on build making no engine without TensorRT")

STAGES = ("  - calibrate: {method: max}\n"
          "  - sensitivity: {modes: [one_at_a_time], proxy_samples: 4, task_samples: 4}\n"
          "  - export: {}\n  - build: {engine: tensorrt}\n"
          "  - evaluate: {backends: [tensorrt], latency: false}\n")
FINISHED = ["calibrate", "sensitivity", "export", "build"]
FIXED = ["model.trust_code=true", "stages.evaluate.backends=[pytorch_int8]"]  # evaluate as it can run here


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("failed")
    images = make_image_folder(root / "images")
    recipe = root / "r.yaml"
    recipe.write_text(tiny_recipe(images, root / "runs", STAGES).replace("helpers:tiny_cnn", "helpers:trained_cnn"))
    assert main(["run", str(recipe)]) == 2
    (failed,) = (root / "runs").iterdir()
    assert failed.name.endswith(".failed") and [f["stage"] for f in _metrics(failed)["fingerprints"]] == FINISHED
    return failed


@pytest.fixture
def run_dir(failed_run, tmp_path) -> Path:
    """A copy of the failed run (times kept), to tamper with."""
    copy = tmp_path / "runs" / failed_run.name
    shutil.copytree(failed_run, copy, symlinks=True)
    return copy


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _snapshot(run_dir: Path) -> dict:
    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink()
                     else None, p.lstat().st_mtime_ns) for p in run_dir.iterdir()}


def _refused(run_dir: Path, capsys, *overrides: str) -> str:
    """Resume `run_dir`: it must exit 2 without a traceback and leave the directory exactly as it was."""
    before = _snapshot(run_dir)
    assert main(["run", "--resume", str(run_dir), *FIXED, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _snapshot(run_dir) == before and [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
    return " ".join(err.split())  # the console wraps long lines


def _resumed(run_dir: Path) -> dict:
    assert main(["run", "--resume", str(run_dir), *FIXED]) == 0
    return _metrics(run_dir.with_name(run_dir.name.removesuffix(".failed")))


def _edit_json(path: Path, edit) -> None:
    """Rewrite a JSON file after `edit(data)` changed it in place, keeping its modification time (as a careful
    tamperer would)."""
    st = path.stat()
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_unchanged_run_resumes_reusing_every_finished_stage(run_dir):
    files = {n: (run_dir / n).read_bytes() for n in ("calibration.json", "sensitivity.json", "model.onnx")}
    times = {n: (run_dir / n).stat().st_mtime_ns for n in files}
    resumed = _resumed(run_dir)
    assert resumed["resumed"]["reused"] == FINISHED and resumed["resumed"]["rerun"] == ["evaluate"]
    assert "rerun_because" not in resumed["resumed"]  # evaluate never finished: nothing was refused
    final = run_dir.with_name(run_dir.name.removesuffix(".failed"))
    assert {n: (final / n).read_bytes() for n in files} == files  # reused, not written again
    assert {n: (final / n).stat().st_mtime_ns for n in files} == times
    # Every finished stage's record holds the hashes of the files it is restored from, and of its metrics.
    records = {f["stage"]: f for f in resumed["fingerprints"]}
    assert set(records["calibrate"]["files"]) == {"calibration.json"}
    assert set(records["sensitivity"]["files"]) == {"sensitivity.json"}
    assert {"model.onnx", "model_fp32.onnx", "model_int8_ort.onnx"} <= set(records["export"]["files"])
    assert all(len(f["metrics_sha256"]) == 64 for f in resumed["fingerprints"])
    assert resumed["stages"]["evaluate"]["backends"]["pytorch_int8"]["metrics"]["top1"] > 80


@pytest.mark.parametrize("value, expected", [
    (-1.0, "a finite number > 0"), (0.0, "a finite number > 0"), (math.nan, "a finite number > 0"),
    ("12.5", "a finite number > 0"), (None, "a finite number > 0"),
])
def test_a_calibration_range_that_is_no_range_is_refused_naming_it(run_dir, capsys, value, expected):
    def edit(data):
        data["activation_amax"] = {name: value for name in data["activation_amax"]}

    _edit_json(run_dir / "calibration.json", edit)
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'calibration.json'}: field activation_amax[\"conv1.input_quantizer\"] is" in err
    assert expected in err and "Delete calibration.json" in err


def test_calibration_ranges_scaled_a_thousandfold_are_refused_by_their_hash(run_dir, capsys):
    """Finite, positive, of the right names: only the content hash tells them from calibrate's own."""
    _edit_json(run_dir / "calibration.json",
               lambda d: d.update(activation_amax={k: v * 1000 for k, v in d["activation_amax"].items()}))
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'calibration.json'}: its content (SHA-256" in err
    assert "is not what stage 1 (calibrate) wrote" in err and "Delete calibration.json to have stage 1" in err


@pytest.mark.parametrize("content, message", [
    ("[]", "holds [], expected an object with config, activation_amax"),
    ('{"config": {}, "activation_amax": []}', 'field activation_amax is [], expected an object of quantizer name'),
    ("not json at all", "is not JSON (line 1)"),
])
def test_a_calibration_json_of_another_shape_is_refused_naming_it(run_dir, capsys, content, message):
    (run_dir / "calibration.json").write_text(content)
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'calibration.json'}: {message}" in err


def test_a_calibration_json_linked_to_another_file_is_refused_unread(run_dir, capsys):
    (run_dir / "calibration.json").unlink()
    (run_dir / "calibration.json").symlink_to("/etc/passwd")
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'calibration.json'} is a symbolic link (to /etc/passwd)" in err and "root:" not in err


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_calibration_json_that_is_no_regular_file_is_refused(run_dir, capsys, kind):
    (run_dir / "calibration.json").unlink()
    if kind == "fifo":
        os.mkfifo(run_dir / "calibration.json")  # reading it would block for ever
    else:
        (run_dir / "calibration.json").mkdir()
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'calibration.json'} is not a regular file" in err


def test_a_model_onnx_rewritten_at_the_same_size_and_time_is_refused(run_dir, capsys):
    path = run_dir / "model.onnx"
    st = path.stat()
    graph = onnx.load(str(path))
    negated = 0
    for tensor in graph.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size > 1:
            tensor.CopyFrom(numpy_helper.from_array(-array, tensor.name))
            negated += 1
    onnx.save(graph, str(path))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert negated > 0 and path.stat().st_size == st.st_size  # what a size-and-time fingerprint cannot see
    err = _refused(run_dir, capsys)
    assert f"{path}: its content (SHA-256" in err and "is not what stage 3 (export) wrote" in err

    # The way out the message names: without the file, export and every later stage run again.
    path.unlink()
    resumed = _resumed(run_dir)
    assert resumed["resumed"]["reused"] == ["calibrate", "sensitivity"]
    assert resumed["resumed"]["rerun"] == ["export", "build", "evaluate"]
    assert resumed["resumed"]["rerun_because"] == "model.onnx is missing"


@pytest.mark.parametrize("edit, field, expected", [
    (lambda rows: rows[0].update(rank="1"), "layers[0].rank", "an integer rank"),
    (lambda rows: rows[0].update(only_sqnr_db=[1, 2]), "layers[0].only_sqnr_db", "a number or null"),
    (lambda rows: rows[0].update(onnx_qdq_nodes="x"), "layers[0].onnx_qdq_nodes", "a list of node names"),
    (lambda rows: rows[0].update(rank=7), "layers[].rank", "the ranks 1 to"),
    (lambda rows: rows[0].pop("layer"), "layers[0].layer", "a layer name"),
])
def test_a_sensitivity_table_with_mistyped_fields_is_refused_naming_them(run_dir, capsys, edit, field, expected):
    _edit_json(run_dir / "sensitivity.json", lambda d: edit(d["layers"]))
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'sensitivity.json'}: field {field} is" in err and expected in err


def _rehash(run_dir: Path, name: str) -> None:
    """Record `name`'s present hash in metrics.json, as a tamperer who also edits the record would."""
    import hashlib

    digest = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
    _edit_json(run_dir / "metrics.json",
               lambda m: [f["files"].__setitem__(name, digest) for f in m["fingerprints"] if name in f["files"]])


def test_ranges_for_quantizers_the_model_lacks_are_refused_even_when_rehashed(run_dir, capsys):
    _edit_json(run_dir / "calibration.json", lambda d: d["activation_amax"].update({"fc9.input_quantizer": 3.0}))
    _rehash(run_dir, "calibration.json")
    err = _refused(run_dir, capsys)
    assert 'field activation_amax["fc9.input_quantizer"] is 3.0, expected no range for a quantizer the model ' in err

    _edit_json(run_dir / "calibration.json", lambda d: d["activation_amax"].pop("fc9.input_quantizer"))
    _edit_json(run_dir / "calibration.json", lambda d: d["activation_amax"].pop("conv2.input_quantizer"))
    _rehash(run_dir, "calibration.json")
    err = _refused(run_dir, capsys)
    assert "field activation_amax is" in err and "expected a range for every quantizer of the model" in err


def test_a_sensitivity_row_for_a_layer_the_model_lacks_is_refused_even_when_rehashed(run_dir, capsys):
    _edit_json(run_dir / "sensitivity.json", lambda d: d["layers"][0].update(layer="no.such.layer"))
    _rehash(run_dir, "sensitivity.json")
    err = _refused(run_dir, capsys)
    path = run_dir / "sensitivity.json"
    assert f'{path}: field layers[0].layer is "no.such.layer", expected a quantized layer' in err


def test_a_stage_s_metrics_edited_in_metrics_json_are_refused(run_dir, capsys):
    _edit_json(run_dir / "metrics.json", lambda m: m["stages"]["calibrate"].update(samples=100000))
    err = _refused(run_dir, capsys)
    assert f"{run_dir / 'metrics.json'}: field stages.calibrate is not what stage 1 (calibrate) recorded" in err


def test_a_stage_recorded_without_file_hashes_runs_again(run_dir):
    """A record from before content hashes (or one stripped of them) proves nothing: the stage runs again."""
    _edit_json(run_dir / "metrics.json", lambda m: m["fingerprints"][3].pop("files"))
    resumed = _resumed(run_dir)
    assert resumed["resumed"]["reused"] == ["calibrate", "sensitivity", "export"]
    assert resumed["resumed"]["rerun"] == ["build", "evaluate"]
    assert resumed["resumed"]["rerun_because"] == "stage 4 (build) recorded no hashes of its files (an older workbench)"


# ---------------------------------------------------------------------------------------------------------
# metrics.json fields of the wrong type: `workbench runs` and --resume (issue 28)
# ---------------------------------------------------------------------------------------------------------


def _planted_run(runs: Path, **fields) -> Path:
    run_dir = runs / "planted-20260101-000000.failed"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: planted\n")
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "failed", "started": "2026-01-01T00:00:00", "pid": 1, "host": socket.gethostname(),
        "stage_names": ["calibrate"], "timings_s": {}, "fingerprints": [], "stages": {}, "inputs": {}, **fields}))
    return run_dir


@pytest.mark.parametrize("field, value, expected", [
    ("pid", 10**30, "a process id: an integer from 1 to 4194304"),
    ("pid", "1", "a process id"),
    ("timings_s", 5, "an object of stage name -> seconds"),
    ("timings_s", {"calibrate": "fast"}, "an object of stage name -> seconds"),
    ("fingerprints", "abc", "a list of {stage, fingerprint, files"),
    ("fingerprints", [{"stage": "calibrate", "fingerprint": 5}], "a list of {stage, fingerprint, files"),
    ("fingerprints", [{"stage": "calibrate", "fingerprint": "x", "files": {"a": "not-a-hash"}}],
     "a list of {stage, fingerprint, files"),
    ("inputs", [], "an object of recipe field -> its record"),
    ("inputs", {"model.weights": 5}, "an object of recipe field -> its record"),
    ("stages", [], "an object of stage name -> that stage's metrics"),
    ("stages", {"calibrate": 5}, "an object of stage name -> that stage's metrics"),
    ("stage_names", "calibrate", "a list of stage names"),
    ("warnings", [5], "a list of {stage, message} records"),
])
def test_a_mistyped_record_field_is_refused_by_runs_and_resume(tmp_path, capsys, field, value, expected):
    runs = tmp_path / "runs"
    good = _planted_run(runs / "ok")
    planted = _planted_run(runs, **{field: value})
    shutil.move(good, runs / "good-20260101-000000.failed")
    shutil.rmtree(runs / "ok")
    before = _snapshot(planted)
    assert main(["runs", str(runs)]) == 2
    out, err = capsys.readouterr()
    assert "good-20260101-000000.failed" in out and "planted-20260101-000000.failed  damaged" in out  # still listed
    message = f"{planted / 'metrics.json'}: field {field} is"
    assert message in " ".join(err.split()) and expected in " ".join(err.split()) and "Traceback" not in err
    assert main(["run", "--resume", str(planted)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--resume: {message}" in err and expected in err and "Traceback" not in err
    assert _snapshot(planted) == before


@pytest.mark.parametrize("content, message", [
    ("[]", "holds a JSON list, expected an object"),
    ('{"status": "failed"', "is not JSON (line 1)"),
])
def test_a_metrics_json_that_is_no_record_is_refused(tmp_path, capsys, content, message):
    planted = _planted_run(tmp_path / "runs")
    (planted / "metrics.json").write_text(content)
    assert main(["run", "--resume", str(planted)]) == 2
    assert f"{planted / 'metrics.json'}: {message}" in " ".join(capsys.readouterr().err.split())
    assert main(["runs", str(tmp_path / "runs")]) == 2


def test_a_live_looking_run_with_a_planted_pid_is_not_marked_by_the_next_run(tmp_path, capsys):
    """A new run in the same runs_dir leaves a damaged neighbour alone (never rewrites it), and still runs."""
    runs = tmp_path / "runs"
    planted = _planted_run(runs, status="running", pid=10**30)
    planted = planted.rename(planted.with_name("planted-20260101-000000.incomplete"))
    before = _snapshot(planted)
    images = make_image_folder(tmp_path / "images", per_class=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, runs, "  - calibrate: {method: max}\n"))
    assert main(["run", str(recipe)]) == 0
    assert _snapshot(planted) == before


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero"])
def test_a_metrics_json_or_recipe_linked_elsewhere_is_refused(tmp_path, capsys, target):
    planted = _planted_run(tmp_path / "runs")
    for name in ("metrics.json", "recipe.yaml"):
        saved = (planted / name).read_bytes()
        (planted / name).unlink()
        (planted / name).symlink_to(target)
        assert main(["run", "--resume", str(planted)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{planted / name} is a symbolic link (to {target})" in err and "Traceback" not in err
        (planted / name).unlink()
        (planted / name).write_bytes(saved)


# ---------------------------------------------------------------------------------------------------------
# The trust keys: a run directory cannot turn on either (issue 28)
# ---------------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("key", ["trust_code", "trust_pickle"])
def test_resume_takes_neither_trust_key_from_the_run_directory(tmp_path, images, capsys, key):
    import torch

    from workbench.resume import open_previous

    marker = tmp_path / "PWNED"
    if key == "trust_code":
        model = f"{{spec: 'import:os:system', trust_code: true, kwargs: {{command: 'touch {marker}'}}}}"
    else:
        torch.save(_Payload(marker), tmp_path / "evil.pt")
        model = f"{{spec: 'file:{tmp_path / 'evil.pt'}', trust_pickle: true}}"
    run_dir = tmp_path / "evil.failed"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "failed", "stages": {}, "fingerprints": []}')
    (run_dir / "recipe.yaml").write_text(f"name: evil\nmodel: {model}\ndata: {{evaluation: {{source: imagefolder, "
                                         f"path: '{images}'}}}}\nstages:\n  - evaluate: {{}}\n")
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"sets model.{key}: true; a run directory is not trusted to say so" in err
    assert f"resume with the override model.{key}=true" in err
    assert not marker.exists()
    # Given again on the command line, the key counts (the recipe is read, nothing is run here).
    assert getattr(open_previous(run_dir).recipe([f"model.{key}=true"]).model, key) is True
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# A seeded fuzz of the record: any JSON in any field is read or refused by name, never a traceback
# ---------------------------------------------------------------------------------------------------------


def _random_json(rng, depth: int = 0):
    kind = rng.integers(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return int(rng.choice([0, -1, 1, 2**31, 2**63, 10**30, -(10**30), int(rng.integers(-1000, 5_000_000))]))
    if kind == 3:
        return float(rng.choice([0.0, -1.0, 1e308, math.inf, -math.inf, math.nan, float(rng.normal())]))
    if kind == 4:
        return str(rng.choice(["", "calibrate", "running", "failed", "a" * 300, "\x1b[31m", "0" * 64, "../x"]))
    if kind == 5:
        return "x" * int(rng.integers(0, 5))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    keys = ["stage", "fingerprint", "files", "path", "message", "calibrate", "metrics_sha256", "model.onnx"]
    return {str(rng.choice(keys)): _random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def test_any_json_in_any_record_field_is_read_or_refused_by_name(tmp_path, capsys):
    from workbench.resume import open_previous
    from workbench.run_record import RECORD_FIELDS, RecordError, read_record

    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    planted = _planted_run(runs)
    base = _metrics(planted)
    fields = [*RECORD_FIELDS, "pid", "fingerprints", "inputs", "stages", "timings_s"]  # the ones code indexes, twice
    refused = 0
    for case in range(400):
        # Odd cases: a run that says it is running, in a `.incomplete` directory (its process is looked up).
        metrics = {**base, "status": "running"} if case % 2 else dict(base)
        (planted,) = runs.iterdir()  # `workbench runs` renamed it where its process was gone
        planted = planted.rename(runs / f"planted-20260101-000000.{'incomplete' if case % 2 else 'failed'}")
        for _ in range(int(rng.integers(1, 3))):
            metrics[str(rng.choice(fields))] = _random_json(rng)
        if case % 50 == 0:
            metrics = _random_json(rng)  # not even an object
        (planted / "metrics.json").write_text(json.dumps(metrics))
        try:
            read_record(planted)
        except RecordError as e:
            refused += 1
            assert str(planted / "metrics.json") in str(e)
        assert main(["runs", str(runs)]) in (0, 2)
        try:
            open_previous(planted)
        except RecordError as e:
            assert str(planted / "metrics.json") in str(e)
        except Exception as e:  # a refusal of the resume itself (no fingerprints, still running) is fine
            assert type(e).__name__ == "WorkbenchError", e
    capsys.readouterr()
    assert 100 < refused < 400  # both roads were taken


def test_any_json_as_calibration_or_sensitivity_is_accepted_or_refused_by_name(tmp_path):
    """The checks resume runs on a reused calibration.json and sensitivity.json, over random JSON and random edits
    of real ones: they pass it or raise a RecordError naming the file, never anything else."""
    from workbench.run_record import RecordError
    from workbench.stages.calibrate import check_calibration
    from workbench.stages.sensitivity import check_sensitivity

    rng = np.random.default_rng(1)
    path = tmp_path / "x.json"
    real = {"calibration": {"config": {}, "activation_amax": {"a.input_quantizer": 1.5, "b.input_quantizer": 0.2},
                            "quantized_layers": {"a": "Conv2d", "b": "Linear"}, "float_layers": {}},
            "sensitivity": {"layers": [{"rank": 1, "layer": "a", "macs": 10, "only_sqnr_db": 30.0,
                                        "onnx_qdq_nodes": ["q"], "only_resolved": False, "ranked_by": "proxy"},
                                       {"rank": 2, "layer": "b", "macs": 5, "only_sqnr_db": math.inf,
                                        "onnx_qdq_nodes": [], "only_resolved": True, "ranked_by": "task"}]}}
    check_calibration(real["calibration"], path)  # the real shapes pass
    check_sensitivity(real["sensitivity"], path)
    outcomes = {"passed": 0, "refused": 0}
    for case in range(600):
        kind = "calibration" if case % 2 else "sensitivity"
        data = json.loads(json.dumps(real[kind]))
        if case % 3 == 0:
            data = _random_json(rng)
        else:  # one field of the real file replaced by random JSON, at the top or in a row / the ranges
            inner = data["activation_amax"] if kind == "calibration" else data["layers"][int(rng.integers(0, 2))]
            target = inner if rng.integers(0, 2) else data
            target[str(rng.choice([*target, "extra"]))] = _random_json(rng)
        check = check_calibration if kind == "calibration" else check_sensitivity
        try:
            check(data, path)
            outcomes["passed"] += 1
        except RecordError as e:
            outcomes["refused"] += 1
            assert str(path) in str(e) and "expected" in str(e)
    assert outcomes["passed"] > 10 and outcomes["refused"] > 300


def test_open_run_takes_no_trust_key_from_the_run_directory(tmp_path, images):
    """The notebook's `open_run` reads a run directory too: a recipe.yaml there that sets trust_code runs nothing
    unless the caller gives the key, and a planted link in place of calibration.json is refused."""
    from workbench import api
    from workbench.errors import WorkbenchError

    marker = tmp_path / "PWNED"
    run_dir = tmp_path / "evil"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(
        f"name: evil\nmodel: {{spec: 'import:os:system', trust_code: true, kwargs: {{command: 'touch {marker}'}}}}\n"
        f"data: {{evaluation: {{source: imagefolder, path: '{images}'}}}}\nstages:\n  - evaluate: {{}}\n")
    (run_dir / "calibration.json").write_text(json.dumps(
        {"config": {"method": "max"}, "activation_amax": {"conv1.input_quantizer": 1.0},
         "quantized_layers": {"conv1": "Conv2d"}, "float_layers": {}}))
    with pytest.raises(WorkbenchError, match="trust_code"):
        api.open_run(run_dir)
    assert not marker.exists()
    (run_dir / "calibration.json").unlink()
    (run_dir / "calibration.json").symlink_to("/etc/passwd")
    with pytest.raises(WorkbenchError, match="symbolic link"):
        api.open_run(run_dir)


def test_the_graph_an_openvino_engine_was_compiled_from_is_hashed_too(tmp_path, images, capsys, monkeypatch):
    """Evaluate measures the OpenVINO engine against model_openvino_int8.onnx: a rewritten copy of that graph must
    not be reused on --resume (the engine would be checked against a graph it was not compiled from)."""
    import workbench.stages.evaluate as evaluate_stage
    from workbench.errors import WorkbenchError

    stages = ("  - calibrate: {method: max}\n  - export: {}\n"
              "  - build: {engine: openvino, openvino_graph: u8, guard_min_agreement: 80}\n"
              "  - evaluate: {latency: false}\n")  # 80%: 16 images resolve it, and the fixture has 30
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", "helpers:trained_cnn"))

    def stop(*args):
        raise WorkbenchError("stopped here by the test")

    with monkeypatch.context() as patch:  # a run that fails in evaluate, after the engine was built and guarded
        patch.setattr(evaluate_stage, "_evaluate", stop)
        assert main(["run", str(recipe)]) == 2
    (failed,) = (tmp_path / "runs").iterdir()
    graph = failed / "model_openvino_int8.onnx"
    assert graph.is_file()
    model = onnx.load(str(graph))
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.int8 and array.size > 1:
            tensor.CopyFrom(numpy_helper.from_array(-array, tensor.name))
    onnx.save(model, str(graph))
    err = _refused(failed, capsys)
    assert f"{graph}: its content (SHA-256" in err and "(build) wrote" in err
