"""A property-based fuzzer over what users hand the workbench (issue 28): recipes and `key=value` overrides,
data.yaml files and YOLO label files, COCO JSON, and ONNX graphs for check-onnx and build. For every generated
input the command answers with exit 0 (or 1, check-onnx's finding) or refuses it with exit 2 and a message
(a WorkbenchError): never a traceback, an argparse crash, a hang or a memory bomb.

The CI profile is derandomised (the same inputs every run) and small: the whole file runs in well under two
minutes on two shared CPU cores. `WORKBENCH_FUZZ=long` runs a hundred times as many random ones (on demand;
`WORKBENCH_FUZZ=5`, five times):

    WORKBENCH_FUZZ=long python -m pytest tests/test_fuzz_hostile.py -q -p no:cacheprovider

Each test counts the inputs it tried; `-s` prints the totals at the end of the module.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections import Counter

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzer needs hypothesis (pip install 'workbench[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402

# WORKBENCH_FUZZ=long: a hundred times the CI inputs, random (not derandomised); a number: that many times.
_FACTOR = {"": 1, "long": 100}.get(os.environ.get("WORKBENCH_FUZZ", ""), None) or int(os.environ["WORKBENCH_FUZZ"])
_LONG = _FACTOR > 1
_SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def _settings(ci_examples: int):
    return settings(max_examples=ci_examples * _FACTOR, derandomize=not _LONG, deadline=None,
                    database=None, suppress_health_check=_SUPPRESS, print_blob=True)


TRIED: Counter = Counter()


class _Shared(dict):
    """A module fixture's files and values, shown briefly when hypothesis reports a failing example."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


@pytest.fixture(scope="module", autouse=True)
def _report_count():
    yield
    print(f"\nfuzzer: {sum(TRIED.values())} inputs tried ({', '.join(f'{k} {v}' for k, v in sorted(TRIED.items()))})")


def _exit_code(argv: list[str], capsys) -> int:
    """The CLI's exit code for `argv`; argparse's usage errors (SystemExit 2) count as a refusal. Any other
    exception propagates and fails the test: a traceback a user would see."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert "\x1b" not in err  # control bytes from the input are escaped on the way out
    return code


# Values the mutations put anywhere: JSON-like data of every type, small and large, hostile strings among them.
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), _TEXT,
                    st.sampled_from(["", "..", "/etc/passwd", "/dev/zero", "/proc/self/x", "${HOME}", "${UNSET_X}",
                                     "import:os:system", "file:/dev/zero", "yolov5:/dev/zero", "-1", "1e309",
                                     "\x1b[31m", "a\nb: 1", "*alias", "&anchor x", "!!python/object:os.system"]))
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(_TEXT, inner, max_size=4)), max_leaves=12)


def _paths(data, prefix=()):
    """Every key path of a nested dict/list."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


def _mutate(data, rnd: random.Random, value):
    """`data` with one random key path replaced by `value`, deleted, or given an extra key."""
    data = copy.deepcopy(data)
    paths = [p for p in _paths(data) if p]
    path = rnd.choice(paths)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    action = rnd.choice(["replace", "replace", "delete", "add"])
    if action == "replace":
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[str(value)[:20]] = value
    else:
        parent.append(value)
    return data


# --- recipes and overrides --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_base(tmp_path_factory) -> dict:
    import yaml
    from conftest import tiny_recipe
    from helpers import make_image_folder

    root = tmp_path_factory.mktemp("fuzz_recipe")
    images = make_image_folder(root / "images")
    stages = ("  - prune: {method: structured, ratio: 0.25}\n  - calibrate: {method: entropy}\n  - export: {}\n"
              "  - evaluate: {latency_batch_sizes: [1]}\n")
    return _Shared(root=root, data=yaml.safe_load(tiny_recipe(images, root / "runs", stages=stages)))


@_settings(150)
@given(seed=st.integers(0, 2**32 - 1), value=_VALUE, mutations=st.integers(1, 3))
def test_fuzzed_recipes_validate_or_are_refused(recipe_base, capsys, seed, value, mutations):
    import yaml

    rnd = random.Random(seed)
    data = recipe_base["data"]
    for _ in range(mutations):
        data = _mutate(data, rnd, value)
    path = recipe_base["root"] / "r.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    TRIED["recipes"] += 1
    assert _exit_code(["validate", str(path)], capsys) in (0, 2)


