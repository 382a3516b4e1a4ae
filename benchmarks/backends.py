"""Every backend of one run, timed by the workbench's own bench stage.

    python benchmarks/backends.py resnet20 efficientnet_lite0 yolov5n [--batch-sizes 1 8] [--repeats 30]

Runs calibrate -> export -> bench for each model (the recipes of benchmarks/ort_int8.py) and
prints the bench stage's table: PyTorch FP32 on the CPU, PyTorch FP32 and FP16 on CUDA where
there is a GPU (the baseline an engine must beat), ONNX Runtime FP32, the TensorRT-style INT8
graph in ONNX Runtime, and its ONNX Runtime flavour. Median (p90) ms and images/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ort_int8 import ASSETS, RECIPES  # noqa: E402

from workbench import api  # noqa: E402
from workbench.recipe import parse_recipe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", choices=list(RECIPES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--runs-dir", default="/tmp/workbench_bench_backends")
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"# {os.cpu_count()} CPU threads ({platform.machine()}), {gpu}, torch {torch.__version__}\n")
    for name in args.models:
        bench = f"  - export: {{}}\n  - bench: {{batch_sizes: {args.batch_sizes}, repeats: {args.repeats}}}\n"
        run = api.run(parse_recipe(RECIPES[name] + bench + f'runs_dir: "{args.runs_dir}"\n', f"{name} (benchmark)"))
        result = api.load_run(run.dir)["stages"]["bench"]
        keys = [f"b{b}" for b in args.batch_sizes]
        print(f"## {name} ({result['threads']} CPU threads)\n")
        print("| Backend | Size MB | " + " | ".join(f"{k} ms (p90) | {k} img/s" for k in keys) + " |")
        print("|---|---|" + "---|---|" * len(keys))
        for backend, entry in result["backends"].items():
            cells = [f"{entry['latency'][k]['median_ms']:.2f} ({entry['latency'][k]['p90_ms']:.2f}) | "
                     f"{entry['latency'][k]['images_per_s']:.0f}" for k in keys]
            print(f"| {backend} | {entry['bytes'] / 1e6:.2f} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
