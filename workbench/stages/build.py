"""build: an engine compiled from the run's exported ONNX, checked against the graph it was built from.

Engines: TensorRT (runtime/tensorrt.py; NVIDIA GPUs) and OpenVINO (runtime/openvino.py; the CPU). `auto`
takes TensorRT where the `tensorrt` package is installed, OpenVINO elsewhere. An INT8 engine is compiled
from the Q/DQ graph; OpenVINO also compiles the FP32 graph, the baseline its speed-up is measured against.
The graph's Q/DQ numbers are checked first (qdq/numeric.py). Every INT8 engine then runs beside the faithful
execution of the graph it was compiled from (runtime/guard.py), on as many calibration and then evaluation
images as resolve the guard's threshold, and is handed on only if it computes the same function; a refused
engine's files are removed. `guard: false` keeps it, marked unverified in its sidecar and every table.

Without the engine's package (or, for TensorRT, a GPU) the stage records why nothing was built and the run
goes on to its reports; `required: true` fails the run instead, as it does for a refused engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..errors import WorkbenchError
from ..runtime import engines
from ..schema import MAX_BATCH, ImageSide
from .registry import Restorer, StageOptions, register_stage


class BuildOptions(StageOptions):
    engine: Literal[("auto",) + engines.NAMES] = Field(
        "auto", description="tensorrt (NVIDIA GPUs), openvino (CPUs); auto: tensorrt where the tensorrt package is "
        "installed, openvino elsewhere.")
    precision: Literal["int8", "fp16", "fp32"] = Field(
        "int8", description="int8: the Q/DQ graph (model.onnx; OpenVINO also compiles the FP32 graph beside it); "
        "fp16 (TensorRT only) / fp32: the FP32 graph.")
    min_batch: int = Field(1, ge=1, le=MAX_BATCH, description="TensorRT: smallest batch of the optimization profile.")
    opt_batch: int = Field(8, ge=1, le=MAX_BATCH, description="TensorRT: batch it tunes for.")
    max_batch: int = Field(32, ge=1, le=MAX_BATCH, description="TensorRT: largest batch.")
    min_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="TensorRT: smallest (H, W), for graphs exported with dynamic_size.")
    opt_size: tuple[ImageSide, ImageSide] | None = Field(
        None, description="TensorRT: (H, W) it tunes for (default: the recipe's input size).")
    max_size: tuple[ImageSide, ImageSide] | None = Field(None, description="TensorRT: largest (H, W).")
    strongly_typed: bool = Field(True, description="TensorRT: precisions from the graph (TensorRT 10's recommended "
                                 "mode for Q/DQ).")
    fp16: bool = Field(True, description="TensorRT, weakly typed builds: allow FP16 for the layers the graph keeps "
                       "float.")
    workspace_mib: int = Field(4096, ge=16, description="TensorRT: builder workspace limit.")
    timing_cache: str | None = Field(None, description="TensorRT: timing cache file, read and updated by every build "
                                     "(default: ~/.cache/workbench).")
    sparse_weights: bool = Field(False, description="TensorRT: use 2:4 sparse kernels (after prune: sparsity_2to4).")
    openvino_graph: Literal["u8", "tensorrt_style"] = Field(
        "u8", description="OpenVINO: the INT8 layout compiled. u8: the same ranges with unsigned activations (zero "
        "point 128 where signed) and 8-bit weight initializers, computed correctly on every CPU; tensorrt_style: "
        "model.onnx as it is (signed activations), which the OpenVINO versions measured compute wrongly after a "
        "Concat on CPUs without AMX (the guard refuses it where it does).")
    openvino_weights: Literal["auto", "s8", "reduce_range"] = Field(
        "auto", description="OpenVINO, u8 graph: s8 (8-bit weights: CPUs with VNNI or AMX), reduce_range (7 bits "
        "where a 16-bit sum could saturate: x86 CPUs without VNNI); auto: for the CPU the build runs on.")
    guard: bool = Field(True, description="Run the engine beside the faithful execution of the graph it was compiled "
                        "from and refuse it when they disagree (false: keep it, marked unverified everywhere).")
    guard_max_samples: int = Field(1024, ge=1, le=65536, description="Most images the guard compares on. It starts "
                                   "at the fewest on which perfect agreement resolves guard_min_agreement (35 for 90% "
                                   "at 95%) and doubles while the interval straddles it, drawing the calibration "
                                   "split, then the evaluation split.")
    guard_min_agreement: float = Field(
        90.0, ge=0, lt=100, description="Refuse an engine whose agreement with its faithful graph is not resolved at "
        "or above this percent: top-1 agreement (classifiers), mAP50 of its boxes against the graph's confident "
        "boxes (detectors). Engines that compute the graph's function agree on 97-100%; the broken ones seen, 0-66%.")
    guard_confidence: float = Field(0.95, gt=0.5, lt=1, description="Of the agreement's interval.")
    guard_min_sqnr_db: float = Field(
        15.0, description="Where no agreement is measurable (no confident box): refuse an engine whose output SQNR "
        "against the faithful graph is below this.")
    required: bool = Field(False, description="Fail the run when the engine cannot be built or is refused (default: "
                           "record why and go on).")

    @model_validator(mode="after")
    def _consistent(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}, {self.opt_batch}, "
                             f"{self.max_batch}")
        if self.engine != "auto" and (problem := engines.precision_problem(engines.engine(self.engine),
                                                                            self.precision)):
            raise ValueError(problem)
        if self.engine != "auto" and (problem := engines.foreign_option(engines.engine(self.engine), self)):
            raise ValueError(problem)
        return self


def resolve_engine(opts: BuildOptions) -> str:
    """The engine `auto` stands for (runtime/engines.resolve: the first in the table whose package is installed)."""
    return engines.resolve(opts.engine).name


def _needs(opts: BuildOptions) -> tuple[str, ...]:
    # INT8 compiles the Q/DQ graph, so the model must have been calibrated; FP16/FP32 the FP32 graph.
    return ("quantized", "onnx") if opts.precision == "int8" else ("onnx_fp32",)


def _makes(opts: BuildOptions, made: set[str]) -> set[str]:
    return engines.resolve(opts.engine).makes(opts, made)


def _preflight(opts: BuildOptions, where: str, recipe) -> list[str]:
    """A required engine that cannot build here (its package, or its device, is missing: the engine table says), and
    an engine or engine option the recipe's target (targets.py) cannot honour."""
    from ..targets import engine_problems

    engine = engines.resolve(opts.engine)
    problems = engine_problems(recipe.target, [(where, engine.name)])
    if recipe.target.name == "openvino":
        # (compared with the defaults: a recipe is re-validated from its dump, where every field counts as set)
        given = [f for f, default in (("openvino_graph", "u8"), ("openvino_weights", "auto"))
                 if getattr(opts, f) != default]
        if given:
            problems.append(f"{where}.{given[0]} with target: openvino: the target calibrates and exports the graph "
                            "OpenVINO compiles (its weights follow target.cpu), so there is no conversion to choose; "
                            f"drop {' and '.join(given)} (or use target: tensorrt to convert its graph)")
    if opts.required and (why := engine.unavailable()):
        problems.append(f"{where}.required is true, but {why}")
    return problems


