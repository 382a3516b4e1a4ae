"""Named calibration sets: definitions in calibration_data/NAME.yaml, materialised on demand.

A definition is a data split (source, count, seed, spatial transform) that a
recipe references by name (`calibration: {calib_set: skimage_photos}`).
materialise.py writes a set's exact images out, with checksums.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..errors import DataError
from ..schema import DataSplit, TransformConfig, check_calib_set_name
from ..yaml_io import load_yaml, read_yaml_text

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


def load_calib_set(name: str, field: str = "calib_set", count: int | None = None,
                   seed: int | None = None) -> tuple[DataSplit, TransformConfig]:
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
