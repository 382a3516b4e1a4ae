"""ChannelClip: ReLU6 with a bound per channel, the module CLE's `relu6: clip` swaps in to equalize exactly.

Scaling the output channel i of the convolution before a ReLU6 by 1/s_i turns ReLU6(x) into
min(ReLU(x / s_i), 6 / s_i) = ReLU6(x) / s_i: the clip bound moves with the channel. ChannelClip holds that bound
per channel, so the equalized chain computes exactly what the original did (and the next convolution, its input
scaled back by s_i, sees the same values). It exports as Relu + Min against a constant, which TensorRT and OpenVINO
fuse with the convolution before it like any elementwise activation.

One ReLU6 module may be called several times in a forward (EfficientNet's MBConv applies its `_swish` after the
expansion and after the depthwise convolution), and each call follows a different convolution with its own
scales. The module therefore keeps one bound per call (`bound0`, `bound1`, ... in call order within one forward
of its parent; a scalar 6 for a call whose chain was not equalized) and counts its calls: the count restarts at
every forward of its parent (a pre-hook) and wraps at the number of calls, so a forward that stopped half way,
or a trace that runs the module without its parent's hooks, cannot shift the bounds onto the wrong call.
"""

from __future__ import annotations

import re

import torch
from torch import nn


class ChannelClip(nn.Module):

    def __init__(self, calls: int = 0, bound: float = 6.0):
        super().__init__()
        for k in range(calls):
            self.register_buffer(f"bound{k}", torch.tensor(float(bound)))
        self._call = 0

    @staticmethod
    def accepts_state_buffer(name: str) -> bool:
        """apply_state may create these buffers from ptq_state.pt (a replayed swap starts with no bounds)."""
        return re.fullmatch(r"bound[0-9]{1,4}", name) is not None

    @property
    def calls(self) -> int:
        return sum(1 for name, _ in self.named_buffers(recurse=False) if name.startswith("bound"))

    def set_bound(self, call: int, bound: torch.Tensor, spatial_dims: int = 2) -> None:
        """Call `call`'s bound: a scalar, or one per channel (stored as (C, 1, ...) to broadcast over the
        spatial dims, so the forward has no shape logic and traces as it runs)."""
        bound = bound.detach().clone()
        self.register_buffer(f"bound{call}", bound if bound.dim() == 0 else bound.view(-1, *[1] * spatial_dims))

    def bound(self, call: int) -> torch.Tensor:
        return getattr(self, f"bound{call}")

    def attach(self, parent: nn.Module) -> None:
        """Restart the call count at every forward of the module that holds this one."""
        parent.register_forward_pre_hook(self._restart)

    def _restart(self, module, args) -> None:
        self._call = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        calls = self.calls
        if calls == 0:
            raise RuntimeError("ChannelClip has no bounds (its ptq_state.pt was not applied)")
        call, self._call = self._call % calls, self._call % calls + 1
        return torch.minimum(torch.relu(x), self.bound(call).to(x.dtype))

    def extra_repr(self) -> str:
        shapes = [tuple(self.bound(k).shape[:1]) or "scalar" for k in range(self.calls)]
        return f"bounds per call: {shapes}"
