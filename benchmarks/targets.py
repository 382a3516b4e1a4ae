"""Target profiles (issue 25): each profile's arithmetic, calibrated and measured through the recipe runner.

    python benchmarks/targets.py resnet20 [--samples 2000]
    python benchmarks/targets.py efficientnet_lite0          # per-tensor weights, 516 held-out images

For every profile (tensorrt, openvino for this CPU, openvino for an AVX2 CPU (7-bit weights), fixed_point) one run
of calibrate (mse) -> export -> build (OpenVINO) -> evaluate, and one run of today's path for an AVX2 CPU (the
tensorrt graph converted with 7-bit weights at build time). Prints top-1 of FP32, the fake-quant model (PyTorch),
its ONNX in ONNX Runtime with optimisations off (faithful) and the OpenVINO engine, each with its paired bootstrap
interval against FP32 on the same images, and each profile's OpenVINO engine paired against the tensorrt profile's
(per_image.npz of both runs).

ResNet-20: lossless CIFAR-10, calibrated on 512 training images, scored on `--samples` test images (a seeded draw).
EfficientNet-Lite0: calibrated on the skimage_photos set (128 crops), scored on the 516 imagenet_samples with an odd
last WordNet digit (the held-out split of benchmarks/qat.py, issue 18), weights per tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import api  # noqa: E402
from workbench.stats import paired_mean  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", ROOT.parent / "shared" / "assets"))

MODELS = {
    "resnet20": """name: targets_resnet20
model:
  spec: cifar_resnet:resnet20
  weights: ${{WORKBENCH_ASSETS}}/models/cifar10_resnet20.th
  input_size: [3, 32, 32]
data:
  transform: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
  calibration: {{source: imagefolder, path: "${{WORKBENCH_ASSETS}}/data/cifar10/train", count: 512, seed: 0}}
  evaluation: {{source: imagefolder, path: "${{WORKBENCH_ASSETS}}/data/cifar10/test", count: {samples}, seed: 0}}
  batch_size: 250
""",
    "efficientnet_lite0": """name: targets_efficientnet_lite0
model:
  spec: efficientnet_lite:efficientnet-lite0
  input_size: [3, 224, 224]
data:
  transform: {{resize: 256, crop: 224, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
  calibration: {{calib_set: skimage_photos}}
  evaluation:
    source: files
    path: ${{WORKBENCH_ASSETS}}/data/imagenet_samples
    pattern: "n*[13579]_*.JPEG"
    labels: wnid_prefix
  batch_size: 32
""",
}
WEIGHTS = {"resnet20": "per_channel", "efficientnet_lite0": "per_tensor"}
STAGES = """{target}stages:
  - calibrate: {{method: mse, weights: {weights}}}
  - export: {{fp32: false}}
  - build: {{engine: openvino{build}}}
  - evaluate: {{backends: [pytorch_fp32, pytorch_int8, ort_int8_faithful, openvino_int8], latency: false}}
"""
PROFILES = {  # name -> (target line, extra build options)
    "tensorrt": ("target: tensorrt\n", ""),
    "tensorrt, converted for AVX2 (today)": ("target: tensorrt\n", ", openvino_weights: reduce_range"),
    "openvino (this CPU)": ("target: {name: openvino, cpu: auto}\n", ""),
    "openvino for AVX2": ("target: {name: openvino, cpu: avx2}\n", ""),
    "fixed_point": ("target: fixed_point\n", ""),
}
COLUMNS = (("FP32", "pytorch_fp32"), ("fake-quant", "pytorch_int8"), ("faithful ONNX", "ort_int8_faithful"),
           ("OpenVINO", "openvino_int8"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("--samples", type=int, default=2000, help="resnet20: CIFAR-10 test images scored")
    p.add_argument("--profiles", nargs="*", default=list(PROFILES), choices=list(PROFILES))
    p.add_argument("--runs", default=None, help="keep the run directories here (default: a temp dir)")
    p.add_argument("--table", nargs="*", metavar="PROFILE=RUN_DIR", help="only print the table of finished runs")
    args = p.parse_args()
    if args.table:
        _print(args.model, {item.split("=", 1)[0]: _finished(Path(item.split("=", 1)[1])) for item in args.table})
        return
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    os.environ.setdefault("WORKBENCH_ASSETS", str(ASSETS))
    runs_dir = Path(args.runs or tempfile.mkdtemp())
    results = {}
    for profile in args.profiles:
        target, build = PROFILES[profile]
        text = MODELS[args.model].format(samples=args.samples) + f'runs_dir: "{runs_dir}"\n' + STAGES.format(
            target=target, weights=WEIGHTS[args.model], build=build)
        path = runs_dir / f"{args.model}_{len(results)}.yaml"
        path.write_text(text)
        run = api.run(path, [])
        results[profile] = run
        print(f"done: {profile} ({run.dir})", flush=True)
    _print(args.model, results)


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "not built"
    top1 = entry["metrics"]["top1"]
    d = entry.get("delta_vs_fp32")
    return f"{top1:.2f} ({d['delta']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}])" if d else f"{top1:.2f}"


def _print(model: str, results: dict) -> None:
    first = next(iter(results.values()))
    samples = first.metrics["stages"]["evaluate"]["samples"]
    print(f"\n# {model}: target profiles, {samples} evaluation images; top-1 % (difference from FP32 in points, "
          "95% paired bootstrap interval)\n")
    print("| profile | arithmetic | " + " | ".join(title for title, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    reference = _per_image(results.get("tensorrt"))
    for profile, run in results.items():
        stages = run.metrics["stages"]
        ev = stages["evaluate"]["backends"]
        built = stages.get("build", {})
        arithmetic = stages["calibrate"]["target"]["summary"]
        if "reduce_range" in str(built.get("int8", {}).get("weights", "")):
            arithmetic += " (converted at build: u8 shift, 7-bit weights where inputs are wide)"
        cells = [_cell(ev.get(key)) for _, key in COLUMNS]
        print(f"| {profile} | {arithmetic} | " + " | ".join(cells) + " |")
    if reference is not None:
        print("\nOpenVINO engine against the tensorrt profile's OpenVINO engine, paired on the same images:")
        for profile, run in results.items():
            this = _per_image(run)
            if profile == "tensorrt" or this is None:
                continue
            d = paired_mean(this.astype(float) - reference.astype(float))
            print(f"- {profile}: {d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}] points")
    for profile, run in results.items():
        print(f"- {profile}: {run.metrics['stages']['calibrate']['target']['why']}; build: "
              f"{run.metrics['stages'].get('build', {}).get('int8', {}).get('graph', 'n/a')}")


def _finished(run_dir: Path):
    """A finished run directory, read back as the table needs it (metrics.json, per_image.npz)."""
    import json
    from types import SimpleNamespace

    return SimpleNamespace(dir=run_dir, metrics=json.loads((run_dir / "metrics.json").read_text()))


def _per_image(run) -> np.ndarray | None:
    if run is None or not (run.dir / "per_image.npz").is_file():
        return None
    with np.load(run.dir / "per_image.npz") as saved:
        key = "openvino_int8.correct"
        return saved[key] if key in saved else None


if __name__ == "__main__":
    main()
