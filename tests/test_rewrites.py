"""Every model rewrite proves itself: with every quantizer off, the rewritten float model computes what the original
did (torchvision and timm ResNets, SE and ECA blocks, BatchNorm folding, option-A shortcuts, the YOLOv5 decode), and
a rewrite that breaks the function is refused (RewriteError, exit 2) or, for a residual block it cannot prove, left
alone and reported; never applied silently."""

import copy
import json

import pytest
import torch
import torchvision
from conftest import tiny_recipe
from helpers import make_tiny_yolov5_checkpoint, tiny_cnn
from torch import nn

from workbench.cli import main
from workbench.errors import RewriteError
from workbench.models import cifar_resnet as cifar
from workbench.models import yolov5_legacy
from workbench.models.cifar_resnet import cifar_resnet
from workbench.prune.structured import ChannelPruning, load_pruned, prune_channels_, save_pruned
from workbench.quant import fold, rules
from workbench.quant.fold import fold_batchnorm_
from workbench.quant.ptq import Int8Config, quantize_
from workbench.quant.rules import NOT_RECOGNISED, ResidualAdd, apply_residual_rule, quantizers_off

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _float_outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), quantizers_off(model):
        return model(X)


def _randomised(model: nn.Module) -> nn.Module:
    """BatchNorm statistics away from identity, so a dropped or doubled branch shows in the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return model.eval()


def _adds_called(model: nn.Module) -> int:
    """How many quantized residual Adds the forward really runs (not merely holds)."""
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
               if isinstance(m, ResidualAdd)]
    _float_outputs(model)
    for h in handles:
        h.remove()
    return len(calls)


def _timm(name: str, **kw) -> nn.Module:
    timm = pytest.importorskip("timm", reason="timm (the `test` extra) builds the timm ResNets without weights")
    return _randomised(timm.create_model(name, pretrained=False, num_classes=10, **kw))


# --- the residual_add rule: rewritten correctly, or left alone with the reason ------------------------------------


def test_torchvision_resnet18_blocks_are_rewritten_and_compute_the_same():
    model = _randomised(torchvision.models.resnet18(num_classes=10))
    before = model(X)
    rewrite = apply_residual_rule(model, X)
    assert rewrite.left_alone == {}
    assert len(rewrite.quantizers) == 16 and _adds_called(model) == 8  # 8 blocks, both Add inputs each
    torch.testing.assert_close(_float_outputs(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kw, attention", [
    ("resnet18", {"act_layer": "silu"}, None),
    ("resnet18", {"act_layer": "gelu"}, None),
    ("seresnet18", {}, "se"),  # the SE block the old rewrite dropped
    ("ecaresnet26t", {}, "se"),  # ECA lives in timm's `se` slot too; deep-tiered stem, avg-pool downsample
])
def test_timm_resnets_are_rewritten_with_their_activation_and_attention(name, kw, attention):
    model = _timm(name, **kw)
    before = model(X)
    rewrite = apply_residual_rule(model, X)
    assert rewrite.left_alone == {}
    assert _adds_called(model) == 8 == len(rewrite.quantizers) // 2
    attention_calls = []
    if attention:
        for m in model.modules():
            if isinstance(getattr(m, attention, None), nn.Module):
                getattr(m, attention).register_forward_hook(lambda *a: attention_calls.append(1))
    torch.testing.assert_close(_float_outputs(model), before, rtol=1e-5, atol=1e-5)
    if attention:
        assert len(attention_calls) == 8  # once per block: the rewritten forward still runs the attention


def test_seresnet18_quantizes_with_its_residual_adds_instead_of_a_key_error():
    model = _timm("seresnet18")
    before = model(X)
    result = quantize_(model, Int8Config(method="max"), lambda m: m(X), X)
    assert result.census()["Add (residual)"] == {"int8": 8, "float": 0}
    assert result.activation_amax["layer1.0.se.fc1.input_quantizer"] > 0  # the SE convolutions were calibrated
    torch.testing.assert_close(_float_outputs(model), before, rtol=1e-4, atol=1e-4)  # BN folded: float rounding


def _drop_attention(self, x):
    """A broken timm rewrite: the attention (SE/ECA) branch is lost, as the BasicBlock-only rewrite lost it."""
    out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.act2(self.residual_add(self.bn2(self.conv2(out)), shortcut))


def test_a_block_whose_rewrite_differs_is_left_alone_and_reported(monkeypatch):
    monkeypatch.setattr(rules, "_timm_basic_forward", _drop_attention)
    model = _timm("seresnet18")
    before = model(X)
    rewrite = apply_residual_rule(model, X)
    assert rewrite.quantizers == [] and _adds_called(model) == 0
    assert sorted(rewrite.left_alone) == [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert all(why.startswith(NOT_RECOGNISED) and "differs by" in why for why in rewrite.left_alone.values())
    torch.testing.assert_close(_float_outputs(model), before, rtol=0, atol=0)  # untouched, bit for bit


def test_a_broken_rewrite_that_passes_the_block_check_is_refused_by_the_model_check(monkeypatch):
    monkeypatch.setattr(rules, "_timm_basic_forward", _drop_attention)
    monkeypatch.setattr(rules, "difference", lambda before, after: (0.0, 1.0))  # the block check fooled
    model = _timm("seresnet18")
    before = model(X)
    with pytest.raises(RewriteError) as caught:
        apply_residual_rule(model, X)
    message = str(caught.value)
    # the first module that differs: the block's activation after the Add (the attention is not run at all)
    assert "residual_add rule" in message and "module 'layer1.0.act2'" in message and "residual_add: false" in message
    assert not any(isinstance(m, ResidualAdd) for m in model.modules())  # put back as it was
    torch.testing.assert_close(_float_outputs(model), before, rtol=0, atol=0)


def test_an_unknown_block_named_like_a_residual_block_is_left_alone():
    class BasicBlock(nn.Module):  # a residual name, but no structure the rule knows
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.body(x)

    model = nn.Sequential(BasicBlock(), nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).eval()
    before = model(X)
    rewrite = apply_residual_rule(model, X)
    assert rewrite.quantizers == [] and rewrite.left_alone["0"].startswith(NOT_RECOGNISED)
    torch.testing.assert_close(model(X), before, rtol=0, atol=0)


def _halved_torchvision_forward(self, x):
    """A broken rewrite of torchvision's BasicBlock: the Add's result halved."""
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(self.residual_add(out, x if self.downsample is None else self.downsample(x)) * 0.5)


def test_a_block_the_rewritten_forward_cannot_run_is_left_alone():
    class BasicBlock(nn.Module):  # ResNet's attribute names, wired otherwise: the ResNet forward fails on it
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            return x + self.bn2(self.conv2(x)) + self.bn1(self.conv1(x)).mean(1, keepdim=True)

    model = nn.Sequential(BasicBlock()).eval()
    before = model(X)
    rewrite = apply_residual_rule(model, X)
    assert rewrite.quantizers == [] and "its rewritten forward fails: RuntimeError" in rewrite.left_alone["0"]
    torch.testing.assert_close(model(X), before, rtol=0, atol=0)


def test_a_refused_residual_rewrite_exits_2_through_the_cli(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rules, "_resnet_basic_forward", _halved_torchvision_forward)
    monkeypatch.setattr(rules, "difference", lambda before, after: (0.0, 1.0))
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs, "  - calibrate: {method: max}\n").replace(
        '"import:helpers:tiny_cnn"', '"torchvision:resnet18"\n  kwargs: {num_classes: 3}')
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "residual_add rule" in err and "changed what the float model computes" in err and "Traceback" not in err
    assert not list(runs.rglob("calibration.json"))


def test_a_run_reports_the_blocks_it_left_alone(images, tmp_path, monkeypatch):
    monkeypatch.setattr(rules, "_resnet_basic_forward", _halved_torchvision_forward)  # fails the block proof
    runs = tmp_path / "runs"
    text = tiny_recipe(images, runs, "  - calibrate: {method: max}\n").replace(
        '"import:helpers:tiny_cnn"', '"torchvision:resnet18"\n  kwargs: {num_classes: 3}')
    (tmp_path / "r.yaml").write_text(text)
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    metrics = json.loads(next(runs.rglob("metrics.json")).read_text())
    calibrate = metrics["stages"]["calibrate"]
    assert calibrate["census"]["Add (residual)"] == {"int8": 0, "float": 8}
    assert sorted(calibrate["residual_left_alone"]) == [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert any("residual_add left 8 residual block(s)" in w["message"] for w in metrics["warnings"])


# --- BatchNorm folding -----------------------------------------------------------------------------------------------


def test_a_broken_fold_is_refused_and_the_model_put_back(monkeypatch):
    def fuse_without_shift(conv, bn):  # forgets BatchNorm's shift (bias - mean * scale)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)

    monkeypatch.setattr(fold, "_fuse", fuse_without_shift)
    model = _randomised(tiny_cnn())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before, bn1, weight = model(x), model.bn1, model.conv1.weight
    with pytest.raises(RewriteError) as caught:
        fold_batchnorm_(model, x)
    message = str(caught.value)
    assert "folding BatchNorm" in message and "module 'bn1'" in message and "fold_batchnorm: false" in message
    assert model.bn1 is bn1 and model.conv1.weight is weight and model.conv1.bias is None  # the same objects
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_fold_the_hooks_misread_is_refused_not_applied():
    class ReadsTheConvTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the functional read of y is invisible to module hooks

    model = _randomised(ReadsTheConvTwice())
    with pytest.raises(RewriteError, match="the model's output differs"):
        fold_batchnorm_(model, X)
    assert isinstance(model.bn, nn.BatchNorm2d)


# --- structured pruning's option-A rewrite and the YOLOv5 decode ------------------------------------------------------


class _MisplacedShortcut(cifar.ZeroPadShortcut):
    """A broken rewrite: input channel i lands on output channel i, not pad + i."""

    def __init__(self, in_planes, planes):
        super().__init__(in_planes, planes)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:in_planes, :, 0, 0] = torch.eye(in_planes)


def test_a_broken_option_a_rewrite_is_refused_before_pruning(monkeypatch, tmp_path):
    model = cifar_resnet("resnet20").eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    save_pruned(model, tmp_path / "unpruned.pt")  # saved before the rewrite breaks: a file to load below
    before = model(x)
    monkeypatch.setattr(cifar, "ZeroPadShortcut", _MisplacedShortcut)
    with pytest.raises(RewriteError) as caught:
        prune_channels_(model, x, [model.linear], ChannelPruning(ratio=0.5))
    assert "option-A shortcuts" in str(caught.value) and "module 'layer2.0.shortcut'" in str(caught.value)
    assert isinstance(model.layer2[0].shortcut, cifar.LambdaLayer)  # put back, nothing pruned
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.raises(RewriteError, match="module 'layer2.0.shortcut'"):  # loading proves each swap on its own
        load_pruned(cifar_resnet("resnet20"), tmp_path / "unpruned.pt")


def test_the_yolov5_decode_is_proved_at_load_and_a_broken_one_refused(tmp_path, monkeypatch):
    path = make_tiny_yolov5_checkpoint(tmp_path / "y.pt")
    model = yolov5_legacy.load_yolov5_checkpoint(path)  # proved against YOLOv5's split decode
    detect = model.model[-1]
    xs = [torch.randn(1, c.in_channels, 4, 6) for c in detect.m]
    torch.testing.assert_close(detect(xs), detect.split_decode(xs), rtol=1e-5, atol=1e-4)
    original = yolov5_legacy.Detect._decode_terms

    def swapped_grid(self, nx, ny, i, like):  # x and y offsets exchanged: wrong on any non-square map
        scale, square, offset = original(self, nx, ny, i, like)
        return scale, square, torch.cat((offset[..., 1:2], offset[..., 0:1], offset[..., 2:]), -1)

    monkeypatch.setattr(yolov5_legacy.Detect, "_decode_terms", swapped_grid)
    with pytest.raises(RewriteError, match=r"box decode .* module 'model.5'"):
        yolov5_legacy.load_yolov5_checkpoint(path)


def test_the_checks_accept_float_rounding_only():
    model = _randomised(torchvision.models.resnet18(num_classes=10))
    copy_ = copy.deepcopy(model)
    from workbench.models.equivalence import first_difference

    assert first_difference(model, copy_, X) is None
    with torch.no_grad():
        copy_.layer3[1].bn2.bias += 1e-2  # a small real change deep inside
    found = first_difference(model, copy_, X)
    assert found is not None and found.module == "layer3.1.bn2" and found.max_abs == pytest.approx(1e-2, rel=1e-3)


def test_a_rewrite_that_leaves_a_model_that_cannot_run_is_refused_and_put_back():
    from workbench.models.equivalence import checked_rewrite

    model = tiny_cnn().eval()
    x = torch.randn(2, 3, 32, 32)
    before, conv1 = model(x), model.conv1

    def wrong_width(m):
        m.conv1 = nn.Conv2d(5, 5, 1)

    with pytest.raises(RewriteError, match=r"some rewrite left a model that does not run .*RuntimeError.*do this"):
        checked_rewrite(model, wrong_width, x, what="some rewrite", advice="do this")
    assert model.conv1 is conv1
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_a_layer_calibration_never_runs_is_named_not_a_key_error():
    class UnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.spare = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x)  # `spare` is quantized but never runs

    from workbench.errors import CalibrationError

    model = UnusedHead().eval()
    with pytest.raises(CalibrationError, match=r"never saw an input .* 'spare.input_quantizer'.*exclude: \['spare'\]"):
        quantize_(model, Int8Config(method="max", residual_add=False), lambda m: m(X), X)


def test_a_batchnorm_subclass_that_does_more_is_left_unfolded():
    """timm's BatchNormAct2d is a BatchNorm2d that also applies its activation: folding it as a BatchNorm would drop
    the activation (the proof then refused the whole fold, asking for fold_batchnorm: false). It is left as it is,
    and a plain BatchNorm beside it is still folded."""

    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    for bn in (model[1], model[3]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    example = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = model(example)
    assert fold_batchnorm_(model, example) == [("2", "3")]
    assert isinstance(model[1], BatchNormAct) and isinstance(model[3], nn.Identity)
    torch.testing.assert_close(model(example), before, rtol=1e-4, atol=1e-5)
