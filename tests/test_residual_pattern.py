"""The residual_add rule by graph pattern (issue 27, item 5): residual Adds between quantized layers in classes the
rules do not know are found on the traced model and quantized, so the export passes check-onnx; the float function
is unchanged bit for bit; what cannot be rewritten is reported, not silently left float."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from workbench.qdq.export import export_onnx, shape_fixes
from workbench.qdq.trt_rules import check_qdq
from workbench.quant.ptq import Int8Config, quantize_
from workbench.quant.residual_pattern import find_residual_adds
from workbench.quant.rules import quantizers_off


class PlainBlock(nn.Module):
    """A residual block the class rules do not know (its own names, `me` for self)."""

    def __init__(me, c):
        super().__init__()
        me.conv1, me.conv2, me.act = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(me, x):
        return me.act(me.conv2(me.act(me.conv1(x))) + x)


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(PlainBlock(8), PlainBlock(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))))


def channel_shuffle(x, groups):
    batch, c, h, w = x.data.size()  # FastestDet's: traced as constants
    x = x.view(batch, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(batch, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels through a branch, concatenated, shuffled (no Add)."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((a, self.branch(b)), 1), 2)


class SPP(nn.Module):
    """FastestDet's SPP: three depthwise branches, concatenated, projected and added to their input."""

    def __init__(self, c):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.s = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 5, padding=2, groups=c), nn.BatchNorm2d(c), nn.ReLU())
                               for _ in range(3))
        self.output = nn.Sequential(nn.Conv2d(3 * c, c, 1), nn.BatchNorm2d(c))
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.conv1x1(x)
        y = torch.cat([s(x) for s in self.s], dim=1)
        return self.relu(x + self.output(y))


class FastestDetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.spp = SPP(16)
        self.head = nn.Conv2d(16, 9, 1)

    def forward(self, x):
        return self.head(self.spp(self.stage(self.stem(x))))


class HelperAdd(PlainBlock):
    """The Add sits in a plain function, not in a module's forward: found, but not rewritable."""

    def forward(me, x):
        return _add(me.conv2(me.act(me.conv1(x))), x)


def _add(a, b):
    return a + b


def _init(model):
    torch.manual_seed(0)
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _quantize(model, size=16):
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size)
    reference = copy.deepcopy(model)  # quantized without the residual rule: the same BatchNorm folding
    quantize_(reference, Int8Config(method="max", residual_add=False), lambda m: m(x), x[:1])
    result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x[:1])
    with torch.no_grad(), quantizers_off(model), quantizers_off(reference):
        assert torch.equal(model(x), reference(x))  # the float function, bit for bit
    return result, x


@pytest.mark.parametrize("builder,owners", [(PlainNet, {"blocks.0", "blocks.1"}), (FastestDetLike, {"spp"})])
def test_unknown_residual_blocks_are_quantized_by_pattern_and_pass_check_onnx(tmp_path, builder, owners):
    model = _init(builder())
    result, x = _quantize(model, 32)
    assert {q.rsplit(".", 2)[0] for q in result.residual_quantizers} == owners
    assert result.residual_left_alone == {}
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert check_qdq(path) == []
    # The same graph without the pattern rule is what check-onnx flags (so the check above can fail).
    bare = _init(builder())
    torch.manual_seed(1)
    quantize_(bare, Int8Config(method="max", residual_add=False), lambda m: m(x), x[:1])
    assert {v.rule for v in check_qdq(export_onnx(bare, x[:1], tmp_path / "bare.onnx"))} == {"residual_add"}
    if builder is FastestDetLike:  # its channel_shuffle pinned batch 1: export freed it, and batches compute alike
        assert len(shape_fixes(path)) == 4
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        both = session.run(None, {"images": x[:2].numpy()})[0]
        one = session.run(None, {"images": x[1:2].numpy()})[0]
        np.testing.assert_allclose(both[1:], one, atol=1e-5)


