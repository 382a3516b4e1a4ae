"""Progress for anything that takes more than a few seconds, on a terminal and in logs.

On a terminal: a live bar (stderr) that, when it ends, leaves one summary line behind, so a scrolled-back
terminal or a `script` log still says what ran and how long it took. Off a terminal (nohup, CI, ssh logs, a
notebook): a plain line when a loop starts, then one every WORKBENCH_PROGRESS_INTERVAL seconds (15 by default)
with the stage, done/total, elapsed time and ETA, and the same summary line at the end. WORKBENCH_NO_PROGRESS=1
silences both; ranks other than 0 of a distributed run stay silent.
"""

from __future__ import annotations

import contextvars
import math
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

# The run's current stage ("stage 2/4 calibrate"), set by the runner, prefixed to each line off a terminal.
current_stage: contextvars.ContextVar[str] = contextvars.ContextVar("workbench_stage", default="")

DEFAULT_INTERVAL_S = 15.0


def track(items: Iterable[T], description: str, total: int | None = None,
          status: Callable[[], str] | None = None) -> Iterator[T]:
    """Yield `items`, reporting progress; `status()` (e.g. the running loss) is shown with each report."""
    total = total if total is not None else _len(items)
    if _flag("WORKBENCH_NO_PROGRESS") or _rank() > 0:
        yield from items
    elif sys.stderr.isatty():
        yield from _bar(items, description, total, status)
    else:
        yield from _lines(items, description, total, status, _interval())


def _bar(items, description, total, status) -> Iterator:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    console = Console(stderr=True)  # stderr: stdout stays clean for tables and for callers that capture it
    start, done = time.monotonic(), 0
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(description, total=total, status="")
            for item in items:
                yield item
                done += 1
                progress.update(task, advance=1, **({"status": status()} if status is not None else {}))
    finally:  # also when the caller stops early (max_batches) or fails: the log says how far it got
        console.print(_summary(description, done, total, time.monotonic() - start, status), highlight=False)


def _lines(items, description, total, status, interval: float) -> Iterator:
    start = time.monotonic()
    last, done = start, 0
    _emit(f"{_prefix()}{description}: started" + (f", {total} steps" if total else ""))
    try:
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= interval and (total is None or done < total):
                last = now
                _emit(_line(description, done, total, now - start, status))
    finally:  # also when the caller stops early (max_batches) or fails: the log says how far it got
        _emit(_summary(description, done, total, time.monotonic() - start, status))


def _line(description: str, done: int, total: int | None, elapsed: float, status) -> str:
    """One report: 'stage 2/4 calibrate | calibrate (mse): 12/40 (30%), elapsed 0:12, ETA 0:28, loss 0.31'."""
    if total:
        eta = elapsed / done * (total - done) if done else None
        counts = f"{done}/{total} ({100 * done / total:.0f}%), elapsed {_clock(elapsed)}, ETA {_clock(eta)}"
    else:
        counts = f"{done} steps, elapsed {_clock(elapsed)}"
    extra = status() if status is not None else ""
    return f"{_prefix()}{description}: {counts}" + (f", {extra}" if extra else "")


def _summary(description: str, done: int, total: int | None, elapsed: float, status) -> str:
    """The line a loop leaves behind: what ran, how many steps, how long; flags a loop that ended early."""
    short = f" of {total}" if total and done < total else ""
    extra = status() if status is not None and done else ""
    return (f"{_prefix()}{description}: {done}{short} steps in {_clock(elapsed)}"
            + (f" ({_per_step(elapsed, done)})" if done else "") + (f", {extra}" if extra else ""))


def _prefix() -> str:
    stage = current_stage.get()
    return f"{stage} | " if stage else ""


def _emit(line: str) -> None:
    if sys.stderr is None:  # started with stderr closed: progress has nowhere to go, the run goes on
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed pipe or file: the same
        pass


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _per_step(elapsed: float, done: int) -> str:
    per = elapsed / done
    return f"{per:.2f} s/step" if per >= 0.1 else f"{1000 * per:.0f} ms/step"


def _interval() -> float:
    """WORKBENCH_PROGRESS_INTERVAL in seconds (0: every step); anything else that is not a number >= 0: 15."""
    try:
        value = float(os.environ.get("WORKBENCH_PROGRESS_INTERVAL", ""))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_INTERVAL_S


def _flag(name: str) -> bool:
    """An on/off environment variable: unset, empty, 0, false, no and off are off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _rank() -> int:
    """This process's rank in a distributed run (torchrun's RANK); 0 when unset or not a number."""
    raw = os.environ.get("RANK", "").strip()
    return int(raw) if raw.isdigit() else 0


def _len(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
