"""The PTQ algorithm pipeline (issue 25): cross-layer equalization, bias correction, statistics, state, recipes.

Each test runs the real algorithm on a small model through `quantize_` (the calibrate stage's verb), and checks
what the algorithm promises: CLE keeps the float function and equalizes ranges, bias correction removes the mean
output error, the pipeline collects a shared statistic once, ptq_state.pt rebuilds the exact model, bad names and
options are refused at validate, an algorithm that does not apply is recorded as skipped, and a resumed run
reuses the algorithms' state.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_recipe
from helpers import make_image_folder
from pydantic import ValidationError
from torch import nn

from workbench.cli import main
from workbench.quant.algorithms import ALGORITHMS, Algorithm, AlgorithmRecord, AlgorithmStep, StatisticRequest
from workbench.quant.algorithms import base as algo_base
from workbench.quant.algorithms.base import AlgorithmContext, load_state, register_algorithm, save_state
from workbench.quant.config import Int8Config
from workbench.quant.ptq import quantize_, restore_
from workbench.stages.calibrate import CalibrateOptions


def _steps(*items) -> list[AlgorithmStep]:
    return [AlgorithmStep.model_validate(i) for i in items]


def _quantize(net: nn.Module, x: torch.Tensor, *algorithms, weights: str = "per_tensor", **kw):
    model = copy.deepcopy(net)
    result = quantize_(model, Int8Config(method="max", weights=weights), lambda m: m(x), x[:4],
                       algorithms=_steps(*algorithms), **kw)
    return model, result


def _float_out(model: nn.Module, result, x: torch.Tensor) -> torch.Tensor:
    ctx = AlgorithmContext(model, None, result, lambda m: None, x)
    with torch.no_grad(), ctx.float_mode():
        return model(x)


def _out_ranges(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().reshape(conv.weight.shape[0], -1).amax(1)


def _spread(r: torch.Tensor) -> float:
    return float(r.max() / r.min())


def _pathological(act: nn.Module, depthwise: bool = False) -> nn.Sequential:
    """conv -> act -> conv whose first conv's output channels differ in scale from 1e-3 to 1e3."""
    torch.manual_seed(0)
    second = nn.Conv2d(8, 8, 3, padding=1, groups=8) if depthwise else nn.Conv2d(8, 6, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act, second, nn.ReLU(), nn.Conv2d(8 if depthwise else 6, 4, 1))
    with torch.no_grad():
        scale = torch.logspace(-3, 3, 8)
        net[0].weight.mul_(scale.view(-1, 1, 1, 1))
        net[0].bias.mul_(scale)
        net[2].weight.div_(scale.view(*([-1, 1] if depthwise else [1, -1]), 1, 1))  # the function stays reasonable
    return net.eval()


