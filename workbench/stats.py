"""Paired confidence intervals for the differences the workbench reports.

Every difference between two models is measured on the same evaluation images, so it is paired: a bootstrap
draws the images with replacement and recomputes both models' metric on the same draw; the interval is the
percentile interval of the difference over the draws. For a per-image metric (top-1 hit, agreement) that is
the mean of per-image differences; for mAP the whole metric is recomputed under image weights
(tasks/map_bootstrap.py). Draws are seeded: the same run gives the same interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A difference in points (this minus the reference) with its paired bootstrap interval."""

    delta: float
    low: float
    high: float
    confidence: float
    samples: int  # images the difference is measured on
    resamples: int

    @property
    def resolved(self) -> bool:
        """The interval excludes zero: the evaluation images resolve a difference."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "resolved": self.resolved}

    def describe(self, digits: int = 2) -> str:
        return (f"{self.delta:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"({100 * self.confidence:.0f}% paired bootstrap, {self.samples} images)")


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n): how often each of n images is drawn in each bootstrap draw."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def paired_mean(differences: np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                seed: int = 0, scale: float = 100.0) -> Interval:
    """The mean of per-image differences (e.g. hit minus reference hit) in points (`scale`), with its interval."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    n = len(d)
    if n == 0:
        raise ValueError("no images to measure a difference on")
    draws = np.empty(resamples)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # bounded memory: (chunk, n) indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        draws[start:stop] = d[idx].mean(axis=1)
    low, high = percentile_interval(draws, confidence)
    return Interval(scale * float(d.mean()), scale * low, scale * high, confidence, n, resamples)


def paired_statistic(this: np.ndarray, reference: np.ndarray, value: float, reference_value: float, samples: int,
                     confidence: float = CONFIDENCE, scale: float = 100.0) -> Interval:
    """A whole-set metric's difference (e.g. mAP) from its values for both models on the same bootstrap draws."""
    low, high = percentile_interval(np.asarray(this) - np.asarray(reference), confidence)
    return Interval(scale * (value - reference_value), scale * low, scale * high, confidence, samples, len(this))


@dataclass(frozen=True)
class Estimate:
    """A proportion or score in percent (agreement of an engine with its reference) with its interval."""

    value: float
    low: float
    high: float
    confidence: float
    samples: int  # images it is measured on
    method: str  # "wilson" (a proportion of images) or "bootstrap" (a whole-set metric resampled over images)

    def resolves(self, threshold: float) -> bool:
        """The interval lies wholly on one side of `threshold`: these images decide above or below it."""
        return self.low >= threshold or self.high < threshold

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self, digits: int = 1) -> str:
        return (f"{self.value:.{digits}f}% [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"({100 * self.confidence:.0f}% {self.method} interval, {self.samples} images)")


def normal_quantile(confidence: float) -> float:
    """z of a two-sided interval at `confidence` (1.96 at 0.95)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson_interval(hits: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """The Wilson score interval of the proportion hits/n, in percent: unlike a bootstrap it is not empty at
    n of n (32 of 32 agreeing says 'at least 89.3%', not '100%')."""
    if n <= 0:
        raise ValueError("no images to measure a proportion on")
    if not 0 <= hits <= n:
        raise ValueError(f"{hits} hits of {n}: a proportion counts at most one hit per image")
    z = normal_quantile(confidence)
    p = hits / n
    centre, spread = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)
    return Estimate(100.0 * p, 100.0 * max(0.0, low), 100.0 * min(1.0, high), confidence, n, "wilson")


def samples_to_resolve(threshold: float, confidence: float = CONFIDENCE) -> int:
    """The fewest images on which perfect agreement resolves `threshold` percent: the Wilson interval of n of n
    starts at n / (n + z^2), which reaches T at n = z^2 T / (1 - T) (35 images for 90% at 95% confidence)."""
    t = threshold / 100.0
    if t <= 0:
        return 1
    if t >= 1:
        raise ValueError(f"a threshold of {threshold:g}% cannot be resolved on any number of images: give less "
                         "than 100")
    z = normal_quantile(confidence)
    n = int(np.ceil(z * z * t / (1 - t) - 1e-9))
    while n / (n + z * z) < t:  # rounding
        n += 1
    return max(1, n)
