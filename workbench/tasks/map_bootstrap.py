"""COCO mAP under image weights: pycocotools' accumulate, with each image counted as often as a bootstrap draws it.

A bootstrap interval of mAP resamples the evaluation images with replacement and recomputes the metric. Matching
detections to ground truth is per image (COCOeval.evaluate), so it is done once; only the accumulation over
images changes with the draw. `map_under_weights` repeats pycocotools' accumulate (area "all", the largest
maxDets) for many draws at once: each detection and each ground-truth box weighs as many times as its image was
drawn. With all weights 1 it gives pycocotools' own stats[0] and stats[1].
"""

from __future__ import annotations

import warnings

import numpy as np


def map_under_weights(ev, weights: np.ndarray) -> np.ndarray:
    """(draws, 2): mAP50-95 and mAP50 of a COCOeval that ran evaluate(), with `weights` (draws, images) counting
    each image of ev.params.imgIds per draw."""
    p = ev.params
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    draws, n_img = weights.shape
    if n_img != len(p.imgIds):
        raise ValueError(f"weights for {n_img} images, the evaluation has {len(p.imgIds)}")
    n_area, max_det = len(p.areaRng), p.maxDets[-1]
    thresholds = len(p.iouThrs)
    ap = np.full((draws, thresholds, len(p.catIds)), np.nan)
    for k in range(len(p.catIds)):
        entries = [(i, ev.evalImgs[k * n_area * n_img + i]) for i in range(n_img)]  # area index 0: "all"
        entries = [(i, e) for i, e in entries if e is not None]
        if not entries:
            continue
        gt_count = np.zeros(n_img)
        for i, e in entries:
            gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        npig = weights @ gt_count  # (draws,)
        scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for _, e in entries])
        if scores.size == 0:
            ap[:, :, k] = np.where(npig[:, None] > 0, 0.0, np.nan)
            continue
        image = np.concatenate([np.full(min(len(e["dtScores"]), max_det), i) for i, e in entries])
        order = np.argsort(-scores, kind="mergesort")
        matches = np.concatenate([e["dtMatches"][:, :max_det] for _, e in entries], axis=1)[:, order]
        ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in entries], axis=1)[:, order]
        w = weights[:, image[order]]  # (draws, detections)
        tps = np.logical_and(matches, np.logical_not(ignored)).astype(np.float64)
        fps = np.logical_and(np.logical_not(matches), np.logical_not(ignored)).astype(np.float64)
        tp_sum = np.cumsum(w[:, None, :] * tps[None], axis=2)  # (draws, thresholds, detections)
        fp_sum = np.cumsum(w[:, None, :] * fps[None], axis=2)
        for r in range(draws):
            if npig[r] == 0:
                continue  # this draw holds no ground truth of the class: pycocotools leaves it out (-1)
            for t in range(thresholds):
                tp, fp = tp_sum[r, t], fp_sum[r, t]
                recall = tp / npig[r]
                precision = tp / (fp + tp + np.spacing(1))
                precision = np.maximum.accumulate(precision[::-1])[::-1]  # pycocotools' envelope
                idx = np.searchsorted(recall, p.recThrs, side="left")
                q = np.zeros(len(p.recThrs))
                valid = idx < len(precision)
                q[valid] = precision[idx[valid]]
                ap[r, t, k] = q.mean()
    with warnings.catch_warnings():  # a draw without any ground truth is NaN, as pycocotools' -1
        warnings.simplefilter("ignore", RuntimeWarning)
        map50_95 = np.nanmean(ap.reshape(draws, -1), axis=1)
        map50 = np.nanmean(ap[:, 0, :], axis=1)
    return np.stack([map50_95, map50], axis=1)
