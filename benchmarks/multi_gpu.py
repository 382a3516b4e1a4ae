"""The same recipe on 1 and on N GPUs (torchrun + DDP): QAT epoch time, final mAP, sensitivity sweep time,
and whether the gathered sensitivity table equals the single-GPU one.

    python benchmarks/multi_gpu.py --gpus 2 [--epochs 5] [--task-samples 16]

Runs recipes/yolov5n_qat.yaml with calibrate -> sensitivity -> qat -> export -> evaluate, once with
`workbench run` and once with `workbench run --gpus N`, the same global batch (data.batch_size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(gpus: int, runs: Path, args) -> Path:
    stages = (f"stages=[{{calibrate: {{method: mse}}}}, {{sensitivity: {{task_samples: {args.task_samples}}}}}, "
              f"{{qat: {{epochs: {args.epochs}, lr: 0.00001, eval_samples: null}}}}, {{export: {{}}}}, "
              "{evaluate: {latency: false, backends: [pytorch_fp32, pytorch_int8, ort_int8_faithful]}}]")
    cmd = [sys.executable, "-m", "workbench", "run", *(["--gpus", str(gpus)] if gpus > 1 else []),
           str(ROOT / "recipes/yolov5n_qat.yaml"), stages, f"runs_dir={runs}", f"data.batch_size={args.batch_size}",
           f"data.workers={args.workers}"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    (run_dir,) = [d for d in runs.iterdir() if d.is_dir()]
    return run_dir


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--task-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--runs", default=None)
    args = p.parse_args()
    base = Path(args.runs or tempfile.mkdtemp())
    dirs = {n: run(n, base / f"gpus{n}", args) for n in (1, args.gpus)}
    print(f"\n# yolov5n on 1 and {args.gpus} GPUs (global batch {args.batch_size})\n")
    print("| GPUs | QAT s/epoch (mean; first) | mAP50-95 QAT fake-quant | ORT faithful "
          "| sweep proxies s | sweep task metric s |")
    print("|---|---|---|---|---|---|")
    tables = {}
    for n, d in dirs.items():
        m = json.loads((d / "metrics.json").read_text())["stages"]
        per_epoch = m["qat"]["seconds_per_epoch"]
        ev = m["evaluate"]["backends"]
        sens = m["sensitivity"]
        print(f"| {n} | {sum(per_epoch[1:]) / max(1, len(per_epoch) - 1):.2f}; {per_epoch[0]:.2f} | "
              f"{100 * ev['pytorch_int8']['metrics']['map50_95']:.2f} | "
              f"{100 * ev['ort_int8_faithful']['metrics']['map50_95']:.2f} | "
              f"{sens['proxy_seconds']:.1f} | {sens.get('task_seconds', 0):.1f} |")
        tables[n] = {r["layer"]: r for r in json.loads((d / "sensitivity.json").read_text())["layers"]}
    one, many = tables[1], tables[args.gpus]
    keys = ("only_sqnr_db", "loo_sqnr_db", "only_metric", "loo_metric")
    worst = max(abs(one[u][k] - many[u][k]) for u in one for k in keys if k in one[u])
    same_order = list(one) == list(many)
    print(f"\n- sensitivity table: {len(one)} layers; same ranking: {same_order}; largest difference of any SQNR/"
          f"metric entry: {worst:.3g}")


if __name__ == "__main__":
    main()
