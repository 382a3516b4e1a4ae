"""A named calibration set materialised: its exact images (after crop, before normalisation) as PNG plus a
manifest of SHA-256 checksums, so a calibration can be reproduced bit for bit, or audited, elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import DataError
from ..io import write_json
from .calibsets import load_calib_set
from .datasets import ImageDataset, sample_subset
from .sources import list_samples


def build_calib_set(name: str, out_dir: str | Path) -> Path:
    """Materialise set `name` into out_dir: NNNN.png files and manifest.json. Returns the manifest path."""
    split, transform = load_calib_set(name)
    field = f"calibration set {name}"
    samples = sample_subset(list_samples(split, field), split, transform, field)
    dataset = ImageDataset(samples, transform, seed=split.seed)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"--out {out_dir} exists and is not empty: choose a new folder")
    # Build in a sibling temp folder and rename at the end: never a half-built set.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        files = []
        for i in range(len(dataset)):
            file = f"{i:04d}.png"
            dataset.spatial(i).save(tmp_dir / file, format="PNG")
            files.append({"file": file, "sha256": _sha256(tmp_dir / file), "source": samples[i].key,
                          "label": samples[i].label})
        manifest = {
            "name": name,
            "definition": split.model_dump(mode="json"),
            "count": len(files),
            "files": files,
            "use_in_a_recipe": {"source": "files", "path": str(out_dir), "pattern": "*.png"},
        }
        write_json(tmp_dir / "manifest.json", manifest)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir / "manifest.json"


def verify_calib_set(folder: str | Path) -> list[str]:
    """Files whose checksum no longer matches the manifest (empty list: the set is intact)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return [f["file"] for f in manifest["files"] if _sha256(folder / f["file"]) != f["sha256"]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
