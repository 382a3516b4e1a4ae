"""PTQ of the shared yolov5n on coco_tiny: mAP of FP32 and of INT8 per calibrator, on every backend.

    python benchmarks/ptq_detection.py [--methods max entropy percentile:99.99 mse]

Calibrated on coco_tiny/train2017 (80 images), scored on coco_tiny/val2017 (80 images,
815 annotations) at 640x640, conf 0.001, NMS IoU 0.6, with pycocotools. Every convolution
in INT8; the box decode after the last convolutions stays in float. Prints a markdown table
and the Q/DQ census of the exported graph.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.data.detection import coco_dataset, detection_collate  # noqa: E402
from workbench.models.registry import resolve_model  # noqa: E402
from workbench.models.yolov5_legacy import load_yolov5_checkpoint  # noqa: E402
from workbench.qdq.export import export_onnx  # noqa: E402
from workbench.qdq.graph import qdq_census  # noqa: E402
from workbench.quant.ptq import Int8Config, quantize_  # noqa: E402
from workbench.runtime.compare import layer_divergence  # noqa: E402
from workbench.runtime.runners import OrtRunner, TorchRunner  # noqa: E402
from workbench.schema import ModelConfig  # noqa: E402
from workbench.tasks.detection import DetectionScorer  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
METHODS = ["max", "entropy", "percentile:99.99", "mse"]


class Float64Runner:
    """The same fake-quant model in float64: same scales, only the arithmetic's rounding differs."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).double().eval()

    @torch.no_grad()
    def __call__(self, x):
        out = self.model(x.double())
        return (out[0] if isinstance(out, (list, tuple)) else out).float().numpy()


def live_init_(model: torch.nn.Module) -> None:
    """Random weights whose outputs depend on the image.

    Ultralytics' own init of a model built from its yaml gives outputs that do not depend on
    the input at all (every class score is sigmoid of the head's bias, about 1.6e-4; every box
    the same size), so no agreement measured on it means anything. Kaiming-normal convolutions,
    zero biases and a fixed seed give a model whose boxes and scores vary with the image.
    """
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad:  # the DFL's fixed 0..15 weights stay
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--model", default="yolov5n", help="yolov5n (the shared checkpoint) or an Ultralytics spec such as "
                   "ultralytics:yolov8n.yaml (random weights: only fake-quant vs ONNX agreement means anything)")
    p.add_argument("--fp64-control", action="store_true",
                   help="also score each fake-quant model in float64: the spread that arithmetic order alone makes")
    args = p.parse_args()
    if not (ASSETS / "models/yolov5n.pt").is_file():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    coco = ASSETS / "data/coco_tiny"
    val = coco_dataset(coco / "val2017", coco / "annotations/instances_val2017.json", (640, 640))
    train = coco_dataset(coco / "train2017", coco / "annotations/instances_train2017.json", (640, 640))
    load = lambda ds: list(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=detection_collate))  # noqa: E731
    evals, calib = load(val), load(train)
    random_weights = args.model != "yolov5n"
    if random_weights:
        fp32 = resolve_model(ModelConfig(spec=args.model))
        live_init_(fp32)
        nms = {"conf": 0.001, "iou": 0.6, "max_det": 300}
    else:
        fp32 = load_yolov5_checkpoint(ASSETS / "models/yolov5n.pt")
        nms = {"conf": 0.001, "iou": 0.6, "max_det": 300}
    example = torch.rand(1, 3, 640, 640)

    def score(runner, reference=None):
        scorer = DetectionScorer(val.coco_gt, val.category_ids, 80, **nms)
        outs = []
        for i, (x, targets) in enumerate(evals):
            out = runner(x)
            outs.append(out)
            scorer.update(out, targets, reference[i] if reference is not None else None)
        return {**scorer.result(), "outputs": outs}

    ref = score(TorchRunner(fp32, "fp32"))
    print(f"# {args.model} on coco_tiny: {len(train)} calibration images, {len(val)} evaluation images, "
          f"torch {torch.__version__}\n")
    rows = [("FP32", "-", f"{ref['map50_95']:.3f} / {ref['map50']:.3f}", "-", "-", "-", "-", "-", "-")]
    tmp = Path(tempfile.mkdtemp())
    census = None
    for spec in args.methods:
        method, _, pct = spec.partition(":")
        cfg = Int8Config(method=method, **({"percentile": float(pct)} if pct else {}))
        model = copy.deepcopy(fp32)

        def loop(m):
            with torch.no_grad():
                for x, _ in calib:
                    m(x)

        start = time.perf_counter()
        result = quantize_(model, cfg, loop, example)
        seconds = time.perf_counter() - start
        path = export_onnx(model, example, tmp / f"{method}{pct}.onnx", dynamic_size=True)
        fq = score(TorchRunner(model, "fq"), ref["outputs"])
        faithful = score(OrtRunner(path, "f", "faithful"), fq["outputs"])
        max_diff = max(float(abs(a - b).max()) for a, b in zip(faithful["outputs"], fq["outputs"]))
        default = score(OrtRunner(path, "d", "default"))
        control = "-"
        if args.fp64_control:
            fq64 = score(Float64Runner(model))
            control = f"{fq64['map50_95']:.3f} / {fq64['map50']:.3f}"
            divergence = layer_divergence(model, path, evals[0][0][:4])
            print(f"  {spec}: ORT faithful vs fake-quant relative error, first conv {divergence[0]['rel_error']:.1e}, "
                  f"deepest {max(r['rel_error'] for r in divergence):.1e}", file=sys.stderr)
        rows.append((spec.replace(":", " "), f"{seconds:.1f}", f"{fq['map50_95']:.3f} / {fq['map50']:.3f}", control,
                     f"{faithful['map50_95']:.3f} / {faithful['map50']:.3f}",
                     f"{default['map50_95']:.3f} / {default['map50']:.3f}",
                     f"{fq['box_agreement']:.1f}", f"{faithful['box_agreement']:.1f}", f"{max_diff:.1e}"))
        print(f"  done {spec}: fake-quant {fq['map50_95']:.3f}", file=sys.stderr, flush=True)
        census = census or (result.census(), qdq_census(path))
    print("| Calibrator | Calib s | mAP50-95 / mAP50 fake-quant | fake-quant in float64 | ORT faithful | ORT default "
          "| Box agreement with FP32 % (fake-quant) "
          "| Box agreement ORT faithful vs fake-quant % | max abs output diff ORT vs fake-quant |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if census:
        layers, graph = census
        print(f"\nQ/DQ census of the exported graph: layers {layers}; "
              f"ONNX compute nodes on INT8 inputs {graph['quantized']}, "
              f"in float {graph['float'] or 'none'}; {graph['QuantizeLinear']} QuantizeLinear, "
              f"{graph['DequantizeLinear']} DequantizeLinear; ops {graph['op_counts']}")


if __name__ == "__main__":
    main()
