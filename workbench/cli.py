"""The `workbench` command: parses, calls the Python API, prints. Nothing else lives here.

    workbench run RECIPE [key.path=value ...]
    workbench run --resume RUN_DIR [RECIPE] [key.path=value ...]
    workbench runs [RUNS_DIR]
    workbench sensitivity RECIPE [key.path=value ...]
    workbench quantize MODEL.pt --data data.yaml [--imgsz 640] [--method mse] [--engine openvino]
    workbench validate RECIPE [key.path=value ...]
    workbench check-onnx MODEL.onnx
    workbench build MODEL.onnx [--precision int8|fp16|fp32] [--data IMAGES] [--no-guard]
    workbench bench MODEL.onnx|MODEL.engine|RUN_DIR ... [--batch-sizes 1 8] [--json FILE]
    workbench schema [--out FILE]
    workbench calib-data build NAME --out DIR | list
    workbench models list [PATTERN]
    workbench stages
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from pathlib import Path

from .errors import Terminated, WorkbenchError, printable
from .runtime import engines  # the engine table's names only: no engine is imported here

ENGINE_HELP = "auto: the first of " + ", ".join(engines.NAMES) + " whose package is installed"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors quote the arguments with their control characters escaped."""

    def error(self, message: str):
        super().error(printable(message))


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _ArgumentParser(prog="workbench", description="Recipe-driven INT8 quantization for PyTorch vision "
                                                              "models.")
    p.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: workbench run recipes/quickstart.yaml [key.path=value ...]")
    run.add_argument("recipe", nargs="?", help="the recipe (with --resume: default the run's recipe.yaml)")
    run.add_argument("overrides", nargs="*", help="recipe fields to override, e.g. stages.calibrate.method=mse")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue this failed or interrupted run from its first "
                     "unfinished stage, reusing the stages it finished with the same recipe and inputs")

    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (the recipe's device)")
    run.add_argument("--gpus", type=int, default=1, metavar="N",
                     help="N processes under torchrun, one per GPU (gloo CPU processes where there is no GPU)")

    quant = sub.add_parser("quantize", help="a YOLO model to INT8 in one line: workbench quantize best.pt --data "
                           "data.yaml")
    quant.add_argument("model", help="a YOLOv5 or Ultralytics .pt checkpoint (or an Ultralytics model .yaml)")
    quant.add_argument("--data", required=True, help="the dataset's Ultralytics data.yaml (train: calibration, "
                       "val: scoring)")
    quant.add_argument("--imgsz", type=int, default=640, help="input size (square), as in Ultralytics")
    quant.add_argument("--method", choices=["max", "entropy", "percentile", "mse"], default="mse")
    quant.add_argument("--engine", choices=("auto",) + engines.NAMES, default="auto", help=ENGINE_HELP)
    quant.add_argument("--trust-pickle", action="store_true", help="an Ultralytics .pt unpickles the whole model "
                       "(runs code from the file): allow it for a file you trust")
    quant.add_argument("--runs-dir", default="runs")
    quant.add_argument("--name", help="run name (default: MODEL_int8)")

    runs = sub.add_parser("runs", help="list the runs in a runs directory (marks runs whose process died as "
                          "interrupted)")
    runs.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR")

    sens = sub.add_parser("sensitivity", help="calibrate as the recipe says, then rank every layer's INT8 sensitivity")
    sens.add_argument("recipe")
    sens.add_argument("overrides", nargs="*",
                      help="recipe fields to override, e.g. stages.sensitivity.proxy_samples=32")
    sens.add_argument("--gpus", type=int, default=1, metavar="N", help="split the sweep over N processes (torchrun)")
    sens.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (the recipe's device)")

    check = sub.add_parser("check-onnx", help="check a Q/DQ ONNX against TensorRT's explicit-quantization rules "
                           "(exit 1 for a violation or a graph with no INT8 layer, 2 for a file that is not a model)")
    check.add_argument("onnx", help="the .onnx file, e.g. runs/<run>/model.onnx")
    check.add_argument("--json", action="store_true", help="print the violations as JSON")

    eng = sub.add_parser("build", help="build an engine from an ONNX (Q/DQ for INT8): TensorRT, or OpenVINO for the "
                                       "CPU")
    eng.add_argument("onnx")
    eng.add_argument("--engine", choices=("auto",) + engines.NAMES, default="auto", help=ENGINE_HELP)
    eng.add_argument("--precision", choices=["int8", "fp16", "fp32"], default="int8")
    eng.add_argument("--batch", type=int, nargs=3, default=[1, 8, 32], metavar=("MIN", "OPT", "MAX"))
    eng.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the graph's fixed "
                                                                           "size)")
    eng.add_argument("--out", help="engine path (default: next to the ONNX: MODEL.engine, or MODEL_openvino.xml; "
                     "OpenVINO adds .xml where it is missing)")
    eng.add_argument("--weak-typing", action="store_true", help="weakly typed network with INT8 and FP16 flags")
    eng.add_argument("--sparse", action="store_true", help="allow 2:4 sparse kernels")
    eng.add_argument("--workspace-mib", type=int, default=4096)
    eng.add_argument("--timing-cache", help="timing cache file (default: ~/.cache/workbench/tensorrt_timing.cache)")
    eng.add_argument("--data", help="images the guard compares the INT8 engine with the faithful graph on: a folder "
                     "of images like the model's inputs, or a detector's data.yaml (default: the calibration and "
                     "evaluation images of the run directory the ONNX is in)")
    eng.add_argument("--no-guard", action="store_true", help="keep the engine without comparing it with the faithful "
                     "graph: its sidecar and every table mark it unverified")
    eng.add_argument("--guard-min-agreement", type=float, default=90.0, metavar="PERCENT",
                     help="refuse an engine whose agreement with the faithful graph is not resolved at or above this")
    eng.add_argument("--guard-max-samples", type=int, default=1024, metavar="N", help="most images the guard uses")
    eng.add_argument("--openvino-graph", choices=["u8", "tensorrt_style"], default="u8",
                     help="OpenVINO: the INT8 layout compiled (as the build stage's openvino_graph)")
    eng.add_argument("--openvino-weights", choices=["auto", "s8", "reduce_range"], default="auto",
                     help="OpenVINO, u8 layout: 8-bit or 7-bit weights (auto: for this CPU; the build stage's "
                     "openvino_weights)")

    ben = sub.add_parser("bench", help="latency and throughput of .onnx/.engine/.xml (OpenVINO) files (or all of "
                                       "those in a run directory)")
    ben.add_argument("paths", nargs="+", metavar="PATH")
    ben.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="B")
    ben.add_argument("--warmup", type=int, default=5)
    ben.add_argument("--repeats", type=int, default=50)
    ben.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ben.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="for graphs with a dynamic "
                                                                                      "image size")
    ben.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ben.add_argument("--plot", metavar="FILE.png", help="also plot images/s per artifact and batch size")

    val = sub.add_parser("validate", help="check a recipe without running it")
    val.add_argument("recipe", nargs="?")
    val.add_argument("overrides", nargs="*")

    schema = sub.add_parser("schema", help="print the recipe JSON schema (for editor completion)")
    schema.add_argument("--out", help="write to this file instead of stdout")

    calib = sub.add_parser("calib-data", help="named calibration sets (calibration_data/*.yaml)")
    calib_sub = calib.add_subparsers(dest="calib_command", metavar="ACTION")
    build = calib_sub.add_parser("build", help="materialise a set into a folder of images plus a checksum manifest")
    build.add_argument("name")
    build.add_argument("--out", required=True)
    calib_sub.add_parser("list", help="list the known sets")

    models = sub.add_parser("models", help="model sources and names")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    ml = models_sub.add_parser("list", help="list model specs")
    ml.add_argument("pattern", nargs="?", default="*")

    sub.add_parser("stages", help="list the stages a recipe can use")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command's exit code: 0 done, 1 a finding (check-onnx), 2 the user's input refused, 130 Ctrl-C, 143
    SIGTERM. SIGTERM (what `timeout`, a scheduler or `kill` sends) ends a run as Ctrl-C does: recorded as
    interrupted, with the stage it was in, and resumable."""
    received: list[int] = []  # the signals that arrived
    previous = _interrupt_on_signals(received)
    try:  # Ctrl-C from the first instant (imports, argument parsing) is an exit, never a traceback
        return _main(argv)
    except KeyboardInterrupt as e:
        return _interrupted(isinstance(e, Terminated))
    except Exception:
        # An interrupt that landed inside an import can leave a half-initialised module that fails a moment later
        # (numpy: "module 'numpy._core' has no attribute ..."): the interrupt's consequence, reported as it.
        if received:
            return _interrupted(signal.SIGTERM in received)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupted(terminated: bool) -> int:
    print("interrupted (SIGTERM)" if terminated else "interrupted", file=sys.stderr)
    return 143 if terminated else 130


def _interrupt_on_signals(received: list[int]) -> dict:
    """Make Ctrl-C raise KeyboardInterrupt and SIGTERM Terminated (a KeyboardInterrupt) in the main thread, noting
    each in `received`; the handlers replaced (none where signals cannot be set: not the main thread)."""

    def interrupt(signum, frame):
        received.append(signum)
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the run's record short
            raise Terminated()
        raise KeyboardInterrupt()

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, interrupt)
        except ValueError:  # not the main thread of the main interpreter
            break
    return previous


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = _parser()
    # `key=value` overrides may come before or after options (`run r.yaml --device cpu a=1 b=2`): argparse ends a
    # positional list at the first option, so the rest come back unrecognised and join the overrides here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args, parser)
    except WorkbenchError as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return e.exit_code


class _PipeSafe(io.TextIOBase):
    """The console's stdout, which a closed pipe (`workbench run r.yaml | head -1`) or a closed descriptor cannot
    fail: the run goes on to the end and its directory is complete; only the output stops."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # EPIPE, or a closed file
                self._drop()
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._drop()

    def isatty(self) -> bool:
        return self.stream is not None and self.stream.isatty()

    def _drop(self) -> None:
        self.stream = None
        try:  # Python flushes sys.stdout at exit: point it at /dev/null so that raises nothing either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        except (OSError, AttributeError, ValueError):
            pass


