"""`workbench run --resume RUN_DIR`: continue a failed or interrupted run from its first unfinished stage.

Every finished stage records a fingerprint in metrics.json: a hash of the recipe up to and including
that stage (the whole recipe but its name, runs_dir and later stages). The run also records its inputs
once: the model and weight files, the module of an `import:` spec, a COCO annotations file and a
named calibration set's YAML, each by size and modification time (the calibration set's YAML also by
its contents), and every data split a stage reads by the samples the run built from it: their count, a
hash of their names and labels (boxes, for detection) in order, and the size and time of at most
SAMPLED_FILES of their files, evenly spread, so that a split of a million images costs no million stat
calls. So an image added, removed, renamed or relabelled is noticed, an image rewritten in place only
where it is one of those files; file contents are not read, and neither is an upgrade of workbench or
of the libraries it calls.

On resume the recipe (the run's recipe.yaml, or the one given, with overrides) must give the same
fingerprints and inputs for every stage the run finished: if not, the resume is refused naming the
first stage that changed, since its artifacts no longer follow from the recipe. The finished stages
are then reused, each restored from its files in the run directory (the state it handed on to later
stages, and its metrics), in order, up to the first stage that cannot be restored soundly (qat and
mixed_precision keep their state only in memory; a finetune without prune only in its checkpoints):
that stage and every later one run again. A complete run is refused: there is nothing to resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkbenchError
from .recipe import Recipe, parse_recipe
from .rundir import is_alive, read_metrics


@dataclass
class Previous:
    """The run to resume: its directory as found, the name it ends with, its metrics and its recipe."""

    dir: Path
    final_dir: Path
    metrics: dict
    recipe_text: str

    def recipe(self, overrides: list[str] | tuple[str, ...] = (), check_trust: bool = True) -> Recipe:
        """The run's own recipe.yaml. A run directory is untrusted input like any file: the trust keys written
        in it count only when the command line gives them again (else a tampered recipe.yaml could run code)."""
        recipe = parse_recipe(self.recipe_text, str(self.dir / "recipe.yaml"), overrides)
        for key in ("trust_code", "trust_pickle") if check_trust else ():
            if getattr(recipe.model, key) and not any(o.split("=", 1)[0] == f"model.{key}" for o in overrides):
                raise WorkbenchError(
                    f"--resume: {self.dir / 'recipe.yaml'} sets model.{key}: true; a run directory is not trusted to "
                    f"say so. If you trust this run, resume with the override model.{key}=true"
                )
        return recipe

    def claim(self) -> Path:
        """Rename the run to `.incomplete` (it is running again); return the new path."""
        work_dir = self.final_dir.with_name(self.final_dir.name + ".incomplete")
        if work_dir != self.dir:
            try:
                os.replace(self.dir, work_dir)
            except OSError as e:
                raise WorkbenchError(f"--resume: cannot rename {self.dir} to {work_dir.name} ({e.strerror}): "
                                     "the run directory must be writable") from None
        return work_dir


def open_previous(run_dir: str | os.PathLike) -> Previous:
    """The run at `run_dir`, if it can be resumed; else a WorkbenchError saying why."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir) if run_dir.is_dir() else None
    if metrics is None or not (run_dir / "recipe.yaml").is_file():
        raise WorkbenchError(f"--resume: {run_dir} is not a run directory (no readable metrics.json and recipe.yaml): "
                             "give a runs/<name>-<timestamp>.failed directory")
    name = run_dir.name
    if not name.endswith((".failed", ".incomplete")):
        raise WorkbenchError(f"--resume: {run_dir} is a {metrics.get('status', 'finished')} run, nothing to resume; "
                             f"to run it again, start a new run: workbench run {run_dir / 'recipe.yaml'}")
    if name.endswith(".incomplete") and metrics.get("status") == "running" and is_alive(metrics) is not False:
        raise WorkbenchError(f"--resume: {run_dir} is still running (pid {metrics.get('pid', '?')} on "
                             f"{metrics.get('host', '?')}): wait for it to end, or stop it, then resume")
    if "fingerprints" not in metrics:
        raise WorkbenchError(f"--resume: {run_dir} records no stage fingerprints (an older workbench wrote it), so "
                             "its stages cannot be checked for reuse: start a new run with its recipe.yaml")
    final_dir = run_dir.with_name(name.rsplit(".", 1)[0])
    if final_dir.exists():
        raise WorkbenchError(f"--resume: {final_dir} exists, and the resumed run would end under that name: move one "
                             "of the two away")
    return Previous(run_dir, final_dir, metrics, (run_dir / "recipe.yaml").read_text(encoding="utf-8"))


def stage_fingerprints(recipe: Recipe) -> list[str]:
    """One hash per stage: the recipe but its name and runs_dir, with the stages up to and including this one."""
    data = recipe.model_dump(mode="json")
    # log_to only says where results are also sent: adding TensorBoard on --resume changes no result.
    base = {k: v for k, v in data.items() if k not in ("name", "runs_dir", "log_to", "stages")}
    digest = hashlib.sha256(json.dumps(base, sort_keys=True).encode())
    out = []
    for stage in data["stages"]:
        digest.update(json.dumps(stage, sort_keys=True).encode())
        out.append(digest.copy().hexdigest()[:16])
    return out


