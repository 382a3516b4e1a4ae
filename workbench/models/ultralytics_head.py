"""The wrapper that makes an Ultralytics DetectionModel return its inference tensor alone."""

from __future__ import annotations

import torch
from torch import nn

from ..tasks.base import first_output


class UltralyticsDetector(nn.Module):
    """An Ultralytics DetectionModel that returns only its inference tensor (B, 4 + classes, N)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if not torch.jit.is_tracing():
            return first_output(self.model(x))
        # Traced for ONNX: Ultralytics' heads cache their anchors for the last input size and, unless `dynamic`,
        # reuse them, so the trace would write the example's anchors into the graph as constants and a graph
        # exported with dynamic height and width would fail at any other size. Recomputed from the feature maps'
        # shapes, as Ultralytics' own exporter does for dynamic exports; a graph of fixed size folds them back.
        heads = [m for m in self.model.modules() if hasattr(m, "anchors") and isinstance(getattr(m, "dynamic", None),
                                                                                          bool)]
        cached = [head.dynamic for head in heads]
        for head in heads:
            head.dynamic = True
        try:
            return first_output(self.model(x))
        finally:
            for head, dynamic in zip(heads, cached):
                head.dynamic = dynamic
