"""The Python API that the CLI and the notebook both call."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RecipeError
import yaml

from .recipe import Recipe, load_recipe, parse_recipe
from .run import Run, run_recipe


def run(recipe: str | os.PathLike | Recipe | None, overrides: list[str] | tuple[str, ...] = (), console=None,
        resume: str | os.PathLike | None = None) -> Run:
    """Run a recipe (a path or a validated Recipe) and return the finished Run.

    `resume`: a failed or interrupted run directory to continue in place (see resume.py); with `recipe`
    None, the run's own recipe.yaml (with `overrides`) is used.
    """
    if recipe is None and resume is None:
        raise RecipeError("give a recipe to run, or a run directory to resume")
    if resume is not None:  # opened once: its recipe may be the one to run
        from .resume import open_previous

        resume = open_previous(resume)
    if recipe is None:
        recipe = resume.recipe(overrides)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run_recipe(recipe, console=console, resume=resume)


def sensitivity_recipe(recipe: Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe's stages up to its calibrate stage, then `sensitivity` (with the recipe's own options if it
    has them); `overrides` (`stages.sensitivity.x=...`) apply to the derived recipe."""
    data = recipe.model_dump(mode="json")
    names = [next(iter(s)) for s in data["stages"]]
    if "calibrate" not in names:
        raise RecipeError(f"{recipe.name}: the recipe has no calibrate stage, and sensitivity needs a calibrated model; add one")
    own = next((s["sensitivity"] for s in data["stages"] if "sensitivity" in s), {})
    data["stages"] = data["stages"][: names.index("calibrate") + 1] + [{"sensitivity": own}]
    data["name"] = f"{recipe.name}-sensitivity"
    return parse_recipe(yaml.safe_dump(data, sort_keys=False), f"{recipe.name} (sensitivity)", overrides)


def sensitivity(recipe: str | os.PathLike | Recipe, overrides: list[str] | tuple[str, ...] = (), console=None) -> Run:
    """`workbench sensitivity RECIPE`: calibrate as the recipe says, then the per-layer sensitivity sweep."""
    # Options of the sweep may be given even when the recipe has no sensitivity stage of its own.
    own = [o for o in overrides if o.startswith("stages.sensitivity.")]
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, [o for o in overrides if o not in own])
    return run_recipe(sensitivity_recipe(recipe, own), console=console)


def load_run(run_dir: str | os.PathLike) -> dict:
    """A finished run's metrics, read from its directory."""
    from .report import load_metrics

    return load_metrics(Path(run_dir))


def open_run(run_dir: str | os.PathLike, device: str = "cpu"):
    """A run directory reopened for exploration: its calibrated model rebuilt from the saved ranges (see explore.py)."""
    from .explore import RunExplorer

    return RunExplorer(Path(run_dir), device)


def bench(paths: list[str | os.PathLike], batch_sizes: list[int] = (1, 8), warmup: int = 5, repeats: int = 50,
          threads: int | None = None, input_size: tuple[int, int, int] | None = None) -> dict:
    """`workbench bench`: latency and throughput of model files (.onnx in ONNX Runtime, .engine in TensorRT),
    or of every such file in a directory; the same measurement as the bench stage."""
    from .runtime.latency import bench_artifacts, check_bench_options, file_artifact, model_files, model_input_shape

    check_bench_options(batch_sizes, warmup, repeats, threads)
    files = model_files([Path(p) for p in paths])
    names = [f.name for f in files]
    results = {}
    for path in files:
        shape, fixed_batch = model_input_shape(path)
        if input_size:
            shape = tuple(input_size)
        if shape is None:
            raise RecipeError(f"{path}: the input size is dynamic; give it with --input-size C H W")
        if fixed_batch and any(b != fixed_batch for b in batch_sizes):
            raise RecipeError(f"{path}: the graph's batch size is fixed at {fixed_batch}; time it with --batch-sizes {fixed_batch} "
                              "(or export with a dynamic batch)")
        name = path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}"  # two run dirs
        results.update(bench_artifacts({name: file_artifact(path, threads)}, shape, list(batch_sizes), warmup, repeats,
                                       threads))
    return {"batch_sizes": list(batch_sizes), "repeats": repeats, "threads": threads, "backends": results}
