"""PTQ accuracy of every calibrator on a real classifier, on every backend, plus ONNX Runtime latency.

    python benchmarks/ptq_classification.py resnet20        # CIFAR-10 test (10,000), calibrated on 512 train images
    python benchmarks/ptq_classification.py resnet44 --weights per_tensor --methods mse
    python benchmarks/ptq_classification.py efficientnet_lite0   # imagenet_samples (1,000)

Reads ../shared/assets (or $WORKBENCH_ASSETS). Prints a markdown table: top-1 of
FP32 and of INT8 per calibrator for the fake-quant model, the Q/DQ ONNX run
faithfully in ONNX Runtime (optimisations off) and with ORT's integer kernels
(default optimisations), the agreement of each with FP32, and the difference of
fake-quant and faithful top-1 with FP32's with its 95% paired bootstrap interval
over the evaluation images.
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

from workbench.data import build_dataset  # noqa: E402
from workbench.hardware.cpu import cpu_info  # noqa: E402
from workbench.models import resolve_model  # noqa: E402
from workbench.qdq.export import export_onnx  # noqa: E402
from workbench.quant.ptq import Int8Config, quantize_  # noqa: E402
from workbench.runtime.latency import measure_latency  # noqa: E402
from workbench.runtime.runners import OrtRunner, TorchRunner  # noqa: E402
from workbench.schema import DataConfig, DataSplit, ModelConfig, TransformConfig  # noqa: E402
from workbench.tasks.classification import ClassificationScorer, ClassificationTask  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))

CIFAR10 = DataConfig(
    transform=TransformConfig(),
    calibration=DataSplit(source="imagefolder", path=str(ASSETS / "data/cifar10/train"), count=512, seed=0),
    evaluation=DataSplit(source="imagefolder", path=str(ASSETS / "data/cifar10/test")),
    batch_size=250,
)
SETUPS = {
    **{name: dict(model=ModelConfig(spec=f"cifar_resnet:{name}", weights=str(ASSETS / f"models/cifar10_{name}.th"),
                                    input_size=(3, 32, 32)), data=CIFAR10)
       for name in ("resnet20", "resnet32", "resnet44")},
    "efficientnet_lite0": dict(
        model=ModelConfig(spec="efficientnet_lite:efficientnet-lite0", input_size=(3, 224, 224)),
        data=DataConfig(
            transform=TransformConfig(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
            calibration=DataSplit(calib_set="skimage_photos"),
            evaluation=DataSplit(source="files", path=str(ASSETS / "data/imagenet_samples"), labels="wnid_prefix"),
            batch_size=50,
        ),
    ),
}
METHODS = [("max", None), ("entropy", None), ("percentile", 99.9), ("percentile", 99.99), ("percentile", 99.999),
           ("mse", None)]


def load_batches(data: DataConfig, split: str, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = build_dataset(data, split)
    loader = torch.utils.data.DataLoader(ds, batch_size=data.batch_size, num_workers=2)
    out, n = [], 0
    for x, y in loader:
        out.append((x, y))
        n += len(x)
        if limit and n >= limit:
            break
    return out


def score(runner, batches, reference=None) -> dict:
    scorer = ClassificationScorer(labeled=True)
    outputs = []
    for i, (x, y) in enumerate(batches):
        out = runner(x)
        outputs.append(out)
        scorer.update(out, y, reference[i] if reference is not None else None)
    return {**scorer.result(), "outputs": outputs, "scorer": scorer}


def delta(result: dict, reference: dict) -> str:
    """Top-1 minus FP32's on the same images, with the 95% paired bootstrap interval."""
    d = ClassificationTask().delta(result["scorer"], reference["scorer"])
    return f"{d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=list(SETUPS))
    p.add_argument("--methods", nargs="*", help="e.g. max entropy percentile:99.99 mse")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--weights", choices=["per_channel", "per_tensor"], default="per_channel")
    p.add_argument(
        "--calib-holdout", type=int, default=0,
        help=("calibrate on N evaluation images held out by a seeded split, and score on the rest "
              "(never on the same images)"),
    )
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    setup = SETUPS[args.model]
    methods = METHODS if not args.methods else [(m.split(":")[0], float(m.split(":")[1]) if ":" in m else None)
                                                for m in args.methods]
    torch.manual_seed(0)
    fp32 = resolve_model(setup["model"])
    c, h, w = setup["model"].input_size
    example = torch.randn(1, c, h, w)
    if args.calib_holdout:
        pool = load_batches(setup["data"], "evaluation")
        xs, ys = torch.cat([x for x, _ in pool]), torch.cat([y for _, y in pool])
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))
        held, rest = order[: args.calib_holdout], order[args.calib_holdout :]
        bs = setup["data"].batch_size
        calib = [(xs[held[i : i + bs]], ys[held[i : i + bs]]) for i in range(0, len(held), bs)]
        evals = [(xs[rest[i : i + bs]], ys[rest[i : i + bs]]) for i in range(0, len(rest), bs)]
    else:
        calib = load_batches(setup["data"], "calibration")
        evals = load_batches(setup["data"], "evaluation", args.eval_limit)
    n_eval = sum(len(x) for x, _ in evals)
    print(f"# {args.model}: {sum(len(x) for x, _ in calib)} calibration images, {n_eval} evaluation images, "
          f"torch {torch.__version__}\n")

    ref = score(TorchRunner(fp32, "fp32"), evals)
    tmp = Path(tempfile.mkdtemp())
    fp32_onnx = export_onnx(copy.deepcopy(fp32), example, tmp / "fp32.onnx")
    rows = [("FP32", "-", f"{ref['top1']:.2f}", "-", "-", "-", "-", "100.00", "-", "-")]
    lat_rows = [("FP32", measure_latency(OrtRunner(fp32_onnx, "fp32", "default"), (c, h, w), (1, 8), repeats=30))]
    for method, pct in methods:
        model = copy.deepcopy(fp32)
        cfg = Int8Config(method=method, weights=args.weights, **({"percentile": pct} if pct else {}))

        def loop(m):
            with torch.no_grad():
                for x, _ in calib:
                    m(x)

        start = time.perf_counter()
        quantize_(model, cfg, loop, example)
        seconds = time.perf_counter() - start
        path = export_onnx(model, example, tmp / f"{method}{pct or ''}.onnx")
        fq = score(TorchRunner(model, "fq"), evals, ref["outputs"])
        faithful = score(OrtRunner(path, "f", "faithful"), evals, ref["outputs"])
        default = score(OrtRunner(path, "d", "default"), evals, ref["outputs"])
        name = method + (f" {pct}" if pct else "")
        rows.append((name, f"{seconds:.1f}", f"{fq['top1']:.2f}", delta(fq, ref), f"{faithful['top1']:.2f}",
                     delta(faithful, ref), f"{default['top1']:.2f}",
                     f"{fq['agreement_top1']:.2f}", f"{faithful['agreement_top1']:.2f}",
                     f"{default['agreement_top1']:.2f}"))
        print(f"  done {name}: fake-quant {fq['top1']:.2f}", file=sys.stderr)
        if method == methods[0][0]:
            lat_rows.append(("INT8 Q/DQ (TensorRT style), ORT default",
                             measure_latency(OrtRunner(path, "d", "default"), (c, h, w), (1, 8), repeats=30)))

    print(f"Weights {args.weights}; CPU: {cpu_info().describe()}\n")
    print("| Calibrator | Calib s | Top-1 fake-quant | Δ fake-quant [95% CI] | Top-1 ORT faithful | Δ faithful "
          "[95% CI] | Top-1 ORT default | Agree fake-quant | Agree ORT faithful | Agree ORT default |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nONNX Runtime latency on this CPU ({os.cpu_count()} threads), median (p90) ms:\n")
    print("| Graph | batch 1 | batch 8 | images/s at batch 8 |")
    print("|---|---|---|---|")
    for name, lat in lat_rows:
        print(f"| {name} | {lat['b1']['median_ms']:.2f} ({lat['b1']['p90_ms']:.2f}) | "
              f"{lat['b8']['median_ms']:.2f} ({lat['b8']['p90_ms']:.2f}) | {lat['b8']['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