def _dispatch(args, parser) -> int:
    quiet = False
    if args.command in ("run", "sensitivity"):
        from . import distributed

        if args.gpus < 1:
            raise WorkbenchError(f"--gpus {args.gpus}: give 1 or more")
        if args.command == "run":
            _run_arguments(args)
        if args.device:  # an override like any other, so the processes torchrun starts get it too
            args.overrides = [*args.overrides, f"device={args.device}"]
        if args.gpus > 1 and not distributed.launched():
            return distributed.relaunch_under_torchrun(args.gpus, [args.command, args.recipe, *args.overrides])
        quiet = not distributed.is_main() and distributed.launched()
    # Styled output on a terminal only: a file or a pipe gets plain text even where FORCE_COLOR is set (CI systems
    # set it globally), so logs and captured output hold no escape codes. NO_COLOR turns colour off on a terminal.
    # Off a terminal, tables are laid out 200 columns wide instead of rich's 80: a log keeps whole backend and
    # file names, and what a table shows does not change with the width of whatever captured it.
    # Only the commands that print through it import rich (validate, stages, schema answer at once without it).
    console = _console(quiet) if args.command in ("run", "quantize", "sensitivity", "bench") else None
    if args.command == "run":
        from . import api

        run = api.run(args.recipe, args.overrides, console=console, resume=args.resume)
        console.print(f"report: {run.dir / 'report.md'}")
        return 0
    if args.command == "runs":
        return _runs(args.runs_dir)
    if args.command == "quantize":
        from . import api

        run = api.quantize(args.model, args.data, args.imgsz, args.method, args.engine, args.trust_pickle,
                           args.runs_dir, args.name, console=console)
        console.print(f"report: {run.dir / 'report.md'}\nthe recipe it ran: {run.dir / 'recipe.yaml'} "
                      f"(workbench run {run.dir / 'recipe.yaml'})")
        return 0
    if args.command == "sensitivity":
        from . import api

        run = api.sensitivity(args.recipe, args.overrides, console=console)
        console.print(f"sensitivity table: {run.dir / 'sensitivity.csv'}")
        return 0
    if args.command == "build":
        return _build_engine(args)
    if args.command == "bench":
        return _bench(args, console)
    if args.command == "check-onnx":
        return _check_onnx(args)
    if args.command == "validate":
        from . import api

        if args.recipe is None:
            raise WorkbenchError("workbench validate: give a recipe file, e.g. workbench validate "
                                 "recipes/quickstart.yaml")
        recipe = api.validate(args.recipe, args.overrides)
        stages = " -> ".join(name for name, _ in recipe.stage_list())
        print(f"{args.recipe}: valid ({recipe.name}: {stages})")
        return 0
    if args.command == "schema":
        from .recipe import recipe_json_schema

        text = json.dumps(recipe_json_schema(), indent=2)
        if args.out:
            from .io import write_text

            write_text(args.out, text + "\n")
        else:
            print(text)
        return 0
    if args.command == "calib-data":
        from .data import build_calib_set, list_calib_sets

        if args.calib_command == "build":
            manifest = build_calib_set(args.name, args.out)
            count = json.loads(manifest.read_text())["count"]
            print(f"wrote {count} images and {manifest}")
            return 0
        if args.calib_command == "list":
            print("\n".join(list_calib_sets()))
            return 0
        parser.parse_args(["calib-data", "--help"])
    if args.command == "models":
        from .models import list_models

        if args.models_command != "list":  # a usage error: the action's help, exit 2 as argparse's own errors
            print("usage: workbench models list [PATTERN]   (model specs, e.g. workbench models list 'cifar_resnet:*')",
                  file=sys.stderr)
            return 2
        found = list_models(args.pattern)
        if not found:
            raise WorkbenchError(f"no model spec matches {args.pattern!r}; `workbench models list` shows them all")
        print("\n".join(found))
        return 0
    if args.command == "stages":
        from .stage_summaries import stage_summaries  # the stage modules' source, not their import: instant

        summaries = stage_summaries()
        width = max(map(len, summaries))
        for name, summary in summaries.items():
            print(f"{name:<{width}}  {summary}")
        return 0
    parser.print_help()
    return 2


