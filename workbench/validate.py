"""What a recipe needs to exist before it can run, checked in seconds without loading a model or reading an image.

The schema (schema.py, recipe.py) says whether a recipe is well formed; these checks say whether it
can run, here: its stages come in an order where each finds what it needs (the artifacts earlier
stages declare they make), the model source and name are known, every file and folder it names is
there, every stage has the data split it reads, and optional parts it requires are installed.
`workbench validate` and `run` (first thing in preflight) both call `check_recipe_inputs`, so
validate passes only what run then accepts as far as files and names go. The model's rules are
the registry's own (models.registry.spec_problems) and the Hugging Face download rule the data
source's (data.sources.hf_problems): the loaders refuse with the same functions, so a problem
reads the same whichever finds it. Nothing here imports user code or unpickles a file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import RecipeError, WorkbenchError
from .models.registry import missing_path, spec_problems
from .schema import DataSplit, Recipe
from .stages import STAGES, order_problems


def check_recipe_inputs(recipe: Recipe, source: str = "the recipe") -> None:
    """Raise one RecipeError listing every problem `recipe_input_problems` finds."""
    problems = recipe_input_problems(recipe)
    if problems:
        head = f"{source} cannot run here ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
        raise RecipeError("\n".join([head] + [f"  - {p}" for p in problems]))


def recipe_input_problems(recipe: Recipe) -> list[str]:
    """Every problem with the recipe's stage order, model, files, data splits and required extras, each naming its
    stage or field."""
    from .tracking import missing_packages

    return (order_problems(recipe.stage_list()) + spec_problems(recipe.model) + _data_problems(recipe)
            + _stage_problems(recipe) + _target_problems(recipe) + missing_packages(recipe.log_to)
            + runs_dir_problems(recipe.runs_dir))


# Kernel pseudo-filesystems: a folder there is no place for a run (/proc/self/x, /sys, /dev).
_PSEUDO_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def runs_dir_problems(runs_dir: str | os.PathLike) -> list[str]:
    """Why runs will not be written under `runs_dir`, found without writing anything (run probes by writing, in
    rundir.check_runs_dir): a file there or above it, a pseudo-filesystem, a folder that cannot be written."""
    hint = "set runs_dir to a folder (runs_dir: PATH in the recipe, or runs_dir=PATH on the command line)"
    try:
        path = Path(os.path.abspath(runs_dir))
        resolved = path.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        return [f"runs_dir: {runs_dir!r} is no usable path ({e}): {hint}"]
    for root in _PSEUDO_ROOTS:
        if resolved == root or root in resolved.parents:
            return [f"runs_dir: {runs_dir} is on the kernel's pseudo-filesystem {root}, where no run can be kept: "
                    f"{hint}"]
    for folder in [path, *path.parents]:
        if not os.path.lexists(folder):
            continue
        if not folder.is_dir():
            where = "is" if folder == path else f"lies under {folder}, which is"
            return [f"runs_dir: {runs_dir} {where} a file, not a folder: {hint}"]
        if not os.access(folder, os.W_OK | os.X_OK):
            return [f"runs_dir: {runs_dir}: {folder} cannot be written by this user: {hint}"]
        return []
    return []


def _data_problems(recipe: Recipe) -> list[str]:
    problems = []
    needed: dict[str, str] = {}  # split -> the first stage that reads it
    for stage, options in recipe.stage_list():
        for split in STAGES[stage].needs_data(options):
            needed.setdefault(split, stage)
    for split, stage in needed.items():
        config = getattr(recipe.data, split)
        if config is None:
            problems.append(f"data.{split} is not set: stage {stage} reads it "
                            f"(add data.{split}: {{source: ..., path: ...}})")
        else:
            problems += _split_problems(config, f"data.{split}")
    return problems


def _split_problems(split: DataSplit, field: str) -> list[str]:
    if split.calib_set:
        from .data.calibsets import load_calib_set

        name = split.calib_set
        try:
            split, _ = load_calib_set(name, f"{field}.calib_set")
        except WorkbenchError as e:
            return [str(e)]
        field = f"calibration set {name!r}"
    problems = []
    # A hub dataset's path is a data_dir inside the hub repository; every other path is a local folder.
    if split.path and (split.source != "hf" or split.name in (None, "imagefolder")):
        problems += missing_path(split.path, f"{field}.path", "the data folder", folder=True)
    if split.annotations:
        problems += missing_path(split.annotations, f"{field}.annotations", "the COCO JSON file")
    if split.label_dir:
        problems += missing_path(split.label_dir, f"{field}.label_dir", "the folder of YOLO txt labels", folder=True)
    if split.yaml:
        problems += missing_path(split.yaml, f"{field}.yaml", "the dataset's data.yaml")
    if split.source == "hf":
        from .data.sources import hf_problems

        problems += hf_problems(split, field)
    if split.source == "package" and split.package and importlib.util.find_spec(split.package.split(".")[0]) is None:
        problems.append(f"{field}.package: package {split.package!r} is not installed (pip install {split.package})")
    return problems


def _stage_problems(recipe: Recipe) -> list[str]:
    problems = []
    for index, (stage, options) in enumerate(recipe.stage_list()):
        where = f"stages[{index}].{stage}"
        for train in (options, getattr(options, "finetune_between", None)):
            if getattr(train, "resume", None):
                problems += missing_path(train.resume, f"{where}.resume", "a checkpoint (checkpoints/*.pt of a run)")
        if stage == "prune" and options.method == "structured" and options.importance == "taylor":
            from .tasks import get_task  # the task's adapter loads torch: only asked when it matters

            if not get_task(recipe.task).has_label_loss:
                problems.append(f"{where}.importance: taylor needs a labeled classification fine-tune split "
                                f"(task is {recipe.task})")
        if stage == "build" and options.required:
            problems += _engine_problems(options, where)
    return problems


def _target_problems(recipe: Recipe) -> list[str]:
    """Stage options the recipe's target (quant/targets.py) cannot honour, each naming the fields and why."""
    from .quant.targets import engine_problems
    from .stages.build import resolve_engine

    target = recipe.target
    stages = [(f"stages[{i}].{stage}", stage, options) for i, (stage, options) in enumerate(recipe.stage_list())]
    problems = engine_problems(target, [(where, resolve_engine(o)) for where, stage, o in stages if stage == "build"])
    for where, stage, options in stages:
        if stage == "build" and target.name == "openvino":
            # (compared with the defaults: a recipe is re-validated from its dump, where every field counts as set)
            given = [f for f, default in (("openvino_graph", "u8"), ("openvino_weights", "auto"))
                     if getattr(options, f) != default]
            if given:
                problems.append(f"{where}.{given[0]} with target: openvino: the target calibrates and exports the "
                                "graph OpenVINO compiles (its weights follow target.cpu), so there is no conversion to "
                                f"choose; drop {' and '.join(given)} (or use target: tensorrt to convert its graph)")
    return problems


def _engine_problems(options, where: str) -> list[str]:
    """A required engine whose package (or, for TensorRT, GPU) is missing."""
    from .stages.build import resolve_engine

    if resolve_engine(options) == "tensorrt":
        from .runtime.tensorrt import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTUnavailable as e:
            return [f"{where}.required is true, but {e}"]
        return []
    if importlib.util.find_spec("openvino") is None:
        from .runtime.openvino import INSTALL_HINT

        return [f"{where}.required is true, but OpenVINO is not installed: {INSTALL_HINT}"]
    return []
