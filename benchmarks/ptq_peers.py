"""PTQ against its peers on the same files: NNCF, AIMET and Brevitas next to the workbench (issue 25).

    python benchmarks/ptq_peers.py efficientnet_lite0 resnet20 yolov5n [--threads 2] [--latency]
    python benchmarks/ptq_peers.py efficientnet_lite0 --peers nncf_fast nncf_full --workbench today
    python benchmarks/ptq_peers.py resnet20 --peers brevitas --workbench today fixed_point

Every model is opened once through a workbench run (its recipe below: calibrate, export, build), which gives the
calibration images, the evaluation images, the FP32 model and its ONNX. Each peer then quantizes that same FP32
model on the same calibration batches, and every result, the workbench's and each peer's, is scored on the same
evaluation images by the workbench's scorer (workbench.tasks) with its paired 95% bootstrap interval against the
FP32 model on those images (workbench.stats). The peers:

- nncf_fast / nncf_full: `nncf.quantize` on `model_fp32.onnx` read by OpenVINO (the path of
  benchmarks/openvino_int8.py), fast or full (empirical) bias correction, weights per tensor where the model's
  recipe quantizes them per tensor; scored and timed in OpenVINO.
- aimet_cle / aimet_adaround: aimet-torch on the FP32 PyTorch model: cross-layer equalization (with high-bias
  absorption), then AdaRound for the second; scored in AIMET's QuantizationSimModel (PyTorch fake quant).
  aimet-torch 2.x has no bias correction.
- brevitas: the fixed-point arithmetic: 8-bit per-tensor power-of-two scales for weights and activations
  (`Int8WeightPerTensorFixedPoint`, `Int8ActPerTensorFixedPoint`), calibrated with `calibration_mode`, then
  `bias_correction_mode`; scored in Brevitas' PyTorch fake quant.

The workbench side is a list of recipe overrides per model (WORKBENCH below; `--workbench NAME ...` picks some,
`--set-workbench 'label=override;override'` adds one): each is a full recipe run on the same data. A
configuration that this checkout's recipe schema refuses (an option not merged yet) is reported as such and the
rest goes on. `--latency` times every OpenVINO graph of the run once, interleaved in one process, at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# WORKBENCH_SRC: the checkout whose workbench runs the workbench rows (another helper's worktree whose branch does
# not merge cleanly yet); imported first, so the benchmarks imported below (which put this checkout on sys.path)
# reuse it.
sys.path.insert(0, os.environ.get("WORKBENCH_SRC") or str(Path(__file__).resolve().parents[1]))
import workbench  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ort_int8 import ASSETS, interleaved_latency  # noqa: E402

A = str(ASSETS)

# One image of the evaluation split is worth 100 / N points of top-1; the splits are fixed here so that every
# configuration and every peer sees the same files.
DATA = {
    # Lossless CIFAR-10: 512 seeded train images calibrate, 2,000 seeded test images evaluate (0.05 points each).
    "resnet20": f"""task: classification
model: {{spec: "cifar_resnet:resnet20", weights: "{A}/models/cifar10_resnet20.th", input_size: [3, 32, 32]}}
data:
  transform: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
  calibration: {{source: imagefolder, path: "{A}/data/cifar10/train", count: 512, seed: 0}}
  evaluation: {{source: imagefolder, path: "{A}/data/cifar10/test", count: 2000, seed: 0}}
  batch_size: 250
""",
    # Issue 18's split of the 1,000 imagenet_samples by the last digit of the WordNet id: at most 300 of the 484
    # even ones calibrate (seeded draw, the evaluation transform), the 516 odd ones evaluate (0.19 points each).
    # No image and no class is in both.
    "efficientnet_lite0": f"""task: classification