def _console(quiet: bool):
    from rich.console import Console

    stdout = _PipeSafe(sys.stdout)
    tty = stdout.isatty()
    return Console(file=stdout, quiet=quiet, force_terminal=None if tty else False, width=None if tty else 200)


def _run_arguments(args) -> None:
    """`run`'s recipe is optional with --resume: a first argument that is an override, not a file, is an override."""
    if args.resume is None:
        if args.recipe is None:
            raise WorkbenchError("workbench run: give a recipe file (or --resume RUN_DIR)")
        return
    if args.gpus > 1:
        raise WorkbenchError("--resume continues a run in one process: leave out --gpus")
    if args.recipe is not None and "=" in args.recipe and not os.path.isfile(args.recipe):
        args.overrides, args.recipe = [args.recipe, *args.overrides], None


def _runs(runs_dir: str) -> int:
    from .rundir import list_runs, mark_stale_runs

    for path in mark_stale_runs(Path(runs_dir)):
        print(f"marked {path.name} as interrupted: its process is gone "
              f"(continue it with workbench run --resume {path})")
    rows = list_runs(Path(runs_dir))
    if not rows:
        print(f"no runs in {runs_dir}")
        return 0
    columns = ("run", "status", "stages", "started")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    for row in [dict(zip(columns, columns)), *rows]:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())
    if damaged := [r["damaged"] for r in rows if "damaged" in r]:  # listed, then named: exit 2
        raise WorkbenchError(f"{len(damaged)} run(s) in {runs_dir} have a damaged record:\n  " + "\n  ".join(damaged))
    return 0


