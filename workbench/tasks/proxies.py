"""Cheap proxies for "how far is this output from the FP32 model's": SQNR, cosine, KL.

They need no labels and no decoding, so a sensitivity sweep can score every
layer in seconds. KL compares what the outputs mean, so the task computes it
(Task.output_kl): for a classifier the softmax over classes, for a detector
each box's confidence as a Bernoulli distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import Task, first_output

EPS = 1e-7


def _tensor(x) -> torch.Tensor:
    # Kept on the model's device: a sweep measures hundreds of configurations.
    x = first_output(x)
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.float()


class ProxyMeter:
    """Accumulates (reference, output) pairs batch by batch; `result()` gives sqnr_db, cosine, kl."""

    def __init__(self, task: Task, num_classes: int | None = None):
        self.task = task
        self.num_classes = num_classes
        self.signal = self.noise = 0.0
        self.cosine_sum = self.kl_sum = 0.0
        self.n = 0

    def update(self, reference, output) -> None:
        ref, out = _tensor(reference), _tensor(output)
        ref = ref.to(out.device)
        if ref.shape != out.shape:
            raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            raise FloatingPointError("the model produced NaN/Inf outputs")
        self.signal += float((ref**2).sum())
        self.noise += float(((out - ref) ** 2).sum())
        flat_r, flat_o = ref.flatten(1), out.flatten(1)
        self.cosine_sum += float(torch.nn.functional.cosine_similarity(flat_r, flat_o, dim=1, eps=EPS).sum())
        self.kl_sum += float(self.task.output_kl(ref, out, self.num_classes).clamp_min(0).sum())  # >= 0 but rounding
        self.n += ref.shape[0]

    def result(self) -> dict[str, float]:
        if not self.n:
            return {}
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, EPS) / self.noise)
        return {"sqnr_db": sqnr, "cosine": self.cosine_sum / self.n, "kl": self.kl_sum / self.n}
