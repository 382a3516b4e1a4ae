"""Named calibration sets: definitions in calibration_data/NAME.yaml, materialised on demand.

A definition is a data split (source, count, seed, spatial transform) that a
recipe references by name (`calibration: {calib_set: skimage_photos}`).
`build_calib_set` writes the exact images (after crop, before normalisation)
as PNG plus a manifest of SHA-256 checksums, so a calibration can be
reproduced bit for bit, or audited, elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from pydantic import ValidationError

from ..errors import DataError
from ..io import write_json
from ..recipe import DataSplit, TransformConfig, check_calib_set_name, load_yaml, read_yaml_text

ENV_DIR = "WORKBENCH_CALIBRATION_DATA"


def calib_set_dirs() -> list[Path]:
    """Where definitions are looked up: $WORKBENCH_CALIBRATION_DATA, ./calibration_data, the repo's."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    dirs.append(Path.cwd() / "calibration_data")
    dirs.append(Path(__file__).resolve().parents[2] / "calibration_data")
    return list(dict.fromkeys(dirs))


def list_calib_sets() -> list[str]:
    names = set()
    for d in calib_set_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find_calib_set(name: str, field: str = "calib_set") -> Path:
    try:
        check_calib_set_name(name)
    except ValueError as e:
        raise DataError(f"{field}: {e}") from None
    for d in calib_set_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    raise DataError(
        f"{field}: no calibration set named {name!r}; known sets: {', '.join(list_calib_sets()) or 'none'} "
        f"(looked in {', '.join(str(d) for d in calib_set_dirs())})"
    )


def load_calib_set(name: str, field: str = "calib_set", count: int | None = None, seed: int | None = None) -> tuple[DataSplit, TransformConfig]:
    """The split a named set defines (count/seed overridable by the recipe) and its spatial transform."""
    path = find_calib_set(name, field)
    raw = load_yaml(read_yaml_text(path, "calibration set"), str(path))[0] or {}
    if not isinstance(raw, dict):
        raise DataError(f"calibration set {path} must be a YAML mapping (source, path, count, ...)")
    raw.pop("description", None)
    if count is not None:
        raw["count"] = count
    if seed is not None:
        raw["seed"] = seed
    try:
        split = DataSplit.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"calibration set {path} is not valid: {e}") from None
    if split.calib_set:
        raise DataError(f"calibration set {path} must name a source, not another calib_set")
    return split, split.transform or TransformConfig()


def build_calib_set(name: str, out_dir: str | Path) -> Path:
    """Materialise set `name` into out_dir: NNNN.png files and manifest.json. Returns the manifest path."""
    from .datasets import ImageDataset, sample_subset
    from .sources import list_samples

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
            files.append({"file": file, "sha256": _sha256(tmp_dir / file), "source": samples[i].key, "label": samples[i].label})
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
    import json

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return [f["file"] for f in manifest["files"] if _sha256(folder / f["file"]) != f["sha256"]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
