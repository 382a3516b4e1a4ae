"""Data sources: each turns a DataSplit into a list of samples (how to open the image, its label).

No pixels are read here except to check a file opens at all; transforms and
loaders do the rest. Labels are ints; -1 means unlabeled.
"""

from __future__ import annotations

import importlib.util
import io
import re
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..schema import DataSplit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}
# The only PIL decoders ever used, those of IMAGE_SUFFIXES. PIL picks a decoder from the content, not the
# name: unrestricted, a ".png" holding PostScript would go to the EPS plugin, which runs Ghostscript on it.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
# Formats named by their first bytes when they are refused (PIL never sees them).
_NEVER_DECODED = {b"%!PS": "PostScript/EPS", b"\xc5\xd0\xd3\xc6": "EPS (binary)", b"%PDF": "PDF"}
UNLABELED = -1


@dataclass(frozen=True)
class Sample:
    key: str  # where the image comes from: a path, or dataset[index]
    opener: Callable[[], Image.Image]
    label: int = UNLABELED


@contextmanager
def no_decompression_bombs(where: str) -> Iterator[None]:
    """PIL's decompression-bomb guard as a DataError naming `where`, at its warning level already.

    PIL only warns between MAX_IMAGE_PIXELS and twice that, and then decodes: a 1 KB PNG
    claiming 10000x10000 pixels would allocate 300 MB per copy. The check runs when the
    header is read (Image.open), so nothing is decoded before it refuses.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than the limit"
            raise DataError(
                f"image {where} has {pixels}, more than the {Image.MAX_IMAGE_PIXELS:,} that PIL decodes "
                "(PIL.Image.MAX_IMAGE_PIXELS, its guard against decompression bombs): downscale the image or remove it"
            ) from None


@contextmanager
def open_header(source: Path | str | io.BytesIO, where: str | None = None) -> Iterator[Image.Image]:
    """Image.open (the header only) by the decoders of IMAGE_FORMATS alone, decompression bombs refused.

    Content in any other format is a DataError naming it; read errors of a file in one of these
    formats (truncated, corrupt) stay the caller's to word.
    """
    where = where or str(source)
    with no_decompression_bombs(where):
        try:
            img = Image.open(source, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            found = _content_format(source)
            if found is None or found in IMAGE_FORMATS:  # not an image at all, or a broken one: "cannot be read"
                raise
            raise DataError(
                f"image {where} holds {found}, not one of the formats read "
                f"({', '.join(IMAGE_FORMATS)}); others are never decoded (PostScript, EPS and PDF would run "
                "Ghostscript): convert it to PNG or JPEG, or remove it"
            ) from None
    with img:
        yield img


def _content_format(source: Path | str | io.BytesIO) -> str | None:
    """The format the first bytes announce, by PIL's prefix checks (which only compare bytes), or None."""
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:16]
    else:
        with open(source, "rb") as f:
            head = f.read(16)
    for magic, name in _NEVER_DECODED.items():
        if head.startswith(magic):
            return name
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except (IndexError, TypeError, SyntaxError, struct.error):  # what Image.open itself tolerates of them
            continue
    return None


def open_image_file(path: Path) -> Image.Image:
    try:
        with open_header(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} cannot be read ({e}): remove or replace the file") from None


def verify_image(sample: Sample, field: str) -> tuple[int, int] | None:
    """Cheap check that a file is an image (header and structure, no full decode): its (width, height).

    None for rows of an in-memory dataset: datasets decodes those itself.
    """
    if sample.key.endswith("]"):
        return None
    try:
        with open_header(sample.key) as img:
            size = img.size
            img.verify()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{field}: image {sample.key} cannot be read ({e}): remove or replace the file") from None
    except DataError as e:
        raise DataError(f"{field}: {e}") from None


def list_samples(split: DataSplit, field: str) -> list[Sample]:
    """All samples a split's source holds, in a stable order (sampling happens later)."""
    from .registry import data_source, load

    row = data_source(split.source)
    if row.samples is None:  # box-labelled: only a detection dataset reads it (data.transform.letterbox)
        raise DataError(f"{field}: the {split.source} source is read as a detection dataset, not a list of images: "
                        "use imagefolder or files for a calibration set's images")
    samples = load(row.samples)(split, field)
    if not samples:
        raise DataError(f"{field}: the {split.source} source {_where(split)} holds no images; check the path and "
                        "pattern")
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


def imagefolder_samples(split: DataSplit, field: str) -> list[Sample]:
    root = Path(split.path)
    if not root.is_dir():
        raise DataError(f"{field}.path: {root} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{field}.path: {root} has no class sub-folders (imagefolder wants root/<class>/<image>)")
    labeled = split.labels != "none"
    if split.labels == "wnid":
        return _imagefolder_by_wnid(root, classes, split, field)
    samples = []
    for index, cls in enumerate(classes):
        for path in _image_files(root / cls, split.pattern, field):
            samples.append(_file_sample(path, index if labeled else UNLABELED))
    return samples


def _imagefolder_by_wnid(root: Path, classes: list[str], split: DataSplit, field: str) -> list[Sample]:
    """Class folders named by WordNet id (n01440764/, ...), numbered by the full ImageNet-1k list: a folder holding
    10 of the 1000 classes must not number them 0..9 among themselves, or an ImageNet model scores at chance."""
    index = imagenet_wnids()
    if unknown := [c for c in classes if c not in index]:
        raise DataError(
            f"{field}.labels: wnid numbers class folders by their ImageNet-1k WordNet id, but {len(unknown)} "
            f"folder(s) under {root} are not one (e.g. {unknown[0]!r}); name them like n01440764, or leave labels "
            "unset to number the folders 0..N-1 in sorted order"
        )
    return [_file_sample(path, index[cls]) for cls in classes for path in _image_files(root / cls, split.pattern,
                                                                                      field)]


