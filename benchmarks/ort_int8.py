"""INT8 in ONNX Runtime: the TensorRT-style Q/DQ graph against its ONNX Runtime flavour, accuracy and speed.

    python benchmarks/ort_int8.py resnet20 efficientnet_lite0 yolov5n [--weights auto s8 reduce_range]

For each model: calibrate as its recipe says (max for the detector), export through the
workbench (model.onnx, TensorRT-style, cleaned by onnxslim), write the ONNX Runtime flavour
for each weight type, then score on the evaluation split
  - FP32 ONNX (ORT default),
  - the TensorRT-style graph executed faithfully (ORT optimisations off: TensorRT's arithmetic),
  - the same graph with ORT's default optimisations,
  - each flavour with ORT's default optimisations (its integer kernels),
and time them all at batch 1 and 8 on this machine's CPU (all cores, interleaved rounds,
the best round's median). Prints markdown tables; reads ../shared/assets (or $WORKBENCH_ASSETS).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import api  # noqa: E402
from workbench.qdq.ort_flavour import to_ort_int8, u8s8_can_saturate  # noqa: E402
from workbench.recipe import parse_recipe  # noqa: E402
from workbench.runtime.latency import measure_latency  # noqa: E402
from workbench.runtime.runners import OrtRunner  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
A = str(ASSETS)

RECIPES = {
    "resnet20": f"""name: bench_ort_resnet20
task: classification
model: {{spec: "cifar_resnet:resnet20", weights: "{A}/models/cifar10_resnet20.th", input_size: [3, 32, 32]}}
data:
  transform: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
  calibration: {{source: imagefolder, path: "{A}/data/cifar10/train", count: 512, seed: 0}}
  evaluation: {{source: imagefolder, path: "{A}/data/cifar10/test"}}
  batch_size: 250
stages:
  - calibrate: {{method: mse}}
""",
    "efficientnet_lite0": f"""name: bench_ort_efficientnet_lite0
task: classification
model: {{spec: "efficientnet_lite:efficientnet-lite0", input_size: [3, 224, 224]}}
data:
  transform: {{resize: 256, crop: 224, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
  calibration: {{calib_set: skimage_photos}}
  evaluation: {{source: files, path: "{A}/data/imagenet_samples", labels: wnid_prefix}}
  batch_size: 50
stages:
  - calibrate: {{method: max}}
""",
    "yolov5n": f"""name: bench_ort_yolov5n
task: detection
model: {{spec: "yolov5:{A}/models/yolov5n.pt", input_size: [3, 640, 640]}}
detection: {{conf: 0.001, iou: 0.6, max_det: 300}}
data:
  transform: {{letterbox: [640, 640], stride: 32}}
  calibration: {{source: coco, path: "{A}/data/coco_tiny/train2017", """
    f"""annotations: "{A}/data/coco_tiny/annotations/instances_train2017.json"}}
  evaluation: {{source: coco, path: "{A}/data/coco_tiny/val2017", """
    f"""annotations: "{A}/data/coco_tiny/annotations/instances_val2017.json"}}
  batch_size: 8
stages:
  - calibrate: {{method: max}}
""",
}
EXPORT = "  - export: {{ort_weights: {weights}}}\n"


def score(run, runner, reference_outputs=None) -> tuple[dict, list]:
    dataset = run.dataset("evaluation")
    scorer = run.task.scorer(run.recipe, dataset)
    outputs = []
    for i, (images, labels) in enumerate(run.loader("evaluation")):
        out = runner(images)
        outputs.append(out)
        scorer.update(out, labels, reference_outputs[i] if reference_outputs is not None else None)
    return scorer.result(), outputs


def interleaved_latency(runners: dict, shape, batch_sizes=(1, 8), rounds: int = 3, repeats: int = 20) -> dict:
    """Each runner timed in turn, `rounds` times over: the best round's median per batch size (the
    2-core machine's neighbours make single rounds noisy)."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, runner in runners.items():
            timing = measure_latency(runner, shape, batch_sizes, warmup=3, repeats=repeats)
            for b, t in timing.items():
                if b not in best.setdefault(name, {}) or t["median_ms"] < best[name][b]["median_ms"]:
                    best[name][b] = t
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", choices=list(RECIPES))
    p.add_argument("--weights", nargs="+", default=["auto", "s8", "reduce_range"],
                   choices=["auto", "exact", "s8", "reduce_range"])
    p.add_argument("--runs-dir", default="/tmp/workbench_bench_ort")
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    print(f"# ONNX Runtime {onnxruntime.__version__} on {os.cpu_count()} CPU threads ({cpu}); "
          f"U8S8 can saturate here: {u8s8_can_saturate()}; torch {torch.__version__}\n")
    for name in args.models:
        text = RECIPES[name] + EXPORT.format(weights=args.weights[0]) + f'runs_dir: "{args.runs_dir}"\n'
        run = api.run(parse_recipe(text, f"{name} (benchmark)"))
        shape = tuple(run.recipe.model.input_size)
        graphs = {"FP32 (ORT)": OrtRunner(run.dir / "model_fp32.onnx", "fp32", "default"),
                  "INT8 TensorRT-style, faithful": OrtRunner(run.dir / "model.onnx", "faithful", "faithful"),
                  "INT8 TensorRT-style, ORT default": OrtRunner(run.dir / "model.onnx", "default", "default")}
        fused = {}
        for weights in args.weights:
            conversion = to_ort_int8(run.dir / "model.onnx", run.dir / f"model_int8_ort_{weights}.onnx", weights)
            label = f"INT8 ORT flavour, {weights}" + (f" ({conversion.weights})" if weights == "auto" else "")
            graphs[label] = OrtRunner(conversion.path, weights, "default")
            fused[label] = conversion.fused
        fp32_metrics, fp32_out = score(run, graphs["FP32 (ORT)"])
        faithful_metrics, faithful_out = score(run, graphs["INT8 TensorRT-style, faithful"], fp32_out)
        rows = {"FP32 (ORT)": (fp32_metrics, None), "INT8 TensorRT-style, faithful": (faithful_metrics, None)}
        for label, runner in graphs.items():
            if label not in rows:
                metrics, _ = score(run, runner, faithful_out)  # agreement measured against the faithful graph
                rows[label] = (metrics, run.task.agreement_points(metrics))
        latency = interleaved_latency(graphs, shape)
        unit, _ = run.task.headline_points(fp32_metrics)
        fp32_b8 = latency["FP32 (ORT)"]["b8"]["median_ms"]
        faithful_points = run.task.headline_points(faithful_metrics)[1]
        print(f"## {name}: {fp32_metrics.get('samples', '')} evaluation samples, run {run.dir}\n")
        print(f"| Graph | {unit} | vs faithful | agreement with faithful % | b1 ms | b8 ms | speed-up vs FP32 at b8 |")
        print("|---|---|---|---|---|---|---|")
        for label, (metrics, agreement) in rows.items():
            points = run.task.headline_points(metrics)[1]
            b1, b8 = latency[label]["b1"]["median_ms"], latency[label]["b8"]["median_ms"]
            print(f"| {label} | {points:.2f} | {points - faithful_points:+.2f} | "
                  f"{'-' if agreement is None else f'{agreement:.2f}'} | {b1:.2f} | {b8:.2f} | {fp32_b8 / b8:.2f}x |")
        print("\nOps ONNX Runtime runs in each flavour:", "; ".join(f"{k}: {v}" for k, v in fused.items()), "\n")
        del graphs


if __name__ == "__main__":
    main()
