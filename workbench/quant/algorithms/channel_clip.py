"""ChannelClip: ReLU6 with a bound per channel, the module CLE's `relu6: clip` swaps in to equalize exactly.

Scaling the output channel i of the convolution before a ReLU6 by 1/s_i turns ReLU6(x) into
min(ReLU(x / s_i), 6 / s_i) = ReLU6(x) / s_i: the clip bound moves with the channel. ChannelClip holds that bound
per channel, so the equalized chain computes exactly what the original did (and the next convolution, its input
scaled back by s_i, sees the same values). It computes clamp(x / b, 0, 1) * b, which is min(ReLU(x), b) for b > 0,
and exports as Div, Clip(0, 1) and Mul by per-channel constants: OpenVINO fuses all three into the convolution before
them as post-ops (per-channel scale and clamp), where a Minimum against a per-channel constant stays a separate
layer that breaks the INT8 convolution's fusion (33 unfused layers and 36 reorders on EfficientNet-Lite0: 23.2 ms
against 20.0 ms at batch 1, interleaved, docs/BENCHMARKS.md).

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
        # a bound of 0 (a channel high-bias absorption emptied) would divide by 0: the smallest normal float instead
        bound = bound.detach().clone().clamp(min=torch.finfo(bound.dtype).tiny)
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
        bound = self.bound(call).to(x.dtype)
        return torch.clamp(x / bound, 0.0, 1.0) * bound

    def extra_repr(self) -> str:
        shapes = [tuple(self.bound(k).shape[:1]) or "scalar" for k in range(self.calls)]
        return f"bounds per call: {shapes}"
