"""The wrapper that makes an Ultralytics DetectionModel return its inference tensor alone."""

from __future__ import annotations

from torch import nn

from ..tasks.base import first_output


class UltralyticsDetector(nn.Module):
    """An Ultralytics DetectionModel that returns only its inference tensor (B, 4 + classes, N)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return first_output(self.model(x))
