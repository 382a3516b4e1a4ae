"""The engine guard and the numbers every engine trusts: no engine leaves a command unverified with exit 0.

A wrong engine here is a real one: OpenVINO compiles a copy of its graph whose 8-bit weights were negated (the
engine then computes another function on any CPU), so nothing depends on which CPU runs the tests. CPU facts
are stubbed where the build's choice depends on them.
"""

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import tiny_recipe
from helpers import make_image_folder
from onnx import numpy_helper

from workbench.cli import main
from workbench.hardware.cpu import CpuInfo
from workbench.stats import samples_to_resolve, wilson_interval

ov = pytest.importorskip("openvino", reason="OpenVINO is a dependency of the default install")

AVX2 = CpuInfo("AVX2-only x86 (Zen 2)", "x86_64", 2, ("avx2",))
VNNI = CpuInfo("AVX-512 VNNI x86 (Zen 4)", "x86_64", 2, ("avx2", "avx512f", "avx512_vnni"))
AMX = CpuInfo("AMX x86 (Sapphire Rapids)", "x86_64", 2, ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16"))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A run directory of the trained tiny CNN: model.onnx (Q/DQ), its recipe, 12 + 36 images."""
    root = tmp_path_factory.mktemp("calibrated")
    images = make_image_folder(root / "images", per_class=12)
    recipe = root / "r.yaml"
    recipe.write_text(tiny_recipe(images, root / "runs", "  - calibrate: {method: max}\n  - export: {}\n")
                      .replace("helpers:tiny_cnn", "helpers:trained_cnn"))
    assert main(["run", str(recipe)]) == 0
    return next((root / "runs").iterdir()), images


def _bare_copy(run_dir, tmp_path):
    """model.onnx alone in a folder: no recipe beside it."""
    (tmp_path / "bare").mkdir()
    return shutil.copy(run_dir / "model.onnx", tmp_path / "bare" / "model.onnx")


def _negate_weights(src, dst):
    """A copy of an ONNX graph whose 8-bit weight initializers are negated: another function, same layout."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.int8 and value.ndim >= 2:
            init.CopyFrom(numpy_helper.from_array(np.clip(-value.astype(np.int16), -127, 127).astype(np.int8),
                                                  init.name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture
def wrong_engine(monkeypatch, tmp_path):
    """OpenVINO compiles every INT8 graph (the one with the build's notes) from a copy with negated weights."""
    from workbench.runtime import openvino

    original = openvino.compile_model_file

    def compile_corrupted(req):
        if not req.notes:
            return original(req)
        bad = tmp_path / "corrupted" / req.onnx.name
        bad.parent.mkdir(exist_ok=True)
        return original(dataclasses.replace(req, onnx=_negate_weights(req.onnx, bad)))

    monkeypatch.setattr(openvino, "compile_model_file", compile_corrupted)


def _stub_cpu(monkeypatch, cpu: CpuInfo) -> None:
    from workbench.hardware import cpu as cpu_module

    monkeypatch.setattr(cpu_module, "cpu_info", lambda: cpu)


def _openvino_files(folder):
    return sorted(p.name for p in folder.iterdir() if "openvino" in p.name)


# --- the graph's numbers, before anything compiles ---------------------------------------------------------------

@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_cli_build_refuses_a_scale_no_engine_can_compute_with_naming_the_node(calibrated, tmp_path, bad, capsys):
    run_dir, images = calibrated
    model = onnx.load(str(run_dir / "model.onnx"))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and
             any(i.name == n.input[1] for i in model.graph.initializer))
    init = next(i for i in model.graph.initializer if i.name == q.input[1])
    init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), bad), init.name))
    (tmp_path / "g").mkdir()
    onnx.save(model, str(tmp_path / "g" / "model.onnx"))
    assert main(["build", str(tmp_path / "g" / "model.onnx"), "--engine", "openvino", "--data", str(images)]) == 2
    err = capsys.readouterr().err
    assert "[positive_scale]" in err and (q.name or q.output[0]) in err and "Nothing was compiled" in err
    assert _openvino_files(tmp_path / "g") == []
    # the same file is refused by bench before it is timed, and check-onnx lists it
    assert main(["bench", str(tmp_path / "g" / "model.onnx"), "--repeats", "1", "--warmup", "0"]) == 2
    assert "[positive_scale]" in capsys.readouterr().err
    assert main(["check-onnx", str(tmp_path / "g" / "model.onnx"), "--json"]) == 1
    assert any(v["rule"] == "positive_scale" and v["node"] == (q.name or q.output[0])
               for v in json.loads(capsys.readouterr().out))


