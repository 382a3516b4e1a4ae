"""Pruning, fine-tuning and INT8 on the shared models, through the recipe runner.

    python benchmarks/prune.py resnet20 --ratios 0.3 0.5 [--epochs 30] [--device cuda] [--control]
    python benchmarks/prune.py resnet20 --method magnitude --sparsity 0.5
    python benchmarks/prune.py resnet20 --method sparsity_2to4
    python benchmarks/prune.py yolov5n --ratios 0.2 --epochs 20 [--device cuda]
    python benchmarks/prune.py --time RUN_DIR [RUN_DIR ...]     # re-time a run's ONNX files on this CPU
    python benchmarks/prune.py resnet20 --control-only --epochs 100 --device cuda   # the control alone (in parallel)
    python benchmarks/prune.py --time RUN_DIR CONTROL_DIR --pair-with CONTROL_DIR   # ... and pair the two

Each configuration runs prune -> finetune (distillation from the unpruned model, plus
cross-entropy for ResNet-20) -> calibrate (mse) -> export -> evaluate and prints one row:
MACs and parameters, the metric of the original FP32 model, of the pruned model right after
pruning and after fine-tuning (PyTorch and ONNX Runtime), of the INT8 ONNX (faithful), and
ONNX Runtime CPU latency of the original FP32, pruned FP32 and pruned INT8 graphs.
--control fine-tunes the unpruned model with the same schedule: fine-tuning on a different
image set (JPEG CIFAR train images here) moves accuracy by itself, and that is the honest
baseline for "lossless". --time re-measures latency on this machine for runs made elsewhere
(a GPU machine's host CPU is not the deployment CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import api  # noqa: E402
from workbench.hardware.cpu import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", ROOT.parent / "shared" / "assets"))
RECIPES = {"resnet20": "recipes/resnet20_prune_int8.yaml", "yolov5n": "recipes/yolov5n_prune_int8.yaml"}
ONNX = {"FP32": "model_fp32.onnx", "pruned FP32": "model_pruned_fp32.onnx", "pruned INT8": "model.onnx"}


def overrides(args, ratio: float | None) -> list[str]:
    out = [f"device={args.device}", f"runs_dir={args.runs}", f"stages.finetune.epochs={args.epochs}",
           "stages.prune.latency=false"]
    if args.method == "structured":
        out += [f"stages.prune.ratio={ratio}"]
    else:
        out += [f"stages.prune.method={args.method}", f"stages.prune.sparsity={args.sparsity}",
                "stages.prune.ratio=null"]
    return out + list(args.set)


def time_onnx(run_dir: Path, batch_sizes: list[int], input_size: tuple[int, ...]) -> dict[str, dict]:
    from workbench.runtime.latency import measure_latency
    from workbench.runtime.runners import OrtRunner

    out = {}
    for label, name in ONNX.items():
        if (run_dir / name).is_file():
            runner = OrtRunner(run_dir / name, label, "default")
            out[label] = {k: v["median_ms"]
                          for k, v in measure_latency(runner, input_size, batch_sizes, repeats=50).items()}
    return out


def onnx_input_size(path: Path) -> tuple[int, ...]:
    """(C, H, W) of the graph's input (its batch dimension is dynamic)."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value for d in dims[1:])


def row(run_dir: Path, batch_sizes: list[int]) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics["stages"]
    input_size = onnx_input_size(run_dir / "model_fp32.onnx")
    ev = stages["evaluate"]["backends"]
    key = "map50_95" if "map50_95" in ev["pytorch_fp32"]["metrics"] else "top1"
    scale = 100 if key == "map50_95" else 1

    def metric(backend):
        return f"{scale * ev[backend]['metrics'][key]:.2f}" if backend in ev else "n/a"

    prune, ft = stages.get("prune", {}), stages.get("finetune", {})
    what = (f"{prune['method']} {prune.get('ratio') or prune.get('sparsity')}" if prune else "none (control)")
    macs = f"{prune['macs_after'] / 1e6:.1f} / {prune['macs_before'] / 1e6:.1f}" if "macs_after" in prune else "dense"
    params = f"{prune['params_after'] / 1e3:.0f}k" if "params_after" in prune else "dense"
    before = f"{ft['eval_before']['value']:.2f}" if ft.get("eval_before") else "n/a"
    lat = time_onnx(run_dir, batch_sizes, input_size)
    cells = []
    for b in batch_sizes:
        k = f"b{b}"
        base = lat.get("FP32", {}).get(k)
        pruned = lat.get("pruned FP32", {}).get(k)
        int8 = lat.get("pruned INT8", {}).get(k)
        cells.append(f"{base:.2f} / {pruned:.2f} / {int8:.2f} ({base / pruned:.2f}x, {base / int8:.2f}x)"
                     if base and pruned and int8 else "n/a")
    after = metric("pytorch_fp32_pruned") if "pytorch_fp32_pruned" in ev else "n/a"
    return (f"| {what} | {macs} | {params} | {metric('pytorch_fp32')} | {before} | {after} | "
            f"{metric('ort_fp32_pruned')} | {metric('ort_int8_faithful')} | {ft.get('epochs', 0)} | "
            + " | ".join(cells) + " |")