model: {{spec: "efficientnet_lite:efficientnet-lite0", input_size: [3, 224, 224]}}
data:
  transform: {{resize: 256, crop: 224, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
  calibration: {{source: files, path: "{A}/data/imagenet_samples", pattern: "n*[02468]_*.JPEG", labels: wnid_prefix,
                 count: {{calib_count}}, seed: 0}}
  evaluation: {{source: files, path: "{A}/data/imagenet_samples", pattern: "n*[13579]_*.JPEG", labels: wnid_prefix}}
  batch_size: 32
""",
    # coco_tiny: the 80 train2017 images calibrate, the 80 val2017 images evaluate (benchmarks/openvino_int8.py).
    "yolov5n": f"""task: detection
model: {{spec: "yolov5:{A}/models/yolov5n.pt", input_size: [3, 640, 640]}}
detection: {{conf: 0.001, iou: 0.6, max_det: 300}}
data:
  transform: {{letterbox: [640, 640], stride: 32}}
  calibration: {{source: coco, path: "{A}/data/coco_tiny/train2017",
                 annotations: "{A}/data/coco_tiny/annotations/instances_train2017.json"}}
  evaluation: {{source: coco, path: "{A}/data/coco_tiny/val2017",
                annotations: "{A}/data/coco_tiny/annotations/instances_val2017.json"}}
  batch_size: 8
""",
}
# Today's PTQ per model: the baselines (per-tensor weights for the two classifiers, the OpenVINO build).
STAGES = {
    "resnet20": "  - calibrate: {method: mse, weights: per_tensor}\n  - export: {}\n",
    "efficientnet_lite0": ("  - calibrate: {method: mse, weights: per_tensor}\n  - export: {}\n"
                           "  - build: {engine: openvino}\n"),
    "yolov5n": "  - calibrate: {method: mse}\n  - export: {}\n  - build: {engine: openvino}\n",
}
PER_TENSOR = {"resnet20": True, "efficientnet_lite0": True, "yolov5n": False}

# The workbench's configurations: recipe overrides on top of DATA + STAGES (issue 25's `target:` profiles and the
# calibrate stage's `algorithms:` list, CONTRACT25). "today" is the recipe as it stands. The fixed-point rows skip
# the OpenVINO build (their engine is an FPGA's or DSP's: the faithful graph is what they compute).
@dataclass(frozen=True)
class Config:
    overrides: tuple[str, ...] = ()
    build: bool = True


_BC = "{name: bias_correction, mode: full}"
_ADAROUND = "{name: adaround, iterations: ITERATIONS}"  # --adaround-iterations, the same as AIMET's
_OPENVINO = "target={name: openvino, cpu: auto}"
WORKBENCH: dict[str, dict[str, Config]] = {
    "resnet20": {
        "today": Config(),
        "fixed_point": Config(("target=fixed_point",), build=False),
        "fixed_point+cle+bc": Config(("target=fixed_point", f"stages.calibrate.algorithms=[cle, {_BC}]"), False),
    },
    "efficientnet_lite0": {
        "today": Config(),
        "cle+bc": Config((f"stages.calibrate.algorithms=[cle, {_BC}]",)),
        "cle+bc+adaround": Config((f"stages.calibrate.algorithms=[cle, {_BC}, {_ADAROUND}]",)),
        "openvino+cle+bc": Config((_OPENVINO, f"stages.calibrate.algorithms=[cle, {_BC}]")),
        "fixed_point": Config(("target=fixed_point",), build=False),
        "fixed_point+cle+bc": Config(("target=fixed_point", f"stages.calibrate.algorithms=[cle, {_BC}]"), False),
    },
    "yolov5n": {
        "today": Config(),
        "openvino": Config((_OPENVINO,)),
        "openvino+bc": Config((_OPENVINO, f"stages.calibrate.algorithms=[{_BC}]")),
    },
}
PEERS = {"resnet20": ["brevitas"],
         "efficientnet_lite0": ["nncf_fast", "nncf_full", "aimet_cle", "aimet_adaround", "brevitas"],
         "yolov5n": ["nncf_fast"]}


def recipe_text(model: str, calib_count: int = 300) -> str:
    """The recipe of `model` without stages: the data split every configuration and every peer uses."""
    return DATA[model].replace("{calib_count}", str(calib_count))


def split_files(model: str, calib_count: int = 300) -> dict[str, list[str]]:
    """The files of each split, in order, as the workbench's data sources read them (the benchmark's split:
    deterministic, and disjoint for the classifiers)."""
    from workbench.data import build_dataset
    from workbench.recipe import parse_recipe

    recipe = parse_recipe(f"name: split_{model}\n" + recipe_text(model, calib_count) + "stages:\n  - calibrate: {}\n",
                          f"{model} (split)")
    def files(dataset) -> list[str]:  # a classification dataset's samples, a detection dataset's records
        return [str(getattr(s, "key", None) or getattr(s, "path", s)) for s in
                (getattr(dataset, "samples", None) or dataset.records)]

    return {split: files(build_dataset(recipe.data, split)) for split in ("calibration", "evaluation")}


@dataclass
class Row:
    """One quantized model's result on the evaluation images."""

    who: str  # workbench / NNCF x.y / ...
    what: str  # the configuration
    graph: str  # where it was scored: fake quant, faithful ONNX, OpenVINO
    metrics: dict | None = None
    interval: Any = None  # stats.Interval against FP32 on the same images
    seconds: float | None = None  # time to quantize
    note: str = ""


@dataclass
class Bench:
    """What one model's benchmark hands around: the base run (data, FP32 model, FP32 ONNX) and the results."""

    name: str
    base: Any  # workbench Run of the "today" configuration
    fp32_scorer: Any = None
    fp32_metrics: dict | None = None
    rows: list[Row] = field(default_factory=list)
    timed: dict[str, Callable] = field(default_factory=dict)  # OpenVINO graphs for --latency
    scored_in: tuple[str, ...] = ("fake_quant", "faithful", "openvino")  # where the workbench's rows are scored
    fp32_in: str = "PyTorch"  # where the FP32 reference was scored


def torch_runner(model) -> Callable:
    import torch

    model = model.eval()

    def run(images):
        with torch.no_grad():
            out = model(images)
        return getattr(out, "value", out)  # Brevitas' QuantTensor: its dequantized value

    return run


def score(bench: Bench, runner: Callable):
    """The workbench's scorer over the evaluation images; (metrics, scorer)."""
    run = bench.base
    scorer = run.task.scorer(run.recipe, run.dataset("evaluation"))
    for images, labels in run.loader("evaluation"):
        scorer.update(runner(images), labels)
    return scorer.result(), scorer


def add_row(bench: Bench, row: Row, runner: Callable | None) -> None:
    if runner is not None:
        row.metrics, scorer = score(bench, runner)
        row.interval = bench.base.task.delta(scorer, bench.fp32_scorer)
    bench.rows.append(row)
    print(f"  {row.who} | {row.what} | {row.graph}: {_points(bench, row.metrics)} {_describe(row.interval)}"
          f"{' ' + row.note if row.note else ''}", flush=True)


def calibration_batches(bench: Bench) -> list:
    return [images for images, _ in bench.base.loader("calibration")]


# ----------------------------------------------------------------------------------------------------- workbench
def workbench_run(name: str, config: Config, args):
    from workbench import api
    from workbench.recipe import parse_recipe

    stages = STAGES[name] if config.build else STAGES[name].replace("  - build: {engine: openvino}\n", "")
    text = (f"name: peers_{name}\n" + recipe_text(name, args.calib_count) + "stages:\n" + stages
            + f'runs_dir: "{args.runs_dir}"\n')
    overrides = [o.replace("ITERATIONS", str(args.adaround_iterations)) for o in config.overrides]
    return api.run(parse_recipe(text, f"{name} (benchmark)", overrides))


def workbench_rows(bench: Bench, label: str, run, seconds: float, threads: int | None) -> None:
    from workbench.runtime.openvino import OpenVINORunner
    from workbench.runtime.runners import OrtRunner

    arithmetic = getattr(run, "arithmetic", None)  # issue 25's target profile, where this checkout has it
    if arithmetic is not None:  # the weights as quantized: the profile's, or the calibrate stage's per_tensor
        import dataclasses

        weights = arithmetic.weights_for("per_tensor" if PER_TENSOR[bench.name] else "per_channel")
        arithmetic = dataclasses.replace(arithmetic, weight_granularity=weights)
    note = f"whole recipe {seconds:.0f} s" + (f"; {arithmetic.describe()}" if arithmetic is not None else "")
    algos = run.metrics["stages"].get("calibrate", {}).get("algorithms")
    if algos:
        note += "; " + ", ".join(f"{a.get('name')} {a.get('seconds', 0):.1f} s" for a in algos if isinstance(a, dict))
    scored_in = bench.scored_in
    if "fake_quant" in scored_in:
        add_row(bench, Row("workbench", label, "fake quant (PyTorch)", seconds=seconds, note=note),
                torch_runner(run.model))
    else:
        print(f"  workbench | {label}: {note}", flush=True)
    if (run.dir / "model.onnx").is_file() and "faithful" in scored_in:
        add_row(bench, Row("workbench", label, "faithful Q/DQ ONNX (ORT)"),
                OrtRunner(run.dir / "model.onnx", "faithful", "faithful"))
    build = run.metrics["stages"].get("build")
    if build is not None and "openvino" in scored_in:
        if build.get("built"):
            runner = OpenVINORunner(run.dir / "model_openvino_int8.xml", f"wb_{label}", threads)
            add_row(bench, Row("workbench", label, "OpenVINO INT8", note=f"{build['int8']['int8']}"), runner)
            bench.timed[f"workbench {label}"] = runner
        else:
            add_row(bench, Row("workbench", label, "OpenVINO INT8", note=f"not built: {build.get('reason')}"), None)


# ---------------------------------------------------------------------------------------------------------- NNCF
def nncf_peer(bench: Bench, fast: bool, threads: int | None) -> None:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from openvino_int8 import nncf_quantize

    from workbench.runtime.openvino import OpenVINORunner

    options: dict[str, Any] = {"fast_bias_correction": fast}
    if PER_TENSOR[bench.name]:
        # NNCF's per-tensor weights: its advanced parameters' weight quantization (per_channel=False).
        options["advanced_parameters"] = AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(per_channel=False))
    label = ("fast" if fast else "full") + " bias correction"
    xml = bench.base.dir / f"nncf_{'fast' if fast else 'full'}_int8.xml"
    seconds, census = nncf_quantize(bench.base, xml, threads, **options)
    runner = OpenVINORunner(xml, f"nncf_{label}", threads)
    add_row(bench, Row(f"NNCF {nncf.__version__}", label + (", per-tensor weights" if PER_TENSOR[bench.name] else ""),
                       "OpenVINO INT8", seconds=seconds, note=census), runner)
    bench.timed[f"NNCF {label}"] = runner


