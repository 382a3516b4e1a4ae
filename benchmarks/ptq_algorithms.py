"""PTQ algorithms (issue 25): the accuracy each configuration wins back, and what each algorithm costs.

    python benchmarks/ptq_algorithms.py efficientnet_lite0 --weights per_tensor   # 516 held-out imagenet_samples
    python benchmarks/ptq_algorithms.py resnet20                                  # 2,000 CIFAR-10 test images
    python benchmarks/ptq_algorithms.py resnet32 --configs PTQ "+CLE+BC full"     # resnet44 too: the same split
    python benchmarks/ptq_algorithms.py yolov5n --cost-only                       # seconds of CLE and BC only
    python benchmarks/ptq_algorithms.py resnet20 --configs PTQ "+CLE+BC full"     # a subset of CONFIGS

For every configuration in CONFIGS (one line each: a title and the `stages.calibrate.algorithms` list) the model is
quantized with mse ranges (quant.ptq.quantize_, the calibrate stage's verb) and scored in fake-quant (and with
--faithful, its Q/DQ ONNX in ONNX Runtime, optimisations off). Printed: top-1, its difference with FP32 and with
plain PTQ as 95% paired bootstrap intervals over the evaluation images (workbench.stats via the task's delta), the
agreement with FP32, and the seconds of each algorithm (the pipeline's own AlgorithmRecord.seconds).

EfficientNet-Lite0 is issue 18's split: calibrated on the 128 skimage photos, evaluated on the 516
`imagenet_samples` with an odd last WordNet-id digit. ResNet-20: calibrated on 512 CIFAR-10 train images,
evaluated on 2,000 test images drawn with seed 0 (lossless PNG). yolov5n: the time of each algorithm on the 80
coco_tiny train images at 640 px (no mAP: --cost-only).
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
from workbench.models import resolve_model  # noqa: E402
from workbench.quant.algorithms import AlgorithmStep  # noqa: E402
from workbench.quant.ptq import Int8Config, quantize_  # noqa: E402
from workbench.runtime.cpu import cpu_info  # noqa: E402
from workbench.schema import DataConfig, DataSplit, ModelConfig, TransformConfig  # noqa: E402
from workbench.tasks.classification import ClassificationScorer, ClassificationTask  # noqa: E402

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))

# One line per configuration: its title -> the calibrate stage's `algorithms` list.
CONFIGS: dict[str, list] = {
    "PTQ": [],
    "+CLE": ["cle"],
    "+CLE+BC fast": ["cle", {"name": "bias_correction", "mode": "fast"}],
    "+CLE+BC full": ["cle", {"name": "bias_correction", "mode": "full"}],
    "+BC full": [{"name": "bias_correction", "mode": "full"}],
    "+CLE(ReLU6->ReLU)+BC full": [{"name": "cle", "relu6": "replace"}, {"name": "bias_correction", "mode": "full"}],
    # AdaRound with 1,000 steps per layer (AIMET's 10,000 take hours on 2 CPU cores; benchmarks/adaround.py takes
    # --iterations and --device cuda for the full schedule)
    "+AdaRound": [{"name": "adaround", "iterations": 1000}],
    "+CLE+AdaRound": ["cle", {"name": "adaround", "iterations": 1000}],
}

SETUPS = {
    # ResNet-20, -32 and -44 on one CIFAR-10 split (for -32/-44, the per-channel goal: the algorithms cost nothing)
    **{f"resnet{depth}": dict(
        model=ModelConfig(spec=f"cifar_resnet:resnet{depth}", weights=str(ASSETS / f"models/cifar10_resnet{depth}.th"),
                          input_size=(3, 32, 32)),
        data=DataConfig(
            transform=TransformConfig(),
            calibration=DataSplit(source="imagefolder", path=str(ASSETS / "data/cifar10/train"), count=512, seed=0),
            evaluation=DataSplit(source="imagefolder", path=str(ASSETS / "data/cifar10/test"), count=2000, seed=0),
            batch_size=250,
        ),
    ) for depth in (20, 32, 44)},
    "efficientnet_lite0": dict(
        model=ModelConfig(spec="efficientnet_lite:efficientnet-lite0", input_size=(3, 224, 224)),
        data=DataConfig(
            transform=TransformConfig(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
            calibration=DataSplit(calib_set="skimage_photos"),
            evaluation=DataSplit(source="files", path=str(ASSETS / "data/imagenet_samples"),
                                 pattern="n*[13579]_*.JPEG", labels="wnid_prefix"),
            batch_size=32,
        ),
    ),
}


def load_batches(data: DataConfig, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = build_dataset(data, split)
    return list(torch.utils.data.DataLoader(ds, batch_size=data.batch_size, num_workers=1))


def score(run_model, batches, reference=None) -> dict:
    scorer = ClassificationScorer(labeled=True)
    outputs = []
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            out = run_model(x)
            outputs.append(out)
            scorer.update(out, y, reference[i] if reference is not None else None)
    return {**scorer.result(), "outputs": outputs, "scorer": scorer}


def interval(result: dict, reference: dict) -> str:
    d = ClassificationTask().delta(result["scorer"], reference["scorer"])
    return f"{d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"


def target_arithmetic(name: str):
    """A TARGETS name -> the Arithmetic every quantizer follows (targets.py, as a recipe's `target:` resolves)."""
    from workbench.targets import FixedPointTarget, OpenVINOTarget, resolve_target

    return resolve_target({"tensorrt": None, "fixed_point": FixedPointTarget(name="fixed_point"),
                           "openvino_avx2": OpenVINOTarget(name="openvino", cpu="avx2"),
                           "openvino_vnni": OpenVINOTarget(name="openvino", cpu="avx512_vnni")}[name])


TARGETS = ("tensorrt", "fixed_point", "openvino_avx2", "openvino_vnni")


def quantize(fp32, weights: str, algorithms: list, calib, example, target: str = "tensorrt"):
    model = copy.deepcopy(fp32)

    def loop(m):
        with torch.no_grad():
            for x, *_ in calib:
                m(x)

    steps = [AlgorithmStep.model_validate(a) for a in algorithms]
    start = time.perf_counter()
    result = quantize_(model, Int8Config(method="mse", weights=weights), loop, example, target_arithmetic(target),
                       algorithms=steps)
    return model, result, time.perf_counter() - start


def seconds_of(result) -> str:
    return ", ".join(f"{r.name}{'(' + r.options['mode'] + ')' if 'mode' in r.options else ''} {r.seconds:.1f}"
                     for r in result.algorithms) or "-"


def yolov5n_setup():
    from workbench.data.detection import coco_dataset, detection_collate
    from workbench.models.yolov5_legacy import load_yolov5_checkpoint

    coco = ASSETS / "data/coco_tiny"
    train = coco_dataset(coco / "train2017", coco / "annotations/instances_train2017.json", (640, 640))
    calib = list(torch.utils.data.DataLoader(train, batch_size=8, collate_fn=detection_collate))
    return load_yolov5_checkpoint(ASSETS / "models/yolov5n.pt"), calib, torch.rand(1, 3, 640, 640)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=[*SETUPS, "yolov5n"])
    p.add_argument("--weights", choices=["per_channel", "per_tensor"], default="per_channel")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), help=f"of {list(CONFIGS)}")
    p.add_argument("--cost-only", action="store_true", help="time the algorithms, score nothing")
    p.add_argument("--target", choices=TARGETS, default="tensorrt",
                   help="the recipe's target profile (targets.py): fixed_point forces per-tensor power-of-two scales")
    p.add_argument("--faithful", action="store_true", help="also score the Q/DQ ONNX in ONNX Runtime (faithful)")
    p.add_argument("--no-float-rows", action="store_true", help="do not score the float model CLE left (faster)")
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    if unknown := [c for c in args.configs if c not in CONFIGS]:
        sys.exit(f"unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    torch.manual_seed(0)
    print(f"CPU: {cpu_info().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.model == "yolov5n":
        fp32, calib, example = yolov5n_setup()
        evals = None
    else:
        setup = SETUPS[args.model]
        fp32 = resolve_model(setup["model"]).eval()
        calib = load_batches(setup["data"], "calibration")
        c, h, w = setup["model"].input_size
        example = calib[0][0][:4]
        evals = None if args.cost_only else load_batches(setup["data"], "evaluation")
    n_calib = sum(len(x) for x, *_ in calib)
    if evals is None:
        print(f"# {args.model}: cost of the algorithms, {args.weights} weights, {n_calib} calibration images\n")
        print("| configuration | quantize_ s (all) | seconds per algorithm |\n|---|---|---|")
        for title in args.configs:
            _, result, seconds = quantize(fp32, args.weights, CONFIGS[title], calib, example, args.target)
            print(f"| {title} | {seconds:.1f} | {seconds_of(result)} |", flush=True)
        return
    n_eval = sum(len(x) for x, _ in evals)
    print(f"# {args.model}: target {args.target}, {args.weights} weights, mse ranges, {n_calib} calibration images, "
          f"{n_eval} evaluation images (one image = {100 / n_eval:.2f} points)\n")
    ref = score(fp32, evals)
    print("| configuration | top-1 | - FP32 [95% CI] | - PTQ [95% CI] | agreement with FP32 % | seconds per "
          "algorithm |\n|---|---|---|---|---|---|")
    rows = [f"| FP32 | {ref['top1']:.2f} | - | - | 100.00 | - |"]
    print(rows[-1], flush=True)
    ptq = None
    tmp = Path(tempfile.mkdtemp())
    for title in args.configs:
        model, result, seconds = quantize(fp32, args.weights, CONFIGS[title], calib, example, args.target)
        fq = score(model, evals, ref["outputs"])
        ptq = ptq or (fq if not CONFIGS[title] else None)
        vs_ptq = interval(fq, ptq) if ptq is not None and CONFIGS[title] else "-"
        rows.append(f"| {title} | {fq['top1']:.2f} | {interval(fq, ref)} | {vs_ptq} | {fq['agreement_top1']:.2f} | "
                    f"{seconds_of(result)} |")
        print(rows[-1], flush=True)
        if args.faithful:
            from workbench.qdq.export import export_onnx
            from workbench.runtime.runners import OrtRunner

            path = export_onnx(model, example[:1], tmp / f"{len(rows)}.onnx")
            faithful = score(OrtRunner(path, "f", "faithful"), evals, ref["outputs"])
            rows.append(f"| {title}, ORT faithful | {faithful['top1']:.2f} | {interval(faithful, ref)} | - | "
                        f"{faithful['agreement_top1']:.2f} | - |")
            print(rows[-1], flush=True)
        # the float model CLE left (ReLU6 -> ReLU where swapped)
        if not args.no_float_rows and any(r.name == "cle" for r in result.algorithms):
            from workbench.quant.algorithms.base import AlgorithmContext

            ctx = AlgorithmContext(model, None, result, lambda m: None, example)
            with ctx.float_mode():
                fl = score(model, evals, ref["outputs"])
            rows.append(f"| {title}: its float model | {fl['top1']:.2f} | {interval(fl, ref)} | - | "
                        f"{fl['agreement_top1']:.2f} | - |")
            print(rows[-1], flush=True)
        for r in result.algorithms:
            if r.skipped:
                print(f"  {title}: {r.name} skipped {len(r.skipped)}: {list(r.skipped.items())[:2]}", file=sys.stderr)
        print(f"  done {title}: {fq['top1']:.2f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