# How the stage comes back from its run directory on --resume (resume.py reads its registration).

def _built_files(options, values) -> list[str]:
    """The files the engine that built wrote (its row in runtime/engines.py says which)."""
    from ..runtime import engines

    return engines.of_record(values).run_files(options, values) if values.get("built") else []


def _built(run, options, values, loaded) -> bool:
    """The engine files the build stage wrote, handed on by the engine's row (which may refuse them: an IR compiled
    by another version of its compiler or for another CPU builds again)."""
    if not values.get("built"):
        return True  # nothing was built: nothing to hand on
    from ..runtime import engines
    from ..runtime.guard import GuardPolicy

    # The recipe's threshold, for evaluate's check of every engine on the evaluation split.
    run.artifacts.engine_guard = GuardPolicy(options.guard_min_agreement, options.guard_min_sqnr_db,
                                             options.guard_confidence, options.guard_max_samples)
    return engines.of_record(values).restore(run, options, values)


# What the report shows of the stage (report.py reads its registration), from metrics.json alone.

def _build_section(run_dir: Path, metrics: dict) -> list[str]:
    b = metrics.get("stages", {}).get("build")
    if not b:
        return []

    engine = engines.of_record(b)
    title = f"## {engine.section}"
    if not b.get("built"):
        return [title, "", f"Not built: {b['reason']}", ""]
    text = engine.report(b)
    guard = b.get("guard")
    if guard:
        text += ["", f"Guard: {_guard_sentence(guard)}"]
    elif b.get("verified") is False:
        text += ["", "Guard: off (guard: false): the engine is **unverified**; nothing checked that it computes its "
                 "graph's function."]
    return [title, ""] + text + [""]


def _guard_sentence(guard: dict) -> str:
    """What the build's guard measured and decided (older runs' records have no interval)."""
    drawn = " and ".join(f"{n} {split}" for split, n in guard.get("sources", {}).items() if n) or "calibration"
    if guard.get("agreement") is None:
        agree = "no agreement measurable"
    elif guard.get("low") is not None:
        agree = (f"{guard.get('criterion', 'agreement')} {guard['agreement']:.1f}% [{guard['low']:.1f}, "
                 f"{guard['high']:.1f}] ({100 * guard['confidence']:.0f}% interval; needs {guard['min_agreement']:g}%)")
    else:
        agree = f"{guard['agreement']:.2f}% agreement over {guard['compared']} compared"
    verdict = guard.get("verdict") or ("passed" if guard["passed"] else "refused")
    return (f"against `{guard.get('reference', 'the faithful graph')}` on {guard['samples']} images ({drawn}), "
            f"{agree}, output SQNR {guard['sqnr_db']:.1f} dB: {verdict}.")


@register_stage("build", BuildOptions, needs=_needs, makes=_makes, restorer=Restorer(_built, _built_files),
                preflight=_preflight,
                report=_build_section, report_position=70)
def build(run, opts: BuildOptions) -> None:
    """An engine (TensorRT, or OpenVINO for the CPU) from the exported ONNX, checked against its faithful graph."""
    from ..runtime.guard import EngineNotBuilt, GuardPolicy

    engine = engines.resolve(opts.engine)
    run.artifacts.engine_guard = GuardPolicy(opts.guard_min_agreement, opts.guard_min_sqnr_db, opts.guard_confidence,
                                             opts.guard_max_samples)
    try:
        values = engine.build(run, opts)
    except EngineNotBuilt as e:
        if opts.required:
            raise WorkbenchError(f"stages.build: {e}") from None
        values = {"engine": engine.name, "built": False, "reason": str(e), **e.details}
    run.record("build", values)
