"""The `workbench` command: parses, calls the Python API, prints. Nothing else lives here.

    workbench run RECIPE [key.path=value ...]
    workbench sensitivity RECIPE [key.path=value ...]
    workbench validate RECIPE [key.path=value ...]
    workbench schema [--out FILE]
    workbench calib-data build NAME --out DIR | list
    workbench models list [PATTERN]
    workbench stages
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import WorkbenchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Recipe-driven INT8 quantization for PyTorch vision models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe: workbench run recipes/quickstart.yaml [key.path=value ...]")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="recipe fields to override, e.g. stages.calibrate.method=mse")
    run.add_argument("--gpus", type=int, default=1, metavar="N",
                     help="N processes under torchrun, one per GPU (gloo CPU processes where there is no GPU)")

    sens = sub.add_parser("sensitivity", help="calibrate as the recipe says, then rank every layer's INT8 sensitivity")
    sens.add_argument("recipe")
    sens.add_argument("overrides", nargs="*", help="recipe fields to override, e.g. stages.sensitivity.proxy_samples=32")
    sens.add_argument("--gpus", type=int, default=1, metavar="N", help="split the sweep over N processes (torchrun)")

    check = sub.add_parser("check-onnx", help="check a Q/DQ ONNX against TensorRT's explicit-quantization rules")
    check.add_argument("onnx", help="the .onnx file, e.g. runs/<run>/model.onnx")
    check.add_argument("--json", action="store_true", help="print the violations as JSON")

    val = sub.add_parser("validate", help="check a recipe without running it")
    val.add_argument("recipe")
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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args, parser)
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args, parser) -> int:
    from rich.console import Console

    from . import distributed

    if getattr(args, "gpus", 1) < 1:
        raise WorkbenchError(f"--gpus {args.gpus}: give 1 or more")
    if getattr(args, "gpus", 1) > 1 and not distributed.launched():
        return distributed.relaunch_under_torchrun(args.gpus, [args.command, args.recipe, *args.overrides])
    console = Console(stderr=False, quiet=not distributed.is_main() and distributed.launched())
    if args.command == "run":
        from . import api

        run = api.run(args.recipe, args.overrides, console=console)
        console.print(f"report: {run.dir / 'report.md'}")
        return 0
    if args.command == "sensitivity":
        from . import api

        run = api.sensitivity(args.recipe, args.overrides, console=console)
        console.print(f"sensitivity table: {run.dir / 'sensitivity.csv'}")
        return 0
    if args.command == "check-onnx":
        from .qdq_check import check_qdq

        violations = check_qdq(args.onnx)
        if args.json:
            print(json.dumps([v.as_dict() for v in violations], indent=2))
        else:
            for v in violations:
                print(v)
            print(f"{args.onnx}: {len(violations)} violation(s) of TensorRT's Q/DQ rules")
        return 1 if violations else 0
    if args.command == "validate":
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
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

        print("\n".join(list_models(args.pattern)))
        return 0
    if args.command == "stages":
        from .stages import STAGES

        for name, spec in STAGES.items():
            print(f"{name:12s} {spec.summary}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