# ---------------------------------------------------------------------------------------------------------
# Cross-layer equalization
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depthwise", [False, True])
def test_cle_keeps_the_float_function_and_equalizes_the_ranges(depthwise):
    net = _pathological(nn.ReLU(), depthwise)
    x = torch.randn(32, 3, 12, 12)
    with torch.no_grad():
        reference = net(x)
    plain, plain_result = _quantize(net, x)
    model, result = _quantize(net, x, {"name": "cle", "high_bias_absorption": False})
    (record,) = result.algorithms
    assert record.name == "cle" and not record.skipped and set(record.changes) >= {"0", "2"}
    after = _float_out(model, result, x)
    assert float((after - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    assert _spread(_out_ranges(net[0])) > 1e5
    assert _spread(_out_ranges(model[0])) < 0.01 * _spread(_out_ranges(net[0]))
    # The same per-tensor INT8 weights lose far less after equalization (the small channels were all rounded away).
    with torch.no_grad():
        err_plain = float((plain(x) - reference).pow(2).mean())
        err_cle = float((model(x) - reference).pow(2).mean())
    assert err_cle < 0.1 * err_plain


def test_cle_absorbs_high_biases_exactly_on_the_calibration_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        net[0].bias[:4] += 20.0  # channels that never go below ~20: their bias can move into the next layer
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        reference = net(x)
    model, result = _quantize(net, x, "cle")
    (record,) = result.algorithms
    assert any("absorbed high biases" in n for n in record.notes)
    after = _float_out(model, result, x)
    assert float((after - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    # the first layer's pre-activation minimum was moved to 0 on the absorbed channels (as scaled by CLE)
    with torch.no_grad():
        low = model[0](x).amin(dim=(0, 2, 3))
        high = net[0](x).amin(dim=(0, 2, 3))
    assert float(low[:4].abs().max()) < 1e-3 * float(high[:4].min())


def test_relu6_is_replaced_by_relu_or_skipped_as_the_options_say():
    net = _pathological(nn.ReLU6())
    x = torch.randn(16, 3, 12, 12)
    model, result = _quantize(net, x, {"name": "cle", "relu6": "replace"})
    assert isinstance(model[1], nn.ReLU) and result.ptq_state["modules"] == {"1": "ReLU"}
    assert any("replaced 1 ReLU6" in n for n in result.algorithms[0].notes)
    kept, kept_result = _quantize(net, x, {"name": "cle", "relu6": "skip"})  # exact, the chain skipped
    assert isinstance(kept[1], nn.ReLU6) and "0 -> 2" in kept_result.algorithms[0].skipped
    assert torch.equal(kept[0].weight, net[0].weight)


class _SharedReLU6Block(nn.Module):
    """EfficientNet-Lite's MBConv shape: ONE ReLU6 module applied after the expansion and after the depthwise
    convolution, so a per-channel bound must follow each call's own channel scales."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.project(self.act(self.depthwise(self.act(self.expand(x)))))


def _shared_relu6_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(_SharedReLU6Block(), nn.ReLU6(), nn.Conv2d(4, 3, 1)).eval()
    with torch.no_grad():  # channel ranges from 0.01 to 10 on both calls; a high bias for the absorption
        scale = torch.logspace(-2, 1, 8).view(-1, 1, 1, 1)
        net[0].expand.weight.mul_(scale)
        net[0].depthwise.weight.mul_(scale.flip(0))
        net[0].depthwise.bias[:3] += 3.0
    return net


def test_relu6_chains_are_equalized_exactly_with_per_channel_clips_on_every_call(tmp_path):
    from workbench.quant.algorithms.channel_clip import ChannelClip

    net = _shared_relu6_net()
    x = torch.randn(32, 3, 10, 10) * 4  # large enough that both calls clip at 6 on some channels
    with torch.no_grad():
        reference = net(x)
        assert bool((net[0].act(net[0].expand(x)) == 6).any())  # the clip is live: replacing it would show
    model, result = _quantize(net, x, "cle")  # the default relu6: clip
    (record,) = result.algorithms
    assert list(record.skipped) == ["absorb 0.expand -> 0.depthwise"]  # the depthwise pads: no absorption there
    assert any("absorbed high biases" in n for n in record.notes)  # depthwise -> project: the bound moved with it
    assert isinstance(model[0].act, ChannelClip) and model[0].act.calls == 2
    assert result.ptq_state["modules"] == {"0.act": "ChannelClip", "1": "ChannelClip"}
    # the two calls carry different bounds (each follows its own convolution's scales), neither all 6
    first, second = model[0].act.bound(0).flatten(), model[0].act.bound(1).flatten()
    assert not torch.allclose(first, second) and not torch.allclose(first, torch.full_like(first, 6.0))
    for _ in range(2):  # the call count restarts with every forward: the second forward is as exact
        after = _float_out(model, result, x)
        assert float((after - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    assert _spread(_out_ranges(model[0].expand)) < 0.2 * _spread(_out_ranges(net[0].expand))
    # ptq_state.pt replays the swap, its bounds and its call counting
    path = tmp_path / "ptq_state.pt"
    save_state(result.ptq_state, path)
    fresh = copy.deepcopy(net)
    restore_(fresh, Int8Config(method="max", weights="per_tensor"), result.activation_amax, x[:4],
             ptq_state=load_state(path))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)) and torch.equal(fresh(x[:5]), model(x[:5]))


def test_a_per_channel_clip_exports_as_fusable_scale_and_clamp_and_onnx_runtime_agrees(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from workbench.quant.algorithms.channel_clip import ChannelClip

    net = _shared_relu6_net()
    x = torch.randn(4, 3, 10, 10) * 4
    model, result = _quantize(net, x, "cle")
    ctx = AlgorithmContext(model, None, result, lambda m: None, x)
    path = tmp_path / "m.onnx"
    with torch.no_grad(), ctx.float_mode():
        expected = model(x).numpy()
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # expand, depthwise and the outer ReLU6: per-channel Div, Clip(0, 1), Mul, which OpenVINO fuses into the
    # convolution (a Minimum against a per-channel constant it does not)
    assert ops.count("Div") == ops.count("Mul") == 3 and ops.count("Clip") == 3 and "Min" not in ops
    assert isinstance(model[1], ChannelClip)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_cle_skips_silu_chains_and_a_model_without_chains_and_the_run_goes_on():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(8, 3, 10, 10)
    model, result = _quantize(net, x, "cle", {"name": "bias_correction", "mode": "fast"})
    cle, bc = result.algorithms
    assert "silu" in cle.skipped["0 -> 2"] and "not positively homogeneous" in cle.skipped["0 -> 2"]
    assert "model" in cle.skipped and not cle.changes
    assert bc.changes  # the next algorithm ran
    linear_only = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    _, result = _quantize(linear_only, torch.randn(8, 3, 2, 2), "cle")
    assert "nothing to equalize" in result.algorithms[0].skipped["model"]


# ---------------------------------------------------------------------------------------------------------
# Bias correction
# ---------------------------------------------------------------------------------------------------------


def _biased_net() -> nn.Sequential:
    """Layers whose INT8 weight error has a large mean effect: inputs far from zero mean, coarse per-tensor steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 5)).eval()
    with torch.no_grad():
        net[0].weight[0] *= 50.0  # one big channel sets the per-tensor step: the others round coarsely
        net[2].weight[0] *= 50.0
    return net


def _data(n: int, seed: int) -> torch.Tensor:
    return 2.0 + torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _mean_error(model, net, x) -> torch.Tensor:
    """The quantized model's mean output error against the float model it was made from."""
    with torch.no_grad():
        return (model(x) - net(x)).mean(0)


@pytest.mark.parametrize("mode", ["full", "fast"])
def test_bias_correction_removes_the_mean_output_error(mode):
    net = _biased_net()
    seen, held_out = _data(64, 0), _data(256, 1)
    plain, plain_result = _quantize(net, seen)
    model, result = _quantize(net, seen, {"name": "bias_correction", "mode": mode, "images": 64})
    (record,) = result.algorithms
    assert set(record.changes) == {"0", "2", "4"} and all(set(c) == {"bias"} for c in record.changes.values())
    before_seen, after_seen = _mean_error(plain, net, seen), _mean_error(model, net, seen)
    before_held, after_held = _mean_error(plain, net, held_out), _mean_error(model, net, held_out)
    # fast corrects each layer's own weight error only (not the input's rounding, nor upstream layers'): less
    limit = 0.2 if mode == "full" else 0.5
    assert float(after_held.abs().mean()) < limit * float(before_held.abs().mean())
    if mode == "full":  # the mean error on the images it corrected on is gone (float rounding)
        assert float(after_seen.abs().max()) < 1e-4 * float(before_seen.abs().max()) + 1e-6


def test_full_bias_correction_corrects_each_layer_for_what_the_layers_before_it_did():
    net = _biased_net()
    x = _data(32, 0)
    model, result = _quantize(net, x, {"name": "bias_correction", "images": 32})
    float_model = copy.deepcopy(net)
    for name in ("0", "2", "4"):  # each layer's own output mean is the float one, in the quantized model
        got, want = {}, {}
        handles = [model.get_submodule(name).register_forward_hook(lambda m, a, o: got.update(y=o)),
                   float_model.get_submodule(name).register_forward_hook(lambda m, a, o: want.update(y=o))]
        with torch.no_grad():
            model(x), float_model(x)
        for h in handles:
            h.remove()
        dims = (0, 2, 3) if got["y"].dim() == 4 else (0,)
        gap = (got["y"].mean(dims) - want["y"].mean(dims)).abs().max()
        assert float(gap) < 1e-4 * float(want["y"].abs().max())


def test_bias_correction_creates_a_bias_where_a_layer_has_none_and_restores_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False)).eval()
    x = _data(16, 0)
    model, result = _quantize(net, x, {"name": "bias_correction", "images": 16}, weights="per_tensor")
    assert model[2].bias is not None and "2.bias" in result.ptq_state["tensors"]
    fresh = copy.deepcopy(net)
    restore_(fresh, Int8Config(method="max", weights="per_tensor"), result.activation_amax, x[:4],
             ptq_state=result.ptq_state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------------------------------------------------
# The pipeline: statistics, records, state
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_readers():
    """Two throwaway algorithms that ask for the same statistic and keep what they got."""
    seen: dict[str, object] = {}

    def make(name):
        class Reader(Algorithm):
            phase = "after_ranges"

            def statistics(self, ctx, opts):
                return [StatisticRequest("0", "output")]

            def apply(self, ctx, opts, stats):
                seen[name] = stats[StatisticRequest("0", "output")]
                return AlgorithmRecord(name)

        register_algorithm(name)(Reader)

    for name in ("_reader_a", "_reader_b"):
        make(name)
    yield seen
    for name in ("_reader_a", "_reader_b"):
        ALGORITHMS.pop(name)


def test_a_statistic_two_algorithms_need_is_collected_once(two_readers):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(8, 3, 8, 8)
    calls = {"n": 0}

    def loop(m):
        calls["n"] += 1
        m(x)

    quantize_(copy.deepcopy(net), Int8Config(method="max"), loop, x[:2], algorithms=_steps("_reader_a", "_reader_b"))
    assert calls["n"] == 2  # the range pass and ONE statistics pass
    assert two_readers["_reader_a"] is two_readers["_reader_b"]
    with torch.no_grad():
        expected = net[0](x).mean(dim=(0, 2, 3)).double()
    assert torch.allclose(two_readers["_reader_a"].mean, expected, atol=1e-6)


def test_the_saved_state_rebuilds_the_exact_model(tmp_path):
    net = _pathological(nn.ReLU6())
    x = torch.randn(16, 3, 12, 12)
    model, result = _quantize(net, x, {"name": "cle", "relu6": "replace"}, {"name": "bias_correction", "images": 16})
    path = tmp_path / "ptq_state.pt"
    save_state(result.ptq_state, path)
    state = load_state(path)
    fresh = copy.deepcopy(net)
    restore_(fresh, Int8Config(method="max", weights="per_tensor"), result.activation_amax, x[:4], ptq_state=state)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    without = copy.deepcopy(net)
    restore_(without, Int8Config(method="max", weights="per_tensor"), result.activation_amax, x[:4])
    with torch.no_grad():
        assert not torch.allclose(without(x), model(x))  # the state is what makes the difference
    # a state for another model is refused naming the key
    state["tensors"]["0.weight"] = torch.zeros(1)
    with pytest.raises(algo_base.StateError, match=r"0\.weight.*shape"):
        restore_(copy.deepcopy(net), Int8Config(method="max", weights="per_tensor"), result.activation_amax, x[:4],
                 ptq_state=state)


def test_records_say_what_changed_how_long_and_the_metric_after_each():
    net = _pathological(nn.ReLU())
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        reference = net(x)
    metric = lambda m: float((m(x) - reference).pow(2).mean())  # noqa: E731
    _, result = _quantize(net, x, "cle", "bias_correction", evaluate=metric)
    cle, bc = result.algorithms
    assert cle.phase == "before_ranges" and bc.phase == "after_ranges"
    assert cle.seconds > 0 and bc.seconds > 0
    assert cle.metric_model == "float" and cle.metric_after < 1e-8  # CLE keeps the float model
    assert bc.metric_model == "int8" and bc.metric_after <= result.algorithm_metric_before["after_ranges"]
    assert cle.changes["0"]["weight"] > 0.1 and "bias" in bc.changes["0"]


# ---------------------------------------------------------------------------------------------------------
# Recipes: validation, the runner, resume
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms, message", [
    (["cel"], "unknown PTQ algorithm 'cel' (did you mean 'cle'?); known algorithms: adaround, bias_correction, cle"),
    ([{"name": "bias_correction", "mode": "slow"}], "algorithm 'bias_correction': mode"),
    ([{"name": "cle", "sweeps": 3}], "algorithm 'cle': sweeps: Extra inputs are not permitted"),
    ([{"mode": "full"}], "an algorithm is a name"),
    (["bias_correction", "cle"], "list cle first"),
])
def test_unknown_algorithms_options_and_orders_are_refused(algorithms, message):
    with pytest.raises(ValidationError) as e:
        CalibrateOptions(algorithms=algorithms)
    assert message in str(e.value)


