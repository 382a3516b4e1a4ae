"""Latency measured the same way for every runner: warm-up, repeats, median and p90."""

from __future__ import annotations

import time

import numpy as np


def measure_latency(runner, input_shape: tuple[int, ...], batch_sizes=(1, 8), warmup: int = 3, repeats: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"b1": {"median_ms", "p90_ms", "images_per_s"}, ...} for a runner on random input of (C, H, W)."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in batch_sizes:
        x = rng.standard_normal((b, *input_shape), dtype=np.float32)
        for _ in range(warmup):
            runner(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        out[f"b{b}"] = {
            "median_ms": 1000 * median,
            "p90_ms": 1000 * float(np.percentile(times, 90)),
            "images_per_s": b / median,
        }
    return out
