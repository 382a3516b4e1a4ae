"""PTQ against QAT, through the recipe runner.

    python benchmarks/qat.py yolov5n [--device cuda] [--epochs 10] [--set stages.qat.lr=5e-5]
    python benchmarks/qat.py resnet20 [--device cuda] [--epochs 5]
    python benchmarks/qat.py resnet20 --device cpu --epochs 1     # CPU seconds per epoch
    python benchmarks/qat.py efficientnet_lite0                   # per-tensor weights: PTQ loses, QAT recovers

Runs calibrate -> qat -> export -> evaluate (recipes/<model>_qat.yaml) and prints the metric of
FP32, PTQ and QAT, for the fake-quant model and for its ONNX in ONNX Runtime (faithful), with
the seconds per QAT epoch and the metric after every epoch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import api  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", ROOT.parent / "shared" / "assets"))
RECIPES = {"yolov5n": "recipes/yolov5n_qat.yaml", "resnet20": "recipes/resnet20_qat.yaml",
           "efficientnet_lite0": "recipes/efficientnet_lite0_qat.yaml"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=list(RECIPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides, e.g. stages.qat.lr=1e-5")
    p.add_argument("--runs", default=None, help="keep the run directory here (default: a temp dir)")
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    os.environ.setdefault("WORKBENCH_ASSETS", str(ASSETS))
    overrides = [f"device={args.device}", f"runs_dir={args.runs or tempfile.mkdtemp()}",
                 "stages.evaluate.latency=false"]
    overrides += [f"stages.qat.epochs={args.epochs}"] if args.epochs else []
    run = api.run(ROOT / RECIPES[args.model], overrides + list(args.set))
    stages = run.metrics["stages"]
    ev, qat = stages["evaluate"]["backends"], stages["qat"]
    key = "map50_95" if "map50_95" in ev["pytorch_fp32"]["metrics"] else "top1"
    scale = 100 if key == "map50_95" else 1
    value = {b: scale * e["metrics"][key] for b, e in ev.items()}
    per_epoch = qat["seconds_per_epoch"]
    print(f"\n# {args.model}: PTQ vs QAT on {run.metrics['device']} ({run.dir})\n")
    print(f"{run.metrics['stages']['evaluate']['samples']} evaluation images; differences are paired bootstrap "
          "intervals (95%) over them, in points\n")
    print(f"| {key} | FP32 | PTQ | PTQ - FP32 | QAT | QAT - FP32 | QAT - PTQ |\n|---|---|---|---|---|---|---|")
    for title, ptq, qat_backend in (("fake-quant (PyTorch)", "pytorch_int8_ptq", "pytorch_int8"),
                                    ("ONNX Runtime (faithful)", "ort_int8_ptq", "ort_int8_faithful")):
        print(f"| {title} | {value['pytorch_fp32']:.2f} | {value[ptq]:.2f} | {_interval(ev[ptq], 'delta_vs_fp32')} | "
              f"{value[qat_backend]:.2f} | {_interval(ev[qat_backend], 'delta_vs_fp32')} | "
              f"{_interval(ev[qat_backend], 'delta_vs_ptq')} |")
    census = stages["calibrate"]["census"]
    print(f"\n- INT8 layers: {census}")
    print(f"- QAT: {qat['epochs']} epochs, {sum(per_epoch) / len(per_epoch):.1f} s per epoch "
          f"(first {per_epoch[0]:.1f} s)")
    curve = ", ".join(f"{h['eval']['value']:.2f}" for h in qat["history"] if "eval" in h)
    if qat.get("eval_before"):
        print(f"- {qat['eval_before']['metric']} on the evaluation subset: PTQ {qat['eval_before']['value']:.2f}, "
              f"per epoch: {curve}")


def _interval(entry: dict, key: str) -> str:
    d = entry.get(key)
    return f"{d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" if d else "n/a"


if __name__ == "__main__":
    main()
