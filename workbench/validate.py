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

import os
from pathlib import Path

from .errors import RecipeError, WorkbenchError
from .models.registry import missing_path, spec_problems
from .schema import DataSplit, Recipe
from .stages import STAGES, order_problems


def check_recipe_inputs(recipe: Recipe, source: str = "the recipe") -> None:
    """Raise one RecipeError listing every problem `recipe_input_problems` finds."""
    problems = merge_repeated(recipe_input_problems(recipe))
    if problems:
        head = f"{source} cannot run here ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
        raise RecipeError("\n".join([head] + [f"  - {p}" for p in problems]))


def merge_repeated(problems: list[str]) -> list[str]:
    """One line per problem: the same message for several fields (one data.yaml read by two splits) is said once,
    naming every field ("data.calibration.yaml and data.evaluation.yaml: ... does not exist")."""
    fields: dict[str, list[str]] = {}
    for problem in problems:
        field, sep, rest = problem.partition(": ")
        key = rest if sep and " " not in field else problem
        fields.setdefault(key, []).append(field if key == rest else "")
    return [problem if not names[0] else f"{' and '.join(dict.fromkeys(names))}: {problem}"
            for problem, names in fields.items()]


def recipe_input_problems(recipe: Recipe) -> list[str]:
    """Every problem with the recipe's stage order, model, files, data splits and required extras, each naming its
    stage or field."""
    from .tracking import missing_packages

    return (order_problems(recipe.stage_list()) + spec_problems(recipe.model) + _data_problems(recipe)
            + _stage_problems(recipe) + missing_packages(recipe.log_to) + runs_dir_problems(recipe.runs_dir))


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
    from .data.registry import path_is_local, source_problems

    problems = []
    if split.path and path_is_local(split):  # not a hub dataset's data_dir (its source's row says)
        problems += missing_path(split.path, f"{field}.path", "the data folder", folder=True)
    if split.annotations:
        problems += missing_path(split.annotations, f"{field}.annotations", "the COCO JSON file")
    if split.label_dir:
        problems += missing_path(split.label_dir, f"{field}.label_dir", "the folder of YOLO txt labels", folder=True)
    if split.yaml:
        problems += missing_path(split.yaml, f"{field}.yaml", "the dataset's data.yaml")
    if split.source is not None:
        problems += source_problems(split, field)  # beyond its files: packages, downloads
    return problems


def _stage_problems(recipe: Recipe) -> list[str]:
    problems = []
    for index, (stage, options) in enumerate(recipe.stage_list()):
        where = f"stages[{index}].{stage}"
        for train in (options, getattr(options, "finetune_between", None)):
            if getattr(train, "resume", None):
                problems += missing_path(train.resume, f"{where}.resume", "a checkpoint (checkpoints/*.pt of a run)")
        problems += STAGES[stage].preflight(options, where, recipe)  # what the stage itself needs here
    return problems
