"""INT8 on the CPU with OpenVINO: the workbench's engine against NNCF's on the same model and images.

    python benchmarks/openvino_int8.py resnet20 efficientnet_lite0 yolov5n [--threads 2] [--skip-nncf]

For each model the workbench runs its recipe (calibrate, export, build with engine openvino: the graph
the build stage picks for this CPU, guarded against the faithful graph), then NNCF quantizes the same
FP32 model (model_fp32.onnx read by OpenVINO) with `nncf.quantize` on the same calibration images
(yolov5n with its box decode in the ignored scope, as NNCF's YOLO examples do, and the MIXED preset).
Every graph is compiled by the same OpenVINO, scored on the evaluation split by the workbench's scorer,
and timed in the same process, interleaved (batch 1 and 8, the best of 3 rounds' medians), with the same
thread count. Prints markdown tables with the CPU's model and INT8 instruction sets.

    python benchmarks/openvino_int8.py resnet20 --reuse RUNS_DIR --assets DIR --skip-nncf

measures runs made earlier (on another machine: the device's CPU) without calibrating or exporting again:
it compiles their model_fp32.onnx and model_openvino_int8.onnx with this machine's OpenVINO, with the
evaluation data under --assets in place of the paths their recipe.yaml names.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ort_int8 import ASSETS, RECIPES, interleaved_latency, score  # noqa: E402

from workbench import api  # noqa: E402
from workbench.hardware.cpu import cpu_info  # noqa: E402
from workbench.recipe import parse_recipe  # noqa: E402
from workbench.runtime.openvino import OpenVINORunner, int8_summary, layer_precisions, save_ir  # noqa: E402
from workbench.runtime.runners import OrtRunner  # noqa: E402

METHOD = {"resnet20": "mse", "efficientnet_lite0": "mse", "yolov5n": "mse"}


def nncf_quantize(run, out_xml: Path, threads: int | None, **options) -> tuple[float, str]:
    """NNCF's post-training quantization of the run's FP32 graph on its calibration images; (seconds, INT8 census).
    `options` go to `nncf.quantize` as they are (fast_bias_correction, advanced_parameters: benchmarks/ptq_peers.py)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(run.dir / "model_fp32.onnx"))
    images = [batch.numpy() for batch, _ in run.loader("calibration")]
    samples = sum(len(b) for b in images)
    dataset = nncf.Dataset(images)
    kwargs = {"subset_size": samples, **options}
    if run.recipe.task == "detection":
        # The box decode after the head's convolutions stays float, as NNCF's YOLO examples keep it (and as the
        # workbench does): every node of the Detect module (model.24) but its convolutions. MIXED: symmetric
        # weights, asymmetric activations (SiLU outputs are signed).
        kwargs["preset"] = nncf.QuantizationPreset.MIXED
        kwargs["ignored_scope"] = nncf.IgnoredScope(patterns=[r".*/model\.24/(?!m\.\d+/Conv).*"], validate=False)
    start = time.perf_counter()
    quantized = nncf.quantize(model, dataset, **kwargs)
    seconds = time.perf_counter() - start
    save_ir(quantized, out_xml)
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    return seconds, int8_summary(layer_precisions(core.compile_model(str(out_xml), "CPU", config)))