@cache
def imagenet_wnids() -> dict[str, int]:
    """WordNet id -> ImageNet-1k class index: the position in the sorted list of all 1000 ids."""
    text = (Path(__file__).parent / "imagenet_wnids.txt").read_text()
    return {wnid: i for i, wnid in enumerate(text.split())}


def files_samples(split: DataSplit, field: str) -> list[Sample]:
    paths = _image_files(Path(split.path), split.pattern, field)
    if split.labels == "wnid_prefix":
        # By the full 1000-class list, not the ids this folder happens to hold: a folder with a
        # few classes numbered 0..k-1 among themselves would be almost all mislabelled.
        index = imagenet_wnids()
        unknown = [p for p in paths if p.name.split("_")[0] not in index]
        if unknown:
            raise DataError(
                f"{field}.labels: wnid_prefix reads the ImageNet-1k WordNet id before the first '_' of each file "
                f"name, but {len(unknown)} file(s) do not start with one (e.g. {unknown[0]}); name files like "
                "n01440764_0001.JPEG, or use source: imagefolder for other classes"
            )
        return [_file_sample(p, index[p.name.split("_")[0]]) for p in paths]
    if split.labels in ("folder", "wnid"):
        raise DataError(f"{field}.labels: '{split.labels}' labels need source: imagefolder (class sub-folders)")
    return [_file_sample(p, UNLABELED) for p in paths]


def package_samples(split: DataSplit, field: str) -> list[Sample]:
    spec = importlib.util.find_spec(split.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{field}.package: package {split.package!r} is not installed (pip install {split.package})")
    root = Path(list(spec.submodule_search_locations)[0])
    return [_file_sample(p, UNLABELED) for p in _image_files(root, split.pattern, field)]


def package_problems(split: DataSplit, field: str) -> list[str]:
    """A `source: package` split whose package is not installed (validate.py lists it, loading refuses it)."""
    if split.package and importlib.util.find_spec(split.package.split(".")[0]) is None:
        return [f"{field}.package: package {split.package!r} is not installed (pip install {split.package})"]
    return []


def hf_path_is_local(split: DataSplit) -> bool:
    """A hub dataset's path is a data_dir inside the hub repository; saved datasets and imagefolder read a folder."""
    return split.name in (None, "imagefolder")


def hf_samples(split: DataSplit, field: str) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise DataError(_NEEDS_DATASETS.format(field=field)) from None
    _check_offline(split, field)
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
        raise DataError(f"{field}.image_column: {split.image_column!r} is not a column "
                        f"(columns: {', '.join(ds.column_names)})")
    labeled = split.label_column is not None and split.labels != "none"
    if labeled and split.label_column not in ds.column_names:
        raise DataError(
            f"{field}.label_column: {split.label_column!r} is not a column (columns: {', '.join(ds.column_names)}); "
            "set label_column: null for unlabeled data"
        )
    labels = ds[split.label_column] if labeled else [UNLABELED] * len(ds)
    if not isinstance(ds.features[split.image_column], datasets.Image):
        raise DataError(f"{field}.image_column: {split.image_column!r} is not an image column")
    # The rows' bytes, decoded here: datasets would hand them to an unrestricted Image.open.
    ds = ds.cast_column(split.image_column, datasets.Image(decode=False))

    def opener(i: int) -> Image.Image:
        row, where = ds[i][split.image_column], f"{_where(split)}[{i}]"
        source = io.BytesIO(row["bytes"]) if row.get("bytes") is not None else row.get("path")
        if source is None:
            raise DataError(f"{field}: row {i} of column {split.image_column!r} holds no image")
        try:
            with open_header(source, where) as img:
                img.load()
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{field}: image {where} cannot be read ({e}): remove or replace the row") from None

    return [Sample(f"{_where(split)}[{i}]", lambda i=i: opener(i), int(labels[i])) for i in range(len(ds))]


def _check_offline(split: DataSplit, field: str) -> None:
    if problems := hf_problems(split, field):
        raise DataError(problems[0])


def hf_problems(split: DataSplit, field: str) -> list[str]:
    """What stops a `source: hf` split from loading offline, found without loading it (validate.py lists these,
    loading refuses them): the datasets package missing, or a split that would reach the Hugging Face Hub without
    allow_download: true.

    Local: load_from_disk (path alone), a builder that ships inside `datasets` (imagefolder, csv,
    parquet, ...) reading a local path, or a name that is a local folder. Anything else is a Hub id.
    `datasets` (seconds to import) is imported only to tell a packaged builder's name from a Hub id.
    """
    if importlib.util.find_spec("datasets") is None:
        return [_NEEDS_DATASETS.format(field=field)]
    if split.allow_download:
        return []
    remote_path = split.path is not None and "://" in split.path
    if not remote_path:
        if split.name is None or Path(split.name).exists():
            return []
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        if split.name in _PACKAGED_DATASETS_MODULES:
            return []
    return [f"{field}: source hf with name {split.name!r} (path {split.path!r}) would download from the Hugging Face "
            f"Hub, and nothing is downloaded unless the recipe says so: set {field}.allow_download: true, or save the "
            "dataset once with datasets' save_to_disk and give its folder as path (without name)"]


_NEEDS_DATASETS = "{field}: source 'hf' needs the datasets package: pip install datasets"
