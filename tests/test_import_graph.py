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