def test_each_add_of_a_loop_gets_its_own_quantizers():
    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))

        def forward(self, x):
            x = torch.relu(self.stem(x))
            for conv in self.convs:
                x = x + conv(x)
            return x

    model = _init(Looped())
    result, _ = _quantize(model)
    units = sorted({q.rsplit(".", 1)[0] for q in result.residual_quantizers})
    assert units == ["pattern_add1.residual_add", "pattern_add2.residual_add", "residual_add"]
    amax = {u: float(model.get_submodule(u).input0_quantizer.amax) for u in units}
    assert len(set(amax.values())) == 3  # calibrated on three different tensors, not one shared


def test_an_add_outside_a_forward_is_reported_left_alone():
    model = _init(HelperAdd(8))
    model.stem = nn.Identity()
    wrapped = _init(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), model))
    result, _ = _quantize(wrapped)
    assert result.residual_quantizers == []
    assert "outside a module's forward" in result.residual_left_alone["2"]


def test_known_blocks_keep_their_class_rewrite(tmp_path):
    import torchvision

    model = _init(torchvision.models.resnet18(num_classes=10))
    # Before quantization there is no quantized layer, so no residual Add by pattern.
    found = find_residual_adds(model, torch.randn(1, 3, 32, 32), quantizers_off)
    assert found.sites == []
    result, x = _quantize(model, 32)
    blocks = {q.rsplit(".", 2)[0] for q in result.residual_quantizers}
    assert len(blocks) == 8 and all(type(model.get_submodule(b)).__name__ == "QuantResidualBasicBlock"
                                    for b in blocks)
    assert check_qdq(export_onnx(model, x[:1], tmp_path / "r.onnx")) == []


def test_exclude_keeps_a_pattern_add_float():
    model = _init(PlainNet())
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    result = quantize_(model, Int8Config(method="max", exclude=["blocks.0.residual_add"]), lambda m: m(x), x[:1])
    assert result.residual_excluded == ["blocks.0.residual_add"]
    assert {q.rsplit(".", 2)[0] for q in result.residual_quantizers} == {"blocks.1"}


class InPlaceBlock(PlainBlock):
    """`out += x` (Python binds `out` to what += returns) is rewritable; a bare `out.add_(x)` is not."""

    def __init__(me, c, bare: bool):
        super().__init__(c)
        me.bare = bare

    def forward(me, x):
        out = me.conv2(me.act(me.conv1(x)))
        if me.bare:
            out.add_(x)
        else:
            out += x
        return me.act(out)


@pytest.mark.parametrize("bare", [False, True])
def test_in_place_adds(bare):
    model = _init(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), InPlaceBlock(8, bare)))
    result, _ = _quantize(model)
    if bare:
        assert result.residual_quantizers == [] and "in-place add_" in result.residual_left_alone["2"]
    else:
        assert result.residual_quantizers == ["2.residual_add.input0_quantizer", "2.residual_add.input1_quantizer"]


def test_adds_of_a_detectors_decode_are_not_residual_adds():
    """A CenterNet-style decode adds a grid to an offset map (two head outputs, of different origins): the decode
    scope keeps it float, so the residual rule must not put 8-bit quantizers on it (box centres would move)."""
    import contextlib

    from workbench.quant.decode_scope import find_decode_scope
    from workbench.quant.residual_pattern import find_residual_adds

    class Centers(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, stride=4, padding=1)
            self.hm, self.off = nn.Conv2d(8, 1, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            f = torch.relu(self.body(x))
            w = f.shape[-1]
            score, idx = self.hm(f).sigmoid().flatten(1).topk(20, dim=1)
            off = self.off(f).flatten(2)
            cx = (idx % w).float() + off[:, 0].gather(1, idx)
            cy = (idx // w).float() + off[:, 1].gather(1, idx)
            return torch.stack([cx, cy, score], -1)

    class Enabled:  # what the finder reads of a quantized layer
        is_enabled = True

    model, x = Centers().eval(), torch.rand(1, 3, 64, 64)
    heads = find_decode_scope(model, x).head_layers
    assert set(heads) == {"hm", "off"}
    for conv in (model.body, model.hm, model.off):
        conv.weight_quantizer = Enabled()
    untold = find_residual_adds(model, x, lambda m: contextlib.nullcontext())
    assert len(untold.sites) == 2  # without the decode's heads, grid + offset looks like a residual Add
    assert find_residual_adds(model, x, lambda m: contextlib.nullcontext(), heads).sites == []
