"""`yolo val` (Ultralytics' own validator) on the workbench's model.onnx against the workbench's own mAP.

    python benchmarks/yolo_val.py --out /tmp/wb_yolo_val

coco_tiny as an Ultralytics dataset (benchmarks/yolo_users.py), then for yolov5n (the shared asset) and an
untrained YOLOv8n (yolov8n.yaml: no trained Ultralytics weights can be fetched here, so it shows the plumbing only):
`workbench quantize MODEL --data data.yaml` cut to calibrate, export and evaluate (ONNX Runtime rows of model.onnx,
no engine), then `yolo val model=model.onnx data=data.yaml` as a user types it, and with `rect=False` (the square
letterbox the workbench scores with). Prints each command's exit code and mAP50-95, or the last line of its error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from yolo_users import ASSETS, coco_to_ultralytics  # noqa: E402

from workbench import api  # noqa: E402
from workbench.hardware.cpu import cpu_info  # noqa: E402
from workbench.recipe import parse_recipe  # noqa: E402


def workbench_run(model: str, data_yaml: Path, runs: Path, method: str):
    recipe = yaml.safe_load(api.quantize_recipe(model, data_yaml, 640, method, runs_dir=runs))
    recipe["stages"] = recipe["stages"][:2] + [
        {"evaluate": {"latency": False, "backends": ["ort_int8_faithful", "ort_int8_default"]}}]
    return api.run(parse_recipe(yaml.safe_dump(recipe), f"workbench quantize {model}"))


def yolo_val(graph: Path, data_yaml: Path, out: Path, *args: str) -> tuple[int, str]:
    """`yolo val` as a separate process: its exit code and its mAP50-95 (or the last line it printed)."""
    yolo = Path(sys.executable).with_name("yolo")
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(out / "ultralytics"), "YOLO_AUTOINSTALL": "False",
           "YOLO_VERBOSE": "True"}  # its table of results (this process's Ultralytics import set it False)
    done = subprocess.run([str(yolo), "val", f"model={graph}", f"data={data_yaml}", *args, f"project={out / 'yolo'}",
                           "plots=False"], capture_output=True, text=True, env=env)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", done.stdout + done.stderr)
    row = re.search(r"^\s+all\s+\d+\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", text, re.M)
    if done.returncode == 0 and row:
        return 0, f"mAP50-95 {float(row.group(4)):.4f}"
    lines = text.strip().splitlines()
    return done.returncode, lines[-1][:200] if lines else "(no output)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/wb_yolo_val"))
    p.add_argument("--method", default="mse")
    p.add_argument("--models", nargs="+", default=[str(ASSETS / "models" / "yolov5n.pt"), "yolov8n.yaml"])
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    data_yaml = coco_to_ultralytics(args.out / "coco_tiny")
    print(f"# coco_tiny val (80 images), 640 px; CPU {cpu_info().describe()}\n")
    print("| model | workbench mAP50-95 of model.onnx (ORT faithful / default) | `yolo val` | `yolo val rect=False` |")
    print("|---|---|---|---|")
    for model in args.models:
        run = workbench_run(model, data_yaml, args.out / "runs", args.method)
        rows = run.metrics["stages"]["evaluate"]["backends"]
        ours = " / ".join(f"{rows[b]['metrics']['map50_95']:.4f}" for b in ("ort_int8_faithful", "ort_int8_default"))
        graph = run.dir / "model.onnx"
        plain = yolo_val(graph, data_yaml, args.out)
        square = yolo_val(graph, data_yaml, args.out, "rect=False")
        print(f"| {Path(model).name} | {ours} | exit {plain[0]}: {plain[1]} | exit {square[0]}: {square[1]} |")


if __name__ == "__main__":
    main()
