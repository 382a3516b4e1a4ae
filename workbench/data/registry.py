"""The one table of data sources: every `source:` a recipe's data split may name, one row each, like the model
registry's sources.

A row says how the source is read: either as a list of samples (an image to open and its class label; the split's
transform and `count` then apply, `data/datasets.py`) or, for box-labelled detection data, as a dataset of its own
(letterboxed by the split's transform: a detection source's data option). And what stops it from loading here,
found without loading it (`validate` lists these; the loader refuses the same). Building a dataset reads the row
and imports the source's module then; the table itself is light (validate reads it without torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DataSource:
    name: str
    # "module:function" of (split, field) -> samples (sources of class-labelled or unlabelled images), or None
    samples: str | None = None
    # "module:function" of (split, (height, width), stride, field) -> a detection dataset (box-labelled sources,
    # letterboxed to data.transform.letterbox), or None
    boxes: str | None = None
    # "module:function" of what stops a split of this source from loading here beyond its files (validate.py):
    # (split, field) -> problems; None: nothing but its files
    problems: str | None = None
    # "module:function" of (split) -> whether split.path is a local folder validate checks exists; None: always
    local_path: str | None = None


DATA_SOURCES: dict[str, DataSource] = {}


def register_data_source(row: DataSource) -> DataSource:
    if row.name in DATA_SOURCES:
        raise ValueError(f"data source {row.name!r} is registered twice")
    if (row.samples is None) == (row.boxes is None):
        raise ValueError(f"data source {row.name!r}: give samples or boxes, one of them")
    DATA_SOURCES[row.name] = row
    return row


register_data_source(DataSource("imagefolder", samples="workbench.data.sources:imagefolder_samples"))
register_data_source(DataSource("files", samples="workbench.data.sources:files_samples"))
register_data_source(DataSource("hf", samples="workbench.data.sources:hf_samples",
                                problems="workbench.data.sources:hf_problems",
                                local_path="workbench.data.sources:hf_path_is_local"))
register_data_source(DataSource("package", samples="workbench.data.sources:package_samples",
                                problems="workbench.data.sources:package_problems"))
register_data_source(DataSource("coco", boxes="workbench.data.detection:coco_split"))
register_data_source(DataSource("yolo_txt", boxes="workbench.data.detection:yolo_txt_split"))
register_data_source(DataSource("yolo", boxes="workbench.data.detection:yolo_split"))


def data_source(name: str) -> DataSource:
    return DATA_SOURCES[name]


def source_problems(split, field: str) -> list[str]:
    """What stops `split` from loading here beyond its files, by its source's row."""
    row = DATA_SOURCES[split.source]
    return load(row.problems)(split, field) if row.problems else []


def path_is_local(split) -> bool:
    """Whether `split.path` names a local folder (a hub dataset's path is a data_dir inside its repository)."""
    row = DATA_SOURCES[split.source]
    return load(row.local_path)(split) if row.local_path else True


def load(target: str) -> Callable:
    """The function a row names ("module:function"), imported now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
