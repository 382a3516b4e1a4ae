"""Data: sources (image folders, files, Hugging Face datasets, package images), transforms, loaders.

Names are imported on first use: reading a calibration set's definition (validate) needs no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageDataset": "datasets", "build_dataset": "datasets", "check_readable": "datasets", "make_loader": "datasets",
    "subset_loader": "datasets", "list_calib_sets": "calibsets", "load_calib_set": "calibsets",
    "build_calib_set": "materialise", "verify_calib_set": "materialise", "UNLABELED": "sources",
    "Sample": "sources", "list_samples": "sources",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