def describe_inputs(recipe: Recipe, datasets: dict) -> dict[str, dict]:
    """What a run reads, by recipe field (after the model was loaded): the model's files by size and time, the
    data splits in `datasets` (the ones the stages read, as preflight built them) by their samples."""
    from .data.calibsets import find_calib_set, load_calib_set

    model = recipe.model
    paths = {"model.weights": model.weights, "model.pruned": model.pruned}
    source, _, rest = model.spec.partition(":")
    if source in ("file", "yolov5", "ultralytics"):
        paths["model.spec"] = rest
    elif source == "import":
        module = sys.modules.get(rest.split(":")[0])  # imported by the preflight: its source file
        paths["model.spec"] = getattr(module, "__file__", None)
    sets, folders = {}, {}
    for split in datasets:
        config = getattr(recipe.data, split)
        if config.calib_set:  # the set's YAML decides which images, and its split where they are
            sets[f"data.{split}.calib_set"] = find_calib_set(config.calib_set, f"data.{split}.calib_set")
            config = load_calib_set(config.calib_set, f"data.{split}.calib_set")[0]
        paths[f"data.{split}.annotations"] = config.annotations
        folders[f"data.{split}.path"] = config.path or config.name or config.package  # for messages
    inputs = {field: _stat(Path(path)) for field, path in paths.items() if path and os.path.isfile(path)}
    inputs.update({field: _stat(path, contents=True) for field, path in sets.items()})
    for split, dataset in datasets.items():
        inputs[f"data.{split}.path"] = _samples(dataset, folders[f"data.{split}.path"])
    return inputs