# --------------------------------------------------------------------------------------------------------- AIMET
def aimet_peer(bench: Bench, adaround: bool, iterations: int, adaround_batches: int) -> None:
    """aimet-torch on the FP32 PyTorch model: CLE (`equalize_model`: BatchNorm fold, cross-layer scaling, high-bias
    absorption), then, for the AdaRound row, AdaRound's weight rounding; W8A8 in AIMET's QuantizationSimModel with
    its default config (per-tensor symmetric weights, asymmetric activations), tf_enhanced ranges. aimet-torch 2.x
    has no bias correction API (aimet_torch.bias_correction of 1.x is gone), so no AIMET bias-correction row."""
    import aimet_torch
    import torch
    from aimet_common.defs import QuantScheme
    from aimet_torch.cross_layer_equalization import equalize_model
    from aimet_torch.quantsim import QuantizationSimModel

    batches = calibration_batches(bench)
    model = copy.deepcopy(bench.base.reference).eval().cpu()
    dummy = batches[0][:1]
    scheme = QuantScheme.post_training_tf_enhanced
    start = time.perf_counter()
    equalize_model(model, dummy_input=dummy)
    steps = ["CLE"]

    def forward(m, _=None):
        with torch.no_grad():
            for b in batches:
                m(b)

    if adaround:
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters

        used = batches[:adaround_batches]
        params = AdaroundParameters(data_loader=[(b, None) for b in used], num_batches=len(used),
                                    default_num_iterations=iterations)
        path = bench.base.dir / "aimet_adaround"
        path.mkdir(exist_ok=True)
        model = Adaround.apply_adaround(model, dummy, params, path=str(path), filename_prefix="adaround",
                                        default_param_bw=8, default_quant_scheme=scheme)
        sim = QuantizationSimModel(model, dummy, quant_scheme=scheme, default_param_bw=8, default_output_bw=8)
        sim.set_and_freeze_param_encodings(str(path / "adaround.encodings"))
        steps.append(f"AdaRound ({iterations} iterations per layer, {sum(len(b) for b in used)} images)")
    else:
        sim = QuantizationSimModel(model, dummy, quant_scheme=scheme, default_param_bw=8, default_output_bw=8)
    sim.compute_encodings(forward, None)
    seconds = time.perf_counter() - start
    add_row(bench, Row(f"AIMET {aimet_torch.__version__}", " + ".join(steps) + ", per-tensor weights",
                       "fake quant (QuantizationSimModel)", seconds=seconds), torch_runner(sim.model))


