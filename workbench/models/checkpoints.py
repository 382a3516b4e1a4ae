"""Checkpoint files read within limits: memory is bounded by the file's own size, whatever the file declares.

A checkpoint is hostile until read: `/dev/zero` named as weights never ends; a zip record can inflate a
few kilobytes into gigabytes; a tensor can declare a (20000, 20000) shape with stride 0 over one stored
float, which costs nothing until a copy (`.float()`, `empty_like`, `load_state_dict`) expands it to
1.6 GB. So, before anything is allocated from a file:

- the file must be a regular file of at most MAX_CHECKPOINT_BYTES (`checkpoint_file_problems`);
- a zip archive's records may hold at most MAX_CHECKPOINT_BYTES and at most MAX_INFLATION times the
  file's size once inflated (torch.save stores them uncompressed: a ratio of about 1);
- every tensor read must be backed by its storage: no stride 0 over a dimension longer than 1, and the
  storage holds every element the shape and strides declare (`check_loaded_tensors`). torch.load builds
  tensors as views of storages read from the file, so the storages are bounded by the file, and a
  tensor that passes costs no more than its share of them.

Together: what a rejected file costs is its own size (plus torch's ~700 MB of libraries), never what it
declares. The checks read the zip's directory and walk the loaded objects; they unpickle nothing.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, shown_path

MAX_CHECKPOINT_BYTES = 4 * 2**30  # 4 GiB: ViT-H/14 in FP32 is 2.5 GB; a CNN to quantize is far below
MAX_INFLATION = 4  # a zip's records, inflated, against the file's size (torch.save: 1, stored uncompressed)
_INFLATION_SLACK = 2**20  # small archives: headers and a short pickle may compress better than 4x
_MAX_OBJECTS = 5_000_000  # objects walked in one loaded checkpoint (yolov5x holds about 10^4)
_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


def checkpoint_file_problems(path: str | Path, field: str, what: str) -> list[str]:
    """The problem with `field`'s `path` as a checkpoint to read: missing, a folder, not a regular file (a device such
    as /dev/zero, a pipe), empty or larger than MAX_CHECKPOINT_BYTES; else none."""
    p, path = Path(path), shown_path(path)
    try:
        info = p.stat()
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return [f"{field}: {path} does not exist: give {what} on this machine (relative paths are relative to the "
                "working directory)"]
    if stat.S_ISDIR(info.st_mode):
        return [f"{field}: {path} is a folder: give {what}"]
    if not stat.S_ISREG(info.st_mode):
        return [f"{field}: {path} is not a regular file (a device, a pipe or a socket, which may never end): give "
                f"{what}"]
    if info.st_size == 0:
        return [f"{field}: {path} is empty (0 bytes): give {what}"]
    if info.st_size > MAX_CHECKPOINT_BYTES:
        return [f"{field}: {path} is {info.st_size / 2**30:.1f} GiB, more than the {MAX_CHECKPOINT_BYTES // 2**30} "
                f"GiB a checkpoint may be here: give {what} of a vision model"]
    return []


def check_checkpoint_file(path: str | Path, field: str, what: str) -> None:
    """Raise ModelLoadError unless `path` is a checkpoint file within the limits (`checkpoint_file_problems`), and,
    for a zip archive, its records stay within them once inflated."""
    if problems := checkpoint_file_problems(path, field, what):
        raise ModelLoadError(problems[0])
    size = os.path.getsize(path)
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # not an archive zipfile can list: torch.load says what is wrong with it
    limit = min(MAX_CHECKPOINT_BYTES, MAX_INFLATION * size + _INFLATION_SLACK)
    if inflated > limit:
        raise ModelLoadError(f"{field}: {path} is a {size}-byte archive whose records inflate to {inflated} bytes "
                             f"(more than the {limit} allowed for it: {MAX_INFLATION}x its size, at most "
                             f"{MAX_CHECKPOINT_BYTES // 2**30} GiB); torch.save writes them uncompressed. Save the "
                             "checkpoint again with torch.save")


def tensor_problem(tensor) -> str | None:
    """Why `tensor` declares more values than its storage holds (None when it does not): a stride of 0 over a
    dimension longer than 1, or a shape and strides reaching past the storage's end."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    numel = tensor.numel()
    if numel == 0:
        return None
    for dim, (n, s) in enumerate(zip(shape, strides)):
        if s == 0 and n > 1:
            return (f"its shape {list(shape)} repeats one stored value along dimension {dim} (stride 0): "
                    f"{numel} values declared over a storage of {tensor.untyped_storage().nbytes()} bytes")
    item = tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    reach = (tensor.storage_offset() + sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * item
    if reach > stored or numel * item > stored:
        return (f"its shape {list(shape)} and strides {list(strides)} declare {numel * item} bytes over a storage "
                f"of {stored} bytes")
    return None


def check_loaded_tensors(obj: Any, field: str, path: str | Path) -> None:
    """Raise ModelLoadError naming the first tensor in `obj` (a state dict, a model, any nesting of dicts, lists,
    tuples, sets and modules) that `tensor_problem` refuses: before anything copies it."""
    import torch
    from torch import nn

    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", obj)]
    while todo:
        name, item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > _MAX_OBJECTS:
            raise ModelLoadError(f"{field}: {path} holds more than {_MAX_OBJECTS} objects; a checkpoint holds a few "
                                 "thousand tensors")
        if isinstance(item, torch.Tensor):
            if item.layout == torch.strided and (problem := tensor_problem(item)):
                raise ModelLoadError(f"{field}: {path}: tensor {name or '(top level)'} is refused: {problem}. A "
                                     "checkpoint written by torch.save holds every value it declares; this one is "
                                     "damaged or crafted")
            continue
        if isinstance(item, nn.Module):  # its parameters, buffers and submodules named as in a state dict
            own = vars(item)
            children = [(k, v) for k, v in own.items() if k not in _MODULE_DICTS]
            children += [kv for d in _MODULE_DICTS if isinstance(own.get(d), dict) for kv in own[d].items()]
        elif isinstance(item, dict):
            children = item.items()
        elif isinstance(item, (list, tuple)):
            children = enumerate(item)
        elif isinstance(item, (set, frozenset)):
            children = enumerate(item)
        else:
            continue
        todo.extend((f"{name}.{key}" if name else str(key), value) for key, value in children)