def test_a_zero_point_of_another_type_is_refused_by_name():
    from onnx import TensorProto
    from onnx import helper as h

    from workbench.qdq.numeric import numeric_violations

    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int32(3), "zp")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="quant_x"),
             h.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dequant_x")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    found = numeric_violations(h.make_model(graph))
    assert [(v.rule, v.node) for v in found] == [("zero_point_range", "quant_x"), ("zero_point_range", "dequant_x")]
    assert "int32" in found[0].message


# --- the CLI build's guard -----------------------------------------------------------------------------------------

def test_cli_build_guards_on_the_images_it_is_given_and_refuses_without_any(calibrated, tmp_path, capsys):
    run_dir, images = calibrated
    bare = _bare_copy(run_dir, tmp_path)
    assert main(["build", str(bare), "--engine", "openvino"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--no-guard" in err and "there are none" in err
    assert _openvino_files(bare.parent) == []
    assert main(["build", str(bare), "--engine", "openvino", "--data", str(images)]) == 0
    sidecar = json.loads((bare.parent / "model_openvino.xml.json").read_text())
    assert sidecar["verified"] is True and sidecar["guard"]["passed"]
    assert sidecar["guard"]["samples"] >= samples_to_resolve(90.0) and sidecar["guard"]["low"] >= 90.0
    assert sidecar["guard"]["reference"] == "model_openvino_graph.onnx"  # the graph it was compiled from


def test_cli_build_refuses_a_wrong_engine_leaves_no_file_and_no_guard_marks_it_unverified(
        calibrated, tmp_path, wrong_engine, capsys):
    run_dir, images = calibrated
    bare = _bare_copy(run_dir, tmp_path)
    assert main(["build", str(bare), "--engine", "openvino", "--data", str(images)]) == 2
    err = capsys.readouterr().err
    assert "openvino_int8 engine was refused (refused: agreement below the threshold)" in err
    assert "top-1 agreement" in err and "Its files were removed" in err
    assert _openvino_files(bare.parent) == []

    # the run directory's own images serve too (its recipe.yaml)
    in_run = tmp_path / "run"
    shutil.copytree(run_dir, in_run)
    assert main(["build", str(in_run / "model.onnx"), "--engine", "openvino"]) == 2
    assert "was refused" in capsys.readouterr().err and not (in_run / "model_openvino.xml").exists()

    assert main(["build", str(bare), "--engine", "openvino", "--no-guard"]) == 0
    sidecar = json.loads((bare.parent / "model_openvino.xml.json").read_text())
    assert sidecar["verified"] is False and sidecar["guard"] is None
    assert main(["bench", str(bare.parent / "model_openvino.xml"), str(bare), "--batch-sizes", "1", "--repeats", "1",
                 "--warmup", "0", "--json", str(tmp_path / "bench.json")]) == 0
    timed = json.loads((tmp_path / "bench.json").read_text())["backends"]
    assert timed["model_openvino.xml"]["verified"] is False and "verified" not in timed["model.onnx"]


def test_cli_build_compiles_the_layout_and_weights_asked_for(calibrated, tmp_path):
    run_dir, images = calibrated
    bare = _bare_copy(run_dir, tmp_path)
    # tensorrt_style: the caller's model.onnx itself is the graph compiled and guarded against; no converted copy
    assert main(["build", str(bare), "--engine", "openvino", "--openvino-graph", "tensorrt_style",
                 "--data", str(images)]) == 0
    sidecar = json.loads((bare.parent / "model_openvino.xml.json").read_text())
    assert sidecar["graph"] == "tensorrt_style" and sidecar["guard"]["reference"] == "model.onnx"
    assert bare.is_file() and not (bare.parent / "model_openvino_graph.onnx").exists()
    # the weights asked for, not this CPU's choice (the build stage's openvino_weights, on the command line)
    assert main(["build", str(bare), "--engine", "openvino", "--openvino-weights", "reduce_range", "--no-guard"]) == 0
    sidecar = json.loads((bare.parent / "model_openvino.xml.json").read_text())
    assert sidecar["weights"] == "reduce_range" and sidecar["verified"] is False


# --- how many images: enough to resolve the threshold ------------------------------------------------------------

def test_the_sample_count_follows_from_the_threshold():
    # Wilson's interval of n of n starts at n / (n + z^2): 35 of 35 resolve 90%, 34 of 34 do not
    assert samples_to_resolve(90.0) == 35
    assert wilson_interval(35, 35).low >= 90.0 > wilson_interval(34, 34).low
    assert samples_to_resolve(97.0) == 125 and samples_to_resolve(99.0) == 381
    assert samples_to_resolve(90.0, confidence=0.99) > samples_to_resolve(90.0)


def _batches(count: int, rng, split="calibration", batch=8):
    for start in range(0, count, batch):
        yield split, rng.standard_normal((min(batch, count - start), 16)).astype(np.float32)


def test_the_guard_draws_more_images_while_its_interval_straddles_the_threshold():
    """A linear classifier and an engine that computes it with slightly other weights: it disagrees near ties only."""
    from workbench.runtime.guard import GuardPolicy, guard_engine
    from workbench.tasks.classification import ClassificationTask

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((16, 5))
    nearly = weights + rng.standard_normal(weights.shape) * 0.05
    faithful, engine = (lambda x: x @ weights), (lambda x: x @ nearly)
    task = ClassificationTask()

    same = guard_engine(faithful, faithful, _batches(4000, rng), task.agreement_meter(None),
                        GuardPolicy(90.0), "engine", "graph")
    assert same.passed and same.agreement == 100.0 and same.samples == 40  # 35 needed, in batches of 8
    strict = guard_engine(faithful, faithful, _batches(4000, rng), task.agreement_meter(None),
                          GuardPolicy(97.0), "engine", "graph")
    assert strict.passed and strict.samples == 128 and strict.min_samples == 125

    close = guard_engine(engine, faithful, _batches(4000, np.random.default_rng(1)), task.agreement_meter(None),
                         GuardPolicy(90.0), "engine", "graph")
    # disagreements near ties leave the interval across 90% at 40 and 72 images: it doubles until it resolves
    assert 90.0 < close.agreement < 100.0 and close.samples == 144 and close.passed and close.low >= 90.0
    # the same engine with fewer images than resolve it: undecided, so refused
    short = guard_engine(engine, faithful, _batches(72, np.random.default_rng(1)), task.agreement_meter(None),
                         GuardPolicy(90.0), "engine", "graph")
    assert not short.passed and short.verdict == "refused: undecided (more images needed)"
    assert "more images" in short.describe()
    wrong = guard_engine(lambda x: -(x @ weights), faithful, _batches(4000, rng), task.agreement_meter(None),
                         GuardPolicy(90.0), "engine", "graph")
    assert not wrong.passed and wrong.high < 90.0 and wrong.samples == 40
    empty = guard_engine(faithful, faithful, iter(()), task.agreement_meter(None), GuardPolicy(), "engine", "graph")
    assert not empty.passed and empty.verdict == "refused: no images to compare on"


def _yolo_outputs(rng, images=16, boxes=300, classes=3) -> np.ndarray:
    """A YOLOv5 raw output (B, N, 5 + C): boxes in a 320-pixel image, scores spread around 0.25."""
    x = np.zeros((images, boxes, 5 + classes), dtype=np.float32)
    x[..., :2] = rng.uniform(30, 290, (images, boxes, 2))
    x[..., 2:4] = rng.uniform(12, 60, (images, boxes, 2))
    x[..., 4] = rng.uniform(0.2, 0.4, (images, boxes))
    x[..., 5:] = rng.uniform(0, 1, (images, boxes, classes)) ** 0.2
    return x


def test_a_detector_engine_is_judged_by_its_boxes_map_not_by_boxes_crossing_a_score_cut():
    """A correct engine moves scores a little: boxes near 0.25 cross the cut, which raw box agreement counts as lost
    (FastestDet: 80.7% agreement at mAP 0.162 vs 0.164); mAP50 against the graph's confident boxes keeps them."""
    from workbench.tasks.detection import DetectionTask

    rng = np.random.default_rng(0)
    task = DetectionTask()
    reference = _yolo_outputs(rng)
    jittered = reference.copy()
    jittered[..., :4] += rng.normal(0, 0.5, jittered[..., :4].shape)
    jittered[..., 4] *= rng.uniform(0.8, 1.2, jittered[..., 4].shape)  # the objectness moves, boxes stay
    agreeing, compared = task.agreement_counts(jittered, reference, 3)
    assert agreeing / compared < 0.9  # the old criterion refuses this engine
    meter = task.agreement_meter(3)
    meter.update(jittered, reference)
    estimate = meter.estimate(0.95)
    assert estimate.low >= 90.0 and meter.compared == compared

    broken = reference.copy()
    broken[..., 4] = rng.permutation(broken[..., 4].ravel()).reshape(broken[..., 4].shape)  # scores on wrong boxes
    meter = task.agreement_meter(3)
    meter.update(broken, reference)
    assert meter.estimate(0.95).high < 90.0
    nothing = task.agreement_meter(3)
    nothing.update(reference * 0, reference * 0)  # no confident box: nothing to agree on
    assert nothing.estimate(0.95) is None


# --- the build stage, evaluate, and the CPU's arithmetic ----------------------------------------------------------

def _run(tmp_path, build: str, images, evaluate=True):
    stages = f"  - calibrate: {{method: max}}\n  - export: {{}}\n  - build: {build}\n"
    stages += "  - evaluate: {latency: false}\n" if evaluate else ""
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", stages).replace("helpers:tiny_cnn", "helpers:trained_cnn"))
    code = main(["run", str(recipe)])
    run_dir = next((tmp_path / "runs").iterdir())
    return code, run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_the_build_stage_refuses_a_wrong_engine_on_any_cpu_and_evaluate_flags_it_when_kept(
        calibrated, tmp_path, wrong_engine, monkeypatch, capsys):
    _, images = calibrated
    _stub_cpu(monkeypatch, AMX)
    code, _, _ = _run(tmp_path / "required", "{engine: openvino, required: true}", images)
    assert code == 2 and "the openvino_int8 engine was refused" in capsys.readouterr().err
    for cpu in (AVX2, VNNI):
        _stub_cpu(monkeypatch, cpu)
        code, run_dir, metrics = _run(tmp_path / cpu.model[:4], "{engine: openvino}", images)
        assert code == 0
        build = metrics["stages"]["build"]
        assert build["built"] is False and "was refused" in build["reason"] and not build["guard"]["passed"]
        assert build["guard"]["high"] < 90.0 and build["guard"]["reference"] == "model_openvino_int8.onnx"
        assert not any((run_dir / f"model_openvino_int8.{suffix}").exists() for suffix in ("xml", "bin", "onnx"))
        assert "openvino_int8" not in metrics["stages"]["evaluate"]["backends"]

    code, run_dir, metrics = _run(tmp_path / "kept", "{engine: openvino, guard: false}", images)
    assert code == 0
    assert metrics["stages"]["build"]["verified"] is False
    assert json.loads((run_dir / "model_openvino_int8.xml.json").read_text())["verified"] is False
    entry = metrics["stages"]["evaluate"]["backends"]["openvino_int8"]
    check = entry["engine_check"]
    assert entry["verified"] is False and check["within"] is False and check["samples"] == 36
    assert check["against"] == "ort_openvino_graph" and check["high"] < check["min_agreement"] == 90.0
    assert any("openvino_int8" in w["message"] and "outside the guard's threshold of 90%" in w["message"]
               for w in metrics["warnings"])
    from workbench.report import backend_rows

    titles = {r["backend"]: r["title"] for r in backend_rows(metrics)}
    assert titles["openvino_int8"].endswith("(unverified)") and not titles["ort_int8_faithful"].endswith("(unverified)")


@pytest.mark.parametrize("cpu, weights", [(AVX2, "reduce_range"), (VNNI, "s8"), (AMX, "s8")])
def test_the_openvino_weight_choice_follows_the_cpu_and_the_guard_measures_that_arithmetic(
        calibrated, tmp_path, monkeypatch, cpu, weights):
    """7-bit weights where a 16-bit pairwise sum could saturate (x86 without VNNI), 8-bit where VNNI or AMX sums in
    32 bits; the guard's reference is the graph with those weights."""
    from workbench.runtime.openvino import weights_for_cpu

    run_dir, _ = calibrated
    _stub_cpu(monkeypatch, cpu)
    assert weights_for_cpu()[0] == weights
    in_run = tmp_path / "run"
    shutil.copytree(run_dir, in_run)
    assert main(["build", str(in_run / "model.onnx"), "--engine", "openvino"]) == 0
    sidecar = json.loads((in_run / "model_openvino.xml.json").read_text())
    assert sidecar["weights"] == weights and sidecar["graph"] == f"u8 activations, {weights} weights"
    assert sidecar["verified"] and sidecar["guard"]["reference"] == "model_openvino_graph.onnx"
    graph = onnx.load(str(in_run / "model_openvino_graph.onnx"))
    largest = [int(np.abs(numpy_helper.to_array(i).astype(np.int16)).max()) for i in graph.graph.initializer
               if numpy_helper.to_array(i).dtype == np.int8 and numpy_helper.to_array(i).ndim >= 2]
    # per-channel 8-bit weights reach 127 in every layer; 7-bit ones stay within 64 where the sums could saturate
    assert any(m <= 64 for m in largest) == (weights == "reduce_range") and max(largest) == 127


def test_the_guard_measures_the_engine_and_evaluate_scores_the_conversion_apart(calibrated, tmp_path, monkeypatch):
    """A conversion that changes the function (here its weights negated) is not the engine's fault: the engine computes
    the converted graph, so the guard passes it; evaluate finds the converted graph far from the faithful one and
    says so."""
    from workbench.runtime import openvino

    original = openvino.int8_graph

    def wrong_conversion(model, out, graph="u8", weights="auto", arithmetic=None):
        path, notes = original(model, out, graph, weights, arithmetic)
        return _negate_weights(path, path), notes

    monkeypatch.setattr(openvino, "int8_graph", wrong_conversion)
    _, images = calibrated
    code, run_dir, metrics = _run(tmp_path, "{engine: openvino}", images)
    assert code == 0
    build = metrics["stages"]["build"]
    assert build["built"] and build["guard"]["passed"] and build["verified"]
    backends = metrics["stages"]["evaluate"]["backends"]
    assert backends["openvino_int8"]["engine_check"]["within"]
    conversion = backends["ort_openvino_graph"]["conversion_check"]
    assert not conversion["within"] and conversion["high"] < 90.0 and conversion["against"] == "ort_int8_faithful"
    assert any("the conversion itself loses accuracy" in w["message"] for w in metrics["warnings"])


def test_the_cpu_facts_follow_onednns_isa_cap():
    """Under ONEDNN_MAX_CPU_ISA=AVX2 OpenVINO runs AVX2 kernels on any CPU: the facts the build decides by must say
    so, or it chooses s8 weights whose 16-bit pair sums those kernels saturate (the guard then refuses the engine)."""
    from workbench.hardware.cpu import capped_flags

    sapphire = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"}
    assert capped_flags(sapphire, "") == sapphire and capped_flags(sapphire, "ALL") == sapphire
    assert capped_flags(sapphire, "avx2") == {"avx2"}
    assert capped_flags(sapphire, "AVX2_VNNI") == {"avx2", "avx_vnni"}
    assert capped_flags(sapphire, "AVX512_CORE") == {"avx2", "avx512f"}
    assert capped_flags(sapphire, "AVX512_CORE_VNNI") == {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}
    assert capped_flags(sapphire, "AVX512_CORE_AMX") == sapphire
    assert capped_flags(sapphire, "SSE41") == set()