# ------------------------------------------------------------------------------------------------------ Brevitas
def brevitas_peer(bench: Bench, equalize_iters: int) -> None:
    """Brevitas' fixed point, through its FlexML target (Xilinx's fixed-point flow): the model traced, BatchNorm
    merged, every Conv2d / Linear with 8-bit per-tensor power-of-two weights (`Int8WeightPerTensorFixedPoint`,
    16-bit biases), every activation and residual input 8-bit power-of-two (`Int8ActPerTensorFixedPoint`, unsigned
    after ReLU); calibrated with `calibration_mode`, then `bias_correction_mode`; once without and once with
    Brevitas' cross-layer equalization (`equalize_iters`). A model FX cannot trace gets the layer-wise flow
    (weights and layer inputs only), said in the row."""
    import brevitas
    import torch
    from brevitas.graph.calibrate import bias_correction_mode, calibration_mode

    batches = calibration_batches(bench)
    who = f"Brevitas {brevitas.__version__}"
    for iters in sorted({0, equalize_iters}):
        model = copy.deepcopy(bench.base.reference).eval().cpu()
        start = time.perf_counter()
        try:
            quant, flow = _brevitas_flexml(model, batches[0][:2], iters)
        except Exception as error:  # FX cannot trace every model's forward
            from brevitas.graph.quantize import layerwise_quantize
            from brevitas.nn import QuantConv2d, QuantLinear
            from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint

            if iters:
                continue
            fixed = {"weight_quant": Int8WeightPerTensorFixedPoint, "input_quant": Int8ActPerTensorFixedPoint,
                     "return_quant_tensor": False}
            layers = {torch.nn.Conv2d: (QuantConv2d, fixed), torch.nn.Linear: (QuantLinear, fixed)}
            quant = layerwise_quantize(model, compute_layer_map=layers).eval()
            flow = f"layer-wise (FX trace failed: {type(error).__name__})"
        with torch.no_grad(), calibration_mode(quant):
            for b in batches:
                quant(b)
        calibrated = time.perf_counter() - start
        what = f"fixed point po2 per-tensor W8A8, {flow}" + (f", CLE {iters} iterations" if iters else "")
        if not iters:
            add_row(bench, Row(who, what + ", calibration", "fake quant (PyTorch)", seconds=calibrated),
                    torch_runner(quant))
        start = time.perf_counter()
        with torch.no_grad(), bias_correction_mode(quant):
            for b in batches:
                quant(b)
        add_row(bench, Row(who, what + ", calibration + bias correction", "fake quant (PyTorch)",
                           seconds=calibrated + time.perf_counter() - start), torch_runner(quant))


