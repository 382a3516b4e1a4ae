"""Data sources: each turns a DataSplit into a list of samples (how to open the image, its label).

No pixels are read here except to check a file opens at all; transforms and
loaders do the rest. Labels are ints; -1 means unlabeled.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..recipe import DataSplit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}
UNLABELED = -1


@dataclass(frozen=True)
class Sample:
    key: str  # where the image comes from: a path, or dataset[index]
    opener: Callable[[], Image.Image]
    label: int = UNLABELED


def open_image_file(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} cannot be read ({e}): remove or replace the file") from None


def verify_image(sample: Sample, field: str) -> None:
    """Cheap check that a file is an image (header and structure, no full decode)."""
    if sample.key.endswith("]"):  # rows of an in-memory dataset: already decoded by datasets
        return
    try:
        with Image.open(sample.key) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{field}: image {sample.key} cannot be read ({e}): remove or replace the file") from None


def list_samples(split: DataSplit, field: str) -> list[Sample]:
    """All samples a split's source holds, in a stable order (sampling happens later)."""
    builders = {"imagefolder": _imagefolder, "files": _files, "hf": _hf, "package": _package}
    samples = builders[split.source](split, field)
    if not samples:
        raise DataError(f"{field}: the {split.source} source {_where(split)} holds no images; check the path and pattern")
    return samples


def _where(split: DataSplit) -> str:
    return repr(split.path or split.name or split.package)


def _image_files(root: Path, pattern: str | list[str], field: str) -> list[Path]:
    if not root.exists():
        raise DataError(f"{field}.path: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{field}.path: {root} is not a folder")
    patterns = [pattern] if isinstance(pattern, str) else pattern
    found = {p for pat in patterns for p in root.glob(pat) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    return sorted(found)


def _file_sample(path: Path, label: int) -> Sample:
    return Sample(str(path), lambda p=path: open_image_file(p), label)


def _imagefolder(split: DataSplit, field: str) -> list[Sample]:
    root = Path(split.path)
    if not root.is_dir():
        raise DataError(f"{field}.path: {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{field}.path: {root} has no class sub-folders (imagefolder wants root/<class>/<image>)")
    labeled = split.labels != "none"
    samples = []
    for index, cls in enumerate(classes):
        for path in _image_files(root / cls, split.pattern, field):
            samples.append(_file_sample(path, index if labeled else UNLABELED))
    return samples


def _files(split: DataSplit, field: str) -> list[Sample]:
    paths = _image_files(Path(split.path), split.pattern, field)
    if split.labels == "wnid_prefix":
        # ImageNet convention: the sorted WordNet ids give the class index 0..999.
        wnids = sorted({p.name.split("_")[0] for p in paths})
        index = {w: i for i, w in enumerate(wnids)}
        return [_file_sample(p, index[p.name.split("_")[0]]) for p in paths]
    if split.labels == "folder":
        raise DataError(f"{field}.labels: 'folder' labels need source: imagefolder")
    return [_file_sample(p, UNLABELED) for p in paths]


def _package(split: DataSplit, field: str) -> list[Sample]:
    spec = importlib.util.find_spec(split.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{field}.package: package {split.package!r} is not installed (pip install {split.package})")
    root = Path(list(spec.submodule_search_locations)[0])
    return [_file_sample(p, UNLABELED) for p in _image_files(root, split.pattern, field)]


def _hf(split: DataSplit, field: str) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{field}: source 'hf' needs the datasets package: pip install datasets") from None
    try:
        if split.path and not split.name:
            ds: Any = datasets.load_from_disk(split.path)
            if isinstance(ds, datasets.DatasetDict):
                if split.split not in ds:
                    raise DataError(f"{field}.split: {split.split!r} is not in {split.path} (it has {', '.join(ds)})")
                ds = ds[split.split]
        else:
            ds = datasets.load_dataset(split.name, data_dir=split.path, split=split.split)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{field}: no Hugging Face dataset at {_where(split)} ({e})") from None
    except Exception as e:
        raise DataError(f"{field}: cannot load the Hugging Face dataset {_where(split)}: {e}") from None
    if split.image_column not in ds.column_names:
        raise DataError(f"{field}.image_column: {split.image_column!r} is not a column (columns: {', '.join(ds.column_names)})")
    labeled = split.label_column is not None and split.labels != "none"
    if labeled and split.label_column not in ds.column_names:
        raise DataError(
            f"{field}.label_column: {split.label_column!r} is not a column (columns: {', '.join(ds.column_names)}); "
            "set label_column: null for unlabeled data"
        )
    labels = ds[split.label_column] if labeled else [UNLABELED] * len(ds)

    def opener(i: int) -> Image.Image:
        img = ds[i][split.image_column]
        if not isinstance(img, Image.Image):
            raise DataError(f"{field}: row {i} of column {split.image_column!r} is not an image")
        return img.convert("RGB")

    return [Sample(f"{_where(split)}[{i}]", lambda i=i: opener(i), int(labels[i])) for i in range(len(ds))]
