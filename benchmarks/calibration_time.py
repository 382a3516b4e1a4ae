"""Calibration time of each calibrator: resnet18 (random weights: time does not depend on them), 64 images at 224 px.

    python benchmarks/calibration_time.py [--reference]

Times workbench's `quantize_` end to end (BatchNorm folding, quantizer insertion, the
calibration forward pass with histogram collection, range search) for max, entropy,
percentile and mse. With --reference, also times modelopt's own histogram entropy
calibration on the same model and data, the number our vectorised search is measured against.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.quant.ptq import Int8Config, quantize_  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reference", action="store_true", help="also time modelopt's histogram entropy calibration")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = torchvision.models.resnet18().eval().to(args.device)
    batches = [(torch.rand(args.batch, 3, 224, 224) * 4 - 2).to(args.device) for _ in range(args.images // args.batch)]

    def loop(model):
        with torch.no_grad():
            for x in batches:
                model(x)

    loop(base)  # warm-up (cuDNN autotuning, lazy init)
    _sync(args.device)
    start = time.perf_counter()
    loop(base)
    _sync(args.device)
    forward = time.perf_counter() - start
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads of {os.cpu_count()}"
    )
    print(f"# resnet18, {args.images} images at 224 px, torch {torch.__version__}, on {where}\n")
    print(f"One FP32 forward pass over the calibration set: {forward:.1f} s\n")
    # warm-up: lazy imports
    quantize_(copy.deepcopy(base), Int8Config(method="max"), lambda m: m(batches[0][:2]), batches[0][:1])
    print("| Calibrator | workbench quantize_ s |")
    print("|---|---|")
    for method, extra in [("max", {}), ("entropy", {}), ("percentile", {"percentile": 99.99}), ("mse", {})]:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_(model, Int8Config(method=method, **extra), loop, batches[0][:1])
        _sync(args.device)
        print(f"| {method} | {time.perf_counter() - start:.1f} |", flush=True)
    if args.reference:
        import modelopt.torch.quantization as mtq

        model = copy.deepcopy(base)
        cfg = {
            "quant_cfg": [
                {"quantizer_name": "*", "enable": False},
                # The same layers as ours: Conv2d and Linear only (BatchNorm is not folded here).
                {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Conv2d", "cfg": {"num_bits": 8, "axis": 0}},
                {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": {"num_bits": 8, "axis": 0}},
                {
                    "quantizer_name": "*input_quantizer",
                    "parent_class": "nn.Conv2d",
                    "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"},
                },
                {
                    "quantizer_name": "*input_quantizer",
                    "parent_class": "nn.Linear",
                    "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"},
                },
            ],
            "algorithm": None,  # calibrate by hand below: modelopt's max pass cannot finish histogram calibrators
        }
        start = time.perf_counter()
        mtq.quantize(model, cfg, forward_loop=None)
        mtq.model_calib.enable_stats_collection(model)
        loop(model)
        from modelopt.torch.quantization.calib import HistogramCalibrator
        from modelopt.torch.quantization.nn import TensorQuantizer

        for module in model.modules():
            if isinstance(module, TensorQuantizer) and module.is_enabled and module._calibrator is not None:
                if isinstance(module._calibrator, HistogramCalibrator):
                    module.load_calib_amax("entropy")
                else:
                    module.load_calib_amax()
                module.enable_quant()
                module.disable_calib()
        _sync(args.device)
        print(f"| modelopt 0.47 histogram entropy (reference) | {time.perf_counter() - start:.1f} |")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
