"""The data-source table (data/registry.py): every source a recipe may name has one row, read by the loaders and
validate."""

import typing

from workbench.data.registry import DATA_SOURCES, load
from workbench.schema import DataSplit


def test_every_source_a_split_may_name_has_a_row_whose_functions_exist():
    named = {a for a in typing.get_args(DataSplit.model_fields["source"].annotation) if a is not type(None)}
    allowed = {v for a in named for v in (typing.get_args(a) or (a,))}
    assert allowed == set(DATA_SOURCES)
    for row in DATA_SOURCES.values():
        for target in (row.samples, row.boxes, row.problems):
            if target is not None:
                assert callable(load(target)), target


def test_a_package_source_whose_package_is_missing_is_named_by_its_row(tmp_path):
    from workbench.data.registry import source_problems

    split = DataSplit(source="package", package="no_such_package_xyz")
    assert source_problems(split, "data.calibration") == [
        "data.calibration.package: package 'no_such_package_xyz' is not installed (pip install no_such_package_xyz)"]
    assert source_problems(DataSplit(source="imagefolder", path=str(tmp_path)), "data.evaluation") == []
