"""Detection outputs: head formats, decoding and NMS, and pycocotools scoring through DetectionScorer."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from test_detection_data import write_detection_set
from torch.utils.data import DataLoader

from workbench.data.detection import coco_dataset, detection_collate
from workbench.errors import DataError
from workbench.tasks.detection import DetectionScorer, DetectionTask, decode, detect_head_format

C = 3


def _v5_row(cx, cy, w, h, obj, cls_probs):
    return [cx, cy, w, h, obj, *cls_probs]


def _v5(rows, n=40):
    """(1, n, 5 + C): the given rows, then empty anchors (objectness 0)."""
    out = torch.zeros(1, n, 5 + C)
    out[0, : len(rows)] = torch.tensor(rows, dtype=torch.float32)
    return out


# --- head format and decoding ------------------------------------------------------------------------------------


def test_detect_head_format():
    assert detect_head_format(torch.zeros(2, 25200, 85), 80) == "anchor_objectness"
    assert detect_head_format(np.zeros((2, 84, 8400), np.float32), 80) == "anchor_free"
    assert detect_head_format((torch.zeros(1, 63, 85), [torch.zeros(1)]), 80) == "anchor_objectness"  # (pred, features)
    with pytest.raises(ValueError, match=r"shape \(2, 8400, 84\) is not a supported head for 80 classes.*transposed"):
        detect_head_format(torch.zeros(2, 8400, 84), 80)
    with pytest.raises(ValueError, match=r"shape \(2, 1000\)"):
        detect_head_format(torch.zeros(2, 1000), 80)
    with pytest.raises(ValueError, match=r"\(1, 25200, 85\) is not a supported head for 20 classes"):
        detect_head_format(torch.zeros(1, 25200, 85), 20)


def test_decode_yolov5_boxes_nms_and_conf():
    out = _v5([
        _v5_row(100, 80, 40, 20, 0.9, [0.1, 0.8, 0.1]),     # class 1, score 0.72
        _v5_row(102, 81, 40, 20, 0.8, [0.1, 0.8, 0.1]),     # its duplicate (score 0.64): NMS removes it
        _v5_row(101, 80, 40, 20, 0.9, [0.1, 0.2, 0.7]),     # same place, other class: class-aware NMS keeps it
        _v5_row(300, 200, 60, 100, 0.5, [0.6, 0.0, 0.0]),   # class 0, score 0.3
        _v5_row(50, 50, 10, 10, 0.0005, [1.0, 0.0, 0.0]),   # objectness below conf
    ])
    (det,) = decode(out, C)
    assert det.dtype == np.float32 and det.shape == (3, 6)
    np.testing.assert_allclose(det[0], [80, 70, 120, 90, 0.72, 1], rtol=1e-6)
    np.testing.assert_allclose(det[1], [81, 70, 121, 90, 0.63, 2], rtol=1e-6)
    np.testing.assert_allclose(det[2], [270, 150, 330, 250, 0.3, 0], rtol=1e-6)
    (det,) = decode(out, C, conf=0.5)
    assert det[:, 4].tolist() == pytest.approx([0.72, 0.63])
    (det,) = decode(out, C, max_det=1)
    assert len(det) == 1 and det[0, 4] == pytest.approx(0.72)
    (det,) = decode(out, C, iou=0.99)  # the duplicate overlaps its original at IoU 0.9
    assert len(det) == 4


def test_decode_multi_label_keeps_every_class_above_conf():
    out = _v5([_v5_row(100, 80, 40, 20, 1.0, [0.5, 0.4, 0.0005])])
    (single,) = decode(out, C)
    (multi,) = decode(out, C, multi_label=True)
    assert single[:, 5].tolist() == [0] and multi[:, 5].tolist() == [0, 1]
    assert multi[:, 4].tolist() == pytest.approx([0.5, 0.4])


def test_decode_yolov8_float64_numpy_and_batches():
    out = np.zeros((2, 4 + C, 30))
    out[0, :, 0] = [100, 80, 40, 20, 0.1, 0.9, 0.05]
    out[0, :, 1] = [103, 80, 40, 20, 0.1, 0.8, 0.05]  # duplicate
    out[0, :, 2] = [20, 30, 10, 20, 0.0, 0.0, 0.4]
    out[1, :, 5] = [64, 64, 32, 32, 0.7, 0.0, 0.0]
    first, second = decode(out, C)
    assert first.dtype == np.float64
    np.testing.assert_allclose(first, [[80, 70, 120, 90, 0.9, 1], [15, 20, 25, 40, 0.4, 2]])
    np.testing.assert_allclose(second, [[48, 48, 80, 80, 0.7, 0]])
    assert [len(d) for d in decode(np.zeros((2, 4 + C, 30), np.float32), C)] == [0, 0]


def test_decode_refuses_nan():
    out = _v5([_v5_row(100, 80, 40, 20, 0.9, [0.1, 0.8, 0.1])])
    out[0, 7, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        decode(out, C)


# --- scoring -----------------------------------------------------------------------------------------------------


def _fake_v5(targets, boxes_per_image, num_classes, n=32, scores=None):
    """A YOLOv5-style raw output that 'detects' the given original-pixel boxes, in letterboxed coordinates."""
    out = torch.zeros(len(targets), n, 5 + num_classes, dtype=torch.float64)
    for b, (t, (boxes, labels)) in enumerate(zip(targets, boxes_per_image)):
        xyxy = t["letterbox"].to_input(np.asarray(boxes, dtype=np.float64))
        for k, (box, label) in enumerate(zip(xyxy, labels)):
            score = 0.9 if scores is None else scores[b][k]
            out[b, k, :4] = torch.tensor([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2,
                                          box[2] - box[0], box[3] - box[1]])
            out[b, k, 4] = 1.0
            out[b, k, 5 + int(label)] = score
    return out


def _dataset_and_batch(tmp_path, size=(320, 320)):
    images, ann, _ = write_detection_set(tmp_path)
    ds = coco_dataset(images, ann, size=size)
    _, targets = next(iter(DataLoader(ds, batch_size=len(ds), collate_fn=detection_collate)))
    return ds, targets


def _truth(targets):
    return [(t["boxes"].numpy().astype(np.float64), t["labels"].numpy()) for t in targets]


def test_perfect_detections_score_one(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path)
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    scorer.update(_fake_v5(targets, _truth(targets), C), targets)
    metrics = scorer.result()
    assert metrics["samples"] == 4
    assert metrics["map50_95"] == pytest.approx(1.0) and metrics["map50"] == pytest.approx(1.0)
    assert DetectionTask().headline_points(metrics) == ("mAP50-95 points", 100 * metrics["map50_95"])


def test_shifted_detections_score_what_cocoeval_says(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path, size=(256, 320))
    rng = np.random.default_rng(0)
    shifted, scores, expected_dets = [], [], []
    for t, (boxes, labels) in zip(targets, _truth(targets)):
        moved = boxes + rng.uniform(-6, 6, size=boxes.shape)
        moved[:, [0, 2]] = moved[:, [0, 2]].clip(0, t["letterbox"].orig_w)
        moved[:, [1, 3]] = moved[:, [1, 3]].clip(0, t["letterbox"].orig_h)
        s = rng.uniform(0.3, 0.95, size=len(boxes))
        shifted.append((moved, labels))
        scores.append(s)
        for box, label, score in zip(moved, labels, s):
            expected_dets.append({"image_id": t["image_id"], "category_id": ds.category_ids[label],
                                  "score": float(score),
                                  "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    scorer.update(_fake_v5(targets, shifted, C, scores=scores), targets)
    metrics = scorer.result()

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ds.coco_gt, ds.coco_gt.loadRes(expected_dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert metrics["map50_95"] < 0.95
    assert metrics["map50_95"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert metrics["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
    # The bootstrap's accumulate, every image counted once, is pycocotools' own; a draw of image 0 four times is
    # the mAP of image 0 alone.
    from workbench.tasks.map_bootstrap import map_under_weights

    n = len(scorer.evaluation.params.imgIds)
    assert map_under_weights(scorer.evaluation, np.ones((1, n)))[0] == pytest.approx([ev.stats[0], ev.stats[1]])
    alone = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    alone.update(_fake_v5(targets[:1], shifted[:1], C, scores=scores[:1]), targets[:1])
    only_first = np.zeros((1, n))
    only_first[0, scorer.evaluation.params.imgIds.index(targets[0]["image_id"])] = 4
    assert map_under_weights(scorer.evaluation, only_first)[0, 0] == pytest.approx(alone.result()["map50_95"])


def test_no_detections_is_zero_map(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path)
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    scorer.update(torch.zeros(len(targets), 32, 5 + C), targets)
    result = scorer.result()
    assert (result["samples"], result["map50_95"], result["map50"]) == (4, 0.0, 0.0)
    assert all(c["map50_95"] == 0.0 for c in result["per_class"].values())


def test_scoring_covers_only_the_images_seen(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path)
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    first = targets[:1]
    scorer.update(_fake_v5(first, _truth(first), C), first)  # the other images' objects are not misses
    assert scorer.result()["map50_95"] == pytest.approx(1.0)


def test_box_agreement(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path)
    truth = _truth(targets)
    reference = _fake_v5(targets, truth, C)
    same = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    same.update(reference.clone(), targets, reference=reference)
    assert same.result()["box_agreement"] == 100.0 and same.result()["box_agreement_f1"] == 100.0

    # the perturbed copy misses one box (a, class 2), and moves another (c's first) far away
    perturbed = [(boxes.copy(), labels.copy()) for boxes, labels in truth]
    perturbed[0] = (perturbed[0][0][:1], perturbed[0][1][:1])
    perturbed[2][0][0] += [60, 40, 60, 40]
    n_ref = sum(len(b) for b, _ in truth)  # 5 confident reference boxes
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    scorer.update(_fake_v5(targets, perturbed, C), targets, reference=reference)
    metrics = scorer.result()
    recall, precision = (n_ref - 2) / n_ref, (n_ref - 2) / (n_ref - 1)
    assert metrics["box_agreement"] == pytest.approx(100 * recall)
    assert metrics["box_agreement_f1"] == pytest.approx(100 * 2 * recall * precision / (recall + precision))
    # detections below 0.25 are not what a user sees: they do not count either way
    low = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    low.update(_fake_v5(targets, truth, C, scores=[[0.2] * len(b) for b, _ in truth]), targets, reference=reference)
    assert low.result()["box_agreement"] == 0.0


def test_scorer_class_count_must_match_the_dataset(tmp_path):
    ds, _ = _dataset_and_batch(tmp_path)
    with pytest.raises(DataError, match="the dataset has 3 categories but the model has 80 classes"):
        DetectionScorer(ds.coco_gt, ds.category_ids, 80)


def test_scorer_rejects_a_wrong_head(tmp_path):
    ds, targets = _dataset_and_batch(tmp_path)
    scorer = DetectionScorer(ds.coco_gt, ds.category_ids, C)
    with pytest.raises(ValueError, match="not a supported head for 3 classes"):
        scorer.update(torch.zeros(len(targets), 32, 85), targets)