@_settings(100)
@given(text=st.text(max_size=300))
def test_fuzzed_recipe_text_is_refused_or_valid(recipe_base, capsys, text):
    path = recipe_base["root"] / "t.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    TRIED["recipe text"] += 1
    assert _exit_code(["validate", str(path)], capsys) in (0, 2)


_KEY_PART = st.one_of(st.sampled_from(["stages", "model", "data", "calibrate", "method", "0", "-1", "99", "spec",
                                       "calibration", "path", "export", "kwargs", "", "name", "runs_dir"]), _TEXT)


@_settings(150)
@given(keys=st.lists(st.lists(_KEY_PART, min_size=1, max_size=6), min_size=1, max_size=3),
       values=st.lists(st.one_of(_TEXT, st.sampled_from(["{a: [", "[1, 2]", "{}", "null", "*x", "!!binary AA=="])),
                       min_size=3, max_size=3))
def test_fuzzed_overrides_apply_or_are_refused(recipe_base, capsys, keys, values):
    import yaml

    path = recipe_base["root"] / "o.yaml"
    path.write_text(yaml.safe_dump(recipe_base["data"]))
    overrides = [".".join(k) + "=" + v for k, v in zip(keys, values)]
    TRIED["overrides"] += 1
    assert _exit_code(["validate", str(path), *overrides], capsys) in (0, 2)


# --- data.yaml, YOLO labels, COCO JSON --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detection_set(tmp_path_factory):
    from test_detection_data import write_detection_set

    root = tmp_path_factory.mktemp("fuzz_data")
    images, ann, labels = write_detection_set(root / "set")
    return _Shared(root=root, images=images, ann=ann, labels=labels, coco=json.loads(ann.read_text()),
                   label_texts={p.name: p.read_text() for p in labels.iterdir()})


def _load_detection(split: dict) -> None:
    """Build the split and read every record's labels, as a run's preflight does: fine, or a WorkbenchError."""
    from workbench.data import build_dataset, check_readable
    from workbench.schema import DataConfig

    try:
        config = DataConfig(evaluation=split, transform={"letterbox": [64, 64], "stride": 8})
        dataset = build_dataset(config, "evaluation")
        check_readable(dataset, "data.evaluation")
    except WorkbenchError:
        return
    except ValueError as e:  # pydantic's ValidationError: the recipe layer turns it into a RecipeError
        if type(e).__name__ != "ValidationError":
            raise


_NUMBER_TEXT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 10**12).map(str),
                         st.sampled_from(["", "nan", "-0", "1e400", "0x10", "1_000", "\x00", "\x1b[2J", "１"]))
_LABEL_LINE = st.lists(_NUMBER_TEXT, min_size=0, max_size=7).map(" ".join)


@_settings(100)
@given(lines=st.lists(_LABEL_LINE, max_size=6), raw=st.one_of(st.none(), st.binary(max_size=64)),
       which=st.integers(0, 10))
def test_fuzzed_yolo_labels_load_or_are_refused(detection_set, lines, raw, which):
    labels = detection_set["labels"]
    names = sorted(detection_set["label_texts"])
    target = labels / names[which % len(names)]
    try:
        if raw is not None:
            target.write_bytes(raw)
        else:
            target.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        TRIED["yolo labels"] += 1
        _load_detection({"source": "yolo_txt", "path": str(detection_set["images"]), "label_dir": str(labels)})
    finally:
        target.write_text(detection_set["label_texts"][target.name])


@_settings(100)
@given(seed=st.integers(0, 2**32 - 1), value=_VALUE)
def test_fuzzed_data_yaml_loads_or_is_refused(detection_set, seed, value):
    import yaml

    base = {"path": str(detection_set["root"] / "set"), "train": "images", "val": "images",
            "names": ["cat1", "cat2", "cat3"]}
    data = _mutate(base, random.Random(seed), value)
    path = detection_set["root"] / "data.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    TRIED["data.yaml"] += 1
    _load_detection({"source": "yolo", "yaml": str(path)})


