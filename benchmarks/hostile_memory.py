"""Peak RSS of a fresh process handed each memory bomb of issue 28 (a checkpoint of a few hundred bytes to a few
hundred kilobytes that declares gigabytes), against the 1 GB goal.

    python benchmarks/hostile_memory.py                        # this checkout
    python benchmarks/hostile_memory.py --checkout ../main     # another checkout, for the before/after table

Each file is loaded by `resolve_model` in its own process (`import:helpers:tiny_cnn` plus the file as model.spec,
model.weights or model.pruned); the row gives the process's peak RSS (VmHWM, importing torch included) and
whether it was refused. /dev/zero is left out for a checkout without the limits (its loader grows until killed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

_PROBE = """
import json, sys
from workbench.errors import WorkbenchError
from workbench.models import resolve_model
from workbench.schema import ModelConfig


def peak_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


field, value = json.loads(sys.argv[1])
try:
    resolve_model(ModelConfig(**{"spec": "import:helpers:tiny_cnn", "trust_code": True, field: value}))
    said = "loaded"
except WorkbenchError as e:
    said = "refused: " + str(e).splitlines()[0][:90]
print(json.dumps({"said": said, "peak_mb": peak_mb()}))
"""


def _files(folder: Path) -> dict[str, tuple[str, str]]:
    import test_hostile_round3 as t

    return {
        "yolov5 .pt calling Conv2d(1, 1, 20000)": ("spec", f"yolov5:{t._torch_zip(folder / 'c.pt', t._checkpoint(t._conv2d_call(20000)))}"),  # noqa: E501
        "yolov5 .pt, a stride-0 (20000, 20000, 1, 1) weight": ("spec", f"yolov5:{t._stride0_yolov5(folder / 's0.pt')}"),
        "pruned_model.pt, a stride-0 (20000, 8, 30, 30) weight": ("pruned", str(t._stride0_pruned(folder / "p"))),
        "weights: a zip record inflating to 400 MB": ("weights", str(t._zip_bomb(folder / "bomb.pt", 400))),
        "weights: /dev/zero": ("weights", "/dev/zero"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the workbench checkout whose loaders to measure")
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    limited = (checkout / "workbench/models/checkpoints.py").exists()
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{ROOT / 'tests'}"}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"| input | file bytes | {checkout.name}: peak RSS MB | outcome |\n|---|---|---|---|")
        for name, (field, value) in _files(Path(tmp)).items():
            path = Path(value.removeprefix("yolov5:"))
            if path == Path("/dev/zero") and not limited:
                print(f"| {name} | - | not run (grows until killed) | - |")
                continue
            done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([field, value])], capture_output=True,
                                  text=True, env=env, cwd=ROOT / "tests", timeout=600)
            size = path.stat().st_size if path.is_file() else "-"
            if done.returncode:
                print(f"| {name} | {size} | - | crashed: {done.stderr.strip().splitlines()[-1][:90]} |")
                continue
            result = json.loads(done.stdout.splitlines()[-1])
            print(f"| {name} | {size} | {result['peak_mb']} | {result['said']} |")


if __name__ == "__main__":
    main()
