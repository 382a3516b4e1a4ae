"""TensorRT placement rules beyond "quantize the input and weight of every Conv/Linear".

Each rule is named, finds the modules it applies to, and changes how they quantize:

- `residual_add`: in residual blocks (`x + cv2(cv1(x))`, YOLOv5 and Ultralytics
  `Bottleneck` with `add`; ResNet `BasicBlock` and `Bottleneck`, torchvision's and the
  CIFAR ResNets', `bn(conv(...)) + shortcut(x)`; EfficientNet(-Lite)'s `MBConvBlock` with
  its identity skip; Ultralytics' attention blocks, YOLO11's `PSABlock` and YOLOv10's `PSA`,
  `x + attn(x)` and `x + ffn(x)`; timm's ResNet `BasicBlock` and `Bottleneck` with any
  activation, SE/ECA attention, anti-aliasing and stochastic depth), both inputs of the Add
  get a quantizer. Each block's new forward is proved before it is kept: run on the input the
  block receives from the calibration images, with every quantizer off, it must give the
  block's own output; a block that fails, or whose structure is unknown, keeps its forward
  and float Add and is reported as "not rewritten: structure not recognised". The whole model
  is then checked the same way (quant/ptq.py), and a difference refuses the rule.
  TensorRT then fuses the Add into the convolution before it and runs it in INT8; with
  a float input it would run the Add on its own, in higher precision.
- Attention stays float: only Conv/Linear layers are quantized, so the attention MatMuls,
  the Softmax, and the Add that joins the attention's output (a MatMul's) to its positional
  convolution run in float; the checker (qdq/trt_rules.py) knows that Add.
- `concat_maxpool_shared_scale`: activations are quantized once, at the input of the
  convolution that reads the Concat (YOLOv5's C3/SPPF, Ultralytics' C2f), and no Q/DQ is
  put on a Concat input, a Split output or around a MaxPool. TensorRT moves that one Q
  above the Concat and the MaxPools (they commute with quantization), so every branch
  shares one scale and nothing is requantized; no Q/DQ dangles on a Split or Concat.
- `one_scale_per_tensor`: a tensor read by several quantizers (C3's cv1 and cv2, a
  shortcut and its block's cv1) gets the same scale from each, because each quantizer
  calibrates on the same tensor with the same calibrator; TensorRT can then share one Q.
  Both are checked on the exported graph in `tests/test_yolo_rules.py`.
- The box decode (and Ultralytics' DFL) stays float: see `DECODE_MODULES` in ptq.py.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.equivalence import DEFAULT_RTOL, checked_rewrite, difference

RESIDUAL_BLOCKS = frozenset({"Bottleneck", "BasicBlock", "MBConvBlock", "PSABlock", "PSA"})
# The second Add of an attention block (x + ffn(x)) lives here, so its unit name ends in `.residual_add` as every
# residual unit's does: `<block>.ffn_residual.residual_add`.
FFN_RESIDUAL = "ffn_residual"


class ResidualAdd(nn.Module):
    """`x + y` with both inputs fake-quantized (modelopt TensorQuantizers, exported as Q/DQ)."""

    def __init__(self):
        super().__init__()
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer

        cfg = QuantizerAttributeConfig(num_bits=8, axis=None)
        self.input0_quantizer = TensorQuantizer(cfg)
        self.input1_quantizer = TensorQuantizer(cfg)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.input0_quantizer(x) + self.input1_quantizer(y)


def _yolo_forward(self, x):
    return self.residual_add(x, self.cv2(self.cv1(x)))


def _shortcut(self, x):
    if getattr(self, "downsample", None) is not None:  # torchvision
        return self.downsample(x)
    return self.shortcut(x) if hasattr(self, "shortcut") else x  # CIFAR ResNets


def _relu(self, x):
    # torchvision's blocks hold their activation as `relu`; the CIFAR ResNets call F.relu.
    return self.relu(x) if getattr(self, "relu", None) is not None else torch.relu(x)


def _resnet_basic_forward(self, x):
    out = _relu(self, self.bn1(self.conv1(x)))
    return _relu(self, self.residual_add(self.bn2(self.conv2(out)), _shortcut(self, x)))


def _resnet_bottleneck_forward(self, x):
    out = _relu(self, self.bn1(self.conv1(x)))
    out = _relu(self, self.bn2(self.conv2(out)))
    return _relu(self, self.residual_add(self.bn3(self.conv3(out)), _shortcut(self, x)))


# timm's ResNet blocks (resnet*, seresnet*, ecaresnet*, ...): any activation, anti-aliasing, DropBlock, an
# attention module (`se`: SE, ECA, ...) and stochastic depth, each optional. Their forwards, with the Add quantized.
_TIMM_BLOCK = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "drop_block", "aa", "se", "drop_path", "downsample")


def _timm_tail(self, x, shortcut):
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    return self.residual_add(x, shortcut)


def _timm_basic_forward(self, x):
    out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    return self.act2(_timm_tail(self, self.bn2(self.conv2(out)), x))


def _timm_bottleneck_forward(self, x):
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
    return self.act3(_timm_tail(self, self.bn3(self.conv3(out)), x))


def _mbconv_forward(self, inputs, drop_connect_rate=None):
    # efficientnet_pytorch / efficientnet_lite_pytorch MBConvBlock, with the skip Add quantized.
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    if self.has_se:
        squeezed = self._se_expand(self._swish(self._se_reduce(nn.functional.adaptive_avg_pool2d(x, 1))))
        x = torch.sigmoid(squeezed) * x
    x = self._bn2(self._project_conv(x))
    if drop_connect_rate and self.training:  # as the original block trains (QAT, fine-tuning): stochastic depth
        keep = 1.0 - drop_connect_rate
        x = x / keep * torch.floor(keep + torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device))
    return self.residual_add(x, inputs)


def _psablock_forward(self, x):
    # Ultralytics' PSABlock (YOLO11's C2PSA) with `add`: both residual Adds quantized.
    x = self.residual_add(x, self.attn(x))
    return self.ffn_residual.residual_add(x, self.ffn(x))


def _psa_forward(self, x):
    # YOLOv10's PSA: the same two residual Adds on the second half of cv1's output.
    a, b = self.cv1(x).split((self.c, self.c), dim=1)
    b = self.residual_add(b, self.attn(b))
    b = self.ffn_residual.residual_add(b, self.ffn(b))
    return self.cv2(torch.cat((a, b), 1))


def _mbconv_has_skip(block: nn.Module) -> bool:
    args = block._block_args
    return bool(block.id_skip and args.stride in (1, [1], [1, 1]) and args.input_filters == args.output_filters)


def _quantized_forward(block: nn.Module):
    """The forward with a quantized Add for this kind of residual block, or None if it is not one we know (or a
    known block without an Add). A forward chosen here is still proved on the block's real input before it is
    kept (`insert_residual_quantizers`)."""
    kind = type(block).__name__
    if kind not in RESIDUAL_BLOCKS:
        return None
    if kind == "PSABlock":
        return _psablock_forward if getattr(block, "add", False) and hasattr(block, "ffn") else None
    if kind == "PSA":
        return _psa_forward if all(hasattr(block, a) for a in ("cv1", "cv2", "attn", "ffn", "c")) else None
    if hasattr(block, "cv1") and hasattr(block, "cv2"):
        return _yolo_forward if getattr(block, "add", False) else None  # YOLO: add is False without a shortcut
    if kind == "MBConvBlock":
        return _mbconv_forward if hasattr(block, "_block_args") and _mbconv_has_skip(block) else None
    if all(hasattr(block, a) for a in _TIMM_BLOCK):
        if kind == "Bottleneck":
            return _timm_bottleneck_forward if all(hasattr(block, a) for a in ("conv3", "bn3", "act3")) else None
        return _timm_basic_forward
    if all(hasattr(block, a) for a in ("conv1", "bn1", "conv2", "bn2")):
        return _resnet_bottleneck_forward if hasattr(block, "conv3") else _resnet_basic_forward
    return None


def _without_add(block: nn.Module) -> bool:
    """A known block that has no residual Add to quantize: a YOLO Bottleneck without shortcut, an MBConvBlock that
    changes shape, a PSABlock without `add`."""
    kind = type(block).__name__
    if kind == "PSABlock":
        return not getattr(block, "add", False)
    if hasattr(block, "cv1") and hasattr(block, "cv2") and kind in ("Bottleneck", "BasicBlock"):
        return not getattr(block, "add", False)
    return kind == "MBConvBlock" and hasattr(block, "_block_args") and not _mbconv_has_skip(block)


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks whose structure the `residual_add` rule knows (each still proved on data)."""
    return [name for name, m in model.named_modules() if _quantized_forward(m) is not None]


