"""Ultralytics' dataset YAML (data.yaml), read as Ultralytics reads it.

    path: ../datasets/mine   # the dataset root (default: the YAML's folder)
    train: images/train      # a folder of images, a .txt file listing images, or a list of those
    val: images/val
    test:                    # optional
    names: {0: person, 1: bicycle}   # or a list; `nc` alone names the classes class_0, class_1, ...

Paths are joined to the root; a split entry that does not exist and starts with '../' is tried again
without it, and a relative root that does not exist is looked up under `datasets/` in the working
directory (Ultralytics' default DATASETS_DIR), as Ultralytics does. A list file's lines starting with
'./' are relative to the list file. Each image's labels are in the file Ultralytics reads:
the path with its last `/images/` replaced by `/labels/` and its suffix by `.txt`; an image without a
label file is a background image. Nothing is downloaded (`download:` is ignored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..yaml_io import load_yaml, read_yaml_text
from .sources import IMAGE_SUFFIXES

SPLITS = ("train", "val", "test")
MAX_LIST_BYTES = 64 * 1024 * 1024  # an image list file: a million paths fit in far less


@dataclass(frozen=True)
class DataYaml:
    file: Path
    root: Path
    entries: dict[str, list[str]]  # split -> its folders / list files, as written
    names: list[str]
    lines: dict  # key path -> line in the YAML, for messages

    def where(self, key: str) -> str:
        line = self.lines.get((key,))
        return f"{self.file}:{line}" if line else str(self.file)


def read_data_yaml(file: str | Path, field: str) -> DataYaml:
    """The dataset YAML at `file`; a DataError naming `field`, the file and the line for anything it cannot use."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{field}: {file} does not exist; give the data.yaml of a YOLO-format dataset")
    data, lines = load_yaml(read_yaml_text(file, "dataset YAML"), str(file))
    if not isinstance(data, dict):
        raise DataError(f"{field}: {file} is not a YAML mapping with path, train, val and names")
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
        lines[("val",)] = lines.get(("validation",))
    for key in ("train", "val"):
        if not data.get(key):
            raise DataError(f"{field}: {file} has no '{key}:' (Ultralytics requires train and val in every data YAML)")
    names = _names(data, file, lines)
    root = _root(data, file, lines)
    entries = {}
    for split in SPLITS:
        value = data.get(split)
        if not value:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in items):
            raise DataError(f"{file}:{lines.get((split,), '?')}: '{split}' must be a path or a list of paths")
        entries[split] = items
    return DataYaml(file, root, entries, names, lines)


def _names(data: dict, file: Path, lines: dict) -> list[str]:
    names, nc = data.get("names"), data.get("nc")
    where = f"{file}:{lines.get(('names',), lines.get(('nc',), '?'))}"
    if names is None:
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise DataError(f"{where}: give 'names' (a list, or a mapping from class id to name) or 'nc' (a whole "
                            "number of classes)")
        return [f"class_{i}" for i in range(nc)]
    if isinstance(names, dict):
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in names) or \
                sorted(names) != list(range(len(names))):
            raise DataError(f"{where}: the keys of 'names' must be the class ids 0..{len(names) - 1}, each once "
                            f"(got {sorted(names, key=str)[:10]})")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{where}: 'names' must be a list of class names or a mapping from class id to name")
    names = [str(n) for n in names]
    if nc is not None and nc != len(names):
        raise DataError(f"{where}: 'names' lists {len(names)} classes but 'nc' is {nc}; they must match")
    return names


def _root(data: dict, file: Path, lines: dict) -> Path:
    given = data.get("path")
    if given is None:
        return file.resolve().parent
    if not isinstance(given, str):
        raise DataError(f"{file}:{lines.get(('path',), '?')}: 'path' must be a folder")
    root = Path(given)
    if root.is_absolute():
        return root
    for base in (file.resolve().parent, Path.cwd(), Path.cwd() / "datasets"):
        if (base / root).is_dir():
            return (base / root).resolve()
    return (file.resolve().parent / root).resolve()  # missing: the split check names it


def label_path(image: Path) -> Path:
    """Ultralytics' img2label_paths: the last '/images/' becomes '/labels/', the suffix '.txt'."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(os.fspath(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def split_images(data: DataYaml, split: str, field: str) -> list[Path]:
    """The images of `split`, sorted, from its folders (recursively) and list files."""
    if split not in data.entries:
        have = ", ".join(data.entries)
        raise DataError(f"{field}: {data.file} has no '{split}:' split (it has {have}); choose one of those")
    images: list[Path] = []
    for entry in data.entries[split]:
        path = (data.root / entry).resolve()
        if not path.exists() and entry.startswith("../"):
            path = (data.root / entry[3:]).resolve()
        if path.is_dir():
            images += [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            images += _listed(path, data.root)
        else:
            raise DataError(f"{field}: {data.where(split)}: '{split}: {entry}' is {path}, which does not exist "
                            f"(paths are joined to the dataset root {data.root}, from 'path' or the YAML's folder)")
    if not images:
        raise DataError(f"{field}: {data.where(split)}: split '{split}' holds no images "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(set(images))


def _listed(list_file: Path, root: Path) -> list[Path]:
    """Images named in a list file, one per line: './x' relative to the list file, others as Ultralytics reads
    them (relative to the working directory), or else relative to the dataset root."""
    if list_file.stat().st_size > MAX_LIST_BYTES:
        raise DataError(f"image list {list_file} is {list_file.stat().st_size} bytes; the limit is "
                        f"{MAX_LIST_BYTES} (64 MiB)")
    try:
        lines = [line.strip() for line in list_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"image list {list_file} cannot be read as UTF-8 text ({e})") from None
    out = []
    for line in lines:
        if Path(line).suffix.lower() not in IMAGE_SUFFIXES:
            continue  # Ultralytics skips what is not an image
        path = list_file.parent / line[2:] if line.startswith("./") else Path(line)
        if not path.is_absolute() and not path.exists():
            path = root / line
        out.append(path.resolve())
    missing = [p for p in out if not p.is_file()]
    if missing:
        raise DataError(f"image list {list_file}: {len(missing)} of its {len(out)} images do not exist "
                        f"(e.g. {missing[0]})")
    return out
