"""The engine table (runtime/engines.py): one row per engine, read by the build stage, the CLI, validate, resume, the
report and latency."""

import pytest

from workbench.runtime import backends, engines
from workbench.stages.build import BuildOptions, resolve_engine


def test_every_registered_row_is_the_engine_it_is_registered_as_and_serves_its_own_suffix():
    for name in engines.NAMES:
        row = engines.engine(name)
        assert row.name == name and row.precisions and row.suffixes
        assert engines.for_suffix(row.suffixes[0]) is row
        assert set(row.options) <= set(BuildOptions.model_fields), f"{name} reads options the build stage lacks"
        # `workbench bench` opens an engine's files with the backend row serving the same suffix
        assert row.suffixes[0] in {r.file_suffix for r in backends.BACKENDS.values()}


@pytest.mark.parametrize("installed", [set(), {"openvino"}, {"tensorrt", "openvino"}, {"tensorrt"}])
def test_auto_is_the_first_engine_in_table_order_whose_package_is_installed(monkeypatch, installed):
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    packages = [engines.engine(n).package for n in engines.NAMES]
    expected = next((n for n, p in zip(engines.NAMES, packages) if p in installed), engines.NAMES[-1])
    assert engines.resolve("auto").name == expected == resolve_engine(BuildOptions())
    assert engines.resolve("openvino").name == "openvino"  # asked by name: no lookup


def test_a_precision_an_engine_does_not_compile_names_the_engines_that_do():
    assert engines.precision_problem(engines.engine("tensorrt"), "fp16") is None
    problem = engines.precision_problem(engines.engine("openvino"), "fp16", "--precision")
    assert problem.startswith("--precision fp16 is for TensorRT;") and "int8 or fp32" in problem
    with pytest.raises(ValueError, match="fp16 is for TensorRT"):
        BuildOptions(engine="openvino", precision="fp16")


def test_a_record_without_an_engine_is_tensorrts_and_the_report_section_comes_from_its_row():
    assert engines.of_record({}).name == "tensorrt"
    assert engines.of_record({"engine": "openvino"}).section == "OpenVINO (CPU)"
