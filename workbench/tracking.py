"""Optional experiment tracking: the training stages' per-epoch metrics and the final table, sent to TensorBoard
and/or MLflow when the recipe asks (`log_to: [tensorboard, mlflow]`) and the package is installed.

Neither is a dependency: `workbench validate` names the package a recipe's `log_to` needs when it is missing.
TensorBoard's event files go into the run directory (`tensorboard/`, `tensorboard --logdir runs`); MLflow logs to
the tracking server or store the user's environment names (MLFLOW_TRACKING_URI; MLflow 3's default is a SQLite
file, which needs the full `mlflow` package, not `mlflow-skinny`), one MLflow run per workbench run, named after
its directory, with the report attached. An unreachable server fails the run's start within seconds: its HTTP
retries are capped (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT, unless the user set them).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Protocol

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # log_to entry -> the module it needs


class Tracker(Protocol):
    def epoch(self, stage: str, entry: dict) -> None: ...

    def finish(self, metrics: dict, run_dir: Path, failed: bool) -> None:
        """Log the final table, then close (always, even when logging fails)."""

    def close(self, failed: bool) -> None: ...


def missing_packages(log_to: list[str]) -> list[str]:
    """`log_to` entries whose package is not installed, each with how to install it."""
    return [f"log_to: {name} needs the {PACKAGES[name]} package (pip install {PACKAGES[name]}), or remove it"
            for name in log_to if importlib.util.find_spec(PACKAGES[name]) is None]


class Trackers:
    """The recipe's trackers, called by the runner (start, finish) and the training stages (each epoch)."""

    def __init__(self, trackers: list[Tracker]):
        self._trackers = trackers

    @classmethod
    def open(cls, log_to: list[str], run_dir: Path, recipe) -> Trackers:
        from .errors import WorkbenchError

        makers = {"tensorboard": _TensorBoard, "mlflow": _MLflow}
        opened = cls([])
        for name in log_to:
            try:
                opened._trackers.append(makers[name](run_dir, recipe))
            except Exception as e:  # before any stage ran: the user asked for it, so say why it cannot be
                for tracker in opened._trackers:  # no MLflow run left active, no TensorBoard file left open
                    _quietly(tracker.close, True)
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise WorkbenchError(f"log_to: {name} could not start ({type(e).__name__}: {first}); fix its "
                                     "setup (for MLflow: MLFLOW_TRACKING_URI) or remove it from log_to") from None
        return opened

    def epoch(self, stage: str, entry: dict) -> None:
        for tracker in list(self._trackers):
            try:
                tracker.epoch(stage, entry)
            except Exception as e:  # a tracking server gone away must not stop the training: warn, stop logging
                _warn(tracker, e, "the run goes on without it")
                self._trackers.remove(tracker)
                _quietly(tracker.close, True)

    def finish(self, metrics: dict, run_dir: Path, failed: bool) -> None:
        """Every tracker logs the final table and closes; one that fails is a warning and the others go on."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                tracker.finish(metrics, run_dir, failed)
            except Exception as e:
                _warn(tracker, e, "the run's results are in its directory all the same")


def _warn(tracker, error: Exception, consequence: str) -> None:
    print(f"warning: log_to: {type(tracker).__name__.strip('_')} failed ({type(error).__name__}: {error}); "
          f"{consequence}", file=sys.stderr)


def _quietly(close, *args) -> None:
    try:
        close(*args)
    except Exception:  # closing after a failure: the first error is the one reported
        pass


def epoch_scalars(entry: dict) -> dict[str, float]:
    """One training epoch's numbers: the losses, the learning rate, seconds, and the evaluation metric."""
    values = {k: float(v) for k, v in entry.items() if k not in ("epoch", "steps", "eval") and _number(v)}
    evaluation = entry.get("eval") or {}
    if _number(evaluation.get("value")):
        values[f"eval_{_key(evaluation['metric'])}"] = float(evaluation["value"])
    return values


def final_scalars(metrics: dict) -> dict[str, float]:
    """The final table: every backend's metrics, its difference with FP32, size and latency."""
    values = {}
    for backend, entry in metrics.get("stages", {}).get("evaluate", {}).get("backends", {}).items():
        for key, value in entry.get("metrics", {}).items():
            if _number(value):
                values[f"{backend}/{key}"] = float(value)
        if entry.get("delta_vs_fp32"):
            values[f"{backend}/delta_vs_fp32"] = float(entry["delta_vs_fp32"]["delta"])
        if "size_bytes" in entry:
            values[f"{backend}/size_mb"] = entry["size_bytes"] / 1e6
        for batch, timing in entry.get("latency", {}).items():
            values[f"{backend}/latency_{batch}_ms"] = float(timing["median_ms"])
    return values


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _key(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


class _TensorBoard:
    def __init__(self, run_dir: Path, recipe):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", f"{recipe.name}: {' -> '.join(n for n, _ in recipe.stage_list())}")

    def epoch(self, stage: str, entry: dict) -> None:
        for key, value in epoch_scalars(entry).items():
            self.writer.add_scalar(f"{stage}/{key}", value, entry["epoch"])
        self.writer.flush()

    def finish(self, metrics: dict, run_dir: Path, failed: bool) -> None:
        try:
            for key, value in final_scalars(metrics).items():
                self.writer.add_scalar(f"evaluate/{key}", value, 0)
        finally:
            self.close(failed)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, recipe):
        import os

        # MLflow retries an unreachable server for minutes by default; a run should fail at its start instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self.mlflow = mlflow
        # The run directory's final name: `<name>-<timestamp>`, without the `.incomplete` it is built under.
        self.active = mlflow.start_run(run_name=run_dir.name.removesuffix(".incomplete"))
        params = {"recipe": recipe.name, "task": recipe.task, "model": recipe.model.spec,
                  "stages": " -> ".join(n for n, _ in recipe.stage_list())}
        for name, options in recipe.stage_list():
            for key, value in options.model_dump(mode="json").items():
                if isinstance(value, (str, int, float, bool)):
                    params[f"{name}.{key}"] = value
        try:
            mlflow.log_params(params)
        except Exception:
            self.close(failed=True)  # not left active for the next run in this process
            raise

    def epoch(self, stage: str, entry: dict) -> None:
        self.mlflow.log_metrics({f"{stage}.{k}": v for k, v in epoch_scalars(entry).items()}, step=entry["epoch"])

    def finish(self, metrics: dict, run_dir: Path, failed: bool) -> None:
        try:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in final_scalars(metrics).items()})
            for name in ("report.html", "metrics.json", "recipe.yaml"):
                if (run_dir / name).is_file():
                    self.mlflow.log_artifact(str(run_dir / name))
        finally:
            self.close(failed)

    def close(self, failed: bool) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
