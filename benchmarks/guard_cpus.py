"""Does any command leave an engine with exit 0 that is further than the guard's threshold from its faithful graph?

    python benchmarks/guard_cpus.py resnet20 yolov5n [--runs-dir /tmp/guard_cpus] [--eval-count 1000]

For each model one run calibrates (max) and exports (benchmarks/ort_int8.py's recipe, smaller splits). Then, in
a fresh process per case, `workbench build model.onnx --engine openvino` (the guard drawing on the run's
calibration and evaluation images) runs with the CPU facts the build decides by (hardware/cpu.cpu_info) stubbed
as an AVX2-only, a VNNI and an AMX CPU, and where told with OpenVINO's kernels really capped
(ONEDNN_MAX_CPU_ISA=AVX2: VPMADDUBSW, whose 16-bit sums saturate). Each engine kept with exit 0 is then measured
against the graph it was compiled from (faithful ONNX Runtime) on the whole evaluation split, the guard's way
(tasks' agreement_meter), and its conversion (that graph against model.onnx, both faithful) apart. Prints one
markdown row per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FACTS = {
    "avx2": ("AVX2-only x86 (stub)", ("avx2",)),
    "vnni": ("AVX-512 VNNI x86 (stub)", ("avx2", "avx512f", "avx512_vnni")),
    "amx": ("AMX x86 (stub)", ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16")),
}
# (label, CPU facts stubbed, OpenVINO ISA cap or None)
CASES = [
    ("AVX2 facts, AVX2 kernels", "avx2", "AVX2"),
    ("VNNI facts, this CPU's kernels", "vnni", None),
    ("AMX facts, this CPU's kernels", "amx", None),
    ("VNNI facts (s8 weights) on AVX2 kernels: the inverted choice", "vnni", "AVX2"),
]


def calibrated_run(name: str, runs_dir: Path, eval_count: int) -> Path:
    from ort_int8 import RECIPES

    from workbench import api

    existing = sorted(runs_dir.glob(f"bench_ort_{name}-*"))
    if existing and (existing[-1] / "model.onnx").is_file():
        return existing[-1]
    text = RECIPES[name].replace("count: 512", "count: 256")
    if name == "resnet20":  # a seeded part of the CIFAR-10 test set: 2 shared cores
        text = text.replace('cifar10/test"}', f'cifar10/test", count: {eval_count}, seed: 0}}')
    text += "  - export: {}\n" + f'runs_dir: "{runs_dir}"\n'
    (runs_dir / f"{name}.yaml").write_text(text)
    return api.run(runs_dir / f"{name}.yaml").dir


def one_case(run_dir: Path, facts: str, out: Path) -> dict:
    """In this process: stub the CPU facts, build with the guard, and measure what was kept."""
    import numpy as np

    from workbench.cli import main
    from workbench.data import build_dataset, make_loader
    from workbench.hardware import cpu
    from workbench.recipe import load_recipe
    from workbench.runtime.openvino import OpenVINORunner
    from workbench.runtime.runners import OrtRunner
    from workbench.tasks import get_task

    model, flags = FACTS[facts]
    cpu.cpu_info = lambda: cpu.CpuInfo(model, "x86_64", os.cpu_count() or 1, flags)
    out.mkdir(parents=True, exist_ok=True)
    xml = out / "model_openvino.xml"
    code = main(["build", str(run_dir / "model.onnx"), "--engine", "openvino", "--out", str(xml)])
    result = {"exit": code, "kept": xml.is_file()}
    if not xml.is_file():
        return result
    sidecar = json.loads((out / "model_openvino.xml.json").read_text())
    result.update(weights=sidecar.get("weights"), guard=sidecar["guard"])
    recipe = load_recipe(run_dir / "recipe.yaml")
    task = get_task(recipe.task)
    dataset = build_dataset(recipe.data, "evaluation")
    graph = out / "model_openvino_graph.onnx"
    engine, faithful = OpenVINORunner(xml, "engine"), OrtRunner(graph, "graph", "faithful")
    original = OrtRunner(run_dir / "model.onnx", "original", "faithful")
    against_graph, conversion = task.agreement_meter(None), task.agreement_meter(None)
    for images, _ in make_loader(dataset, recipe.data):
        x = images.numpy()
        ref, conv = faithful(x), original(x)
        against_graph.update(engine(x), ref)
        conversion.update(ref, conv)
    result["engine_vs_graph"] = against_graph.estimate(0.95).as_dict()
    result["conversion"] = conversion.estimate(0.95).as_dict()
    result["criterion"] = against_graph.criterion
    del np
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="*", default=["resnet20", "yolov5n"])
    p.add_argument("--runs-dir", default="/tmp/guard_cpus")
    p.add_argument("--eval-count", type=int, default=1000)
    p.add_argument("--one", nargs=3, metavar=("RUN_DIR", "FACTS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_case(Path(args.one[0]), args.one[1], Path(args.one[2]))))
        return
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    print("| Model | Case | Exit | Weights | Guard (images, agreement [95% CI]) | Engine vs its graph, all evaluation "
          "images | Conversion vs model.onnx | Within 90%? |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        run_dir = calibrated_run(name, runs, args.eval_count)
        for i, (label, facts, cap) in enumerate(CASES):
            env = {**os.environ, "WORKBENCH_NO_PROGRESS": "1"}
            if cap:
                env["ONEDNN_MAX_CPU_ISA"] = cap
            proc = subprocess.run([sys.executable, __file__, "--one", str(run_dir), facts, str(runs / f"{name}_{i}")],
                                  env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"| {name} | {label} | {proc.returncode} | crashed: {proc.stderr[-300:]!r} |")
                continue
            r = json.loads(line[7:])
            if not r["kept"]:
                err = proc.stderr.strip().splitlines()[-1][:160] if proc.stderr.strip() else ""
                print(f"| {name} | {label} | {r['exit']} | - | refused: {err} | - | - | nothing kept |")
                continue
            g, e, c = r["guard"], r["engine_vs_graph"], r["conversion"]
            print(f"| {name} | {label} | {r['exit']} | {r['weights']} | {g['samples']}: {g['agreement']:.1f} "
                  f"[{g['low']:.1f}, {g['high']:.1f}] | {e['value']:.1f} [{e['low']:.1f}, {e['high']:.1f}] "
                  f"({e['samples']}) | {c['value']:.1f} [{c['low']:.1f}, {c['high']:.1f}] | "
                  f"{'yes' if e['value'] >= 90 else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
