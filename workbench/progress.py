"""Progress bars for anything that takes more than a few seconds (quiet when not on a terminal)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    disable = not sys.stderr.isatty() or bool(os.environ.get("WORKBENCH_NO_PROGRESS")) or int(os.environ.get("RANK", "0")) > 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    # On stderr: stdout stays clean for tables and for callers that capture it.
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=disable) as progress:
        task = progress.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            progress.advance(task)


def _len(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
