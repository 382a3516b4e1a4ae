"""Progress bars for anything that takes more than a few seconds (quiet when not on a terminal)."""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None,
          status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield `items` under a progress bar; `status()` (e.g. the running loss) is shown after each item."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    disable = (not sys.stderr.isatty() or bool(os.environ.get("WORKBENCH_NO_PROGRESS"))
               or int(os.environ.get("RANK", "0")) > 0)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    # On stderr: stdout stays clean for tables and for callers that capture it.
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=disable) as progress:
        task = progress.add_task(description, total=total if total is not None else _len(items), status="")
        for item in items:
            yield item
            progress.update(task, advance=1, **({"status": status()} if status is not None and not disable else {}))


def _len(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