def test_validate_refuses_an_unknown_algorithm_with_exit_2(tmp_path, capsys):
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", "  - calibrate: {method: max, algorithms: [cel]}\n"))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cel" in err and "bias_correction, cle" in " ".join(err.split())


def test_a_stored_step_reads_back_as_itself():
    opts = CalibrateOptions(algorithms=["cle", {"name": "bias_correction", "mode": "fast"}])
    dumped = opts.model_dump(mode="json")
    assert dumped["algorithms"][1] == {"name": "bias_correction", "mode": "fast", "images": 32, "layers": []}
    assert CalibrateOptions(**dumped).model_dump(mode="json") == dumped


STAGES = ("  - calibrate: {method: max, weights: per_tensor, algorithm_eval_samples: 8,\n"
          "               algorithms: [cle, {name: bias_correction, images: 8}]}\n"
          "  - export: {}\n  - build: {engine: tensorrt}\n"
          "  - evaluate: {backends: [tensorrt], latency: false}\n")
FIXED = ["model.trust_code=true", "stages.evaluate.backends=[pytorch_int8]"]


def test_a_resumed_run_reuses_the_algorithms_state(tmp_path):
    import importlib.util

    from workbench import api

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("the failing run relies on build making no engine without TensorRT")
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", STAGES).replace("helpers:tiny_cnn", "helpers:trained_cnn"))
    assert main(["run", str(recipe)]) == 2  # evaluate needs the engine build could not make here
    (failed,) = (tmp_path / "runs").iterdir()
    assert (failed / "ptq_state.pt").is_file()
    calibration = json.loads((failed / "calibration.json").read_text())
    assert [a["name"] for a in calibration["algorithms"]] == ["cle", "bias_correction"]
    assert main(["run", "--resume", str(failed), *FIXED]) == 0
    final = failed.with_name(failed.name.removesuffix(".failed"))
    metrics = json.loads((final / "metrics.json").read_text())
    assert "calibrate" in metrics["resumed"]["reused"]
    recorded = metrics["stages"]["calibrate"]["algorithms"]
    assert [a["name"] for a in recorded] == ["cle", "bias_correction"] and recorded[1]["layers_changed"] > 0
    # top-1 on 8 evaluation images after each algorithm, and before them (float, then INT8 with ranges only)
    assert all(0 <= a["metric_after"] <= 100 for a in recorded)
    assert set(metrics["stages"]["calibrate"]["algorithm_metric_before"]) == {"before_ranges", "after_ranges"}
    assert "ptq_state.pt" in {f["stage"]: f for f in metrics["fingerprints"]}["calibrate"]["files"]
    # The same recipe run in one go: its evaluation equals the resumed run's (the state was re-applied).
    whole = tmp_path / "whole.yaml"
    whole.write_text(tiny_recipe(images, tmp_path / "runs2", STAGES.replace("[tensorrt]", "[pytorch_int8]").replace(
        "  - build: {engine: tensorrt}\n", "")).replace("helpers:tiny_cnn", "helpers:trained_cnn"))
    assert main(["run", str(whole), "model.trust_code=true"]) == 0
    (done,) = (tmp_path / "runs2").iterdir()
    other = json.loads((done / "metrics.json").read_text())
    key = "pytorch_int8"
    assert metrics["stages"]["evaluate"]["backends"][key]["metrics"] == \
        other["stages"]["evaluate"]["backends"][key]["metrics"]
    # open_run rebuilds the same model from the run directory; without the state it would be another one.
    explorer = api.open_run(final, trust_code=True)
    reopened = api.open_run(done, trust_code=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(explorer.model(x), reopened.model(x))
    # an edited state file is refused by its hash, naming it
    state = torch.load(final / "ptq_state.pt", weights_only=True)
    assert state["tensors"]


def test_an_edited_state_file_is_refused_on_resume(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("the failing run relies on build making no engine without TensorRT")
    images = make_image_folder(tmp_path / "images")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(images, tmp_path / "runs", STAGES).replace("helpers:tiny_cnn", "helpers:trained_cnn"))
    assert main(["run", str(recipe)]) == 2
    (failed,) = (tmp_path / "runs").iterdir()
    state = torch.load(failed / "ptq_state.pt", weights_only=True)
    key = next(iter(state["tensors"]))
    state["tensors"][key] = state["tensors"][key] * 2
    torch.save(state, failed / "ptq_state.pt")
    capsys.readouterr()
    assert main(["run", "--resume", str(failed), *FIXED]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "ptq_state.pt" in err and "SHA-256" in err


def test_every_algorithm_file_registers_itself():
    assert {"cle", "bias_correction"} <= set(ALGORITHMS)
    for name, cls in ALGORITHMS.items():
        if not name.startswith("_"):
            assert cls.name == name and cls.phase in algo_base.PHASES


def test_a_convolution_whose_same_padding_module_is_a_foreign_identity_does_not_pad():
    """EfficientNet's Conv2dStaticSamePadding holds its own `Identity` class where a 1x1 convolution needs no
    padding; read as padding, it blocked high-bias absorption into every projection of EfficientNet-Lite0."""
    from workbench.quant.algorithms.cle import _pads

    class Identity(nn.Module):  # not torch's
        def forward(self, x):
            return x

    conv = nn.Conv2d(4, 4, 1)
    conv.static_padding = Identity()
    assert not _pads(conv)
    conv.static_padding = nn.ZeroPad2d((0, 1, 0, 1))
    assert _pads(conv)


def test_chains_are_found_by_module_hooks_through_an_identity_that_returns_its_input():
    """Where torch.fx cannot trace, the hooks see an Identity (a folded BatchNorm) hand back the very tensor it read:
    its readers include itself, which once sent the chain search round in a loop forever."""
    from workbench.quant.algorithms.cle import _chains_hooks

    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Identity(), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    chains, calls = _chains_hooks(net, torch.randn(2, 3, 6, 6))
    assert [(c.first, c.second, c.kind) for c in chains] == [("0", "3", "relu")] and calls == {"2": 1}
