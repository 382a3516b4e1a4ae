"""`workbench run --resume RUN_DIR`: continue a failed or interrupted run from its first unfinished stage.

Every finished stage records in metrics.json a fingerprint (a hash of the recipe up to and including that
stage: the whole recipe but its name, runs_dir and later stages), the SHA-256 of its metrics, and the SHA-256
of every file resume would restore it from (the files its registration's restorer names: its ranges, graphs,
tables, engines, models). The run also records its inputs once: the model and weight files, the module of an `import:`
spec, a COCO annotations file and a named calibration set's YAML, each by its size, time and content hash,
and every data split a stage reads by the samples the run built from it: their count, a hash of their names
and labels (boxes, for detection) in order, and the size, time and content of at most SAMPLED_FILES of their
files, evenly spread, so that a split of a million images costs no million reads. So an image added, removed,
renamed or relabelled is noticed, an image rewritten in place only where it is one of those files; an
upgrade of workbench or of the libraries it calls is not.

On resume the recipe (the run's recipe.yaml, or the one given, with overrides) must give the same
fingerprints and inputs for every stage the run finished: if not, the resume is refused naming the
first stage that changed, since its artifacts no longer follow from the recipe. The finished stages
are then reused, each restored from its files in the run directory (the state it handed on to later
stages, and its metrics), in order, up to the first stage that cannot be restored soundly (a stage registered
without a restorer keeps its state only in memory; a restorer may decline, as one whose state lives only in its
checkpoints does): that stage and every later one run again. Each stage says how it comes back beside its own
function (stages/registry.py's Restorer): this module names no stage. A complete run is refused: there is
nothing to resume.

The run directory is untrusted input: it is reused for what it holds, never for the names of its files.
  - metrics.json and recipe.yaml are the run's record: one that fails its check (a field of the wrong type
    or an impossible value, run_record.py; a stage's metrics other than it recorded) ends the resume with
    exit 2, naming the file and the field, before anything is renamed or written.
  - A file a stage wrote that is missing, or whose hash was never recorded (an older workbench), is a stage
    that cannot be restored: it and every later one run again, as the console line says.
  - A file a stage wrote that is there but not what the stage wrote (another SHA-256), that fails its own
    check (each stage's restorer checks its own: an activation range that is not a finite number > 0, a
    quantizer or layer the model does not have, a rank that is no integer), or that is a symbolic link or no
    regular file, ends the resume with exit 2 naming the file, the field and what was expected, and the run
    directory as it was. It is not silently recomputed: an edited file may be someone's intent, and a damaged
    one a finding. Deleting that file makes its stage and every later one run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import WorkbenchError
from .recipe import Recipe, parse_recipe
from .rundir import is_alive, read_metrics
from .targets import DEFAULT_TARGET


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
    from .run_record import RecordError, run_file
    from .yaml_io import read_yaml_text

    run_dir = Path(run_dir)
    try:
        metrics = read_metrics(run_dir) if run_dir.is_dir() else None
        recipe = run_file(run_dir, "recipe.yaml") if run_dir.is_dir() else None
        recipe_text = read_yaml_text(recipe, "the run's recipe") if metrics is not None and recipe is not None else None
    except WorkbenchError as e:  # a damaged record, a link, a recipe too large or not UTF-8
        raise RecordError(f"--resume: {e}") from None
    except OSError as e:
        raise RecordError(f"--resume: {run_dir / 'recipe.yaml'}: cannot be read ({e.strerror}); start a new "
                          "run") from None
    if metrics is None or recipe_text is None:
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
    return Previous(run_dir, final_dir, metrics, recipe_text)


def stage_fingerprints(recipe: Recipe) -> list[str]:
    """One hash per stage: the recipe but its name and runs_dir, with the stages up to and including this one."""
    data = recipe.model_dump(mode="json")
    # log_to only says where results are also sent: adding TensorBoard on --resume changes no result.
    base = {k: v for k, v in data.items() if k not in ("name", "runs_dir", "log_to", "stages")}
    if base.get("target") == {"name": DEFAULT_TARGET}:  # the default target: runs from before `target:` resume
        del base["target"]
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
    from .models.registry import spec_input_file

    model = recipe.model
    paths = {"model.weights": model.weights, "model.pruned": model.pruned}
    paths["model.spec"] = spec_input_file(model.spec)  # a checkpoint, or an import: spec's module file
    sets, folders = {}, {}
    for split in datasets:
        config = getattr(recipe.data, split)
        if config.calib_set:  # the set's YAML decides which images, and its split where they are
            sets[f"data.{split}.calib_set"] = find_calib_set(config.calib_set, f"data.{split}.calib_set")
            config = load_calib_set(config.calib_set, f"data.{split}.calib_set")[0]
        paths[f"data.{split}.annotations"] = config.annotations
        folders[f"data.{split}.path"] = config.path or config.name or config.package  # for messages
    inputs = {field: _stat(Path(path)) for field, path in paths.items() if path and os.path.isfile(path)}
    inputs.update({field: _stat(path) for field, path in sets.items()})
    for split, dataset in datasets.items():
        inputs[f"data.{split}.path"] = _samples(dataset, folders[f"data.{split}.path"])
    return inputs


def _stat(path: Path) -> dict:
    """A file by size, time and a hash of its contents (streamed: a model of gigabytes costs its read)."""
    from .run_record import sha256_file

    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


SAMPLED_FILES = 256  # files of a data split whose size, time and content are recorded: a bounded cost for any split


def _samples(dataset, where: str | None) -> dict:
    """A data split by the samples the run reads (see the module's docstring)."""
    if hasattr(dataset, "records"):  # detection: each image with the boxes and classes its labels gave
        entries = [(str(r.path), r.boxes.tolist(), r.labels.tolist()) for r in dataset.records]
    else:
        entries = [(s.key, s.label) for s in dataset.samples]
    from .run_record import sha256_file

    digest = hashlib.sha256()
    for entry in entries:
        digest.update(repr(entry).encode())
    size, newest, contents = 0, 0, hashlib.sha256()
    for key, *_ in entries[:: max(1, len(entries) // SAMPLED_FILES)][:SAMPLED_FILES]:
        try:
            st = os.stat(key)
            if not stat.S_ISREG(st.st_mode):
                continue
            contents.update(sha256_file(Path(key)).encode())
        except OSError:  # a hub dataset's row, not a file
            continue
        size, newest = size + st.st_size, max(newest, st.st_mtime_ns)
    return {"path": str(where), "samples": len(entries), "sha256": digest.hexdigest(),
            "bytes": size, "mtime_ns": newest, "files_sha256": contents.hexdigest()}


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
        old = previous.metrics.get("inputs", {}).get(field)
        unhashed = old and inputs.get(field) and {"sha256", "files_sha256"} & (set(inputs[field]) - set(old))
        how = ("was recorded without a hash of its content (an older workbench), so it cannot be shown unchanged"
               if unhashed else f"changed since {previous.dir.name} ran")
        raise WorkbenchError(
            f"--resume: {field} ({path}) {how}, so stage 1 ({first}) and every later "
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


def stage_record(run, name: str, options, fingerprint: str) -> dict:
    """What metrics.json records of a stage that just finished: its fingerprint, the SHA-256 of every file resume
    would restore it from, and of its metrics (what --resume checks before reusing it)."""
    from .run_record import sha256_file, sha256_values

    values = run.metrics.get("stages", {}).get(name)
    restorer = _restorer(name)
    names = restorer.files(options, values) if restorer is not None and isinstance(values, dict) else []
    files = {n: sha256_file(run.path(n)) for n in names if run.path(n).is_file()}
    return {"stage": name, "fingerprint": fingerprint, "files": files, "metrics_sha256": sha256_values(values)}


@dataclass
class Restored:
    """What restore_stages gave back: the stages restored, in order, and why the next finished one runs again."""

    stages: list[str]
    rerun_because: str | None = None  # None: every finished stage was restored


def restore_stages(run, previous: Previous, count: int) -> Restored:
    """Restore the first `count` finished stages from the run directory, in order, up to the first that cannot be;
    copy their metrics, timings and fingerprints into the run's.

    Each stage's metrics and files are checked first (see the module's docstring): one missing, or recorded without
    its hash, ends the restoring there (that stage runs again); one present but not what the stage wrote, or that
    fails its check, is a RecordError naming the file and the field."""
    fingerprints = previous.metrics["fingerprints"][:count]
    recorded: dict[str, str] = {}  # file -> its hash as the stage that wrote it last recorded it
    for entry in fingerprints:
        recorded.update(entry.get("files", {}))
    restored = Restored([])
    for index, ((name, options), entry) in enumerate(zip(run.recipe.stage_list()[:count], fingerprints)):
        values = previous.metrics.get("stages", {}).get(name)
        restorer = _restorer(name)
        if values is None:
            restored.rerun_because = f"{name} recorded no metrics"
        elif restorer is None:
            restored.rerun_because = f"{name} keeps its state only in memory"
        elif not _same_metrics(previous, index, name, values, entry):
            restored.rerun_because = f"{name} was recorded without a hash of its metrics (an older workbench)"
        else:
            loaded, restored.rerun_because = _checked_files(run, restorer, options, values, entry, recorded,
                                                            f"stage {index + 1} ({name})")
            if loaded is not None and not restorer.restore(run, options, values, loaded):
                restored.rerun_because = f"{name} cannot be restored from the run directory"
        if restored.rerun_because is not None:
            break
        run.metrics["stages"][name] = values
        if name in previous.metrics.get("timings_s", {}):
            run.metrics.setdefault("timings_s", {})[name] = previous.metrics["timings_s"][name]
        run.metrics["fingerprints"].append(entry)
        # The stage's warnings come with it: a reused stage whose output failed a check still says so.
        run.metrics.setdefault("warnings", []).extend(
            w for w in previous.metrics.get("warnings", []) if w.get("stage") == name)
        restored.stages.append(name)
    return restored


def _restorer(name: str):
    """How a finished stage comes back from its run directory: its registration's restorer (None: it keeps its state
    only in memory, and runs again)."""
    from .stages import STAGES

    return STAGES[name].restorer if name in STAGES else None


def _same_metrics(previous: Previous, index: int, name: str, values: dict, entry: dict) -> bool:
    """Whether the stage's metrics are those it recorded (False: recorded by an older workbench, without a hash:
    the stage runs again); a RecordError where they were edited since."""
    from .run_record import RecordError, sha256_values

    if "metrics_sha256" not in entry:
        return False
    if sha256_values(values) != entry["metrics_sha256"]:
        raise RecordError(
            f"--resume: {previous.dir / 'metrics.json'}: field stages.{name} is not what stage {index + 1} ({name}) "
            f"recorded (its SHA-256 differs from fingerprints[{index}].metrics_sha256): the run's record was edited "
            "since; start a new run"
        )
    return True


def _checked_files(run, restorer, options, values: dict, entry: dict, recorded: dict[str, str],
                   stage: str) -> tuple[dict[str, Any] | None, str | None]:
    """The stage's files checked as the module's docstring says: ({JSON file: its content}, None) when every one is
    there and is what the stage wrote; (None, why) when one is missing or its hash was never recorded (the stage
    runs again)."""
    from .run_record import RecordError, read_json, run_file, sha256_file

    if "files" not in entry:  # an older workbench recorded no content: nothing to check the files against
        return None, f"{stage} recorded no hashes of its files (an older workbench)"
    loaded = {}
    for name in restorer.files(options, values):
        path = run_file(run.dir, name)  # a link or a non-regular file is refused here, before it is read
        if path is None:
            return None, f"{name} is missing"
        if name not in recorded:
            return None, f"no hash of {name} was recorded"
        if name in restorer.checks:
            content, digest = read_json(path)
            restorer.checks[name](content, path)  # the field that is wrong names itself better than a hash
            loaded[name] = content
        else:
            digest = sha256_file(path)
        if digest != recorded[name]:
            raise RecordError(
                f"--resume: {path}: its content (SHA-256 {digest[:16]}...) is not what {stage} wrote (SHA-256 "
                f"{recorded[name][:16]}..., recorded in metrics.json fingerprints): it was edited or damaged since. "
                f"{_remedy(path, stage)}"
            )
    return loaded, None


def _remedy(path: Path, stage: str) -> str:
    return f"Delete {path.name} to have {stage} and every later stage run again on --resume, or start a new run"


