"""Limits on what a tensor file named by the user may make the workbench allocate.

A loaded tensor is a view of a storage, and the view's shape and strides are data from the file: a 1.5 KB file
can hold a stride-0 view of 4 bytes with 1e10 elements. It loads fine, even with weights_only=True, and
allocates its full logical size wherever it is first used (.float(), isfinite, empty_like, an optimizer step).
A zip entry compressed with deflate (torch.save never writes one) inflates whole while torch.load reads it.
So every torch.load of a user's file is preceded by `check_archive` and followed by `check_tensors`, which
refuse both, naming the file and the tensor.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError

# Distinct views of the same data may legitimately overlap a little (a weight saved with its transpose);
# more than this many times the file's size is data that is not in the file.
_OVERLAP_FACTOR = 4
_OVERLAP_SLACK = 1 << 20


def check_archive(path: str | Path, field: str) -> None:
    """Refuse a torch zip archive with a compressed entry (torch.load would inflate it in memory whole)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format: torch checks each storage's size against the bytes it reads
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile):
        return  # torch.load names what is wrong with it
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ModelLoadError(
                f"{field}: {path} holds a compressed entry ({entry.filename}, {_bytes(entry.file_size)} once "
                f"inflated, {_bytes(entry.compress_size)} in the file): torch.save never compresses, and reading it "
                "would inflate it in memory whole. It was not loaded; save the tensors again with torch.save."
            )


def check_tensors(obj, path: str | Path, field: str) -> None:
    """Refuse tensors in `obj` (what torch.load returned) that hold more elements than the file holds data for."""
    file_size = Path(path).stat().st_size
    total, seen = 0, set()
    for name, tensor in _tensors(obj):
        if tensor.layout != torch.strided:
            raise ModelLoadError(
                f"{field}: {path} holds a {tensor.layout} tensor '{name}' of shape {tuple(tensor.shape)}: the "
                "workbench reads dense tensors only (a sparse one expands to its full shape when used). Save it "
                "with .to_dense()."
            )
        if getattr(tensor, "_backward_hooks", None):
            raise ModelLoadError(
                f"{field}: {path} holds tensor '{name}' with backward hooks, which would be called during training; "
                "a saved model carries none. It was not loaded."
            )
        logical, stored = tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes()
        if logical > stored:
            raise ModelLoadError(
                f"{field}: {path} holds tensor '{name}' of shape {tuple(tensor.shape)} ({_bytes(logical)}) over only "
                f"{_bytes(stored)} of data: a view whose strides repeat its data (stride 0 or overlapping), which "
                "allocates its full size wherever it is used. It was not loaded; save the tensors with .contiguous()."
            )
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
        if view not in seen:  # the same tensor saved under two names (tied weights) is one tensor
            seen.add(view)
            total += logical
    if total > _OVERLAP_FACTOR * file_size + _OVERLAP_SLACK:
        raise ModelLoadError(
            f"{field}: {path} is {_bytes(file_size)}, but its tensors add up to {_bytes(total)}: views that overlap "
            "on the same data, which allocate that much wherever they are used. It was not loaded; save each "
            "tensor with .clone()."
        )


def _tensors(obj):
    """(name, tensor) for every tensor in dicts, lists, tuples, sets and nn.Modules below `obj`, each once."""
    stack, seen = [("", obj)], set()
    while stack:  # a stack, not recursion: the nesting is the file's to choose
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield name or "<top level>", value
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = enumerate(value)
        elif isinstance(value, nn.Module):
            items = []
            for key, item in vars(value).items():
                if key in ("_parameters", "_buffers", "_modules") and isinstance(item, dict):
                    items += item.items()  # named as in the state dict, without the container's name
                else:
                    items.append((key, item))
        else:
            continue
        stack += [(f"{name}.{key}" if name else str(key), item) for key, item in items]


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"
