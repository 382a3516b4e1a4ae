"""The one table of engines: every compiler the build stage and `workbench build` can hand a graph to, one row each.

A row says whether the engine can build here and why not, the precisions it compiles and the build options it reads,
the artifacts it makes in a run, how it builds from the build stage and from `workbench build` (each guarded against
the faithful execution of the graph it compiled), which run files resume checks and how it hands them on again, the
report's lines and the CLI's line for what it built, the input shape a built file fixes (latency), and the suffixes
of the files it writes. The build stage, `workbench build`, validate, resume, the report and latency read this table,
so nothing outside an engine's own module branches on its name.

Like the task registry, a row is registered by one line (`name -> "module:ROW"`) and its module imported when the
row is first read: the engine's names type the recipe's `engine:` without importing anything.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# Table order is `auto`'s preference: the first engine whose package is installed.
ENGINES: dict[str, str] = {
    "tensorrt": "workbench.runtime.tensorrt:ENGINE",
    "openvino": "workbench.runtime.openvino:ENGINE",
}
NAMES: tuple[str, ...] = tuple(ENGINES)
# A build record written before the build stage recorded its engine was TensorRT's (the only engine then).
UNNAMED_RECORD = "tensorrt"


@dataclass(frozen=True)
class FileBuild:
    """`workbench build`'s request: one ONNX file compiled to one engine file (each engine reads its own fields)."""

    onnx: Path
    out: Path | None
    precision: str
    dims: list  # the ONNX input's dimensions, None where dynamic
    batch: tuple[int, int, int] = (1, 8, 32)
    size: tuple[int, int] | None = None
    strongly_typed: bool = True
    workspace_mib: int = 4096
    timing_cache: Path | None = None
    sparse: bool = False
    openvino_graph: str = "u8"
    openvino_weights: str = "auto"


# (runner factory, the ONNX graph it was compiled from, its files, tap, backend name) -> the guard's record: the
# build stage's and the CLI's guards differ in what they do with a refusal, not in what the engine hands them.
Guard = Callable[[Callable[[], Any], Path, list, Any, str], dict]


@dataclass(frozen=True)
class Engine:
    name: str  # build.engine's value; the build record's and the sidecar's `engine`
    title: str  # in sentences: "precision fp16 is for TensorRT"
    section: str  # the report's section title
    device: str  # what it compiles for, in sentences ("the CPU")
    package: str  # the Python package `auto` looks for (found, not imported)
    precisions: tuple[str, ...]  # what it compiles
    options: tuple[str, ...]  # the build options it reads, beside the guard's and `required` (every engine's)
    suffixes: tuple[str, ...]  # the files it writes; the first is the one `workbench bench` opens, the rest count
    # toward its bytes
    unavailable: Callable[[], str | None]  # why it cannot build here (None: it can); cheap, for validate
    makes: Callable[[Any, set[str]], set[str]]  # (build options, artifacts made before) -> the artifacts it makes
    build: Callable[[Any, Any], dict]  # (run, build options) -> the build's record; raises guard.EngineNotBuilt
    build_file: Callable[[FileBuild, Guard], dict]  # `workbench build`: (request, guard) -> the sidecar
    run_files: Callable[[Any, dict], list[str]]  # (build options, record) -> the run files resume checks
    restore: Callable[[Any, Any, dict], bool]  # (run, build options, record) -> handed on again (False: build again)
    report: Callable[[dict], list[str]]  # the report's lines for a built record
    describe: Callable[[dict, Path], str]  # the CLI's line for a sidecar and where the built file is
    default_out: Callable[[Path], Path]  # where `workbench build` writes the engine for an ONNX file
    input_shape: Callable[[Path], tuple]  # ((C, H, W) or None, fixed batch or None) of a built file's input


_LOADED: dict[str, Engine] = {}


def engine(name: str) -> Engine:
    """The row of a registered engine (its module imported on first use)."""
    if name not in _LOADED:
        module, _, attr = ENGINES[name].partition(":")
        row = getattr(importlib.import_module(module), attr)
        if row.name != name:
            raise ValueError(f"{ENGINES[name]} registers engine {row.name!r}, not {name!r}")
        _LOADED[name] = row
    return _LOADED[name]


def resolve(requested: str) -> Engine:
    """The engine a build asks for; `auto`: the first in table order whose package is installed, else the last."""
    if requested != "auto":
        return engine(requested)
    for name in NAMES:
        if importlib.util.find_spec(engine(name).package) is not None:
            return engine(name)
    return engine(NAMES[-1])


def of_record(values: dict) -> Engine:
    """The engine a build record (metrics.json's stages.build) was written by."""
    return engine(values.get("engine", UNNAMED_RECORD))


def for_suffix(suffix: str) -> Engine | None:
    """The engine whose built files `workbench bench` opens by this suffix, if any."""
    return next((engine(n) for n in NAMES if engine(n).suffixes[0] == suffix), None)


def precision_problem(row: Engine, precision: str, field: str = "precision") -> str | None:
    """Why `row` cannot compile `precision` (None: it can), naming the engines that do."""
    if precision in row.precisions:
        return None
    others = " or ".join(engine(n).title for n in NAMES if precision in engine(n).precisions) or "no engine"
    return f"{field} {precision} is for {others}; {row.title} on {row.device} compiles {' or '.join(row.precisions)}"


def foreign_option(row: Engine, options: Any) -> str | None:
    """An option of another engine given a value of its own in build options that name `row` (compared with the
    default: a recipe is re-validated from its dump, where every field counts as set); None where there is none."""
    for name in NAMES:
        other = engine(name)
        for field in other.options if other is not row else ():
            if field in row.options or field not in type(options).model_fields:
                continue
            if getattr(options, field) != type(options).model_fields[field].default:
                return (f"{field} is one of {other.title}'s options, and engine {row.name} does not read it: drop "
                        f"it, or use engine: {other.name} (its options: {', '.join(other.options)})")
    return None


def companion_bytes(path: Path) -> int:
    """The bytes of the files beside a built file that it needs (an OpenVINO IR's .bin beside its .xml)."""
    row = for_suffix(path.suffix)
    extra = [path.with_suffix(s) for s in (row.suffixes[1:] if row else ())]
    return sum(p.stat().st_size for p in extra if p.is_file())