def reused_run(runs_dir: Path, name: str, assets: Path | None, threads: int | None):
    """A run of `name` made earlier, reopened for measuring: its recipe (data under `assets`), and OpenVINO models
    compiled here from the ONNX files it holds (the u8 INT8 graph is for CPUs with VNNI or AMX)."""
    from workbench.recipe import parse_recipe
    from workbench.run import Run
    from workbench.runtime import openvino
    from workbench.tasks import Classes

    run_dir = sorted(runs_dir.glob(f"bench_ort_{name}-*"))[-1]
    text = (run_dir / "recipe.yaml").read_text()
    if assets is not None:
        text = text.replace(str(ASSETS), str(assets.resolve()))
    recipe = parse_recipe(text, str(run_dir / "recipe.yaml"))
    import json

    import onnx
    import torch

    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = onnx.load(str(run_dir / "model_fp32.onnx"), load_external_data=False).graph.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    classes = dims[-1] - 5 if recipe.task == "detection" else None  # a YOLOv5 head's (B, N, 5 + classes)
    run = Run(recipe=recipe, dir=run_dir, model=None, reference=None, device=torch.device("cpu"), metrics=metrics,
              _classes=Classes(classes))
    build = {"built": True}
    for key, graph in (("fp32", "model_fp32.onnx"), ("int8", "model_openvino_int8.onnx")):
        xml = run_dir / f"model_openvino_{key}.xml"
        request = openvino.CompileRequest(onnx=run_dir / graph, xml=xml, threads=threads)
        build[key] = openvino.compile_model_file(request)
    run.metrics["stages"]["build"] = {**run.metrics["stages"].get("build", {}), **build}
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", choices=list(RECIPES))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every runtime (default: all cores)")
    p.add_argument("--runs-dir", default="/tmp/workbench_bench_openvino")
    p.add_argument("--skip-nncf", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides, e.g. stages.build.openvino_weights=reduce_range")
    p.add_argument("--reuse", type=Path, help="measure the runs in this folder, made earlier, instead of running")
    p.add_argument("--assets", type=Path, help="with --reuse: the evaluation data's root in place of the recipe's")
    args = p.parse_args()
    import onnxruntime
    import openvino

    cpu = cpu_info()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"# OpenVINO {openvino.get_version()}, ONNX Runtime {onnxruntime.__version__}; CPU {cpu.describe()}"
          + (f", oneDNN ISA capped at {cap}" if cap else "") + f"; {args.threads or os.cpu_count()} threads"
          + (f"; overrides {' '.join(args.set)}" if args.set else "") + "\n")
    for name in args.models:
        recipe = RECIPES[name].replace("calibrate: {method: max}", f"calibrate: {{method: {METHOD[name]}}}")
        recipe += (f"  - export: {{}}\n  - build: {{engine: openvino}}\nruns_dir: \"{args.runs_dir}\"\n")
        start = time.perf_counter()
        if args.reuse:
            run = reused_run(args.reuse, name, args.assets, args.threads)
        else:
            run = api.run(parse_recipe(recipe, f"{name} (benchmark)", args.set))
        wb_seconds = time.perf_counter() - start
        build = run.metrics["stages"]["build"]
        shape = tuple(run.recipe.model.input_size)
        graphs = {
            "FP32 (ONNX Runtime)": OrtRunner(run.dir / "model_fp32.onnx", "ort_fp32", "default", args.threads),
            "FP32 (OpenVINO)": OpenVINORunner(run.dir / "model_openvino_fp32.xml", "ov_fp32", args.threads),
        }
        if (run.dir / "model.onnx").is_file():
            graphs["INT8 faithful graph (ONNX Runtime, reference)"] = OrtRunner(run.dir / "model.onnx", "faithful",
                                                                                "faithful")
        notes = {}
        if build.get("built"):
            graphs["INT8 workbench (OpenVINO)"] = OpenVINORunner(run.dir / "model_openvino_int8.xml", "wb",
                                                                 args.threads)
            notes["INT8 workbench (OpenVINO)"] = (f"{build['int8']['int8']}; graph {build['int8'].get('graph', '?')}; "
                                                  f"whole recipe {wb_seconds:.0f} s")
        else:
            notes["INT8 workbench (OpenVINO)"] = f"not built: {build['reason']}"
        if not args.skip_nncf:
            xml = run.dir / "nncf_int8.xml"
            seconds, census = nncf_quantize(run, xml, args.threads)
            graphs["INT8 NNCF (OpenVINO)"] = OpenVINORunner(xml, "nncf", args.threads)
            notes["INT8 NNCF (OpenVINO)"] = f"{census}; nncf.quantize {seconds:.0f} s"
        fp32_metrics, fp32_out = score(run, graphs["FP32 (ONNX Runtime)"])
        rows = {}
        for label, runner in graphs.items():
            rows[label] = fp32_metrics if label.startswith("FP32 (ONNX") else score(run, runner, fp32_out)[0]
        faithful_metrics = rows.get("INT8 faithful graph (ONNX Runtime, reference)", fp32_metrics)
        timed = {k: v for k, v in graphs.items() if "faithful" not in k}
        latency = interleaved_latency(timed, shape)
        fastest_fp32 = min(latency[k]["b8"]["median_ms"] for k in timed if k.startswith("FP32"))
        unit, _ = run.task.headline_points(fp32_metrics)
        faithful_points = run.task.headline_points(faithful_metrics)[1]  # FP32's where no faithful graph was brought
        print(f"## {name}: {fp32_metrics.get('samples', '')} evaluation samples (one is "
              f"{run.task.metric_step(fp32_metrics['samples']) or 'n/a'} points), run {run.dir}\n")
        print(f"| Graph | {unit} | vs faithful | agreement with FP32 % | b1 ms | b8 ms | b8 speed-up vs fastest FP32 |")
        print("|---|---|---|---|---|---|---|")
        for label, metrics in rows.items():
            points = run.task.headline_points(metrics)[1]
            agreement = run.task.agreement_points(metrics)
            timing = latency.get(label)
            b1, b8 = (f"{timing['b1']['median_ms']:.2f}", f"{timing['b8']['median_ms']:.2f}") if timing else ("-", "-")
            speed = f"{fastest_fp32 / timing['b8']['median_ms']:.2f}x" if timing else "-"
            print(f"| {label} | {points:.2f} | {points - faithful_points:+.2f} | "
                  f"{'-' if agreement is None else f'{agreement:.2f}'} | {b1} | {b8} | {speed} |")
        print()
        for label, note in notes.items():
            print(f"- {label}: {note}")
        guard = build.get("guard")
        if guard:
            print(f"- guard: {guard['agreement']}% agreement, SQNR {guard['sqnr_db']:.1f} dB, "
                  f"{'passed' if guard['passed'] else 'refused'}")
        print()
        del graphs


if __name__ == "__main__":
    main()