def _stat(path: Path, contents: bool = False) -> dict:
    """A file by size and time; `contents`: also by a hash of them (a short file, whose edit may keep both)."""
    st = path.stat()
    entry = {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    if contents:
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entry


SAMPLED_FILES = 256  # files of a data split whose size and time are recorded: a bounded cost for any split


def _samples(dataset, where: str | None) -> dict:
    """A data split by the samples the run reads (see the module's docstring)."""
    if hasattr(dataset, "records"):  # detection: each image with the boxes and classes its labels gave
        entries = [(str(r.path), r.boxes.tolist(), r.labels.tolist()) for r in dataset.records]
    else:
        entries = [(s.key, s.label) for s in dataset.samples]
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(repr(entry).encode())
    size, newest = 0, 0
    for key, *_ in entries[:: max(1, len(entries) // SAMPLED_FILES)][:SAMPLED_FILES]:
        try:
            st = os.stat(key)
        except OSError:  # a hub dataset's row, not a file
            continue
        size, newest = size + st.st_size, max(newest, st.st_mtime_ns)
    return {"path": str(where), "samples": len(entries), "sha256": digest.hexdigest(),
            "bytes": size, "mtime_ns": newest}


def check_reusable(previous: Previous, recipe: Recipe, inputs: dict[str, dict]) -> int:
    """How many leading stages the run finished with this very recipe and inputs; refuse if any of them changed."""
    done = previous.metrics["fingerprints"]
    if not done:
        return 0
    first = done[0]["stage"]
    if changed := sorted(k for k in set(inputs) | set(previous.metrics.get("inputs", {}))
                         if inputs.get(k) != previous.metrics.get("inputs", {}).get(k)):
        field = changed[0]
        path = (inputs.get(field) or previous.metrics["inputs"][field])["path"]
        raise WorkbenchError(
            f"--resume: {field} ({path}) changed since {previous.dir.name} ran, so stage 1 ({first}) and every later "
            "one would no longer follow from its inputs; start a new run instead of resuming"
        )
    now = stage_fingerprints(recipe)
    names = [name for name, _ in recipe.stage_list()]
    for i, entry in enumerate(done):
        if i >= len(now) or names[i] != entry["stage"] or now[i] != entry["fingerprint"]:
            what = _changes(previous, recipe, i) or [f"the recipe has no stage {i + 1} ({entry['stage']}) now"]
            raise WorkbenchError(
                f"--resume: stage {i + 1} ({entry['stage']}) finished under another recipe ({'; '.join(what[:3])}), so "
                "its artifacts do not follow from this one. Resume with the run's own recipe (drop the change), or "
                "start a new run"
            )
    return len(done)


def _changes(previous: Previous, new: Recipe, index: int) -> list[str]:
    """'key: old -> new' for every field that differs in the part of the recipe that stage `index` depends on."""
    try:
        old = previous.recipe(check_trust=False)  # only compared, never run
    except WorkbenchError:  # a recipe.yaml this workbench no longer reads: the fingerprint alone tells
        return []

    def part(recipe: Recipe) -> dict:
        data = recipe.model_dump(mode="json")
        data.pop("name"), data.pop("runs_dir"), data.pop("log_to", None)
        data["stages"] = data["stages"][: index + 1]
        return _flat(data)

    a, b = part(old), part(new)
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def restore_stages(run, previous: Previous, count: int) -> list[str]:
    """Restore the first `count` finished stages from the run directory, in order, up to the first that cannot be;
    copy their metrics, timings and fingerprints into the run's; return the names of the stages restored."""
    restored = []
    for (name, options), entry in zip(run.recipe.stage_list()[:count], previous.metrics["fingerprints"]):
        values = previous.metrics.get("stages", {}).get(name)
        restore = RESTORERS.get(name)
        if values is None or restore is None or not restore(run, options, values):
            break
        run.metrics["stages"][name] = values
        if name in previous.metrics.get("timings_s", {}):
            run.metrics.setdefault("timings_s", {})[name] = previous.metrics["timings_s"][name]
        run.metrics["fingerprints"].append(entry)
        # The stage's warnings come with it: a reused export that failed check-onnx still says so.
        run.metrics.setdefault("warnings", []).extend(
            w for w in previous.metrics.get("warnings", []) if isinstance(w, dict) and w.get("stage") == name)
        restored.append(name)
    return restored


def _pruned(run, options, values) -> bool:
    """prune: the pruned model from pruned_model.pt (as a later finetune re-saved it, when it finished too)."""
    from .models import resolve_model

    path = run.path("pruned_model.pt")
    if not path.is_file():
        return False
    model = resolve_model(run.recipe.model.model_copy(update={"pruned": str(path)}))
    run.model = model.to(run.device).eval()
    run.artifacts.pruned_fp32 = run.model
    run.artifacts.pruned_file = path
    return True


def _finetuned(run, options, values) -> bool:
    # After prune, pruned_model.pt holds the fine-tuned weights, already restored with the prune stage;
    # a finetune without prune keeps its weights only in the epoch checkpoints: it runs again.
    return run.artifacts.pruned_file is not None


def _calibrated(run, options, values) -> bool:
    from .quant.ptq import restore_

    path = run.path("calibration.json")
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    if saved.get("config") != options.model_dump(mode="json"):
        return False
    if run.artifacts.pruned_fp32 is run.model:  # as the calibrate stage: keep the pruned FP32 model apart
        run.artifacts.pruned_fp32 = copy.deepcopy(run.model)
    run.artifacts.quant = restore_(run.model, options, saved["activation_amax"], run.example_input())
    return True


def _exported(run, options, values) -> bool:
    """The ONNX files export wrote, where each is still there with the size it had."""
    from .stages.export import MODEL, onnx_files

    present = {n: run.path(n) for n, v in values.items() if isinstance(v, dict) and "bytes" in v}
    if MODEL not in present or any(not p.is_file() or p.stat().st_size != values[n]["bytes"]
                                   for n, p in present.items()):
        return False
    run.artifacts.onnx = onnx_files(run, set(present))
    return True


def _sensitivity(run, options, values) -> bool:
    path = run.path("sensitivity.json")
    if not path.is_file():
        return False
    run.artifacts.sensitivity = json.loads(path.read_text())["layers"]
    return True


def _built(run, options, values) -> bool:
    """The engine files the build stage wrote, where each is still there (an OpenVINO IR also with its sidecar,
    which says it was compiled by this OpenVINO for this CPU)."""
    if not values.get("built"):
        return True  # nothing was built: nothing to hand on
    if values.get("engine", "tensorrt") == "tensorrt":
        engine = run.path(f"model_{options.precision}.engine")
        if not engine.is_file():
            return False
        run.artifacts.tensorrt_engine = engine
        return True
    from .runtime.openvino import artifact_files, check_sidecar

    found = {}
    for key in ("int8", "fp32"):
        if key in values:
            xml = run.path(f"model_openvino_{key}.xml")
            if not all(p.is_file() for p in artifact_files(xml) if p.suffix != ".blob"):
                return False
            try:
                check_sidecar(xml)
            except WorkbenchError:  # another OpenVINO or CPU since: compile again
                return False
            found[key] = xml
    run.artifacts.openvino_int8, run.artifacts.openvino_fp32 = found.get("int8"), found.get("fp32")
    if "int8" in found:  # the graph it was compiled from (model.onnx itself for the TensorRT-style layout)
        converted = run.path("model_openvino_int8.onnx")
        run.artifacts.openvino_int8_graph = converted if converted.is_file() else run.artifacts.onnx.model
    from .runtime.guard import GuardPolicy

    run.artifacts.engine_guard = GuardPolicy(options.guard_min_agreement, options.guard_min_sqnr_db,
                                             options.guard_confidence, options.guard_max_samples)
    return True


def _metrics_only(run, options, values) -> bool:
    return True  # evaluate and bench hand nothing on: their metrics are all there is


RESTORERS = {"prune": _pruned, "finetune": _finetuned, "calibrate": _calibrated, "export": _exported,
             "sensitivity": _sensitivity, "build": _built, "evaluate": _metrics_only, "bench": _metrics_only}
