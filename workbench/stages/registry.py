"""The stage registry: one flat dict from stage name to its function, options and declared hand-over.

A stage is `fn(run: Run, opts: Options) -> None`: it does one thing to the run, writes its files into the
run directory, records its metrics and adds what it makes to `run.artifacts`. Each registration declares
which artifacts (artifacts.py) the stage needs, which it makes (given its options and what earlier
stages made) and which it cannot follow, so `order_problems` can refuse an impossible recipe before
anything runs. Stage modules import torch and the machinery they drive inside their stage functions:
registering a stage (reading or validating a recipe) stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import DESCRIPTIONS, Artifact
from ..schema import StrictModel


class StageOptions(StrictModel):
    """Base of every stage's options: unknown keys, NaN/Inf and booleans for numbers are errors, never ignored."""


def metrics_only(run, options, values, loaded) -> bool:
    return True  # a stage that hands nothing on (evaluate, bench): its metrics are all there is


def _no_files(options, values) -> list[str]:
    return []


@dataclass(frozen=True)
class Restorer:
    """How a finished stage comes back from its run directory: the files restoring reads (by name, from the stage's
    options and metrics; export hashes them as it finishes), the check of each JSON one, and the restoring (False:
    the stage runs again)."""

    restore: Callable[..., bool]  # (run, options, values, {JSON file: its checked content}) -> restored
    files: Callable[[Any, dict], list[str]] = _no_files
    checks: dict[str, Callable[[Any, Path], None]] = field(default_factory=dict)


Needs = Callable[[StageOptions], Iterable[str]]
Makes = Callable[[StageOptions, set[str]], Iterable[Artifact]]
Preflight = Callable[[StageOptions, str, Any], list[str]]


@dataclass(frozen=True)
class StageSpec:
    name: str
    fn: Callable
    options: type[StageOptions]
    summary: str
    needs: Needs  # artifacts that earlier stages must have made
    makes: Makes  # artifacts this stage adds, given its options and the artifacts made before it
    refuses: tuple[Artifact, ...] = ()  # artifacts that must not exist yet (prune cannot follow calibrate)
    refusal_hint: str = ""  # said after a refusal: what the user may have meant
    needs_data: Needs = lambda opts: ()  # data splits the stage reads (given its options), checked before it runs
    restorer: Restorer | None = None  # how --resume brings it back (None: it keeps its state only in memory)
    # What `workbench validate` (and run's preflight) checks for it beyond the order: (options, "stages[i].name", the
    # recipe) -> problems, each naming the field and what to do. Light: no model is loaded, no image read.
    preflight: Preflight = lambda opts, where, recipe: []
    # What the report shows of it: (run directory, metrics.json) -> markdown lines, [] where it did not run; the
    # report's sections follow report_position.
    report: Callable[[Path, dict], list[str]] | None = None
    report_position: int = 0
    # Its metrics hold the backends' results, which the report and the console summary open with (one stage does).
    results: bool = False
    console: Callable[[dict], list[str]] | None = None  # its lines under the console summary's table


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, options: type[StageOptions], *, needs: Iterable[Artifact] | Needs = (),
                   makes: Iterable[Artifact] | Makes = (), refuses: Iterable[Artifact] = (), refusal_hint: str = "",
                   needs_data: Iterable[str] | Needs = (), restorer: Restorer | None = None,
                   preflight: Preflight | None = None, report: Callable[[Path, dict], list[str]] | None = None,
                   report_position: int = 0, results: bool = False,
                   console: Callable[[dict], list[str]] | None = None):
    """Decorator: register `fn` as the stage `name`. `needs`, `needs_data` and `makes` are fixed tuples or
    functions of the options (and, for makes, of the artifacts already made)."""

    def decorator(fn: Callable) -> Callable:
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        STAGES[name] = StageSpec(
            name=name, fn=fn, options=options, summary=summary,
            needs=needs if callable(needs) else _fixed_needs(tuple(needs)),
            makes=makes if callable(makes) else _fixed_makes(tuple(makes)),
            refuses=tuple(refuses), refusal_hint=refusal_hint,
            needs_data=needs_data if callable(needs_data) else _fixed_needs(tuple(needs_data)), restorer=restorer,
            preflight=preflight or (lambda opts, where, recipe: []), report=report, report_position=report_position,
            results=results, console=console,
        )
        return fn

    return decorator


def results_of(metrics: dict) -> dict:
    """The metrics (metrics.json's stages.<name>) of the stage that holds the backends' results; {} where it did
    not run."""
    holder = next((s.name for s in STAGES.values() if s.results), None)
    return metrics.get("stages", {}).get(holder, {}) if holder else {}


def _fixed_needs(names: tuple[Artifact, ...]) -> Needs:
    return lambda opts: names


def _fixed_makes(names: tuple[Artifact, ...]) -> Makes:
    return lambda opts, made: names


def order_problems(stages: list[tuple[str, StageOptions]]) -> list[str]:
    """Walk the stages in order with their declarations: one problem per stage whose input no earlier stage
    makes, or that cannot follow an artifact an earlier stage made, naming the stage and what to do."""
    problems: list[str] = []
    made: dict[str, int] = {}  # artifact -> index of the first stage that made it
    for index, (name, opts) in enumerate(stages):
        spec = STAGES[name]
        where = f"stages[{index}].{name}"
        for need in dict.fromkeys(spec.needs(opts)):
            if need not in made:
                what, maker = DESCRIPTIONS[need]
                problems.append(f"{where} needs {what}, which no stage before it makes: put {maker} before {name}")
        for refused in spec.refuses:
            if refused in made:
                first = stages[made[refused]][0]
                problems.append(f"{where} cannot follow stages[{made[refused]}].{first}, which made "
                                f"{DESCRIPTIONS[refused][0]}: put {name} before {first}{spec.refusal_hint}")
        for artifact in spec.makes(opts, set(made)):
            made.setdefault(artifact, index)
    return problems


class UndeclaredArtifacts(Exception):
    """A stage made an artifact its registration does not declare: a defect of the stage (order_problems would not
    have known a later stage could rely on it), never of the recipe, so it keeps its traceback."""


def check_made(spec: StageSpec, opts: StageOptions, before: set[str], after: set[str]) -> None:
    """After a stage ran: refuse what it made beyond what it declared (`makes`, given its options and what was made
    before it). A declared artifact it did not make is no error: an engine that could not build makes nothing."""
    declared = set(spec.makes(opts, set(before)))
    if extra := sorted(after - set(before) - declared):
        raise UndeclaredArtifacts(
            f"stage {spec.name} made {', '.join(extra)}, which its registration does not declare "
            f"(it declares {', '.join(sorted(declared)) or 'nothing'}): add them to its register_stage(makes=...)")