def _brevitas_flexml(model, probe, equalize_iters: int):
    """(quantized graph, description): Brevitas' FlexML flow. ReLU6 is kept (its default turns it into ReLU, which
    changes EfficientNet-Lite's FP32 function) except with CLE, whose scaling ReLU6 does not commute with: there it
    is Brevitas' default. Where a traced graph cannot run with QuantTensors between layers (Brevitas 0.13 cannot
    slice one: the option-A shortcut of the CIFAR ResNets), the same quantizers hand over plain tensors and biases
    stay float."""
    from brevitas.graph.target import flexml

    graph = flexml.preprocess_for_flexml_quantize(copy.deepcopy(model), probe[:1], equalize_iters=equalize_iters,
                                                  relu6_to_relu=equalize_iters > 0)
    try:
        quant = flexml.quantize_flexml(copy.deepcopy(graph)).eval()
        quant(probe)
        return quant, "FlexML graph"
    except Exception:
        def plain(table: dict) -> dict:
            out = {}
            for key, (cls, kwargs) in table.items():
                kwargs = dict(kwargs)
                kwargs.update({k: v for k, v in (("return_quant_tensor", False), ("bias_quant", None))
                               if k in kwargs})
                out[key] = (cls, kwargs)
            return out

        quant = flexml.quantize_flexml(graph, quant_identity_map=plain(flexml.FLEXML_QUANT_IDENTITY_MAP),
                                       compute_layer_map=plain(flexml.FLEXML_COMPUTE_LAYER_MAP),
                                       quant_act_map=plain(flexml.FLEXML_QUANT_ACT_MAP)).eval()
        quant(probe)
        return quant, "FlexML graph, plain tensors between layers, float biases"


