"""`workbench run --resume RUN_DIR`: continue a failed or interrupted run from its first unfinished stage.

Every finished stage records in metrics.json a fingerprint (a hash of the recipe up to and including that
stage: the whole recipe but its name, runs_dir and later stages), the SHA-256 of its metrics, and the SHA-256
of every file resume would restore it from (calibration.json, the ONNX files, sensitivity.json, the engine,
pruned_model.pt). The run also records its inputs once: the model and weight files, the module of an `import:`
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
stages, and its metrics), in order, up to the first stage that cannot be restored soundly (qat and
mixed_precision keep their state only in memory; a finetune without prune only in its checkpoints):
that stage and every later one run again. A complete run is refused: there is nothing to resume.

The run directory is untrusted input: it is reused for what it holds, never for the names of its files.
  - metrics.json and recipe.yaml are the run's record: one that fails its check (a field of the wrong type
    or an impossible value, run_record.py; a stage's metrics other than it recorded) ends the resume with
    exit 2, naming the file and the field, before anything is renamed or written.
  - A file a stage wrote that is missing, or whose hash was never recorded (an older workbench), is a stage
    that cannot be restored: it and every later one run again, as the console line says.
  - A file a stage wrote that is there but not what the stage wrote (another SHA-256), that fails its own
    check (an activation range that is not a finite number > 0, a quantizer or layer the model does not have,
    a sensitivity rank that is no integer), or that is a symbolic link or no regular file, ends the resume
    with exit 2 naming the file, the field and what was expected, and the run directory as it was. It is not
    silently recomputed: an edited file may be someone's intent, and a damaged one a finding. Deleting that
    file makes its stage and every later one run again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    if base.get("target") == {"name": "tensorrt"}:  # the default target: runs from before `target:` still resume
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
    restorer = RESTORERS.get(name)
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
    recorded: dict[str, str] = {}  # file -> its hash as the last stage that wrote it recorded (finetune re-saves)
    for entry in fingerprints:
        recorded.update(entry.get("files", {}))
    restored = Restored([])
    for index, ((name, options), entry) in enumerate(zip(run.recipe.stage_list()[:count], fingerprints)):
        values = previous.metrics.get("stages", {}).get(name)
        restorer = RESTORERS.get(name)
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
        # The stage's warnings come with it: a reused export that failed check-onnx still says so.
        run.metrics.setdefault("warnings", []).extend(
            w for w in previous.metrics.get("warnings", []) if w.get("stage") == name)
        restored.stages.append(name)
    return restored


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


def _checked_files(run, restorer: Restorer, options, values: dict, entry: dict, recorded: dict[str, str],
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


def _bad(path: Path, field: str, value: Any, expected: str) -> Exception:
    from .run_record import RecordError, show

    what = f"field {field} is {show(value)}" if field else f"holds {show(value)}"
    return RecordError(f"--resume: {path}: {what}, expected {expected}: it was edited or damaged since the run "
                       f"wrote it. Delete {path.name} to have its stage and every later one run again on --resume, "
                       "or start a new run")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------
# One restorer per stage that hands something on: the files it reads, their checks, the restoring
# ---------------------------------------------------------------------------------------------------------


def check_calibration(saved: Any, path: Path) -> None:
    """calibration.json as calibrate writes it: every activation range a finite number > 0 (one per quantizer,
    per tensor; calibrate never writes less than quant.ptq.MIN_AMAX), the layer lists lists of names."""
    if not isinstance(saved, dict):
        raise _bad(path, "", saved, "an object with config, activation_amax and quantized_layers (calibrate's ranges)")
    if not isinstance(saved.get("config"), dict):
        raise _bad(path, "config", saved.get("config"), "an object (the calibrate stage's options)")
    amax = saved.get("activation_amax")
    if not isinstance(amax, dict) or not amax:
        raise _bad(path, "activation_amax", amax, "an object of quantizer name -> activation range")
    for quantizer, value in amax.items():
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise _bad(path, f"activation_amax[{json.dumps(quantizer)}]", value,
                       "a finite number > 0 (the quantizer's activation range, one per tensor)")
    if "target" in saved:
        from .quant.targets import Arithmetic

        try:
            Arithmetic.from_dict(saved["target"])
        except (ValueError, TypeError) as e:
            raise _bad(path, "target", saved["target"], str(e)) from None
    lower = saved.get("activation_min", {})
    if not isinstance(lower, dict):
        raise _bad(path, "activation_min", lower, "an object of quantizer name -> lower end of its range")
    for quantizer, value in lower.items():
        if not _is_number(value) or not math.isfinite(value) or value > 0:
            raise _bad(path, f"activation_min[{json.dumps(quantizer)}]", value,
                       "a finite number <= 0 (the lower end of the quantizer's asymmetric range)")
    for key in ("quantized_layers", "float_layers"):
        layers = saved.get(key)
        if not isinstance(layers, dict) or not all(isinstance(t, str) for t in layers.values()):
            raise _bad(path, key, layers, "an object of layer name -> layer type")


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


def _pruned_files(options, values) -> list[str]:
    return ["pruned_model.pt"]


def _pruned(run, options, values, loaded) -> bool:
    """prune: the pruned model from pruned_model.pt (as a later finetune re-saved it, when it finished too)."""
    from .models import resolve_model

    path = run.path("pruned_model.pt")
    model = resolve_model(run.recipe.model.model_copy(update={"pruned": str(path)}))
    run.model = model.to(run.device).eval()
    run.artifacts.pruned_fp32 = run.model
    run.artifacts.pruned_file = path
    return True


def _finetuned(run, options, values, loaded) -> bool:
    # After prune, pruned_model.pt holds the fine-tuned weights, already restored with the prune stage;
    # a finetune without prune keeps its weights only in the epoch checkpoints: it runs again.
    return run.artifacts.pruned_file is not None


def _without_why(arithmetic: dict) -> dict:
    # `why` names the CPU model; the arithmetic is the rest (the same on another CPU of the same variant).
    return {k: v for k, v in arithmetic.items() if k != "why"} if isinstance(arithmetic, dict) else arithmetic


def _calibrated(run, options, values, loaded) -> bool:
    from .errors import CalibrationError
    from .quant.ptq import restore_
    from .quant.targets import TENSORRT

    saved = loaded["calibration.json"]
    if saved["config"] != options.model_dump(mode="json"):
        return False  # written by a workbench whose calibrate options differ: calibrate again
    path = run.path("calibration.json")
    if run.artifacts.pruned_fp32 is run.model:  # as the calibrate stage: keep the pruned FP32 model apart
        run.artifacts.pruned_fp32 = copy.deepcopy(run.model)
    amax = saved["activation_amax"]
    arithmetic = run.arithmetic
    calibrated_for = _without_why(saved["target"]) if "target" in saved else TENSORRT.target
    wanted = _without_why(arithmetic.for_weights(options.weights).as_dict()) if "target" in saved else arithmetic.target
    if calibrated_for != wanted:
        return False  # calibrated for another target (or CPU variant): calibrate again
    from .quant.algorithms.base import StateError, read_run_state

    try:  # what the PTQ algorithms changed (ptq_state.pt, its hash checked), re-applied by restore_
        state = read_run_state(run.dir, options)
        run.artifacts.quant = result = restore_(run.model, options, amax, run.example_input(), arithmetic,
                                                saved.get("activation_min"), ptq_state=state)
    except StateError as e:
        raise _bad(run.path("ptq_state.pt"), "", "a state", f"one that fits the model ({e})")
    except CalibrationError as e:  # a quantizer of the model without a range
        raise _bad(path, "activation_amax", f"{len(amax)} ranges", f"a range for every quantizer of the model ({e})")
    if extra := sorted(set(amax) - set(result.activation_amax)):
        raise _bad(path, f"activation_amax[{json.dumps(extra[0])}]", amax[extra[0]],
                   f"no range for a quantizer the model does not have ({len(extra)} such name(s)); the model's "
                   f"quantizers are e.g. {sorted(result.activation_amax)[:3]}")
    if saved["quantized_layers"] != result.quantized:
        raise _bad(path, "quantized_layers", saved["quantized_layers"],
                   f"the layers calibrate quantizes in this model, {_show_list(list(result.quantized))}")
    return True


def _show_list(names: list[str], limit: int = 4) -> str:
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"


def _exported_files(options, values) -> list[str]:
    return [n for n, v in values.items() if isinstance(v, dict) and "bytes" in v]


def _exported(run, options, values, loaded) -> bool:
    """The ONNX files export wrote (their content already checked against the hashes it recorded)."""
    from .stages.export import MODEL, onnx_files

    present = set(_exported_files(options, values))
    if MODEL not in present:
        return False
    run.artifacts.onnx = onnx_files(run, present)
    return True


def _sensitivity(run, options, values, loaded) -> bool:
    from .quant.ptq import quant_units

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


def _built_files(options, values) -> list[str]:
    if not values.get("built"):
        return []
    if values.get("engine", "tensorrt") == "tensorrt":  # the engine and its sidecar, which says `verified`
        return [f"model_{options.precision}.engine", f"model_{options.precision}.engine.json"]
    from .runtime.openvino import artifact_files

    # The IR, its weights and its sidecar; the blob (a compiled cache) where the compile left one; and the converted
    # graph the INT8 engine was compiled from, which evaluate measures the engine against.
    files = [p.name for key in ("int8", "fp32") if key in values
             for p in artifact_files(Path(f"model_openvino_{key}.xml")) if p.suffix != ".blob"]
    int8 = values.get("int8")
    if isinstance(int8, dict) and int8.get("graph", "tensorrt_style") != "tensorrt_style":
        files.append("model_openvino_int8.onnx")
    return files


def _built(run, options, values, loaded) -> bool:
    """The engine files the build stage wrote (an OpenVINO IR also with its sidecar, which says it was compiled by
    this OpenVINO for this CPU)."""
    if not values.get("built"):
        return True  # nothing was built: nothing to hand on
    from .runtime.guard import GuardPolicy

    # The recipe's threshold, for evaluate's check of every engine on the evaluation split.
    run.artifacts.engine_guard = GuardPolicy(options.guard_min_agreement, options.guard_min_sqnr_db,
                                             options.guard_confidence, options.guard_max_samples)
    if values.get("engine", "tensorrt") == "tensorrt":
        run.artifacts.tensorrt_engine = run.path(f"model_{options.precision}.engine")
        return True
    from .runtime.openvino import check_sidecar

    found = {}
    for key in ("int8", "fp32"):
        if key in values:
            xml = run.path(f"model_openvino_{key}.xml")
            try:
                check_sidecar(xml)
            except WorkbenchError:  # another OpenVINO or CPU since: compile again
                return False
            found[key] = xml
    run.artifacts.openvino_int8, run.artifacts.openvino_fp32 = found.get("int8"), found.get("fp32")
    if "int8" in found:  # the graph it was compiled from (model.onnx itself for the TensorRT-style layout)
        converted = run.path("model_openvino_int8.onnx")
        run.artifacts.openvino_int8_graph = converted if converted.is_file() else run.artifacts.onnx.model
    return True


def _metrics_only(run, options, values, loaded) -> bool:
    return True  # evaluate and bench hand nothing on: their metrics are all there is


def _no_files(options, values) -> list[str]:
    return []


@dataclass(frozen=True)
class Restorer:
    """How a finished stage comes back from its run directory: the files restoring reads (by name, from the stage's
    options and metrics; export hashes them as it finishes), the check of each JSON one, and the restoring (False:
    the stage runs again)."""

    restore: Callable[..., bool]  # (run, options, values, {JSON file: its checked content}) -> restored
    files: Callable[[Any, dict], list[str]] = _no_files
    checks: dict[str, Callable[[Any, Path], None]] = field(default_factory=dict)


RESTORERS = {
    "prune": Restorer(_pruned, _pruned_files),
    "finetune": Restorer(_finetuned, _pruned_files),
    "calibrate": Restorer(_calibrated, lambda o, v: ["calibration.json", *(["ptq_state.pt"] if getattr(
        o, "algorithms", None) else [])], {"calibration.json": check_calibration}),
    "export": Restorer(_exported, _exported_files),
    "sensitivity": Restorer(_sensitivity, lambda o, v: ["sensitivity.json"], {"sensitivity.json": check_sensitivity}),
    "build": Restorer(_built, _built_files),
    "evaluate": Restorer(_metrics_only),
    "bench": Restorer(_metrics_only),
}
