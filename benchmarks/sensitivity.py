"""Per-layer sensitivity and mixed precision under a budget, through the recipe runner.

    python benchmarks/sensitivity.py yolov5n [--device cpu|cuda] [--max-drop 0.2] [--proxy-samples 16]
    python benchmarks/sensitivity.py resnet20 [--weights per_tensor] [--task-samples 10000] [--max-drop 0.1]
    python benchmarks/sensitivity.py resnet44 --modes one_at_a_time --task-samples 10000
    python benchmarks/sensitivity.py efficientnet_lite0 [--min-agreement 99] [--weights per_tensor]

Runs calibrate (mse unless --method) -> sensitivity (both modes, proxies and task metric) ->
mixed_precision -> export -> evaluate, and prints: the time of the proxy sweep and
of the task-metric sweep, the plan (layers kept float, share of convolution MACs
in INT8), the final metric for fake-quant and for the ONNX in ONNX Runtime, how
many layers' task-metric deltas the evaluation images resolve (their paired
interval excludes 0), and how well the SQNR proxy ranks those layers against the
task metric (Spearman over the resolved layers: ranking noise against noise says
nothing); then every proxy against every layer, resolved or not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import api  # noqa: E402
from workbench.quant.sensitivity import task_sensitivity  # noqa: E402
from workbench.recipe import dump_recipe, load_recipe, parse_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", ROOT.parent / "shared" / "assets"))
RECIPES = {"yolov5n": "recipes/yolov5n_coco_int8.yaml", "resnet20": "recipes/resnet20_cifar10_int8.yaml",
           "resnet32": "recipes/resnet20_cifar10_int8.yaml", "resnet44": "recipes/resnet20_cifar10_int8.yaml"}
EFFICIENTNET = {
    "name": "efficientnet_lite0_imagenet_samples",
    "model": {"spec": "efficientnet_lite:efficientnet-lite0", "input_size": [3, 224, 224]},
    "data": {
        "transform": {"resize": 256, "crop": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "calibration": {"calib_set": "skimage_photos"},
        "evaluation": {"source": "files", "path": str(ASSETS / "data/imagenet_samples"), "labels": "wnid_prefix"},
        "batch_size": 50,
    },
}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the ranks, ties given their average rank (as scipy)."""

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(1, len(x) + 1)
        for v in np.unique(x):  # average the ranks of ties
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def build_recipe(args, runs: Path):
    os.environ.setdefault("WORKBENCH_ASSETS", str(ASSETS))
    if args.model == "efficientnet_lite0":
        base = dict(EFFICIENTNET)
    else:
        base = yaml.safe_load(dump_recipe(load_recipe(ROOT / RECIPES[args.model])))
        if args.model.startswith("resnet"):  # the same CIFAR-10 recipe, another depth
            base["model"]["spec"] = f"cifar_resnet:{args.model}"
            base["model"]["weights"] = str(ASSETS / f"models/cifar10_{args.model}.th")
            base["name"] = f"{args.model}_cifar10_sensitivity"
    budget = {"min_agreement": args.min_agreement} if args.min_agreement else {"max_drop": args.max_drop}
    sens = {"proxy_samples": args.proxy_samples} if args.proxy_samples else {}
    if args.task_samples:
        sens["task_samples"] = args.task_samples
    if args.no_task_metric:
        sens["task_metric"] = False
    if args.modes:
        sens["modes"] = args.modes
    base["stages"] = [
        {"calibrate": {"method": args.method, "weights": args.weights}},
        {"sensitivity": sens},
        {"mixed_precision": budget},
        {"export": {}},
        {"evaluate": {"backends": ["pytorch_fp32", "pytorch_int8", "ort_int8_faithful"], "latency": False}},
    ]
    base["device"] = args.device
    base["runs_dir"] = str(runs)
    return parse_recipe(yaml.safe_dump(base, sort_keys=False), f"benchmark {args.model}", args.set)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=["yolov5n", "resnet20", "resnet32", "resnet44", "efficientnet_lite0"])
    p.add_argument("--modes", nargs="*", choices=["one_at_a_time", "leave_one_out"], help="default: both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-drop", type=float, default=0.2)
    p.add_argument("--min-agreement", type=float)
    p.add_argument("--proxy-samples", type=int, help="default: the stage's (16 classifiers, 8 detectors)")
    p.add_argument("--task-samples", type=int)
    p.add_argument("--no-task-metric", action="store_true",
                   help="proxy sweep only (the ranking then comes from the proxies)")
    p.add_argument("--method", default="mse", choices=["max", "entropy", "percentile", "mse"])
    p.add_argument("--weights", default="per_channel", choices=["per_channel", "per_tensor"])
    p.add_argument("--set", nargs="*", default=[], help="recipe overrides, e.g. data.evaluation.path=DIR")
    p.add_argument("--runs", default=None, help="keep the run directory here (default: a temp dir)")
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    runs = Path(args.runs or tempfile.mkdtemp())
    run = api.run(build_recipe(args, runs))
    stages = run.metrics["stages"]
    sens, mp, ev = stages["sensitivity"], stages["mixed_precision"], stages["evaluate"]["backends"]
    table = json.loads((run.dir / "sensitivity.json").read_text())["layers"]
    print(f"# {args.model}: sensitivity and mixed precision on {run.metrics['device']} ({run.dir})\n")
    modes = " and ".join(args.modes) if args.modes else "both modes"
    print(f"- layers swept: {sens['units']}; proxy sweep ({sens['proxy_samples']} samples, {modes}): "
          f"{sens['proxy_seconds']:.1f} s; "
          f"task-metric sweep ({sens['task_samples']} samples, {modes}): {sens['task_seconds']:.1f} s; "
          f"mixed-precision search and verification: {run.metrics['timings_s']['mixed_precision']:.1f} s")
    budget = ", ".join(f"{k} {v}" for k, v in mp["budget"].items())
    print(f"- budget {budget} ({mp['metric']}): FP32 {mp['fp32']:.2f}, all INT8 {mp['int8_all']:.2f}, "
          f"plan {mp['final']:.2f} on {mp['evaluation_samples']} samples")
    print(f"- kept float: {len(mp['float_layers'])} {mp['float_layers']}; "
          f"INT8 share of MACs {100 * mp['int8_mac_share']:.1f}%")
    key = "map50_95" if "map50_95" in ev["pytorch_int8"]["metrics"] else "top1"
    scale = 100 if key == "map50_95" else 1
    print(f"- full evaluation ({key}): FP32 {scale * ev['pytorch_fp32']['metrics'][key]:.2f}, fake-quant "
          f"{scale * ev['pytorch_int8']['metrics'][key]:.2f}, ONNX Runtime faithful "
          f"{scale * ev['ort_int8_faithful']['metrics'][key]:.2f}")
    corr = sens.get("proxy_task_spearman") or {}
    print(f"- task-metric deltas resolved (95% paired interval excludes 0): {sens['resolved_layers']} of "
          f"{sens['units']} layers; Spearman of the one-at-a-time SQNR with the task delta over the "
          f"{corr.get('layers', 0)} layers resolved one at a time: "
          + (f"{corr['rho']:.2f}" if corr.get("rho") is not None else "n/a (fewer than 3)"))
    task = [task_sensitivity(r) for r in table]
    if all(t is not None for t in task):
        print("\nOver every layer, resolved or not:")
        print("\n| Proxy | Spearman rank correlation with the task-metric sensitivity |\n|---|---|")
        for name, key, sign in (
            ("SQNR, only this layer INT8 (lower = more sensitive)", "only_sqnr_db", -1),
            ("KL, only this layer INT8", "only_kl", 1),
            ("cosine, only this layer INT8", "only_cosine", -1),
            ("SQNR gain, this layer float (leave-one-out)", "loo_sqnr_db", 1),
        ):
            if not all(key in r for r in table):
                continue  # a mode not swept
            values = [sign * r[key] for r in table]
            rho = spearman(values, task)
            print(f"| {name} | {rho:.2f} |" if not math.isnan(rho) else f"| {name} | n/a (constant) |")
    print("\n| Rank | Layer | Type | MMACs | only delta [95% CI] | loo delta [95% CI] | only SQNR dB | proxy rank | "
          "ranked by |\n|---|---|---|---|---|---|---|---|---|")
    for r in table[:10]:
        print(f"| {r['rank']} | {r['layer']} | {r['type']} | {r['macs'] / 1e6:.1f} | {_delta(r, 'only')} | "
              f"{_delta(r, 'loo')} | {r['only_sqnr_db']:.1f} | {r['proxy_rank']} | {r.get('ranked_by', '-')} |")


def _delta(row: dict, mode: str) -> str:
    if f"{mode}_delta" not in row:
        return "n/a"
    if f"{mode}_delta_low" not in row:
        return f"{row[f'{mode}_delta']:+.2f}"
    return (f"{row[f'{mode}_delta']:+.2f} [{row[f'{mode}_delta_low']:+.2f}, {row[f'{mode}_delta_high']:+.2f}]"
            + ("" if row.get(f"{mode}_resolved") else " (noise)"))


if __name__ == "__main__":
    main()
