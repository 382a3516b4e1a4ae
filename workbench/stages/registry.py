"""The stage registry: one flat dict from stage name to its function and options model.

A stage is `fn(run: Run, opts: Options) -> None`: it does one thing to the run,
writes its artifacts into the run directory and records its metrics.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from ..recipe import StrictModel


class StageOptions(StrictModel):
    """Base of every stage's options: unknown keys, NaN/Inf and booleans for numbers are errors, never ignored."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: Callable
    options: type[StageOptions]
    summary: str
    needs_data: tuple[str, ...] = ()  # data splits the stage reads, checked before the run starts


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, options: type[StageOptions], needs_data: tuple[str, ...] = ()):
    """Decorator: register `fn` as the stage `name` with its options model."""

    def decorator(fn: Callable) -> Callable:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        STAGES[name] = StageSpec(name=name, fn=fn, options=options, summary=summary, needs_data=needs_data)
        return fn

    return decorator


def get_stage(name: str) -> StageSpec:
    try:
        return STAGES[name]
    except KeyError:
        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown stage {name!r}.{hint} Stages: {', '.join(sorted(STAGES))}") from None