def unrecognised_blocks(model: nn.Module) -> list[str]:
    """Blocks named like residual blocks (RESIDUAL_BLOCKS) whose structure the rule does not know: left alone."""
    return [name for name, m in model.named_modules()
            if type(m).__name__ in RESIDUAL_BLOCKS and _quantized_forward(m) is None and not _without_add(m)]


def residual_units(model: nn.Module) -> list[str]:
    """The residual Add units, `<block>.residual_add` (and an attention block's `<block>.ffn_residual.residual_add`)."""
    out = []
    for name in residual_blocks(model):
        out.append(f"{name}.residual_add")
        if _quantized_forward(model.get_submodule(name)) in (_psablock_forward, _psa_forward):
            out.append(f"{name}.{FFN_RESIDUAL}.residual_add")
    return out


@contextlib.contextmanager
def quantizers_off(model: nn.Module):
    """Every enabled TensorQuantizer of the model passes data through inside the block (the float model), and is
    enabled again after it."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    on = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled]
    for q in on:
        q.disable()
    try:
        yield
    finally:
        for q in on:
            q.enable()


@dataclass
class ResidualRewrite:
    """What the residual_add rule did: quantizers added, units the excludes kept float, blocks left alone (why)."""

    quantizers: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    left_alone: dict[str, str] = field(default_factory=dict)
    by_pattern: list[str] = field(default_factory=list)  # the residual units found by graph pattern, not by class


NOT_RECOGNISED = "not rewritten: structure not recognised"


def apply_residual_rule(model: nn.Module, example: torch.Tensor, exclude: list[str] = (),
                        decode_heads: list[str] = ()) -> ResidualRewrite:
    """The residual_add rule, block by block as `insert_residual_quantizers` proves them, and then proved on the whole
    model: with every quantizer off it must compute what it did before on `example`, or a RewriteError names the
    first module whose output differs (and the model is put back)."""
    return checked_rewrite(
        model, lambda m: insert_residual_quantizers(m, example, exclude, decode_heads=decode_heads), example,
        float_mode=quantizers_off,
        what="calibrate: the residual_add rule (quantized residual Adds)",
        advice="Set residual_add: false in stages.calibrate (the Adds then stay float), or exclude that block's Add "
               "(exclude: ['<block>.residual_add']).")


def insert_residual_quantizers(model: nn.Module, example: torch.Tensor, exclude: list[str] = (),
                               pattern: bool = True, decode_heads: list[str] = ()) -> ResidualRewrite:
    """Apply `residual_add` to every block whose structure it can prove; returns the quantizer names added (calibrated
    like any input quantizer), the residual units left float by the excludes, and the blocks left alone.

    A block is rewritten only if its rewritten forward gives its original output, to float rounding, on the input it
    really receives when the model runs on `example` (every quantizer off). A block whose structure is not known, or
    whose rewritten forward differs (a timm block with an unknown extra, a subclass with another forward), keeps its
    own forward and float Add, and is reported. A block whose `<block>.residual_add` matches an exclude pattern keeps
    its float Add(s). With `pattern`, every other residual Add between quantized layers is then found on the traced
    model and rewritten the same way, proved the same way (`_insert_by_pattern`).
    """
    rewrite = ResidualRewrite(left_alone={name: f"{NOT_RECOGNISED} ({type(model.get_submodule(name)).__name__} of "
                                                f"an unknown form)" for name in unrecognised_blocks(model)})
    candidates = []
    for name in residual_blocks(model):
        if any(fnmatch.fnmatchcase(f"{name}.residual_add", p) for p in exclude):
            rewrite.excluded += [u for u in residual_units(model) if u == f"{name}.residual_add"
                                 or u == f"{name}.{FFN_RESIDUAL}.residual_add"]
        else:
            candidates.append(name)
    inputs = _block_inputs(model, candidates, example)
    for name in candidates:
        block = model.get_submodule(name)
        if name not in inputs:
            rewrite.left_alone[name] = f"{NOT_RECOGNISED} (the block never ran on the check images, so it is unproved)"
            continue
        units, gap = _proved(block, inputs[name], lambda b=block, n=name: _rewrite_block(b, n), _undo_rewrite)
        if gap:
            rewrite.left_alone[name] = f"{NOT_RECOGNISED} ({type(block).__name__}: {gap})"
            continue
        rewrite.quantizers += [f"{unit}.input{i}_quantizer" for unit in units for i in (0, 1)]
    if pattern:
        _insert_by_pattern(model, example, exclude, rewrite, decode_heads)
    return rewrite


def _proved(block: nn.Module, inputs: tuple[tuple, dict], apply, undo) -> tuple[list[str], str | None]:
    """Apply a rewrite to `block` and keep it if, with every quantizer off, the block gives its original output on
    the input it really receives: (its units, None), or ([], why not) with the rewrite undone."""
    args, kwargs = inputs
    with torch.no_grad(), quantizers_off(block):
        before = block(*_clones(args), **kwargs)
    units = apply()
    try:
        with torch.no_grad(), quantizers_off(block):  # entered after the rewrite: its new quantizers pass through
            after = block(*_clones(args), **kwargs)
        found = difference(before, after)
    except Exception as e:  # the rewritten forward does not even run on this block: not the structure it assumes
        found, failure = None, f"its rewritten forward fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    else:
        failure = "another output structure"
    if found is None or found[0] > DEFAULT_RTOL * max(found[1], 1e-6):
        undo(block)
        return [], failure if found is None else f"its rewritten output differs by {found[0]:.3g}"
    return units, None


def _insert_by_pattern(model: nn.Module, example: torch.Tensor, exclude, rewrite: ResidualRewrite,
                       decode_heads: list[str] = ()) -> None:
    """The residual Adds no class rewrite covers, found and rewritten by graph pattern (quant/residual_pattern.py):
    in classes the rules do not know, and in known blocks whose class rewrite was not proved."""
    from .residual_pattern import excluded, find_residual_adds, rewrite_owner, undo_owner, unit_names

    found = find_residual_adds(model, example, quantizers_off, decode_heads)
    owners: dict[str, list] = {}
    for site in found.sites:  # an Add inside a ResidualAdd is one a class rewrite already quantizes
        if not isinstance(model.get_submodule(site.owner), ResidualAdd):
            owners.setdefault(site.owner, []).append(site)
    inputs = _block_inputs(model, list(owners), example)
    for name, sites in owners.items():
        units = unit_names(name, len(sites))
        if excluded(units, exclude):  # (a known block the excludes kept whole is listed once, by its class rewrite)
            rewrite.excluded += [u for u in units if u not in rewrite.excluded]
            rewrite.left_alone.pop(name, None)
            continue
        owner = model.get_submodule(name)
        if name not in inputs:
            continue
        done, gap = _proved(owner, inputs[name], lambda o=owner, n=name, s=sites: rewrite_owner(o, n, s, ResidualAdd),
                            undo_owner)
        where = ", ".join(s.where() for s in sites)
        if gap:
            rewrite.left_alone[name] = f"{NOT_RECOGNISED} ({type(owner).__name__}, Add at {where}: {gap})"
            continue
        rewrite.left_alone.pop(name, None)
        rewrite.by_pattern += done
        rewrite.quantizers += [f"{unit}.input{i}_quantizer" for unit in done for i in (0, 1)]
    for name, why in found.unhandled.items():
        if name not in owners:
            rewrite.left_alone.setdefault(name, f"{NOT_RECOGNISED} ({why})")


def _rewrite_block(block: nn.Module, name: str) -> list[str]:
    """Give the block its quantized Add(s) and forward; returns its residual units."""
    forward = _quantized_forward(block)
    block.residual_add = ResidualAdd()
    units = [f"{name}.residual_add"]
    if forward in (_psablock_forward, _psa_forward):
        block.add_module(FFN_RESIDUAL, nn.Module())
        getattr(block, FFN_RESIDUAL).residual_add = ResidualAdd()
        units.append(f"{name}.{FFN_RESIDUAL}.residual_add")
    # A subclass with the quantized forward, so the block keeps its type, name and state dict keys.
    block.__class__ = type(f"QuantResidual{type(block).__name__}", (type(block),), {"forward": forward})
    return units


def _undo_rewrite(block: nn.Module) -> None:
    block.__class__ = type(block).__mro__[1]
    del block.residual_add
    if FFN_RESIDUAL in block._modules:
        del block._modules[FFN_RESIDUAL]


def _clones(args: tuple) -> tuple:
    # A forward may change its input in place (an inplace activation): each run gets its own copy.
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _block_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each named block is first called with when the float model runs on `example`."""
    seen: dict[str, tuple[tuple, dict]] = {}
    if not names:
        return seen
    handles = []
    for name in names:
        def hook(module, args, kwargs, name=name):
            if name not in seen:
                seen[name] = (_clones(args), dict(kwargs))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), quantizers_off(model):
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen
