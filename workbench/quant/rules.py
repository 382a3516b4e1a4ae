"""TensorRT placement rules beyond "quantize the input and weight of every Conv/Linear".

Each rule is named, finds the modules it applies to, and changes how they quantize:

- `residual_add`: in residual blocks (`x + cv2(cv1(x))`, YOLOv5 and Ultralytics
  `Bottleneck` with `add`; ResNet `BasicBlock` and `Bottleneck`, torchvision's and the
  CIFAR ResNets', `bn(conv(...)) + shortcut(x)`; EfficientNet(-Lite)'s `MBConvBlock` with
  its identity skip; Ultralytics' attention blocks, YOLO11's `PSABlock` and YOLOv10's `PSA`,
  `x + attn(x)` and `x + ffn(x)`), both inputs of the Add get a quantizer.
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

import fnmatch

import torch
from torch import nn

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


def _resnet_basic_forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.residual_add(self.bn2(self.conv2(out)), _shortcut(self, x)))


def _resnet_bottleneck_forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    return torch.relu(self.residual_add(self.bn3(self.conv3(out)), _shortcut(self, x)))


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
    """The forward with a quantized Add for this kind of residual block, or None if it is not one we know."""
    if type(block).__name__ not in RESIDUAL_BLOCKS:
        return None
    if type(block).__name__ == "PSABlock":
        return _psablock_forward if getattr(block, "add", False) and hasattr(block, "ffn") else None
    if type(block).__name__ == "PSA":
        return _psa_forward if all(hasattr(block, a) for a in ("cv1", "cv2", "attn", "ffn", "c")) else None
    if hasattr(block, "cv1") and hasattr(block, "cv2"):
        return _yolo_forward if getattr(block, "add", False) else None  # YOLO: add is False without a shortcut
    if type(block).__name__ == "MBConvBlock":
        return _mbconv_forward if hasattr(block, "_block_args") and _mbconv_has_skip(block) else None
    if all(hasattr(block, a) for a in ("conv1", "bn1", "conv2", "bn2")):
        return _resnet_bottleneck_forward if hasattr(block, "conv3") else _resnet_basic_forward
    return None


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks the `residual_add` rule applies to."""
    return [name for name, m in model.named_modules() if _quantized_forward(m) is not None]


def residual_units(model: nn.Module) -> list[str]:
    """The residual Add units, `<block>.residual_add` (and an attention block's `<block>.ffn_residual.residual_add`)."""
    out = []
    for name in residual_blocks(model):
        out.append(f"{name}.residual_add")
        if _quantized_forward(model.get_submodule(name)) in (_psablock_forward, _psa_forward):
            out.append(f"{name}.{FFN_RESIDUAL}.residual_add")
    return out


def insert_residual_quantizers(model: nn.Module, exclude: list[str] = ()) -> tuple[list[str], list[str]]:
    """Apply `residual_add`; returns the quantizer names added (calibrated like any input quantizer) and the
    residual units left float.

    A block whose `<block>.residual_add` matches an exclude pattern keeps its float Add(s).
    """
    names, excluded = [], []
    for name in residual_blocks(model):
        if any(fnmatch.fnmatchcase(f"{name}.residual_add", p) for p in exclude):
            excluded += [u for u in residual_units(model) if u == f"{name}.residual_add"
                         or u == f"{name}.{FFN_RESIDUAL}.residual_add"]
            continue
        block = model.get_submodule(name)
        forward = _quantized_forward(block)
        block.residual_add = ResidualAdd()
        units = [f"{name}.residual_add"]
        if forward in (_psablock_forward, _psa_forward):
            block.add_module(FFN_RESIDUAL, nn.Module())
            getattr(block, FFN_RESIDUAL).residual_add = ResidualAdd()
            units.append(f"{name}.{FFN_RESIDUAL}.residual_add")
        # A subclass with the quantized forward, so the block keeps its type, name and state dict keys.
        block.__class__ = type(f"QuantResidual{type(block).__name__}", (type(block),), {"forward": forward})
        names += [f"{unit}.input{i}_quantizer" for unit in units for i in (0, 1)]
    return names, excluded