# ---------------------------------------------------------------------------------------------------------- main
def run_peer(bench: Bench, peer: str, args) -> None:
    try:
        if peer in ("nncf_fast", "nncf_full"):
            nncf_peer(bench, peer == "nncf_fast", args.threads)
        elif peer in ("aimet_cle", "aimet_adaround"):
            aimet_peer(bench, peer == "aimet_adaround", args.adaround_iterations, args.adaround_batches)
        elif peer == "brevitas":
            brevitas_peer(bench, args.equalize_iters)
        else:
            raise ValueError(f"unknown peer {peer!r}")
    except Exception as error:  # a peer that does not run here is a finding to report, not the end of the run
        traceback.print_exc(limit=3)
        add_row(bench, Row(peer, "-", "-", note=f"did not run: {type(error).__name__}: {str(error)[:300]}"), None)


def _points(bench: Bench, metrics: dict | None) -> str:
    if not metrics:
        return "-"
    unit, value = bench.base.task.headline_points(metrics)
    return "-" if value is None else f"{value:.2f}"


def _describe(interval) -> str:
    return f"{interval.delta:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]" if interval is not None else "-"


def print_table(bench: Bench) -> None:
    run = bench.base
    unit, fp32 = run.task.headline_points(bench.fp32_metrics)
    samples = bench.fp32_metrics.get("samples", "?")
    step = run.task.metric_step(samples) if isinstance(samples, int) else None
    print(f"\n## {bench.name}: {samples} evaluation images"
          + (f" (one image is {step:.2f} points)" if step else "")
          + f", FP32 ({bench.fp32_in}) {unit} {fp32:.2f}; run {run.dir}\n")
    print(f"| Who | Configuration | Scored in | {unit} | vs FP32 (95% paired bootstrap) | quantize s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in bench.rows:
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        print(f"| {r.who} | {r.what} | {r.graph} | {_points(bench, r.metrics)} | {_describe(r.interval)} | "
              f"{seconds} | {r.note} |")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", choices=list(DATA))
    p.add_argument("--peers", nargs="*", default=None, help="default: every peer of each model (PEERS)")
    p.add_argument("--workbench", nargs="*", default=None,
                   help="the workbench configurations to run (keys of WORKBENCH); default: all. 'today' is the base")
    p.add_argument("--set-workbench", nargs="*", default=[], metavar="LABEL=OVERRIDE;OVERRIDE",
                   help="an extra workbench configuration: its label and its recipe overrides, ';'-separated")
    p.add_argument("--calib-count", type=int, default=300, help="EfficientNet-Lite0 calibration images (<= 484)")
    p.add_argument("--adaround-iterations", type=int, default=300,
                   help="AIMET AdaRound iterations per layer (its default, 10,000, is hours on 2 CPU cores)")
    p.add_argument("--adaround-batches", type=int, default=4, help="AIMET AdaRound calibration batches")
    p.add_argument("--equalize-iters", type=int, default=20, help="Brevitas' CLE iterations in its CLE row")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--latency", action="store_true", help="time the OpenVINO graphs, interleaved, at the end")
    p.add_argument("--runs-dir", default="/tmp/workbench_bench_peers")
    p.add_argument("--scored-in", nargs="+", default=["fake_quant", "faithful", "openvino"],
                   choices=["fake_quant", "faithful", "openvino"], help="where the workbench's rows are scored")
    p.add_argument("--fp32-in", choices=["pytorch", "openvino"], default="pytorch",
                   help="the FP32 reference: the PyTorch model, or its OpenVINO FP32 compile (faster on a busy CPU)")
    p.add_argument("--resume-base", type=Path, help="the base configuration's run, made earlier: resumed, not rerun")
    args = p.parse_args()
    if not (ASSETS / "models").is_dir():
        sys.exit(f"shared assets not found at {ASSETS}: set WORKBENCH_ASSETS=../shared/assets")
    os.environ.setdefault("WORKBENCH_ASSETS", str(ASSETS))
    from workbench.runtime.cpu import cpu_info

    print(f"# CPU {cpu_info().describe()}; {args.threads or os.cpu_count()} threads; {_versions()}; workbench from "
          f"{Path(workbench.__file__).parents[1]}\n", flush=True)
    benches = []
    for name in args.models:
        configs = {k: WORKBENCH[name][k] for k in (WORKBENCH[name] if args.workbench is None else args.workbench)
                   if k in WORKBENCH[name]}
        for extra in args.set_workbench:
            label, _, overrides = extra.partition("=")
            configs[label] = Config(tuple(o for o in overrides.split(";") if o))
        print(f"## {name}", flush=True)
        # The first configuration's run is the base: its data, FP32 model and FP32 ONNX serve every peer.
        first = next(iter(configs), "today")
        start = time.perf_counter()
        if args.resume_base:
            from workbench import api

            base = api.run(None, resume=args.resume_base)
        else:
            base = workbench_run(name, configs.get(first, Config()), args)
        bench = Bench(name, base, scored_in=tuple(args.scored_in))
        from workbench.runtime.openvino import OpenVINORunner
        from workbench.runtime.runners import OrtRunner

        fp32_xml = base.dir / "model_openvino_fp32.xml"
        fp32_runner = (OpenVINORunner(fp32_xml, "fp32", args.threads) if args.fp32_in == "openvino"
                       and fp32_xml.is_file() else torch_runner(base.reference))
        bench.fp32_metrics, bench.fp32_scorer = score(bench, fp32_runner)
        calib = sum(len(b) for b in calibration_batches(bench))
        bench.fp32_in = "OpenVINO" if isinstance(fp32_runner, OpenVINORunner) else "PyTorch"
        print(f"  FP32 ({bench.fp32_in}): "
              f"{_points(bench, bench.fp32_metrics)}; {calib} calibration images", flush=True)
        if fp32_xml.is_file():
            bench.timed["FP32 OpenVINO"] = OpenVINORunner(base.dir / "model_openvino_fp32.xml", "fp32", args.threads)
            bench.timed["FP32 ONNX Runtime"] = OrtRunner(base.dir / "model_fp32.onnx", "fp32", "default", args.threads)
        if first in configs:
            workbench_rows(bench, first, base, time.perf_counter() - start, args.threads)
        for peer in (PEERS[name] if args.peers is None else [q for q in args.peers if q in PEERS[name]]):
            run_peer(bench, peer, args)
        for label, config in configs.items():
            if label == first:
                continue
            start = time.perf_counter()
            try:
                run = workbench_run(name, config, args)
            except (Exception, SystemExit) as error:  # an option this checkout does not know yet
                add_row(bench, Row("workbench", label, "-", note=f"not run: {type(error).__name__}: "
                                                                 f"{str(error)[:300]} (overrides {config.overrides})"),
                        None)
                continue
            workbench_rows(bench, label, run, time.perf_counter() - start, args.threads)
        print_table(bench)
        benches.append(bench)
    if args.latency:
        for bench in benches:
            if not bench.timed:
                continue
            latency = interleaved_latency(bench.timed, tuple(bench.base.recipe.model.input_size))
            fastest = min(v["b8"]["median_ms"] for k, v in latency.items() if k.startswith("FP32"))
            print(f"\n### {bench.name}: latency, interleaved (best of 3 rounds' medians, ms)\n")
            print("| Graph | b1 ms | b8 ms | b8 speed-up vs fastest FP32 |\n|---|---|---|---|")
            for label, t in latency.items():
                print(f"| {label} | {t['b1']['median_ms']:.2f} | {t['b8']['median_ms']:.2f} | "
                      f"{fastest / t['b8']['median_ms']:.2f}x |")
            print(flush=True)


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for package in ("torch", "openvino", "onnxruntime", "nncf", "aimet-torch", "brevitas", "nvidia-modelopt"):
        with contextlib.suppress(md.PackageNotFoundError):
            found.append(f"{package} {md.version(package)}")
    return ", ".join(found)


if __name__ == "__main__":
    main()