def header(batch_sizes: list[int], metric: str) -> str:
    lat = " | ".join(f"ORT ms b{b}: FP32 / pruned / pruned INT8 (speed-ups)" for b in batch_sizes)
    return (f"| Pruning | MMACs after / before | Params | FP32 {metric} | pruned, before FT | pruned FP32 after FT | "
            f"same, ORT | INT8 ORT faithful | FT epochs | {lat} |\n|" + "---|" * (9 + len(batch_sizes)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", choices=list(RECIPES))
    p.add_argument("--method", default="structured", choices=["structured", "magnitude", "sparsity_2to4"])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.5])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--control", action="store_true", help="also fine-tune the unpruned model with the same schedule")
    p.add_argument("--control-only", action="store_true",
                   help="fine-tune only the unpruned model (the control), e.g. in a process beside the pruned run's")
    p.add_argument("--pair-with", metavar="CONTROL_DIR", help="with --time: pair every run with this control run")
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. stages.finetune.lr=0.02")
    p.add_argument("--runs", default=None, help="keep the run directories here (default: a temp dir)")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=None)
    p.add_argument("--time", nargs="*", metavar="RUN_DIR", help="only re-time (and tabulate) finished runs on this CPU")
    args = p.parse_args()
    batch_sizes = args.batch_sizes or ([1, 8] if args.model == "yolov5n" else [1, 8, 32])
    if args.time:
        first = json.loads(
            (Path(args.time[0]) / "metrics.json").read_text()
        )["stages"]["evaluate"]["backends"]["pytorch_fp32"]
        print(header(batch_sizes, "mAP50-95" if "map50_95" in first["metrics"] else "top-1"))
        for d in args.time:
            print(row(Path(d), batch_sizes))
        if args.pair_with:
            control = Path(args.pair_with)
            for d in (Path(d) for d in args.time if Path(d).resolve() != control.resolve()):
                print(f"\n- {d.name} against the control ({control.name}), same images: " + paired(d, control))
        return
    if args.model is None:
        p.error("give a model (or --time RUN_DIR ...)")
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    os.environ.setdefault("WORKBENCH_ASSETS", str(ASSETS))
    args.runs = args.runs or tempfile.mkdtemp()
    dirs = []
    configs = args.ratios if args.method == "structured" else [None]
    for ratio in configs if not args.control_only else ():
        dirs.append(api.run(ROOT / RECIPES[args.model], overrides(args, ratio)).dir)
    if args.control or args.control_only:
        import yaml

        from workbench.recipe import load_recipe, parse_recipe

        recipe = load_recipe(ROOT / RECIPES[args.model], overrides(args, configs[0]))
        data = recipe.model_dump(mode="json")
        data["stages"] = [s for s in data["stages"] if "prune" not in s]
        data["name"] = f"{recipe.name}-control"
        dirs.append(api.run(parse_recipe(yaml.safe_dump(data, sort_keys=False), "control")).dir)
    print(f"\n# {args.model}: pruning, fine-tuning, INT8 (runs in {args.runs}; latency on this machine's CPU: "
          f"{cpu_info().describe()})\n")
    print(header(batch_sizes, "mAP50-95" if args.model == "yolov5n" else "top-1"))
    for d in dirs:
        print(row(d, batch_sizes))
    for d in dirs[:-1] if args.control or args.control_only else ():
        print(f"\n- {d.name} against the control ({dirs[-1].name}), same images: " + paired(d, dirs[-1]))


def paired(run_dir: Path, control_dir: Path, backend: str = "ort_int8_faithful") -> str:
    """The INT8 top-1 of a pruned run minus the control's, image by image (per_image.npz), with its 95% paired
    bootstrap interval."""
    import numpy as np

    from workbench.stats import paired_mean

    if not all((d / "per_image.npz").is_file() for d in (run_dir, control_dir)):
        return "no per-image record to pair (per_image.npz: runs made before it was written)"
    a, b = (np.load(d / "per_image.npz") for d in (run_dir, control_dir))
    key = f"{backend}.correct"
    if key not in a or key not in b or len(a[key]) != len(b[key]):
        return "no per-image record to pair (per_image.npz)"
    d = paired_mean(a[key].astype(float) - b[key].astype(float))
    return (f"{backend} top-1 {100 * a[key].mean():.2f} vs {100 * b[key].mean():.2f}: {d.delta:+.2f} "
            f"[{d.low:+.2f}, {d.high:+.2f}] points ({len(a[key])} images)")


if __name__ == "__main__":
    main()
