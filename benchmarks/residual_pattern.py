"""Issue 27 items 4-5: residual Adds found by graph pattern against those found by class, check-onnx on the export,
the float function with quantizers off, and the declared-shape check's fixes and cost, model by model.

    WORKBENCH_ASSETS=/work/shared/assets python benchmarks/residual_pattern.py [--size 320]

Counts do not depend on the calibration data, so two random images calibrate (`max`): the numbers are structural.
yolov5n is the real checkpoint from the shared assets (skipped without them); the Ultralytics and timm models are
their architectures with random weights (no download here); the FastestDet-like model is the tests' own
(tests/test_residual_pattern.py).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _models(size: int):
    from workbench.models import resolve_model
    from workbench.schema import ModelConfig

    assets = os.environ.get("WORKBENCH_ASSETS")
    if assets and (Path(assets) / "models/yolov5n.pt").exists():
        yield "yolov5n (real weights)", lambda: resolve_model(ModelConfig(
            spec=f"yolov5:{Path(assets) / 'models/yolov5n.pt'}", input_size=[3, size, size]))
    for name in ("yolov8n.yaml", "yolo11n.yaml"):
        yield f"ultralytics {name}", lambda n=name: resolve_model(ModelConfig(spec=f"ultralytics:{n}",
                                                                              input_size=[3, size, size]))
    yield "timm resnet18", lambda: resolve_model(ModelConfig(spec="timm:resnet18", input_size=[3, size, size]))
    yield "timm resnet50", lambda: resolve_model(ModelConfig(spec="timm:resnet50", input_size=[3, size, size]))

    def fastestdet():
        from test_residual_pattern import FastestDetLike, _init

        return _init(FastestDetLike())

    yield "FastestDet-like (ShuffleNet units + SPP)", fastestdet

    def plain():
        from test_residual_pattern import PlainNet, _init

        return _init(PlainNet())

    yield "custom PlainBlock x2", plain


def measure(label: str, build, size: int, tmp: Path) -> dict:
    from workbench.qdq.export import export_onnx, shape_fixes
    from workbench.qdq.trt_rules import check_qdq
    from workbench.quant.ptq import Int8Config, quantize_
    from workbench.quant.residual_pattern import find_residual_adds
    from workbench.quant.rules import quantizers_off, residual_blocks

    torch.manual_seed(0)
    x = torch.rand(2, 3, size, size)
    model = build().eval()
    by_class = len(residual_blocks(model))
    bare = copy.deepcopy(model)  # without the rule: what the pattern search finds over the whole model
    quantize_(bare, Int8Config(method="max", residual_add=False), lambda m: m(x), x[:1])
    pattern_sites = len(find_residual_adds(bare, x[:1], quantizers_off).sites)
    bare_violations = check_qdq(export_onnx(bare, x[:1], tmp / "bare.onnx"))
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    with torch.no_grad(), quantizers_off(model), quantizers_off(bare):
        a, b = model(x), bare(x)
        a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
        float_gap = float((a - b).abs().max())
    start = time.perf_counter()
    path = export_onnx(model, x[:1], tmp / "m.onnx")
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    export_onnx(model, x[:1], tmp / "nocheck.onnx", dynamic_batch=False)  # no declared dynamic dim: no check
    static_s = time.perf_counter() - start
    violations = check_qdq(path)
    units = {q.rsplit(".", 1)[0] for q in result.residual_quantizers}
    return {"model": label, "class_blocks": by_class, "pattern_sites_whole_model": pattern_sites,
            "units": len(units), "units_by_pattern": len(result.residual_by_pattern),
            "left_alone": len(result.residual_left_alone), "violations_without_rule": len(bare_violations),
            "violations": len(violations), "float_gap": float_gap, "shape_fixes": len(shape_fixes(path)),
            "export_s": round(export_s, 2), "export_static_s": round(static_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=320)
    args = parser.parse_args()
    os.environ.setdefault("WORKBENCH_NO_PROGRESS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in _models(args.size):
            rows.append(measure(label, build, args.size, Path(tmp)))
            print(rows[-1], flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
