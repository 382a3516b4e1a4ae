"""The Python API that the CLI and the notebook both call."""

from __future__ import annotations

import os
from pathlib import Path

from .recipe import Recipe, load_recipe
from .run import Run, run_recipe


def run(recipe: str | os.PathLike | Recipe, overrides: list[str] | tuple[str, ...] = (), console=None) -> Run:
    """Run a recipe (a path or a validated Recipe) and return the finished Run."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return run_recipe(recipe, console=console)


def load_run(run_dir: str | os.PathLike) -> dict:
    """A finished run's metrics, read from its directory."""
    from .report import load_metrics

    return load_metrics(Path(run_dir))