@_settings(150)
@given(seed=st.integers(0, 2**32 - 1), value=_VALUE, mutations=st.integers(1, 3))
def test_fuzzed_coco_json_loads_or_is_refused(detection_set, seed, value, mutations):
    rnd = random.Random(seed)
    coco = detection_set["coco"]
    for _ in range(mutations):
        coco = _mutate(coco, rnd, value)
    path = detection_set["root"] / "fuzzed.json"
    try:
        path.write_text(json.dumps(coco, allow_nan=True))
    except (TypeError, ValueError):  # a key json cannot write: not an input a file can hold
        return
    TRIED["coco"] += 1
    _load_detection({"source": "coco", "path": str(detection_set["images"]), "annotations": str(path)})


# --- ONNX for check-onnx and build ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_base(tmp_path_factory) -> dict:
    import onnx
    import torch
    from helpers import tiny_cnn

    root = tmp_path_factory.mktemp("fuzz_onnx")
    path = root / "tiny.onnx"
    torch.onnx.export(tiny_cnn(), torch.zeros(1, 3, 16, 16), str(path), dynamo=False, opset_version=17)
    return _Shared(root=root, bytes=path.read_bytes(), model=onnx.load(str(path)))


@_settings(120)
@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 2**31)))
def test_fuzzed_onnx_bytes_are_checked_or_refused(onnx_base, capsys, flips, cut):
    data = bytearray(onnx_base["bytes"])
    for at, byte in flips:
        data[at % len(data)] = byte
    if cut is not None:
        data = data[: cut % len(data)]
    path = onnx_base["root"] / "bytes.onnx"
    path.write_bytes(bytes(data))
    TRIED["onnx bytes"] += 1
    assert _exit_code(["check-onnx", str(path)], capsys) in (0, 1, 2)


def _mutated_graph(model, rnd: random.Random, number: int):
    """The graph with one structural edit: an initializer's dims, an input's dims, a node's op type or inputs."""
    model = copy.deepcopy(model)
    g = model.graph
    edit = rnd.choice(["init_dims", "input_dims", "op_type", "node_input", "drop_node", "init_type"])
    if edit == "init_dims" and g.initializer:
        t = rnd.choice(g.initializer)
        del t.dims[:]
        t.dims.extend([number, rnd.choice([1, 0, -1, 2**31, number])][: rnd.randint(0, 2)])
    elif edit == "input_dims":
        dims = g.input[0].type.tensor_type.shape.dim
        dims[rnd.randrange(len(dims))].dim_value = number
    elif edit == "op_type":
        rnd.choice(g.node).op_type = rnd.choice(["QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "NoSuchOp",
                                                 "Loop", "If", ""])
    elif edit == "node_input":
        node = rnd.choice(g.node)
        if node.input:
            node.input[rnd.randrange(len(node.input))] = rnd.choice(["", "missing", g.input[0].name, node.output[0]])
    elif edit == "drop_node" and len(g.node) > 1:
        del g.node[rnd.randrange(len(g.node))]
    elif g.initializer:
        rnd.choice(g.initializer).data_type = rnd.randint(0, 30)
    return model


@_settings(80)
@given(seed=st.integers(0, 2**32 - 1), number=st.one_of(st.integers(-3, 70), st.integers(2**20, 2**40)),
       build=st.integers(0, 7))
def test_fuzzed_onnx_graphs_are_checked_built_or_refused(onnx_base, capsys, seed, number, build):
    import onnx

    model = _mutated_graph(onnx_base["model"], random.Random(seed), number)
    path = onnx_base["root"] / "graph.onnx"
    try:
        onnx.save(model, str(path))
    except (ValueError, onnx.onnx_cpp2py_export.checker.ValidationError):
        return
    TRIED["onnx graphs"] += 1
    assert _exit_code(["check-onnx", str(path)], capsys) in (0, 1, 2)
    if build == 0:  # one in eight also compiled by OpenVINO (seconds each)
        pytest.importorskip("openvino")
        TRIED["onnx builds"] += 1
        out = onnx_base["root"] / "graph_openvino.xml"
        assert _exit_code(["build", str(path), "--engine", "openvino", "--precision", "fp32", "--out", str(out)],
                          capsys) in (0, 2)
