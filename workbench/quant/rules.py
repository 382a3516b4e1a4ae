"""TensorRT placement rules beyond "quantize the input and weight of every Conv/Linear".

Each rule is named, finds the modules it applies to, and changes how they quantize:

- `residual_add`: in residual blocks (`x + cv2(cv1(x))`, YOLOv5 and Ultralytics
  `Bottleneck` with `add`), both inputs of the Add get a quantizer. TensorRT then
  fuses the Add into the convolution before it and runs it in INT8; with float
  inputs it would run the Add on its own, in higher precision.
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

RESIDUAL_BLOCKS = frozenset({"Bottleneck"})


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


def _residual_forward(self, x):
    return self.residual_add(x, self.cv2(self.cv1(x)))


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks the `residual_add` rule applies to."""
    return [
        name
        for name, m in model.named_modules()
        if type(m).__name__ in RESIDUAL_BLOCKS and getattr(m, "add", False) and hasattr(m, "cv1") and hasattr(m, "cv2")
    ]


def insert_residual_quantizers(model: nn.Module, exclude: list[str] = ()) -> list[str]:
    """Apply `residual_add`; returns the quantizer names added (calibrated like any input quantizer).

    A block whose `<block>.residual_add` matches an exclude pattern keeps its float Add.
    """
    names = []
    for name in residual_blocks(model):
        if any(fnmatch.fnmatchcase(f"{name}.residual_add", p) for p in exclude):
            continue
        block = model.get_submodule(name)
        block.residual_add = ResidualAdd()
        # A subclass with the quantized forward, so the block keeps its type, name and state dict keys.
        block.__class__ = type(f"QuantResidual{type(block).__name__}", (type(block),), {"forward": _residual_forward})
        names += [f"{name}.residual_add.input0_quantizer", f"{name}.residual_add.input1_quantizer"]
    return names
