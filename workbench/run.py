"""A Run: what stages share (the models, the task, the data, the artifacts they hand on), and the function that
carries a recipe through its stages.

    recipe -> preflight (model, data: fail before writing anything) -> run dir
           -> stages in order -> report -> run dir renamed complete

The run directory is built as `<name>-<timestamp>.incomplete` and renamed to
`<name>-<timestamp>` only when every stage finished, or to `.failed` (with the
error in metrics.json) when one did not. Every file in it is written
atomically, so no directory ever holds half a file.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .artifacts import Artifacts
from .data import ImageDataset, build_dataset, check_readable, make_loader
from .errors import Terminated, WorkbenchError
from .io import write_json, write_text
from .models import resolve_model
from .recipe import Recipe, dump_recipe, with_absolute_paths
from .resume import (
    Previous,
    Restored,
    check_reusable,
    describe_inputs,
    open_previous,
    restore_stages,
    stage_fingerprints,
    stage_record,
)
from .rundir import check_runs_dir, mark_stale_runs, process_identity
from .stages import STAGES
from .stages.registry import check_made
from .tasks import Classes, Task, get_task
from .tracking import Trackers
from .validate import check_recipe_inputs

_UNREAD = object()  # classes not asked of the task yet


@dataclass
class Run:
    recipe: Recipe
    dir: Path
    model: nn.Module  # the model as the stages leave it
    reference: nn.Module  # the FP32 model as loaded: never modified
    device: torch.device
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: Artifacts = field(default_factory=Artifacts)  # what stages hand on (artifacts.py)
    stage: str | None = None  # the stage running now: a failure's record names it
    trackers: Trackers = field(default_factory=lambda: Trackers([]))  # recipe.log_to: TensorBoard, MLflow
    _datasets: dict[str, ImageDataset] = field(default_factory=dict)
    _classes: Any = _UNREAD

    @property
    def task(self) -> Task:
        """What the model's output means: every stage asks it (tasks/base.py)."""
        return get_task(self.recipe.task)

    def dataset(self, split: str) -> ImageDataset:
        if split not in self._datasets:
            self._datasets[split] = self.task.for_model(build_dataset(self.recipe.data, split), self.classes,
                                                        f"data.{split}")
        return self._datasets[split]

    def classes(self) -> Classes:
        """The model's own classes where the task needs them (a detector's head, names or output, never the
        labels): their count and, where the model names them, their names."""
        if self._classes is _UNREAD:
            self._classes = self.task.classes(self.reference, self.recipe.model.input_size)
        return self._classes

    def num_classes(self) -> int | None:
        return self.classes().count

    def class_names(self) -> list[str] | None:
        """The model's class names, else those a split of the run names (a data.yaml's), else None."""
        if self.classes().names:
            return self.classes().names
        named = (getattr(d, "names_from", None) and d.names for d in self._datasets.values())
        return next((n for n in named if n), None)

    def loader(self, split: str):
        return make_loader(self.dataset(split), self.recipe.data)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        c, h, w = self.recipe.model.input_size
        return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0)).to(self.device)

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def arithmetic(self):
        """The recipe's target resolved to the arithmetic every quantizer follows (targets.Arithmetic; the
        openvino target's `cpu: auto` reads this CPU once)."""
        from .targets import resolve_target

        return resolve_target(self.recipe.target)

    def warn(self, message: str) -> None:
        """A finding the run goes on after, which the console summary and the report show (never a silent
        'complete'): a failed check of an exported graph, say."""
        self.metrics.setdefault("warnings", []).append({"stage": self.stage, "message": message})
        self.save_metrics()

    def record(self, stage: str, values: dict[str, Any]) -> None:
        """Store a stage's metrics and rewrite metrics.json (after every stage, atomically)."""
        self.metrics.setdefault("stages", {})[stage] = values
        self.save_metrics()

    def save_metrics(self) -> None:
        write_json(self.path("metrics.json"), self.metrics)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("device: 'cuda' was asked for but no CUDA device is available; use device: auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def preflight(recipe: Recipe) -> tuple[nn.Module, dict[str, ImageDataset]]:
    """Everything that can fail on the user's input, before a single file is written."""
    check_recipe_inputs(recipe)  # names and paths first: seconds, where loading the model and data takes minutes
    model = resolve_model(recipe.model)
    datasets = {}
    for name, options in recipe.stage_list():
        for split in STAGES[name].needs_data(options):
            if split not in datasets:
                datasets[split] = build_dataset(recipe.data, split)
                check_readable(datasets[split], f"data.{split}")
    # The task checks the model is one it reads, and reads each split for it (a detector's class count).
    return model, get_task(recipe.task).prepare_datasets(model, recipe.model.input_size, datasets)


def run_recipe(recipe: Recipe, console=None, resume: str | os.PathLike | Previous | None = None) -> Run:
    """Carry `recipe` through its stages; return the finished Run (its dir holds every artifact).

    `resume`: a failed or interrupted run directory (or that run, opened) to continue in place, reusing the
    stages it finished with this same recipe and inputs (see resume.py).
    """
    from .report import print_summary

    recipe = with_absolute_paths(recipe)
    distributed.init()
    if not distributed.is_main():  # rank 0 writes the run directory; the others compute beside it
        recipe = recipe.model_copy(update={"runs_dir": tempfile.mkdtemp(prefix=f"workbench-rank{distributed.rank()}-")})
    previous = resume if isinstance(resume, Previous) or resume is None else open_previous(resume)
    if previous is None:
        # Before the model and the data are loaded (minutes, for some): a run that cannot be written fails now.
        check_runs_dir(Path(recipe.runs_dir), recipe.name)
        mark_stale_runs(Path(recipe.runs_dir))
    model, datasets = preflight(recipe)
    device = pick_device(recipe.device)
    if device.type == "cuda":
        # INT8 simulation must be exact float32 around the fake-quant rounding: TF32 (PyTorch's
        # default for cuDNN convolutions) rounds inputs to 10 bits and moved yolov5n's
        # fake-quant mAP by about a point against the same graph in ONNX Runtime.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = model.to(device).eval()
    # Only rank 0's run directory is kept (and --resume runs in one process): the others need no fingerprint.
    inputs = describe_inputs(recipe, datasets) if distributed.is_main() else {}
    reusable = check_reusable(previous, recipe, inputs) if previous is not None else 0
    # A resumed run restores what it reuses from the directory as it is, before claiming it: a file that fails its
    # check (resume.py) leaves the directory under its name, as it was.
    run = Run(recipe=recipe, dir=previous.dir if previous is not None else Path(), model=copy.deepcopy(model),
              reference=model, device=device, _datasets=datasets)
    run.metrics = {
        "recipe": recipe.name,
        "status": "running",
        "started": datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "task": recipe.task,
        "torch": torch.__version__,
        **process_identity(),  # tells a later run whether this one still runs (rundir.mark_stale_runs)
        "stage_names": [name for name, _ in recipe.stage_list()],
        "stages": {},
        "inputs": inputs,
        "fingerprints": [],  # one per finished stage, in order: what --resume checks before reusing it
    }
    restored = restore_stages(run, previous, reusable) if previous is not None else None
    final_dir, work_dir = _start_run_dir(recipe, previous)
    if previous is not None:
        run.artifacts.move(previous.dir, work_dir)
    run.dir = work_dir
    try:  # from here on, whatever happens (Ctrl-C too) leaves the directory renamed .failed with the reason
        if distributed.is_main():
            run.trackers = Trackers.open(recipe.log_to, work_dir, recipe)
        _run_stages(run, previous, restored, console)
        _finish_trackers(run, failed=False)  # before the rename: TensorBoard reopens its file by name
    except BaseException as e:
        _record_failure(run, e, final_dir)
        raise
    os.replace(work_dir, final_dir)
    run.dir = final_dir
    if console is not None:
        print_summary(run.dir, console)
    return run


def _finish_trackers(run: Run, failed: bool) -> None:
    """Send the final table (and the report) to the recipe's trackers and close them; a tracker that fails is a
    warning (tracking.Trackers.finish), never the run's failure."""
    run.trackers.finish(run.metrics, run.dir, failed)


def _start_run_dir(recipe: Recipe, previous: Previous | None) -> tuple[Path, Path]:
    """The run's final directory and the `.incomplete` one it works in: the resumed run's, claimed, or a new one."""
    if previous is not None:
        return previous.final_dir, previous.claim()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final_dir = _unique_dir(Path(recipe.runs_dir) / f"{recipe.name}-{stamp}")
    work_dir = final_dir.with_name(final_dir.name + ".incomplete")
    work_dir.mkdir(parents=True)
    return final_dir, work_dir


def _run_stages(run: Run, previous: Previous | None, restored: Restored | None, console) -> None:
    """Record the recipe, note what a resumed run reused, run the other stages in order, write the report."""
    from .deploy import write_deploy
    from .progress import current_stage
    from .report import write_report

    recipe = run.recipe
    write_text(run.path("recipe.yaml"), dump_recipe(recipe))
    run.save_metrics()
    reused = restored.stages if restored is not None else []
    if previous is not None:
        run.metrics["resumed"] = {"from": previous.dir.name, "started_first": previous.metrics.get("started"),
                                  "reused": reused, "rerun": run.metrics["stage_names"][len(reused):]}
        why = f" ({restored.rerun_because})" if restored.rerun_because else ""
        if restored.rerun_because:
            run.metrics["resumed"]["rerun_because"] = restored.rerun_because
        run.save_metrics()
        if console is not None:
            console.print(f"resuming {previous.dir.name}: reusing {', '.join(reused) or 'no stage'}; running "
                          f"{', '.join(run.metrics['resumed']['rerun']) or 'no stage'}{why}")
    fingerprints = stage_fingerprints(recipe)
    for index, (name, options) in enumerate(recipe.stage_list()):
        if index < len(reused):
            continue
        run.stage = name  # before the heading: a signal after the heading is recorded as in this stage
        if console is not None:
            console.print(f"[bold]stage {index + 1}/{len(recipe.stages)}: {name}[/bold]")
        start = time.perf_counter()
        token = current_stage.set(f"stage {index + 1}/{len(recipe.stages)} {name}")
        made = run.artifacts.made()
        try:
            STAGES[name].fn(run, options)
        finally:
            current_stage.reset(token)
        check_made(STAGES[name], options, made, run.artifacts.made())  # what it hands on is what it declared
        run.metrics.setdefault("timings_s", {})[name] = round(time.perf_counter() - start, 3)
        run.metrics.setdefault("peak_rss_mb", {})[name] = peak_rss_mb()
        run.metrics["fingerprints"].append(stage_record(run, name, options, fingerprints[index]))
        run.save_metrics()
        run.stage = None
    run.metrics["status"] = "complete"
    run.metrics["finished"] = datetime.now().isoformat(timespec="seconds")
    if manifest := write_deploy(run.dir, run.metrics):  # the one file to deploy, in deploy/
        run.metrics["deploy"] = manifest
    run.save_metrics()
    write_report(run.dir)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (the kernel's high-water mark: it only grows, so the stage
    where it rises is the one that needed it)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)


