"""Data: sources (image folders, files, Hugging Face datasets, package images), transforms, loaders."""

from .calibsets import list_calib_sets, load_calib_set
from .datasets import ImageDataset, build_dataset, check_readable, make_loader, subset_loader
from .materialise import build_calib_set, verify_calib_set
from .sources import UNLABELED, Sample, list_samples

__all__ = [
    "ImageDataset",
    "Sample",
    "UNLABELED",
    "build_calib_set",
    "build_dataset",
    "check_readable",
    "list_calib_sets",
    "list_samples",
    "load_calib_set",
    "make_loader",
    "subset_loader",
    "verify_calib_set",
]
