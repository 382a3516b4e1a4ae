"""YOLO users' paths to INT8 give the numbers of the equivalent recipe.

    python benchmarks/yolo_users.py --out /tmp/wb_yolo_users

Converts coco_tiny (../shared/assets, COCO JSON) into an Ultralytics dataset (images/{train,val},
labels/{train,val} as YOLO txt, crowd boxes left out as Ultralytics' converter does, data.yaml with the 80 names),
then runs yolov5n to INT8 three ways and prints their scores side by side:
  1. a recipe with `source: yolo_txt` splits of the converted data (the equivalent recipe; batch size 32, the
     default, as the others: histogram calibration bins by batch, so the batch size moves the ranges slightly),
  2. the same recipe with `data: data.yaml`,
  3. `workbench quantize yolov5n.pt --data data.yaml` (with the same calibration method and no build stage change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import api  # noqa: E402
from workbench.hardware.cpu import cpu_info  # noqa: E402
from workbench.recipe import parse_recipe  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def coco_to_ultralytics(out: Path) -> Path:
    """coco_tiny as an Ultralytics dataset under `out`; returns its data.yaml."""
    coco = ASSETS / "data" / "coco_tiny"
    names = None
    for split in ("train", "val"):
        data = json.loads((coco / "annotations" / f"instances_{split}2017.json").read_text())
        cats = sorted(c["id"] for c in data["categories"])
        index = {c: i for i, c in enumerate(cats)}
        names = [next(c["name"] for c in data["categories"] if c["id"] == cat) for cat in cats]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        rows: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            w, h = sizes[ann["image_id"]]
            x, y, bw, bh = ann["bbox"]
            rows[ann["image_id"]].append(f"{index[ann['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                                         f"{bw / w:.6f} {bh / h:.6f}")
        for img in data["images"]:
            shutil.copy(coco / f"{split}2017" / img["file_name"], out / "images" / split / img["file_name"])
            (out / "labels" / split / f"{Path(img['file_name']).stem}.txt").write_text("\n".join(rows[img["id"]]))
    yaml_file = out / "data.yaml"
    yaml_file.write_text(f"path: {out}\ntrain: images/train\nval: images/val\nnames:\n"
                         + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    return yaml_file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/wb_yolo_users"))
    p.add_argument("--method", default="mse")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    data_yaml = coco_to_ultralytics(args.out / "coco_tiny")
    weights = ASSETS / "models" / "yolov5n.pt"
    runs = args.out / "runs"
    stages = (f"  - calibrate: {{method: {args.method}}}\n  - export: {{}}\n  - build: {{engine: openvino}}\n"
              "  - evaluate: {latency: false}\n")
    root = args.out / "coco_tiny"
    txt = (f'name: yolo_txt\ntask: detection\nmodel: {{spec: "yolov5:{weights}", input_size: [3, 640, 640]}}\n'
           f'data:\n  transform: {{letterbox: [640, 640]}}\n'
           f'  calibration: {{source: yolo_txt, path: "{root}/images/train", label_dir: "{root}/labels/train"}}\n'
           f'  evaluation: {{source: yolo_txt, path: "{root}/images/val", label_dir: "{root}/labels/val"}}\n'
           f'  batch_size: 32\nruns_dir: "{runs}"\nstages:\n{stages}')
    shorthand = (f'name: data_yaml\nmodel: {{spec: "yolov5:{weights}"}}\ndata: "{data_yaml}"\nruns_dir: "{runs}"\n'
                 f'stages:\n{stages}')
    results = {
        "recipe, yolo_txt splits": api.run(parse_recipe(txt, "yolo_txt")),
        "recipe, data: data.yaml": api.run(parse_recipe(shorthand, "data.yaml")),
    }
    quantize = parse_recipe(api.quantize_recipe(weights, data_yaml, 640, args.method, "openvino", runs_dir=runs),
                            "quantize", ["stages.evaluate.latency=false"])
    results["workbench quantize"] = api.run(quantize)
    print(f"# yolov5n on coco_tiny val (80 images) through three paths; CPU {cpu_info().describe()}\n")
    backends = ("pytorch_fp32", "pytorch_int8", "ort_int8_faithful", "openvino_int8")
    print("| Path | " + " | ".join(f"{b} mAP50-95" for b in backends) + " | classes scored |")
    print("|---" * (len(backends) + 2) + "|")
    for label, run in results.items():
        evaluation = run.metrics["stages"]["evaluate"]["backends"]
        cells = [f"{evaluation[b]['metrics']['map50_95']:.4f}" if b in evaluation else "-" for b in backends]
        classes = len(evaluation["pytorch_fp32"]["metrics"]["per_class"])
        print(f"| {label} | " + " | ".join(cells) + f" | {classes} |")


if __name__ == "__main__":
    main()
