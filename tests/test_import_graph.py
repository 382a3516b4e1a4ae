"""scripts/import_graph.py, the CI check of the import graph: module cycles, folder loops, stage-to-stage imports."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_folder_loop_of_acyclic_modules_is_found_with_the_imports_that_make_it():
    # No module cycle: qdq.a -> runtime.b, runtime.c -> qdq.d. Only the folders loop.
    g = _script()
    edges = {"workbench.qdq.a": {"workbench.runtime.b"}, "workbench.runtime.b": set(),
             "workbench.runtime.c": {"workbench.qdq.d"}, "workbench.qdq.d": set(), "workbench.errors": set()}
    assert g.cycles(edges) == []
    found, loops, crossing = g.problems(edges)
    assert found == [] and crossing == []
    assert loops == [(["workbench.qdq", "workbench.runtime"],
                      [("workbench.qdq.a", "workbench.runtime.b"), ("workbench.runtime.c", "workbench.qdq.d")])]


def test_a_ground_floor_module_is_its_own_node():
    # report.py -> runtime/ and runtime/ -> report.py loop; two folders both importing errors.py do not.
    g = _script()
    edges = {"workbench.report": {"workbench.runtime.b"}, "workbench.runtime.b": {"workbench.errors"},
             "workbench.runtime.c": {"workbench.report"}, "workbench.qdq.a": {"workbench.errors"},
             "workbench.errors": set()}
    assert [comp for comp, _ in g.folder_loops(edges)] == [["workbench.report", "workbench.runtime"]]
    del edges["workbench.runtime.c"]
    assert g.folder_loops(edges) == []


def test_the_workbench_has_no_module_cycle_folder_loop_or_stage_importing_a_stage():
    g = _script()
    found, loops, crossing = g.problems(g.without_registration(g.graph()))
    assert (found, [comp for comp, _ in loops], crossing) == ([], [], [])


def test_resume_validate_and_report_name_no_stage_engine_backend_or_family():
    """They iterate the stage registry and the backend and engine tables: a name written in them is a member that
    a new stage, engine or model family would have to edit them for. Derived from the registries, so a new member
    is checked too."""
    import re

    from workbench.runtime import backends, engines
    from workbench.stages.registry import STAGES
    from workbench.targets import TARGET_NAMES

    names = set(STAGES) | set(backends.BACKENDS) | set(engines.ENGINES) | set(TARGET_NAMES) | {
        "yolov5", "ultralytics", "timm", "torchvision", "efficientnet_lite", "cifar_resnet", "qat"}
    assert {"calibrate", "evaluate", "openvino", "pytorch_fp32", "ort_int8_default"} <= names  # the tables were read
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b", re.I)
    root = SCRIPT.parent.parent / "workbench"
    found = {f"{name}:{i}: {line.strip()}" for name in ("resume.py", "validate.py", "report.py")
             for i, line in enumerate((root / name).read_text().splitlines(), 1) if pattern.search(line)}
    assert not found, sorted(found)
