"""A run directory read as the untrusted input it is: its record (metrics.json) checked field by field, and the
files its stages wrote checked by their content.

Anything in a run directory may have been edited, damaged or planted since the run wrote it: `workbench runs`
and `workbench run --resume` read metrics.json through `read_record`, which refuses (a WorkbenchError naming the
file, the field and what was expected) any field the workbench relies on that has the wrong type or an impossible
value (a pid no process can have, a timing that is no number, fingerprints that are no list of records). The
files a stage wrote are opened through `run_file`, which refuses a symbolic link, a directory or any other
non-regular file in place of one (a `calibration.json` linked to /etc/passwd is never read), and are compared by
`sha256_file`, a hash of their bytes streamed in chunks (a model of gigabytes costs its read, never its size in
memory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable

from .errors import WorkbenchError
from .io import plain_json

PID_MAX = 4_194_304  # Linux's PID_MAX_LIMIT: no process has a larger id
JSON_MAX_BYTES = 256 * 1024 * 1024  # a run's JSON files are kilobytes to a few megabytes; a larger one is planted
CHUNK_BYTES = 1 << 20


class RecordError(WorkbenchError):
    """A file of a run directory is damaged, edited or planted: its message names the file and the field."""


def show(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it: its JSON, cut to `limit` characters."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_file(run_dir: Path, name: str) -> Path | None:
    """`run_dir/name` as a regular file of the run directory; None where there is none. A symbolic link, a
    directory, a FIFO or a device in its place is refused: the workbench writes only regular files there, so
    anything else was planted (and a link may point anywhere: /etc/passwd, /dev/zero)."""
    path = Path(run_dir) / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise RecordError(f"{path} is a symbolic link (to {os.readlink(path)}), not a file the run wrote: a run "
                          "directory holds only its own regular files. Remove the link (its stage then runs again "
                          "on --resume), or start a new run")
    if not stat.S_ISREG(st.st_mode):
        raise RecordError(f"{path} is not a regular file (a directory, FIFO, socket or device), not a file the run "
                          "wrote. Remove it (its stage then runs again on --resume), or start a new run")
    return path


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (bounded memory for a file of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_values(values: Any) -> str:
    """The SHA-256 of a JSON value in its canonical form (as written and read back, keys sorted): the same for a
    stage's metrics in memory and in metrics.json."""
    return hashlib.sha256(json.dumps(plain_json(values), sort_keys=True).encode()).hexdigest()


def read_json(path: Path) -> tuple[Any, str]:
    """A regular file's JSON and the SHA-256 of its bytes (hashed as parsed: what is checked is what is read)."""
    size = path.stat().st_size
    if size > JSON_MAX_BYTES:
        raise RecordError(f"{path}: {size} bytes, larger than any file a run writes ({JSON_MAX_BYTES} at most): "
                          "it was replaced; remove it, or start a new run")
    data = path.read_bytes()
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise RecordError(f"{path}: is not JSON{where}, so not the file the run wrote: remove it, or start a new "
                          "run") from None
    return value, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# metrics.json: the fields `workbench runs` and `--resume` rely on, each with its type and its meaning
# ---------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _fingerprint(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("stage"), str):
        return False
    if not isinstance(entry.get("fingerprint"), str):
        return False
    files = entry.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and _is_hex64(v) for k, v in files.items()):
        return False
    return "metrics_sha256" not in entry or _is_hex64(entry["metrics_sha256"])


def _input(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("path"), str)


def _warning(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("message"), str)
            and (entry.get("stage") is None or isinstance(entry.get("stage"), str)))


# field -> (accepts its value, what is expected). Fields not named here are free text the report shows.
RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "status": (lambda v: isinstance(v, str), "a string (running, complete, failed or interrupted)"),
    "started": (lambda v: isinstance(v, str), "a time as a string"),
    "finished": (lambda v: isinstance(v, str), "a time as a string"),
    "host": (lambda v: isinstance(v, str), "a host name as a string"),
    "error": (lambda v: isinstance(v, str), "a string"),
    "failed_stage": (lambda v: isinstance(v, str), "a stage name as a string"),
    "pid": (lambda v: _is_int(v) and 1 <= v <= PID_MAX, f"a process id: an integer from 1 to {PID_MAX}"),
    "pid_started": (lambda v: v is None or (_is_int(v) and v >= 0), "a start time in clock ticks: an integer >= 0"),
    "pid_namespace": (lambda v: _is_int(v) and v >= 0, "a namespace inode: an integer >= 0"),
    "boot_id": (lambda v: isinstance(v, str), "a boot id as a string"),
    "stage_names": (_is_str_list, "a list of stage names"),
    "timings_s": (lambda v: isinstance(v, dict) and all(is_number(t) and math.isfinite(t) and t >= 0
                                                        for t in v.values()),
                  "an object of stage name -> seconds (a finite number >= 0)"),
    "peak_rss_mb": (lambda v: isinstance(v, dict) and all(is_number(t) and math.isfinite(t) and t >= 0
                                                          for t in v.values()),
                    "an object of stage name -> the process's peak memory in MB after it (a finite number >= 0)"),
    "stages": (lambda v: isinstance(v, dict) and all(isinstance(s, dict) for s in v.values()),
               "an object of stage name -> that stage's metrics (an object)"),
    "inputs": (lambda v: isinstance(v, dict) and all(_input(e) for e in v.values()),
               "an object of recipe field -> its record (an object with a path)"),
    "fingerprints": (lambda v: isinstance(v, list) and all(_fingerprint(e) for e in v),
                     "a list of {stage, fingerprint, files: {name: sha256}} records, one per finished stage"),
    "warnings": (lambda v: isinstance(v, list) and all(_warning(e) for e in v),
                 "a list of {stage, message} records"),
    "resumed": (lambda v: isinstance(v, dict), "an object"),
    "deploy": (lambda v: isinstance(v, dict) and _is_str_list(v.get("files")), "an object with the deployed files"),
}


def check_record(metrics: Any, path: Path) -> dict:
    """`metrics` (metrics.json's parsed content) if every field the workbench relies on holds what it should; else
    a RecordError naming the first field that does not, its value and what was expected."""
    if not isinstance(metrics, dict):
        raise RecordError(f"{path}: holds a JSON {type(metrics).__name__}, expected an object with the run's status "
                          "and stages: the run's record is damaged; start a new run")
    for field, (accepts, expected) in RECORD_FIELDS.items():
        if field in metrics and not accepts(metrics[field]):
            raise RecordError(f"{path}: field {field} is {show(metrics[field])}, expected {expected}: the run's record "
                              "was edited or damaged; start a new run")
    return metrics


def read_record(run_dir: Path) -> dict | None:
    """A run directory's metrics.json, checked (`check_record`); None where the directory has no metrics.json
    (it is no run directory). A RecordError where it has one that is damaged, planted or no regular file."""
    path = run_file(run_dir, "metrics.json")
    if path is None:
        return None
    try:
        metrics, _ = read_json(path)
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror})") from None
    return check_record(metrics, path)


def bad_field(path: Path, field: str, value: Any, expected: str) -> Exception:
    what = f"field {field} is {show(value)}" if field else f"holds {show(value)}"
    return RecordError(f"--resume: {path}: {what}, expected {expected}: it was edited or damaged since the run "
                       f"wrote it. Delete {path.name} to have its stage and every later one run again on --resume, "
                       "or start a new run")


def show_list(names: list[str], limit: int = 4) -> str:
    return "[" + ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") + "]"
