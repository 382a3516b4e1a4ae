"""The run directory's life outside the stages: can it be created, which runs died, which runs there are.

A run records its process (pid, host, the process's start time) in metrics.json while it runs. A
`.incomplete` directory whose metrics still say "running" although that process is gone (SIGKILL, the
out-of-memory killer, a power cut) is stale: the next run in the same runs_dir and `workbench runs`
mark it "interrupted" and rename it `.failed`, as a run stopped with Ctrl-C is, so that
`workbench run --resume` can continue it. A run on another host cannot be checked and is left alone, and so
is one recorded under another boot or in another pid namespace (two containers may share a hostname and a
runs_dir but not their process ids: a pid missing here may be a live run there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from datetime import datetime
from pathlib import Path

from .errors import WorkbenchError
from .io import write_json
from .run_record import RecordError, read_record


def check_runs_dir(runs_dir: Path, name: str) -> None:
    """Refuse a runs_dir in which this run's directory cannot be created: probed by creating and removing one."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise WorkbenchError(f"runs_dir: {runs_dir} is a file, not a directory: set runs_dir to a directory "
                             "(runs_dir: PATH in the recipe, or runs_dir=PATH on the command line)")
    created = _first_missing(runs_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # As long as the longest name a run directory gets (<name>-<stamp>-<n>.incomplete), hidden from listings.
    probe = runs_dir / f".{name}-{stamp}-probe.incomplete"
    try:
        probe.mkdir(parents=True)
        (probe / "metrics.json").write_bytes(b"{}")
    except OSError as e:
        raise _refusal(runs_dir, name, probe, e) from None
    finally:
        _remove_probe(probe, created)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (the probe removes what it made)."""
    missing = None
    for parent in [path, *path.parents]:
        if os.path.lexists(parent):
            break
        missing = parent
    return missing


def _remove_probe(probe: Path, created: Path | None) -> None:
    """Remove the probe and the directories it created; a part that was never made is skipped."""
    with contextlib.suppress(OSError):
        (probe / "metrics.json").unlink()
    with contextlib.suppress(OSError):
        probe.rmdir()
    if created is not None:  # innermost first, up to the outermost one the probe made
        for d in [probe.parent, *probe.parent.parents]:
            if not d.is_relative_to(created):
                break
            with contextlib.suppress(OSError):
                d.rmdir()


def _refusal(runs_dir: Path, name: str, probe: Path, e: OSError) -> WorkbenchError:
    if e.errno == errno.ENAMETOOLONG:
        limit = _name_max(runs_dir)
        return WorkbenchError(
            f"name: the run directory <name>-<timestamp>.incomplete for a name of {len(name)} characters is longer "
            f"than {runs_dir} allows ({limit} characters for a file name): shorten the recipe's name"
        )
    what = {errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
            errno.EROFS: "the file system is read-only", errno.ENOSPC: "the disk is full",
            errno.ENOTDIR: "a part of the path is a file",
            errno.ENOENT: "a directory on the way vanished, or the file system takes no new ones, as /proc or /sys"}
    reason = _dangling_link(runs_dir) or what.get(e.errno, e.strerror or str(e))
    return WorkbenchError(
        f"runs_dir: cannot create a run directory in {runs_dir} ({reason}: {e.strerror}); set runs_dir to a "
        "writable directory (runs_dir: PATH in the recipe, or runs_dir=PATH on the command line)"
    )


def _dangling_link(path: Path) -> str | None:
    """'X is a symbolic link to Y, which does not exist' for the first such part of `path`; None if none is."""
    for part in [*reversed(path.parents), path]:
        if part.is_symlink() and not part.exists():
            return f"{part} is a symbolic link to {os.readlink(part)}, which does not exist"
    return None


def _name_max(path: Path) -> int:
    for parent in [path, *path.parents]:
        if parent.is_dir():
            try:
                return os.pathconf(parent, "PC_NAME_MAX")
            except (OSError, ValueError):
                break
    return 255


def process_identity() -> dict:
    """What metrics.json records of the running process, to tell later whether it is still alive."""
    fields = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": int(fields[19]) if fields else None,
            **_pid_space()}


def _pid_space() -> dict:
    """The boot and the pid namespace the process's id belongs to (each omitted where /proc does not tell)."""
    space = {}
    with contextlib.suppress(OSError):
        space["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        space["pid_namespace"] = os.stat("/proc/self/ns/pid").st_ino
    return space


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (the state) on: [0] the state, [19] the start time (clock ticks since boot,
    another for a reused pid); None without /proc or without that process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name before ')' may hold spaces


def is_alive(metrics: dict) -> bool | None:
    """Whether the process that wrote `metrics` still runs; None when that cannot be told (another host, boot
    or pid namespace, no pid)."""
    pid = metrics.get("pid")
    if not isinstance(pid, int) or metrics.get("host") != socket.gethostname():
        return None
    here = _pid_space()
    if any(key in metrics and key in here and metrics[key] != here[key] for key in ("boot_id", "pid_namespace")):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: the pid exists, which is all that can be told
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    started = metrics.get("pid_started")
    return started is None or int(fields[19]) == started


def read_metrics(run_dir: Path) -> dict | None:
    """A run directory's metrics.json, checked field by field (run_record.read_record); None where there is none,
    a RecordError naming the file and field where it is damaged."""
    return read_record(run_dir)


def mark_stale_runs(runs_dir: Path) -> list[Path]:
    """Mark every `.incomplete` run whose process is gone as interrupted and rename it `.failed`; the new paths."""
    marked = []
    if not Path(runs_dir).is_dir():
        return marked
    for work_dir in sorted(Path(runs_dir).glob("*.incomplete")):
        try:
            metrics = read_metrics(work_dir)
        except RecordError:
            continue  # a damaged record is never rewritten: `workbench runs` names it, --resume refuses it
        if metrics is None or metrics.get("status") != "running" or is_alive(metrics) is not False:
            continue
        metrics["status"] = "interrupted"
        metrics["error"] = (
            f"the run's process (pid {metrics['pid']} on {metrics['host']}) ended without finishing or recording an "
            f"error (killed, out of memory or a power cut); found so at {datetime.now().isoformat(timespec='seconds')}"
        )
        failed = work_dir.with_name(work_dir.name.removesuffix(".incomplete") + ".failed")
        try:
            write_json(work_dir / "metrics.json", metrics)
            if not failed.exists():
                os.replace(work_dir, failed)
                marked.append(failed)
        except OSError:
            continue  # a read-only runs_dir, or another process marked it first: leave it as it is
    return marked


def list_runs(runs_dir: Path) -> list[dict]:
    """The runs under `runs_dir`, oldest first: directory, status, stages finished (of all), start time. A run whose
    metrics.json is damaged is listed with status "damaged" and the problem (the file, the field) under "damaged"."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise WorkbenchError(f"{runs_dir} is not a directory: give the runs_dir of your recipes (default: runs)")
    rows = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            metrics = read_metrics(run_dir)
        except RecordError as e:
            rows.append({"run": run_dir.name, "status": "damaged", "stages": "-", "started": "?", "damaged": str(e)})
            continue
        if metrics is None:
            continue
        status = metrics.get("status", "?")
        if status == "running" and run_dir.name.endswith(".failed"):
            status = "failed (not recorded)"  # the failure could not be written (a full disk)
        elif status == "running" and is_alive(metrics) is None:
            status = f"running? (pid {metrics.get('pid', '?')} on {metrics.get('host', '?')})"
        done = list(metrics.get("timings_s", {}))
        total = len(metrics.get("stage_names", [])) or len(done)
        stages = f"{len(done)}/{total} " + (", ".join(done) or "-")
        rows.append({"run": run_dir.name, "status": status, "stages": stages,
                     "started": metrics.get("started", "?")})
    return sorted(rows, key=lambda r: (r["started"], r["run"]))
