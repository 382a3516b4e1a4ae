"""Target profiles (issue 25): each profile's fake-quant model is what its exported graph computes, the TensorRT
graph is what it was, power-of-two scales are exact, the OpenVINO variant follows the CPU, asymmetric ranges use
their zero point, and validate refuses what an engine cannot honour."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers import make_image_folder, tiny_cnn, write_recipe
from onnx import numpy_helper
from torch import nn

from workbench.cli import main
from workbench.errors import CalibrationError
from workbench.qdq.export import export_onnx
from workbench.qdq.trt_rules import check_qdq
from workbench.quant.affine import AffineQuantizer
from workbench.quant.calibrators import SignedHistogram, affine_range
from workbench.quant.ptq import Int8Config, quantize_, restore_, set_float_units
from workbench.runtime import cpu
from workbench.runtime.runners import OrtRunner
from workbench.targets import (
    TENSORRT,
    Arithmetic,
    FixedPointTarget,
    OpenVINOTarget,
    TensorRTTarget,
    resolve_target,
)

torch.manual_seed(0)
CALIB = [torch.randn(8, 3, 32, 32) for _ in range(4)]
TEST = torch.randn(16, 3, 32, 32)
PROFILES = {
    "openvino_avx2": OpenVINOTarget(cpu="avx2"),
    "openvino_vnni": OpenVINOTarget(cpu="avx512_vnni"),
    "fixed_point": FixedPointTarget(),
}


def _loop(model):
    with torch.no_grad():
        for x in CALIB:
            model(x)


class SiluNet(nn.Module):
    """conv -> SiLU -> conv -> ReLU -> linear: one activation skewed negative a little, one never negative."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = nn.functional.silu(self.conv1(x))
        x = torch.relu(self.conv3(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _quantized(arithmetic: Arithmetic, model=None, method: str = "mse"):
    model = model if model is not None else tiny_cnn()
    result = quantize_(model, Int8Config(method=method), _loop, CALIB[0][:2], arithmetic)
    return model, result


def _qdq_constants(path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(the tensor a QuantizeLinear reads, its scale, its zero point) for every Q of the graph."""
    graph = onnx.load(str(path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"})
    return [(n.input[0], consts[n.input[1]], consts[n.input[2]]) for n in graph.node if n.op_type == "QuantizeLinear"]


def test_the_default_target_is_tensorrt_and_its_graph_is_unchanged(tmp_path):
    """No target and `target: tensorrt` give today's graph byte for byte, on modelopt's own quantizers, and it
    passes TensorRT's Q/DQ rules."""
    assert resolve_target(TensorRTTarget()) == TENSORRT and TENSORRT.modelopt_native
    old = SiluNet().eval()
    quantize_(old, Int8Config(), _loop, CALIB[0][:2])  # the call as it was, no arithmetic
    new, _ = _quantized(resolve_target(TensorRTTarget()), SiluNet().eval())
    assert not any(isinstance(m, AffineQuantizer) for m in new.modules())
    a = export_onnx(old, TEST[:1], tmp_path / "old.onnx")
    b = export_onnx(new, TEST[:1], tmp_path / "new.onnx")
    assert a.read_bytes() == b.read_bytes()
    assert check_qdq(b, {n for n, _ in new.named_modules()}) == []


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("model_fn", [tiny_cnn, SiluNet])
def test_fake_quant_is_what_the_exported_graph_computes(profile, model_fn, tmp_path):
    """ONNX Runtime, optimisations off, runs the exported Q/DQ graph to float tolerance of the PyTorch fake-quant
    model, for every profile (a wrong zero point, bit width or scale rounding in either shows as whole steps)."""
    arithmetic = resolve_target(PROFILES[profile])
    model, _ = _quantized(arithmetic, model_fn().eval())
    with torch.no_grad():
        expected = model(TEST).numpy()
    path = export_onnx(model, TEST[:1], tmp_path / "m.onnx")
    got = OrtRunner(path, "faithful")(TEST)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    # and the fake-quant model is not the float model: it does quantize
    with torch.no_grad():
        assert not np.allclose(expected, model_fn().eval()(TEST).numpy(), atol=1e-4)


@pytest.mark.parametrize("profile, bits", [("openvino_avx2", 7), ("openvino_vnni", 8)])
def test_openvino_graph_u8_activations_and_its_weight_bits(profile, bits, tmp_path):
    """u8 activations with zero points; weights s8 with zero point 0, on the 7-bit grid [-63, 63] for a CPU without
    VNNI (reached: the range is used) and on the 8-bit grid [-127, 127] with it."""
    model, _ = _quantized(resolve_target(PROFILES[profile]), SiluNet().eval())
    path = export_onnx(model, TEST[:1], tmp_path / "m.onnx")
    weights = {name: w for name, w in ((n, p.detach().numpy()) for n, p in model.named_parameters())}
    seen_weights = 0
    for tensor, scale, zero_point in _qdq_constants(path):
        if tensor in weights:
            assert zero_point.dtype == np.int8 and not zero_point.any()
            shape = [-1] + [1] * (weights[tensor].ndim - 1)
            q = np.rint(weights[tensor] / scale.reshape(shape))
            assert np.abs(q).max() == 2 ** (bits - 1) - 1
            seen_weights += 1
        else:
            assert zero_point.dtype == np.uint8
    assert seen_weights == 4


def test_power_of_two_scales_are_exact_powers_of_two(tmp_path):
    """fixed_point: every scale in the graph is one number per tensor, exactly 2^k (a mantissa of 0.5 in frexp)."""
    model, _ = _quantized(resolve_target(FixedPointTarget()), SiluNet().eval())
    scales = [scale for _, scale, _ in _qdq_constants(export_onnx(model, TEST[:1], tmp_path / "m.onnx"))]
    assert len(scales) == 8
    for scale in scales:
        assert scale.size == 1 and scale.dtype == np.float32
        mantissa, _ = np.frexp(scale)
        assert float(mantissa) == 0.5, scale


@pytest.mark.parametrize("flags, variant, bits", [
    (("avx2",), "avx2", 7),
    (("avx2", "avx512f", "avx512_vnni"), "avx512_vnni", 8),
    (("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16"), "amx", 8),
])
def test_openvino_cpu_auto_follows_the_cpu(monkeypatch, flags, variant, bits):
    monkeypatch.setattr(cpu, "cpu_info", lambda: cpu.CpuInfo("stub CPU", "x86_64", 4, flags))
    arithmetic = resolve_target(OpenVINOTarget())
    assert (arithmetic.cpu, arithmetic.weight_bits) == (variant, bits)
    assert "stub CPU" in arithmetic.why
    # an explicit CPU is what a deployment CPU other than this one needs: it wins over this CPU
    other = "avx2" if variant != "avx2" else "amx"
    assert resolve_target(OpenVINOTarget(cpu=other)).weight_bits == (7 if other == "avx2" else 8)


def test_asymmetric_ranges_use_the_zero_point():
    """A never-negative activation (after ReLU) gets zero point 0 and twice the symmetric range's resolution; the
    SiLU's output (down to -0.28) a zero point above 0 and a finer step than a symmetric range of the same data."""
    ov_model, ov = _quantized(resolve_target(OpenVINOTarget(cpu="amx")), SiluNet().eval(), method="max")
    trt_model, trt = _quantized(TENSORRT, SiluNet().eval(), method="max")
    relu_q, silu_q = ov_model.fc.input_quantizer, ov_model.conv2.input_quantizer
    scale, zero_point = relu_q.scale_zero_point()
    assert ov.activation_min["fc.input_quantizer"] == 0.0 and float(zero_point) == 0.0
    symmetric_step = trt.activation_amax["fc.input_quantizer"] / 127
    assert float(scale) == pytest.approx(symmetric_step * 127 / 255, rel=1e-6)
    scale, zero_point = silu_q.scale_zero_point()
    lo = ov.activation_min["conv2.input_quantizer"]
    assert -0.2785 <= lo < -0.05 and float(zero_point) > 0
    assert float(scale) < trt.activation_amax["conv2.input_quantizer"] / 127 * 0.6


def test_affine_mse_beats_the_extremes_on_a_long_tail():
    """mse over the signed histogram clips the long positive tail of a skewed activation that max keeps whole, and
    quantizes the data with a smaller error than the extremes do."""
    torch.manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((200_000,)) - 0.2
    hist = SignedHistogram(num_bins=2048)
    hist.update(x)
    lo_max, hi_max = affine_range(hist, "max")
    lo, hi = affine_range(hist, "mse")
    assert (lo_max, hi_max) == (pytest.approx(float(x.min())), pytest.approx(float(x.max())))
    assert hi < hi_max and lo_max <= lo <= 0

    def error(lo, hi):
        scale = (hi - lo) / 255
        zp = round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
        return float(((q - zp) * scale - x).square().sum())

    assert error(lo, hi) < error(lo_max, hi_max)


def test_restore_reproduces_an_asymmetric_calibration():
    arithmetic = resolve_target(OpenVINOTarget(cpu="avx2"))
    model, result = _quantized(arithmetic, SiluNet().eval())
    restored = SiluNet().eval()
    again = restore_(restored, Int8Config(), result.activation_amax, CALIB[0][:2], arithmetic, result.activation_min)
    assert again.activation_min == result.activation_min
    with torch.no_grad():
        assert torch.equal(model(TEST), restored(TEST))
    with pytest.raises(CalibrationError, match="activation_min"):
        restore_(SiluNet().eval(), Int8Config(), result.activation_amax, CALIB[0][:2], arithmetic, None)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_precision_switches_and_training_reach_the_target_quantizers(profile):
    """Mixed precision's switch turns the target's quantizers off (all float: the float model's outputs), and QAT's
    gradients pass through them to every weight."""
    arithmetic = resolve_target(PROFILES[profile])
    model, result = _quantized(arithmetic, SiluNet().eval())
    float_model = copy.deepcopy(model)
    set_float_units(float_model, result, set(result.quantized))
    with torch.no_grad():
        torch.testing.assert_close(float_model(TEST), SiluNet().eval()(TEST))
    model.train()
    model(TEST).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "weight" in n)


RECIPE = """name: targets
model:
  spec: "import:helpers:tiny_cnn"
  trust_code: true
  input_size: [3, 32, 32]
data:
  calibration: {{source: imagefolder, path: "{images}", count: 12, seed: 0}}
  evaluation: {{source: imagefolder, path: "{images}"}}
  batch_size: 4
runs_dir: "{runs}"
{target}stages:
  - calibrate: {{method: max}}
  - export: {{}}
  - build: {{engine: {engine}}}
"""


@pytest.mark.parametrize("target, engine, said", [
    ("fixed_point", "tensorrt", "power-of-two"),
    ("openvino", "tensorrt", "zero point 0"),
    ("{name: openvino, cpu: avx2}", "tensorrt", "zero point 0"),
])
def test_validate_refuses_a_target_the_engine_cannot_honour(tmp_path, capsys, target, engine, said):
    images = make_image_folder(tmp_path / "images")
    path = write_recipe(tmp_path / "r.yaml", RECIPE.format(images=images, runs=tmp_path / "runs",
                                                            target=f"target: {target}\n", engine=engine))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "target:" in err and "build.engine: tensorrt" in err and said in err, err


def test_validate_accepts_each_target_on_openvino_and_refuses_a_conversion_option(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images")
    for target in ("tensorrt", "openvino", "fixed_point"):
        path = write_recipe(tmp_path / f"{target}.yaml", RECIPE.format(
            images=images, runs=tmp_path / "runs", target=f"target: {target}\n", engine="openvino"))
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    text = RECIPE.format(images=images, runs=tmp_path / "runs", target="target: openvino\n", engine="openvino")
    path = write_recipe(tmp_path / "conv.yaml", text.replace("engine: openvino}", "engine: openvino, "
                                                                                  "openvino_weights: s8}"))
    assert main(["validate", str(path)]) == 2
    assert "openvino_weights" in capsys.readouterr().err
    path = write_recipe(tmp_path / "bad.yaml", text.replace("target: openvino", "target: {name: openvino, cpu: sse}"))
    assert main(["validate", str(path)]) == 2
    assert "target" in capsys.readouterr().err


def test_a_run_with_the_openvino_target_records_and_reopens_its_arithmetic(tmp_path):
    """Through the recipe runner: metrics and calibration.json name the target and hold the asymmetric ranges'
    lower ends, export skips what is TensorRT's, and the notebook's RunExplorer rebuilds the very model the run
    exported (the faithful graph's outputs) from calibration.json alone."""
    import json

    from workbench import api
    from workbench.explore import RunExplorer

    images = make_image_folder(tmp_path / "images")
    text = RECIPE.format(images=images, runs=tmp_path / "runs", target="target: {name: openvino, cpu: avx2}\n",
                         engine="openvino")
    text = text.replace("  - build: {engine: openvino}\n", "  - evaluate: {backends: [pytorch_int8, "
                        "ort_int8_faithful], latency: false}\n")
    run = api.run(write_recipe(tmp_path / "r.yaml", text))
    target = run.metrics["stages"]["calibrate"]["target"]
    assert (target["target"], target["weight_bits"], target["activation_zero_point"]) == ("openvino", 7, True)
    saved = json.loads((run.dir / "calibration.json").read_text())
    assert saved["target"]["cpu"] == "avx2" and set(saved["activation_min"]) == set(saved["activation_amax"])
    export = run.metrics["stages"]["export"]
    assert export["model.onnx"]["tensorrt_rules"] is None and "skipped" in export["model_int8_ort.onnx"]
    faithful = run.metrics["stages"]["evaluate"]["backends"]["ort_int8_faithful"]["metrics"]["top1"]
    assert faithful == run.metrics["stages"]["evaluate"]["backends"]["pytorch_int8"]["metrics"]["top1"]
    explorer = RunExplorer(run.dir, trust_code=True)
    assert explorer.arithmetic.weight_bits == 7
    with torch.no_grad():
        mine = explorer.model(TEST).numpy()
    np.testing.assert_allclose(OrtRunner(run.dir / "model.onnx", "faithful")(TEST), mine, atol=1e-5, rtol=0)


@pytest.mark.parametrize("profile", ["openvino_avx2", "fixed_point"])
def test_ptq_algorithms_run_in_the_target_arithmetic(profile, tmp_path):
    """CLE and bias correction (quant/algorithms) on a target's quantizers: the algorithms see the arithmetic they
    are handed, the fake-quant model they leave is still what its exported graph computes, and restore_ with their
    state rebuilds it."""
    from workbench.quant.algorithms import AlgorithmStep

    arithmetic = resolve_target(PROFILES[profile])
    steps = [AlgorithmStep.model_validate(s) for s in ("cle", {"name": "bias_correction", "mode": "fast"})]
    model = SiluNet().eval()
    result = quantize_(model, Int8Config(method="mse"), _loop, CALIB[0][:2], arithmetic, algorithms=steps)
    assert [r.name for r in result.algorithms] == ["cle", "bias_correction"]
    assert result.arithmetic == arithmetic and isinstance(model.conv1.weight_quantizer, AffineQuantizer)
    with torch.no_grad():
        expected = model(TEST).numpy()
    got = OrtRunner(export_onnx(model, TEST[:1], tmp_path / "m.onnx"), "faithful")(TEST)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    restored = SiluNet().eval()
    restore_(restored, Int8Config(method="mse"), result.activation_amax, CALIB[0][:2], arithmetic,
             result.activation_min or None, ptq_state=result.ptq_state)
    with torch.no_grad():
        torch.testing.assert_close(restored(TEST), model(TEST))


def test_the_target_is_part_of_every_stage_fingerprint_but_the_default_keeps_old_ones(tmp_path):
    """A run resumed under another target calibrates again (its fingerprints differ); runs written before `target:`
    existed (no key, the tensorrt default) keep theirs."""
    from workbench.recipe import parse_recipe
    from workbench.resume import stage_fingerprints

    images = make_image_folder(tmp_path / "images")
    text = RECIPE.format(images=images, runs=tmp_path / "runs", target="", engine="openvino")
    plain = stage_fingerprints(parse_recipe(text))
    assert stage_fingerprints(parse_recipe(text, overrides=["target=tensorrt"])) == plain
    other = stage_fingerprints(parse_recipe(text, overrides=["target=openvino"]))
    assert all(a != b for a, b in zip(plain, other))


def test_the_recorded_arithmetic_is_the_one_the_quantizers_use():
    """The calibrate option `weights: per_tensor` narrows a per-channel profile; fixed point is per tensor whatever
    the option says. What quantize_ records is what its weight quantizers hold."""
    for arithmetic, requested, expected in ((TENSORRT, "per_tensor", "per_tensor"),
                                            (resolve_target(FixedPointTarget()), "per_channel", "per_tensor"),
                                            (resolve_target(OpenVINOTarget(cpu="amx")), "per_channel", "per_channel")):
        model = SiluNet().eval()
        result = quantize_(model, Int8Config(method="max", weights=requested), _loop, CALIB[0][:2], arithmetic)
        assert result.arithmetic.weight_granularity == expected
        assert (model.conv1.weight_quantizer.amax.numel() == 1) == (expected == "per_tensor")


def test_a_run_with_the_openvino_target_reuses_its_engine_on_resume(tmp_path):
    """The openvino target's engine is compiled from model.onnx as exported (no converted graph beside it): resume
    must not ask for model_openvino_int8.onnx and build again."""
    import json

    pytest.importorskip("openvino", reason="needs OpenVINO")
    images = make_image_folder(tmp_path / "images")
    text = RECIPE.format(images=images, runs=tmp_path / "runs", target="target: {name: openvino, cpu: avx2}\n",
                         engine="openvino")
    text = text.replace("  - build: {engine: openvino}\n", "  - build: {engine: openvino, guard: false}\n"
                        "  - evaluate: {backends: [openvino_int8], latency: false}\n")
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", text))]) == 0
    (done,) = (tmp_path / "runs").iterdir()
    assert not (done / "model_openvino_int8.onnx").exists() and (done / "model_openvino_int8.xml").is_file()
    # as if evaluate had failed: the run marked failed, evaluate's record gone
    metrics = json.loads((done / "metrics.json").read_text())
    metrics.update(status="failed", failed_stage="evaluate", error="evaluate failed")
    del metrics["stages"]["evaluate"]
    metrics["fingerprints"] = [f for f in metrics["fingerprints"] if f["stage"] != "evaluate"]
    failed = done.with_name(done.name + ".failed")
    done.rename(failed)
    (failed / "metrics.json").write_text(json.dumps(metrics))
    assert main(["run", "--resume", str(failed), "model.trust_code=true"]) == 0
    metrics = json.loads((done / "metrics.json").read_text())
    assert metrics["resumed"]["reused"] == ["calibrate", "export", "build"], metrics["resumed"]
    # `workbench build` of that graph compiles it as exported (the target's arithmetic, recorded in its metadata),
    # not through a u8 conversion meant for TensorRT-style graphs, and its sidecar says so
    assert main(["build", str(done / "model.onnx"), "--engine", "openvino", "--no-guard", "--out",
                 str(tmp_path / "cli.xml")]) == 0
    sidecar = json.loads((tmp_path / "cli.xml.json").read_text())
    assert sidecar["graph"] == "as exported (target: openvino)" and sidecar["weights"] == "s7"
    assert not (tmp_path / "cli_graph.onnx").exists()
    assert main(["build", str(done / "model.onnx"), "--engine", "openvino", "--no-guard", "--openvino-graph",
                 "tensorrt_style", "--out", str(tmp_path / "other.xml")]) == 2
    assert not (tmp_path / "other.xml").exists()


def test_qat_weight_ranges_keep_the_fixed_point_targets_powers_of_two():
    """QAT re-measures weight ranges after every step (refresh_weight_ranges_): under fixed_point they must stay
    2^k * qmax, or the exported graph leaves the target's arithmetic."""
    import math

    from workbench.quant.ptq import refresh_weight_ranges_

    model = SiluNet().eval()
    result = quantize_(model, Int8Config(method="max"), _loop, CALIB[0][:2], resolve_target(PROFILES["fixed_point"]))
    with torch.no_grad():
        for name in result.quantized:
            dict(model.named_modules())[name].weight.mul_(1.37)  # as a training step moves them
    refresh_weight_ranges_(model, result)
    for name in result.quantized:
        amax = float(dict(model.named_modules())[name].weight_quantizer.amax)
        assert math.log2(amax / 127) == round(math.log2(amax / 127)), (name, amax)


@pytest.mark.parametrize("value", ["[" * 100_000, '{"target": "openvino", "weight_bits": 3}', "not json"])
def test_a_hostile_target_in_a_graphs_metadata_is_refused_by_name(tmp_path, value):
    """`workbench build` reads the exporting target back from the graph: a value the workbench would not write (a deep
    nest that exhausts the JSON parser, a bad field, no JSON) is a clear refusal naming the key, not a traceback."""
    import onnx
    from onnx import TensorProto, helper

    from workbench.errors import WorkbenchError
    from workbench.runtime.openvino import exported_arithmetic

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph)
    model.metadata_props.add(key="workbench.target", value=value)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(WorkbenchError, match="metadata workbench.target"):
        exported_arithmetic(path)
