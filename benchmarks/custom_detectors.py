"""Issue 27: detectors of no known family quantized through the recipe alone (the detector contract).

    WORKBENCH_ASSETS=../shared/assets python benchmarks/custom_detectors.py              # 16 calib, 32 eval images
    python benchmarks/custom_detectors.py --calibration 32 --evaluation 80 --json out.json
    python benchmarks/custom_detectors.py --models distribution_head --quantize-decode   # its decode conv INT8 too

The models are tests/custom_heads.py's, as a user would write them (each decodes its own head in forward), built
with random weights from a fixed seed for COCO's 80 classes: this measures the plumbing (what was kept float, whether
INT8 computes FP32's boxes), never accuracy. Each goes through one recipe, no adapter code: `import:` +
`trust_code`, `model.detector` (FastestDet-like: boxes in 0..1 of the input; the anchor head: pixels), the model's
own pre-processing in `data.transform` (FastestDet-like: plain resize to 352 and BGR, as FastestDet; the anchor
head and the distribution head, anchor-free, whose boxes come from a softmax read by a 1x1 conv: letterbox 320,
RGB), stages calibrate (mse) -> export -> evaluate on `coco_tiny/val2017`.

Per model the table gives the layout the exported graph declares, the decode the calibration found and kept float
(quant/decode_scope.py), the convolutions INT8/float, the TensorRT-rule violations of model.onnx, and FP32 vs INT8
agreement: the run's own box agreement (FP32's boxes with score >= 0.25 that INT8 finds; none when a random model
scores nothing that high), and, measured here on the same images, the agreement over every box both keep at conf
0.001 (score 0: what a random model has), for the fake-quant PyTorch model and ONNX Runtime's run of model.onnx.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.api import run as run_recipe  # noqa: E402
from workbench.recipe import recipe_model  # noqa: E402
from workbench.schema import Recipe  # noqa: E402
from workbench.tasks.detection import DetectionScorer  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", ROOT.parent / "shared" / "assets"))

MODELS = {
    "fastestdet_like": {"factory": "fastestdet_like", "size": 352,
                        "detector": {"layout": "anchor_objectness", "units": "normalized"},
                        "transform": {"resize": [352, 352], "stride": 16, "channels": "bgr"}},
    "multiscale_anchor": {"factory": "multiscale_anchor", "size": 320,
                          "detector": {"layout": "anchor_objectness"},
                          "transform": {"letterbox": [320, 320], "stride": 32}},
    # a third, anchor-free: its boxes are the expectation of a softmax by a fixed 1x1 conv (a DFL by another name)
    "distribution_head": {"factory": "distribution_head", "size": 320, "detector": {"layout": "anchor_free"},
                          "transform": {"letterbox": [320, 320], "stride": 16}},
}


def recipe_for(name: str, spec: dict, runs: Path, calibration: int, evaluation: int,
               decode_float: bool = True) -> Recipe:
    coco = ASSETS / "data" / "coco_tiny"
    ann = coco / "annotations"
    return recipe_model().model_validate({
        "name": name, "task": "detection", "runs_dir": str(runs), "device": "cpu",
        "model": {"spec": f"import:custom_heads:{spec['factory']}", "trust_code": True,
                  "import_path": str(ROOT / "tests"), "kwargs": {"num_classes": 80, "seed": 0},
                  "input_size": [3, spec["size"], spec["size"]], "detector": spec["detector"]},
        "data": {"transform": spec["transform"], "batch_size": 8,
                 "calibration": {"source": "coco", "path": str(coco / "train2017"),
                                 "annotations": str(ann / "instances_train2017.json"), "count": calibration},
                 "evaluation": {"source": "coco", "path": str(coco / "val2017"),
                                "annotations": str(ann / "instances_val2017.json"), "count": evaluation}},
        "stages": [{"calibrate": {"method": "mse", "decode_float": decode_float}}, {"export": {}},
                   {"evaluate": {"latency_repeats": 1, "latency_batch_sizes": [1],
                                 "backends": ["pytorch_fp32", "pytorch_int8", "ort_int8_faithful"]}}],
    })


def every_box_agreement(run, recipe: Recipe) -> dict[str, float | None]:
    """FP32 vs INT8 over every box both keep (score 0), on the evaluation images: fake-quant PyTorch and ORT."""
    import onnxruntime as ort

    dataset = run.dataset("evaluation")
    session = ort.InferenceSession(str(run.path("model.onnx")), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    scorers = {k: DetectionScorer(dataset.coco_gt, dataset.category_ids, len(dataset.category_ids),
                                  agreement_score=0.0) for k in ("pytorch_int8", "ort_int8")}
    with torch.no_grad():
        for images, targets in run.loader("evaluation"):
            fp32 = run.reference(images)
            scorers["pytorch_int8"].update(run.model(images), targets, reference=fp32)
            ort_out = session.run(None, {feed: images.numpy()})[0]
            scorers["ort_int8"].update(torch.from_numpy(np.asarray(ort_out)), targets, reference=fp32)
    return {k: s.result().get("box_agreement") for k, s in scorers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=16, help="coco_tiny train images that calibrate")
    parser.add_argument("--evaluation", type=int, default=32, help="coco_tiny val images that score")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--quantize-decode", action="store_true",
                        help="calibrate with decode_float: false (the decode's layers quantized too), to compare")
    args = parser.parse_args()
    if not (ASSETS / "data" / "coco_tiny").is_dir():
        sys.exit(f"coco_tiny not found under {ASSETS}: set WORKBENCH_ASSETS")
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for name in args.models:
            recipe = recipe_for(name, MODELS[name], Path(runs), args.calibration, args.evaluation,
                                decode_float=not args.quantize_decode)
            run = run_recipe(recipe)
            stages = run.metrics["stages"]
            calib, export = stages["calibrate"], stages["export"]
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(run.path("model.onnx"))).metadata_props}
            backends = stages["evaluate"]["backends"]
            rows.append({
                "model": name, "layout": meta.get("workbench.output_layout"),
                "preprocess": meta.get("workbench.preprocess"),
                "decode": calib["decode_float"]["summary"] if "decode_float" in calib else "decode_float: false",
                "conv": calib["census"].get("Conv2d"),
                "trt_violations": len(export["model.onnx"].get("tensorrt_rules", [])),
                "box_agreement_0.25": {k: backends[k]["metrics"].get("box_agreement")
                                       for k in ("pytorch_int8", "ort_int8_faithful")},
                "map50_95_fp32": backends["pytorch_fp32"]["metrics"].get("map50_95"),
                "box_agreement_every_box": every_box_agreement(run, recipe),
                "images": backends["pytorch_fp32"]["metrics"]["samples"],
            })
    for r in rows:
        print(f"\n{r['model']} ({r['images']} images)\n  layout: {r['layout']}\n  input: {r['preprocess']}\n"
              f"  kept float: {r['decode']}\n  Conv2d: {r['conv']}; TensorRT-rule violations: {r['trt_violations']}\n"
              f"  FP32 mAP50-95 (random weights): {r['map50_95_fp32']}\n"
              f"  box agreement, score >= 0.25: {r['box_agreement_0.25']}\n"
              f"  box agreement, every box (score 0): {r['box_agreement_every_box']}")
    if args.json:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
        args.json.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
