"""Paired bootstrap intervals: what they resolve and what they cannot, on per-image hits and on mAP."""

import json

import numpy as np
import pytest
from conftest import tiny_recipe

from workbench.cli import main
from workbench.stats import bootstrap_weights, paired_mean
from workbench.tasks.classification import ClassificationScorer, ClassificationTask


def _scorer(hits: np.ndarray) -> ClassificationScorer:
    """A scorer that saw len(hits) images of 2 classes and got hits[i] right."""
    s = ClassificationScorer(labeled=True)
    labels = np.arange(len(hits)) % 2
    logits = np.zeros((len(hits), 2), dtype=np.float32)
    predicted = np.where(hits, labels, 1 - labels)
    logits[np.arange(len(hits)), predicted] = 1.0
    s.update(logits, labels)
    return s


def test_a_real_difference_is_resolved_and_a_tie_is_not():
    rng = np.random.default_rng(0)
    base = rng.random(2000) < 0.9
    better = base.copy()
    better[np.flatnonzero(~base)[:60]] = True  # 60 more right of 2000: +3.00 points
    task = ClassificationTask()
    up = task.delta(_scorer(better), _scorer(base))
    assert up.delta == pytest.approx(3.0) and up.resolved and up.low > 1.5 and up.high < 4.5
    shuffled = base.copy()
    shuffled[np.flatnonzero(base)[:20]] = False  # 20 lost and 20 gained: no net difference, 40 images differ
    shuffled[np.flatnonzero(~base)[:20]] = True
    tie = task.delta(_scorer(shuffled), _scorer(base))
    assert tie.delta == 0.0 and not tie.resolved and tie.low < 0 < tie.high
    assert task.delta(_scorer(base), _scorer(base)).as_dict() == {
        "delta": 0.0, "low": 0.0, "high": 0.0, "confidence": 0.95, "samples": 2000, "resamples": 1000,
        "resolved": False}


def test_the_interval_narrows_with_more_images_and_is_seeded():
    rng = np.random.default_rng(1)
    small, large = (rng.choice([-1.0, 0.0, 0.0, 1.0], size=n) for n in (300, 10000))
    a, b = paired_mean(small), paired_mean(large)
    assert (a.high - a.low) > 3 * (b.high - b.low)
    assert paired_mean(small, seed=3) == paired_mean(small, seed=3)
    weights = bootstrap_weights(50, resamples=7, seed=2)
    assert weights.shape == (7, 50) and (weights.sum(axis=1) == 50).all()


def test_every_backend_reports_its_difference_with_fp32(images, tmp_path):
    runs = tmp_path / "runs"
    (tmp_path / "r.yaml").write_text(tiny_recipe(images, runs, "  - calibrate: {method: max}\n  - export: {}\n"
                                                 "  - evaluate: {latency: false, confidence: 0.9}\n"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    run_dir = next(runs.iterdir())
    backends = json.loads((run_dir / "metrics.json").read_text())["stages"]["evaluate"]["backends"]
    assert "delta_vs_fp32" not in backends["pytorch_fp32"]
    for name in ("pytorch_int8", "ort_int8_faithful", "ort_fp32"):
        d = backends[name]["delta_vs_fp32"]
        assert d["confidence"] == 0.9 and d["samples"] == 18 and d["low"] <= d["delta"] <= d["high"]
        top1 = backends[name]["metrics"]["top1"] - backends["pytorch_fp32"]["metrics"]["top1"]
        assert d["delta"] == pytest.approx(top1)
    assert "Δ vs FP32, points [90% CI]" in (run_dir / "report.md").read_text()


def test_a_95_percent_interval_has_the_width_of_the_normal_closed_form():
    """The bootstrap of a mean is close to normal: a 95% interval spans +-1.96 standard errors. One cut at
    alpha = 1 - c instead of (1 - c) / 2 spans +-1.64 (a 90% interval labelled 95%) and fails here."""
    rng = np.random.default_rng(7)
    differences = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.5, 0.3], size=4000)
    standard_error = 100 * differences.std() / np.sqrt(len(differences))
    for confidence, z in ((0.95, 1.959964), (0.8, 1.281552)):
        interval = paired_mean(differences, confidence=confidence, resamples=4000)
        half_width = (interval.high - interval.low) / 2
        assert half_width == pytest.approx(z * standard_error, rel=0.06), confidence
        assert interval.low < interval.delta < interval.high


def test_pairing_holds_image_by_image_over_several_batches():
    """Two scorers fed the same images in several batches pair image i with image i: identical hits give a zero
    difference with a zero-width interval, and one image flipped in the last batch moves it by exactly 1/n.
    A pairing that joins one scorer's batches in another order sees differences where there are none."""
    rng = np.random.default_rng(3)
    batches = [rng.random(size) < p for size, p in ((16, 0.9), (16, 0.2), (7, 0.6))]

    def fed(hit_batches):
        s = ClassificationScorer(labeled=True)
        for hits in hit_batches:
            labels = np.arange(len(hits)) % 2
            logits = np.zeros((len(hits), 2), dtype=np.float32)
            logits[np.arange(len(hits)), np.where(hits, labels, 1 - labels)] = 1.0
            s.update(logits, labels)
        return s

    task = ClassificationTask()
    same = task.delta(fed(batches), fed(batches))
    assert (same.delta, same.low, same.high, same.samples) == (0.0, 0.0, 0.0, 39)
    flipped = [b.copy() for b in batches]
    flipped[-1][np.flatnonzero(~flipped[-1])[0]] = True  # one more right, in the last batch
    one = task.delta(fed(flipped), fed(batches))
    assert one.delta == pytest.approx(100 / 39) and one.low >= 0.0


def test_a_proportion_counts_one_hit_per_image_and_top1_agreement_needs_logits():
    """A detector's (batch, boxes, 85) output read as logits counted up to 85 'hits' an image (6000% agreement,
    an interval of [0, 100] that no engine passes): both are refused by name."""
    from workbench.errors import WorkbenchError
    from workbench.stats import wilson_interval
    from workbench.tasks.classification import TopOneAgreement

    assert wilson_interval(35, 35).low == pytest.approx(100 * 35 / (35 + 1.959964 ** 2), abs=0.01)
    with pytest.raises(ValueError, match="at most one hit per image"):
        wilson_interval(36, 35)
    meter = TopOneAgreement()
    boxes = np.zeros((2, 25200, 85), dtype=np.float32)
    with pytest.raises(WorkbenchError, match=r"\(batch, classes\) logits"):
        meter.update(boxes, boxes)