def _check_onnx(args) -> int:
    """Exit 0 for a quantized graph TensorRT builds as intended; 1 for rule violations or a graph with no
    INT8 compute at all (it would build in float: a finding like a violation); 2 for a file that is no model."""
    from . import api

    found = api.check_onnx(args.onnx)
    if args.json:
        print(json.dumps([v.as_dict() for v in found.findings], indent=2))
    else:
        for v in found.findings:
            print(v)
        verdict = "not quantized, " if found.not_quantized else ""
        print(f"{args.onnx}: {verdict}{len(found.violations)} violation(s) of TensorRT's Q/DQ rules")
    return 1 if found.findings else 0


def _bench(args, console) -> int:
    from rich.table import Table

    from . import api

    result = api.bench(args.paths, args.batch_sizes, args.warmup, args.repeats, args.threads, args.input_size)
    threads = f"{result['threads']} CPU threads for every file"
    table = Table(title=f"{result['repeats']} timed runs per batch size, {threads}: median ms (p90), images/s")
    table.add_column("artifact", overflow="fold")
    table.add_column("MB", justify="right")
    for b in args.batch_sizes:
        table.add_column(f"b{b} ms", justify="right")
        table.add_column(f"b{b} img/s", justify="right")
    for name, entry in result["backends"].items():
        cells = []
        for b in args.batch_sizes:
            t = entry["latency"][f"b{b}"]
            cells += [f"{t['median_ms']:.2f} ({t['p90_ms']:.2f})", f"{t['images_per_s']:.0f}"]
        table.add_row(name + (" (unverified)" if entry.get("verified") is False else ""), f"{entry['bytes'] / 1e6:.2f}",
                      *cells)
    console.print(table)
    if args.json:
        from .io import write_json

        write_json(args.json, result)
    if args.plot:
        from .plots import plot_throughput

        plot_throughput(args.plot, result["backends"], args.batch_sizes)
    return 0


def _build_engine(args) -> int:
    from . import api

    row = engines.resolve(args.engine)  # once: the build and the line below speak of the same engine
    sidecar = api.build(args.onnx, engine=row.name, batch=tuple(args.batch),
                        size=tuple(args.size) if args.size else None, out=args.out, precision=args.precision,
                        strongly_typed=not args.weak_typing, workspace_mib=args.workspace_mib,
                        timing_cache=args.timing_cache, sparse=args.sparse, data=args.data,
                        guard=not args.no_guard, guard_min_agreement=args.guard_min_agreement,
                        guard_max_samples=args.guard_max_samples, openvino_graph=args.openvino_graph,
                        openvino_weights=args.openvino_weights)
    print(row.describe(sidecar, Path(args.onnx), Path(args.out) if args.out else None))
    if sidecar.get("guard"):
        from .runtime.guard import GuardResult

        fields = {k: v for k, v in sidecar["guard"].items() if k not in ("passed", "resolved", "verdict")}
        print(f"guard: passed: {GuardResult(**fields).describe()}")
    elif "verified" in sidecar:
        print("guard: off (--no-guard): this engine is UNVERIFIED; nothing checked that it computes the graph's "
              "function")
    return 0


if __name__ == "__main__":
    sys.exit(main())
