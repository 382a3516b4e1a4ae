"""What a recipe needs to exist before it can run, checked in seconds without loading a model or reading an image.

The schema (recipe.py) says whether a recipe is well formed; these checks say whether this
machine can run it: the model source and name are known, every file and folder it names is
there, every stage has the data split it reads, and optional parts it requires are installed.
`workbench validate` and `run` (first thing in preflight) both call `check_recipe_inputs`, so
validate passes only what run then accepts as far as files and names go. Nothing here imports
user code or unpickles a file.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from .errors import RecipeError, WorkbenchError
from .recipe import DataSplit, Recipe

# Sources whose `names()` is the full list of what they build; the others take a path or a module.
NAMED_SOURCES = ("cifar_resnet", "torchvision", "efficientnet_lite")
# Sources whose name is a checkpoint path on this machine.
FILE_SOURCES = ("file", "yolov5", "ultralytics")
WEIGHT_SUFFIXES = (".pt", ".pth", ".th", ".bin")


def check_recipe_inputs(recipe: Recipe, source: str = "the recipe") -> None:
    """Raise one RecipeError listing every problem `recipe_input_problems` finds."""
    problems = recipe_input_problems(recipe)
    if problems:
        head = f"{source} cannot run here ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
        raise RecipeError("\n".join([head] + [f"  - {p}" for p in problems]))


def recipe_input_problems(recipe: Recipe) -> list[str]:
    """Every problem with the recipe's model, files, data splits and required extras, each naming its field."""
    return _model_problems(recipe) + _data_problems(recipe) + _stage_problems(recipe)


def _model_problems(recipe: Recipe) -> list[str]:
    from .models import MODEL_SOURCES

    model = recipe.model
    source, sep, name = model.spec.partition(":")
    problems = []
    if not sep or source not in MODEL_SOURCES:
        close = difflib.get_close_matches(source, MODEL_SOURCES, n=1)
        hint = f" Did you mean '{close[0]}:{name}'?" if close and sep else ""
        return [f"model.spec {model.spec!r} does not name a known source.{hint} Write 'source:name' with source one "
                "of: " + ", ".join(f"{s.name} (e.g. {s.example})" for s in MODEL_SOURCES.values())]
    if source in NAMED_SOURCES:
        names = MODEL_SOURCES[source].names()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            problems.append(f"model.spec: {source} has no model {name!r}. Close names: {', '.join(close) or 'none'} "
                            f"(`workbench models list '{source}:*'` lists them)")
    if source == "import":
        module, colon, factory = name.rpartition(":")
        if not colon or not module or not factory:
            problems.append(f"model.spec 'import:{name}' must be 'import:package.module:factory'")
        elif not model.trust_code:
            problems.append(f"model.trust_code: model.spec 'import:{name}' imports {module} and calls {factory}(), "
                            "which runs that code: set model.trust_code: true if you trust it")
    if source in FILE_SOURCES and (source != "ultralytics" or Path(name).suffix == ".pt"):
        problems += _missing(name, "model.spec", "the checkpoint")
        if source in ("file", "ultralytics") and not model.trust_pickle:
            problems.append(f"model.trust_pickle: model.spec '{source}:{name}' unpickles a whole model, which runs "
                            "code from the file: set model.trust_pickle: true if you trust it")
    # torchvision's weights may name its weights enum ('DEFAULT', 'IMAGENET1K_V1') instead of a file.
    if model.weights and (source != "torchvision" or Path(model.weights).suffix in WEIGHT_SUFFIXES):
        problems += _missing(model.weights, "model.weights", "a state dict (.pt/.pth)")
    if model.pruned:
        problems += _missing(model.pruned, "model.pruned", "the pruned_model.pt of a run's prune stage")
    return problems


def _data_problems(recipe: Recipe) -> list[str]:
    from .stages import STAGES

    problems = []
    needed: dict[str, str] = {}  # split -> the first stage that reads it
    for stage, options in recipe.stage_list():
        for split in STAGES[stage].needs_data:
            needed.setdefault(split, stage)
        uses_finetune = getattr(options, "finetune_between", None) is not None or (
            stage == "prune" and options.method == "structured" and options.importance == "taylor")
        if uses_finetune:
            needed.setdefault("finetune", stage)
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
        problems += _missing(split.path, f"{field}.path", "the data folder", folder=True)
    if split.annotations:
        problems += _missing(split.annotations, f"{field}.annotations", "the COCO JSON file")
    if split.label_dir:
        problems += _missing(split.label_dir, f"{field}.label_dir", "the folder of YOLO txt labels", folder=True)
    if split.source == "package" and split.package and importlib.util.find_spec(split.package.split(".")[0]) is None:
        problems.append(f"{field}.package: package {split.package!r} is not installed (pip install {split.package})")
    return problems


def _stage_problems(recipe: Recipe) -> list[str]:
    problems = []
    for index, (stage, options) in enumerate(recipe.stage_list()):
        where = f"stages[{index}].{stage}"
        for train in (options, getattr(options, "finetune_between", None)):
            if getattr(train, "resume", None):
                problems += _missing(train.resume, f"{where}.resume", "a checkpoint (checkpoints/*.pt of a run)")
        if stage == "prune" and options.method == "structured" and options.importance == "taylor" \
                and recipe.task != "classification":
            problems.append(f"{where}.importance: taylor needs a labeled classification fine-tune split "
                            f"(task is {recipe.task})")
        if stage == "build" and options.required:
            from .runtime.tensorrt import TensorRTUnavailable, require_tensorrt

            try:
                require_tensorrt()
            except TensorRTUnavailable as e:
                problems.append(f"{where}.required is true, but {e}")
    return problems


def _missing(path: str, field: str, what: str, folder: bool = False) -> list[str]:
    p = Path(path)
    if not p.exists():
        return [f"{field}: {path} does not exist: give {what} on this machine (relative paths are relative to the "
                "working directory)"]
    if folder and not p.is_dir():
        return [f"{field}: {path} is not a folder: give {what}"]
    if not folder and p.is_dir():
        return [f"{field}: {path} is a folder: give {what}"]
    return []
