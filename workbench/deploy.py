"""The one file to deploy: the run's fastest INT8 deployment candidate, put in `deploy/` with a manifest.

A run leaves a dozen files (references, the TensorRT-style graph, ONNX Runtime's flavour, OpenVINO's IRs, their
sidecars); the summary already chooses the INT8 backend a deployment would use (report.deployment_choice). This
puts its files, and nothing else, in `<run>/deploy/` (hard links where the filesystem allows, else copies) with
`deploy.json`: which backend, its files, size, speed against the fastest FP32 graph, fidelity, and whether the
build's guard verified it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .io import write_json

DEPLOY_DIR = "deploy"


def write_deploy(run_dir: str | Path, metrics: dict) -> dict | None:
    """Fill `<run_dir>/deploy/` and return its manifest (also written as deploy/deploy.json); None where the run
    evaluated no deployable INT8 file (no evaluate stage, or only PyTorch models)."""
    from .report import deployment_choice, in_short
    from .stages.registry import results_of

    run_dir = Path(run_dir)
    int8, fp32 = deployment_choice(metrics)
    entry = results_of(metrics).get("backends", {}).get(int8["backend"], {}) if int8 else {}
    files = [f for f in entry.get("files", []) if (run_dir / f).is_file()]
    if not files:
        return None
    target = run_dir / DEPLOY_DIR
    if target.exists():  # a resumed run chooses again
        shutil.rmtree(target)
    target.mkdir()
    for name in files:
        _link_or_copy(run_dir / name, target / Path(name).name)
    manifest = {
        "backend": int8["backend"],
        "title": int8["title"],
        "files": [f"{DEPLOY_DIR}/{Path(f).name}" for f in files],
        "size_mb": int8["size_mb"],
        "latency_b1_ms": int8["latency"].get("b1"),
        "fp32_backend": fp32["backend"] if fp32 else None,
        "speedup_b1": (round(fp32["latency"]["b1"] / int8["latency"]["b1"], 3)
                       if fp32 and fp32["latency"].get("b1") and int8["latency"].get("b1") else None),
        "verified": int8["verified"],
        "summary": " ".join(in_short(metrics)),
    }
    write_json(target / "deploy.json", manifest)
    return manifest


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, dest)
