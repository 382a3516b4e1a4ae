"""notebooks/sensitivity_exploration.ipynb, executed top to bottom on a run of the outlier CNN, so it cannot rot."""

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
import torch
from conftest import tiny_recipe
from helpers import make_image_folder

from workbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "sensitivity_exploration.ipynb"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """What the notebook's kernel inherits: this interpreter as 'python3', workbench and tests/ importable."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (workbench test)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))  # searched before any user-installed kernelspec
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile or startup files
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WORKBENCH_NO_PROGRESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a 32x32 CNN: threads cost more than they save
    for name in ("WORKBENCH_RUN_DIR", "WORKBENCH_SAMPLES", "WORKBENCH_TOP_K", "WORKBENCH_MAX_DROP"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _notebook():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code"), (
        "store the notebook with its outputs cleared"
    )
    return nb


def _client(nb, cwd: Path) -> nbclient.NotebookClient:
    return nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})


def _text(cell) -> str:
    """A code cell's printed text and Markdown displays, joined."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.data.get("text/markdown", ""))
    return "".join(parts)


def _line(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


def _top1(line: str) -> float:
    return float(line.split("top-1 %")[1].split(",")[0])


def test_notebook_runs_top_to_bottom(tmp_path, kernel_env):
    blobs = make_image_folder(tmp_path / "blobs", per_class=30, seed=3)
    runs = tmp_path / "runs"
    stages = "  - calibrate: {method: max}\n  - sensitivity: {proxy_samples: 16}\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(blobs, runs, stages).replace("helpers:tiny_cnn", "helpers:outlier_cnn"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster for this model, more so on a busy machine
    try:
        assert main(["run", str(recipe)]) == 0
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = runs.iterdir()

    kernel_env.setenv("WORKBENCH_RUN_DIR", str(run_dir))
    kernel_env.setenv("WORKBENCH_SAMPLES", "32")
    kernel_env.setenv("WORKBENCH_TOP_K", "3")
    kernel_env.setenv("WORKBENCH_TRUST_RUN", "1")  # the run's model is the test's own code (trust_code)
    nb = _notebook()
    # in notebooks/, as Jupyter runs it; a failing cell raises with its traceback
    _client(nb, NOTEBOOK.parent).execute()

    text = [_text(c) for c in nb.cells if c.cell_type == "code"]
    joined = "\n".join(text)
    assert f"run: {run_dir}" in text[0]
    # conv1-3, fc and the residual Add (quantized by the pattern rule: TinyCNN's block is no known class)
    assert "5 switchable units; the run's own plan keeps in float: none" in joined
    # The table, as Markdown, with conv2 (the layer INT8 ruins) first; and both plots drawn.
    table = next(t for t in text if "| rank | layer |" in t)
    assert table.splitlines()[2].startswith("| 1 | `conv2` | Conv2d | 294,912 | -")
    assert len(table.splitlines()) == 2 + 5  # one row per unit, the residual Add included
    assert "most sensitive: conv2 (of 5 units)" in joined
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    # On the 32-sample subset: all INT8 is ruined, and conv2 alone in float recovers FP32.
    fp32, int8 = _top1(_line(joined, "FP32")), _top1(_line(joined, "all INT8"))
    assert "(32 samples)" in _line(joined, "all INT8") and int8 < fp32 - 20
    assert [line.split()[0] for line in joined.splitlines() if line.startswith("k=")] == ["k=0", "k=1", "k=2", "k=3"]
    k1 = _line(joined, "k=1")
    assert k1.startswith("k=1 (+ conv2)") and _top1(k1) == fp32 and "1 unit(s) float, 73.3% of MACs in INT8" in k1
    # The plan: the smallest k within 1 point of FP32 keeps exactly conv2 float, exported as calibrate excludes.
    snippet = text[-1]
    assert _top1(_line(snippet, "plan: 1 unit(s) float")) == fp32
    assert ("stages:\n- calibrate:\n    method: max\n" in snippet
            and "    exclude:\n    - conv2\n" in snippet)


def test_notebook_finds_the_newest_run_with_a_sensitivity_table(tmp_path, kernel_env):
    repo = tmp_path / "repo"  # the notebook finds the repository root above its working directory
    (repo / "workbench").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    (repo / "pyproject.toml").write_text("")
    nb = _notebook()
    client = _client(nb, repo / "notebooks")
    first = next(c for c in nb.cells if c.cell_type == "code")
    with client.setup_kernel():
        with pytest.raises(nbclient.exceptions.CellExecutionError) as err:
            client.execute_cell(first, nb.cells.index(first))
        assert "workbench sensitivity recipes/" in str(err.value) and "WORKBENCH_RUN_DIR" in str(err.value)

        for age, name, table in [(30, "older", True), (20, "newest", True), (10, "no-table", False),
                                 (0, "crashed.failed", True)]:
            (repo / "runs" / name).mkdir(parents=True)
            if table:
                (repo / "runs" / name / "sensitivity.json").write_text("{}")
                mtime = 1_700_000_000 - age
                os.utime(repo / "runs" / name / "sensitivity.json", (mtime, mtime))
        first.outputs = []
        client.execute_cell(first, nb.cells.index(first))
    assert _text(first).strip() == f"run: {repo / 'runs' / 'newest'}"
