"""Runners: PyTorch eager and ONNX Runtime behind one call signature.

ONNX Runtime runs a Q/DQ graph in two ways, and both matter:
- mode "faithful" (graph optimisations off): QuantizeLinear/DequantizeLinear
  run as plain ops and the convolutions in float. That is the arithmetic
  TensorRT performs on the same graph, so it must match the fake-quant model.
- mode "default" (ONNX Runtime's optimisations on): Q/DQ fuse into ORT's own
  integer kernels, which is what a CPU deployment runs. On AVX2 CPUs without
  VNNI those kernels can saturate with signed 8-bit activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from ..hardware.ort import ort_session_options
from ..tasks.base import first_output


class Runner(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    def __init__(self, model: nn.Module, name: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model = model.eval()
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype  # the input's: float16 for a half-precision model

    @torch.no_grad()
    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(batch).to(self.device, self.dtype)
        return first_output(self.model(x)).float().cpu().numpy()


class DeviceResidentRunner:
    """A CUDA model's compute time alone, for latency only: the input is uploaded once per shape and stays on the
    GPU, the output stays there, and each call ends with a synchronize. (TorchRunner's time is end to end: host
    copies in and out, as a caller sees it; this one is the figure an engine's GPU compute time compares with.)"""

    def __init__(self, model: nn.Module, name: str, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.model = model.eval()
        self.name = name
        self.dtype = dtype
        self.channels_last = channels_last
        self._x = None

    @torch.no_grad()
    def __call__(self, batch: np.ndarray | torch.Tensor) -> None:
        if self._x is None or tuple(self._x.shape) != tuple(batch.shape):
            self._x = torch.as_tensor(batch).to("cuda", self.dtype)
            if self.channels_last:
                self._x = self._x.contiguous(memory_format=torch.channels_last)
        self.model(self._x)
        torch.cuda.synchronize()


class OrtRunner:
    def __init__(
        self,
        path: str | Path,
        name: str,
        mode: Literal["faithful", "default"] = "faithful",
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), ort_session_options(mode, threads),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.name = name
        self.mode = mode
        self.path = Path(path)

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