def _record_failure(run: Run, error: BaseException, final_dir: Path) -> None:
    """Record why the run ended (a failure, or Ctrl-C) in metrics.json, even on a full disk; rename it `.failed`."""
    interrupted = isinstance(error, KeyboardInterrupt)
    run.metrics["status"] = "interrupted" if interrupted else "failed"
    if interrupted:
        signal = "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C"
        run.metrics["error"] = f"interrupted ({signal})" + (f" during stage {run.stage}" if run.stage else "")
    elif isinstance(error, WorkbenchError):
        run.metrics["error"] = str(error)
    else:
        run.metrics["error"] = "".join(traceback.format_exception_only(error)).strip()
    if run.stage is not None:
        run.metrics["failed_stage"] = run.stage
    try:
        run.save_metrics()
    except OSError as write_error:  # a full disk: the directory still says failed by its name
        print(f"warning: could not record the failure in {run.path('metrics.json')} ({write_error}); "
              "the run directory is renamed .failed all the same", file=sys.stderr)
    # The trackers get the failure as recorded, before the rename (TensorBoard reopens its file by name).
    _finish_trackers(run, failed=True)
    failed = final_dir.with_name(final_dir.name + ".failed")
    os.replace(run.dir, failed)
    run.dir = failed


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 1
    while any(candidate.with_name(candidate.name + s).exists() for s in ("", ".incomplete", ".failed")):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
