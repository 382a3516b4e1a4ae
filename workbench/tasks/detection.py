"""Detection scoring: YOLO raw outputs -> boxes -> pycocotools mAP, and agreement with the FP32 model.

This is the only place that knows what a detector's output means. Two head
layouts are understood (the raw tensor, before any NMS):

- "anchor_objectness", YOLOv5: (B, N, 5 + C) rows [cx, cy, w, h, obj, cls_1..cls_C],
  probabilities already sigmoided; score = obj * cls.
- "anchor_free", YOLOv8/11: (B, 4 + C, N) columns [cx, cy, w, h, cls_1..cls_C]; score = cls.

Boxes are in network-input (letterboxed or resized) pixels; the dataset's Letterbox maps
them back to the original image, where the COCO ground truth lives. A model whose output has
another form declares it in the recipe (model.detector: tasks/detection_contract.py converts it).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from ..errors import DataError, ModelLoadError, WorkbenchError
from .base import Classes, Metric, Task, first_output

ANCHOR_OBJECTNESS = "anchor_objectness"
ANCHOR_FREE = "anchor_free"
MAX_NMS = 30000  # boxes kept (by score) before NMS, as Ultralytics: bounds NMS time on a noisy model
AGREEMENT_SCORE = 0.25  # detections a user would see (Ultralytics' predict default)
AGREEMENT_IOU = 0.5
# How an exported graph's output is laid out, in its metadata (workbench.output_layout).
OUTPUT_LAYOUTS = {
    ANCHOR_FREE: "(batch, 4 + classes, boxes): cx, cy, w, h in input pixels, class scores (Ultralytics' layout)",
    ANCHOR_OBJECTNESS: "(batch, boxes, 5 + classes): cx, cy, w, h in input pixels, objectness, class scores (YOLOv5)",
}
# The `task` of a YOLOv5-layout graph: not one of Ultralytics' tasks, so `yolo val`/`predict` refuse it by this name.
YOLOV5_TASK = "detect-yolov5: output (batch, boxes, 5 + classes) with objectness, which Ultralytics 8 cannot decode"


def _as_tensor(output) -> torch.Tensor:
    # A tensor stays on its device: on a GPU the NMS of a sensitivity sweep's hundreds of
    # evaluations runs there too; only the kept boxes come back to the CPU.
    output = first_output(output)
    t = output.detach() if isinstance(output, torch.Tensor) else torch.from_numpy(np.asarray(output))
    return t if t.dtype == torch.float64 else t.float()  # float16/int -> float32; float64 kept


# YOLO head classes (YOLOv5 and Ultralytics): their convolutions give the raw predictions.
HEAD_MODULES = frozenset({"Detect", "Segment", "Pose", "OBB", "v10Detect"})


def detection_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in HEAD_MODULES]


class UnknownHeadError(ModelLoadError, ValueError):
    """The model's output is not a detection head the adapter can decode (a user-facing error, exit 2)."""


def model_num_classes(model: torch.nn.Module, input_size) -> int:
    """A detector's class count from the model itself: its head's `nc`, else its `names`, else its output's layout.

    Never from the labels: an evaluation split without the last class is still a split of
    the model's classes. A model with neither head nor names (an `import:` detector) is read
    by its raw output, boxes outnumbering channels as in every real head: (B, N, 5 + C) with
    N > 5 + C is YOLOv5, (B, 4 + C, N) YOLOv8/11.
    """
    device = next(iter(model.parameters()), torch.zeros(())).device
    with torch.no_grad():
        output = model(torch.zeros(1, *input_size, device=device))
    shape = tuple(first_output(output).shape)
    if len(shape) != 3:
        raise UnknownHeadError(
            f"model.spec: this model is not a detector the adapter knows: its output has shape {shape}, not YOLOv5's "
            "(batch, boxes, 5 + classes) or YOLOv8/11's (batch, 4 + classes, boxes), raw (before NMS)"
        )
    heads = {int(h.nc) for h in detection_heads(model) if isinstance(getattr(h, "nc", None), int)}
    names = getattr(model, "names", None)
    named = len(names) if isinstance(names, (list, tuple, dict)) and names else None
    if len(heads) > 1:
        raise UnknownHeadError(f"model.spec: the model's detection heads disagree on the class count ({sorted(heads)})")
    head = next(iter(heads), None)
    if head is not None and named is not None and named != head:
        raise UnknownHeadError(
            f"model.spec: the model's names list {named} classes but its detection head has nc={head}; "
            "the checkpoint is inconsistent"
        )
    if head is not None:
        count, said = head, "its detection head's nc"
    elif named is not None:
        count, said = named, "its names"
    elif (declared := getattr(model, "detector_layout", None)) is not None:  # model.detector.layout wins
        count, said = (shape[2] - 5 if declared == ANCHOR_OBJECTNESS else shape[1] - 4), \
            f"its output, read as model.detector.layout {declared}"
    elif shape[1] > shape[2]:
        count, said = shape[2] - 5, "its output, read as YOLOv5"
    else:
        count, said = shape[1] - 4, "its output, read as YOLOv8"
    if count < 1:
        raise UnknownHeadError(f"model.spec: this model is not a detector the adapter knows: its output {shape} "
                               f"leaves {count} classes by {said}")
    try:
        detect_head_format(output, count)
    except UnknownHeadError as e:
        raise UnknownHeadError(
            f"model.spec: the model has {count} classes by {said}, and its output does not decode for them: {e}"
        ) from None
    return count


def _output_layout(model: torch.nn.Module, input_size, num_classes: int) -> str:
    """The head layout of the model's output, from one forward pass on a blank image of the export size."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return detect_head_format(model(x), num_classes)
    finally:
        model.train(was_training)


def model_class_names(model: torch.nn.Module, count: int) -> list[str] | None:
    """The model's class names (Ultralytics' `names` dict, YOLOv5's list) when they are `count`, else None."""
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i))) for i in range(len(names))]
    if not isinstance(names, (list, tuple)) or len(names) != count or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def detect_head_format(output: torch.Tensor | np.ndarray, num_classes: int) -> str:
    """Which head layout `output` has: "anchor_objectness" (YOLOv5) or "anchor_free" (YOLOv8/11)."""
    shape = tuple(first_output(output).shape)
    c = num_classes
    if len(shape) == 3:
        v5 = shape[2] == 5 + c
        v8 = shape[1] == 4 + c
        if v5 and not v8:
            return ANCHOR_OBJECTNESS
        if v8 and not v5:
            return ANCHOR_FREE
        if v5 and v8:
            # (B, 4+C, 5+C): both readings fit; real heads have far more boxes than channels.
            raise UnknownHeadError(
                f"detector output {shape} is ambiguous for {c} classes: it reads as YOLOv5 (B, N, 5+C) with "
                f"N={shape[1]} "
                f"and as YOLOv8 (B, 4+C, N) with N={shape[2]}; use an input size that gives more boxes"
            )
    hint = ""
    if len(shape) == 3 and shape[2] == 4 + c:
        hint = " It looks like a transposed YOLOv8 output (B, N, 4+C): transpose it to (B, 4+C, N)."
    elif len(shape) == 3 and (shape[2] > 5 or shape[1] > 4):
        hint = f" Check num_classes: the model may have {shape[2] - 5} (YOLOv5) or {shape[1] - 4} (YOLOv8) classes."
    raise UnknownHeadError(
        f"detector output of shape {shape} is not a supported head for {c} classes: expected YOLOv5 "
        f"(batch, boxes, {5 + c}) = [cx, cy, w, h, obj, {c} class scores] or YOLOv8/11 (batch, {4 + c}, boxes) = "
        f"[cx, cy, w, h, {c} class scores], raw (before NMS).{hint}"
    )


def decode(
    output,
    num_classes: int,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 300,
    multi_label: bool = False,
) -> list[np.ndarray]:
    """Raw head output -> per image an array (k, 6): x1, y1, x2, y2, score, class index (network-input pixels).

    As Ultralytics' non_max_suppression: keep score > conf, the best class per box
    (or every class above conf with multi_label), at most 30000 boxes by score,
    class-aware NMS at `iou`, then the `max_det` best. float32 out, float64 for float64 in.
    """
    fmt = detect_head_format(output, num_classes)
    pred = _as_tensor(output)
    if not torch.isfinite(pred).all():
        raise FloatingPointError(f"the detector produced NaN/Inf in its output (shape {tuple(pred.shape)})")
    out_dtype = np.float64 if pred.dtype == torch.float64 else np.float32
    if fmt == ANCHOR_FREE:
        pred = pred.transpose(1, 2)  # -> (B, N, 4 + C)
    results = []
    for x in pred:
        if fmt == ANCHOR_OBJECTNESS:
            x = x[x[:, 4] > conf]  # obj <= conf means obj * cls <= conf: drop early, as YOLOv5
            scores = x[:, 5:] * x[:, 4:5]
        else:
            scores = x[:, 4:]
        boxes = _cxcywh_to_xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf).nonzero(as_tuple=True)
            boxes, score, cls = boxes[i], scores[i, j], j
        else:
            score, cls = scores.max(1) if len(scores) else (scores.new_zeros(0), scores.new_zeros(0, dtype=torch.long))
            keep = score > conf
            boxes, score, cls = boxes[keep], score[keep], cls[keep]
        if len(score) > MAX_NMS:
            top = score.argsort(descending=True)[:MAX_NMS]
            boxes, score, cls = boxes[top], score[top], cls[top]
        keep = torchvision.ops.batched_nms(boxes, score, cls, iou)[:max_det]  # sorted by score, best first
        det = torch.cat([boxes[keep], score[keep, None], cls[keep, None].to(boxes.dtype)], dim=1)
        results.append(det.cpu().numpy().astype(out_dtype, copy=False))
    return results


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    half = b[:, 2:4] / 2
    return torch.cat([b[:, :2] - half, b[:, :2] + half], dim=1)


class DetectionScorer:
    """Accumulates one backend's detections batch by batch; `result()` gives its metrics.

    map50_95 and map50: pycocotools COCOeval (bbox, its default parameters, so
    at most 100 detections per image count) on exactly the images seen. When
    reference outputs (the FP32 model's) are given: box_agreement, the percent
    of the reference's confident detections (score >= agreement_score, 0.25 by
    default; 0 compares every kept detection, for random-weight models) that this backend
    also finds (same class, IoU >= 0.5, matched one-to-one greedily by score),
    and box_agreement_f1, its harmonic mean with the reverse direction.
    """

    def __init__(
        self,
        coco_gt: COCO,
        category_ids: list[int],
        num_classes: int,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 300,
        agreement_score: float = AGREEMENT_SCORE,
    ):
        if len(category_ids) != num_classes:
            # Class index i means the i-th sorted category id; with another count every label shifts.
            raise DataError(
                f"the dataset has {len(category_ids)} categories but the model has {num_classes} classes; class "
                "index i is the i-th category (sorted ids), so they must be the same (YOLO txt labels: pass the "
                "model's num_classes)"
            )
        self.coco_gt = coco_gt
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.num_classes = num_classes
        self.nms = {"conf": conf, "iou": iou, "max_det": max_det}
        self.agreement_score = agreement_score
        self.image_ids: list[int] = []
        self.rows: list[np.ndarray] = []  # per image (k, 7): image_id, x, y, w, h, score, category_id
        self.ref_total = self.ref_matched = 0  # reference detections, and those this backend found
        self.own_total = self.own_matched = 0  # the reverse direction
        self.ref_images = 0  # images scored against a reference
        self.evaluation = None  # pycocotools' COCOeval after result(): its per-image matches (Task.delta)
        self.draws: dict = {}  # (resamples, seed) -> mAP50-95 per bootstrap draw

    def update(self, outputs, targets: list[dict], reference=None) -> None:
        self._result, self.draws = None, {}
        dets = decode(outputs, self.num_classes, **self.nms)
        if len(dets) != len(targets):
            raise ValueError(f"the detector returned {len(dets)} images' outputs for a batch of {len(targets)} targets")
        refs = decode(reference, self.num_classes, **self.nms) if reference is not None else None
        for b, (det, target) in enumerate(zip(dets, targets)):
            image_id = int(target["image_id"])
            lb = target["letterbox"]
            boxes = lb.to_original(det[:, :4])
            self.image_ids.append(image_id)
            if len(det):
                row = np.empty((len(det), 7), dtype=np.float64)
                row[:, 0] = image_id
                row[:, 1:3] = boxes[:, :2]
                row[:, 3:5] = boxes[:, 2:] - boxes[:, :2]  # COCO wants x, y, width, height
                row[:, 5] = det[:, 4]
                row[:, 6] = self.category_ids[det[:, 5].astype(np.int64)]
                self.rows.append(row)
            if refs is not None:
                # Compared in network-input pixels: clipping to the image would shrink boxes that
                # reach into the letterbox padding to nothing, and an empty box matches nothing, not even itself.
                own, ref = det, refs[b]
                own, ref = own[own[:, 4] >= self.agreement_score], ref[ref[:, 4] >= self.agreement_score]
                self.ref_images += 1
                self.ref_total += len(ref)
                self.own_total += len(own)
                self.ref_matched += _greedy_matches(ref, own)
                self.own_matched += _greedy_matches(own, ref)

    def result(self) -> dict:
        if getattr(self, "_result", None) is not None:  # pycocotools' evaluation is not cheap: once per state
            return self._result
        self._result = self._compute()
        return self._result

    def _compute(self) -> dict:
        out: dict = {"samples": len(self.image_ids)}
        maps = self._coco_map()
        if maps is not None:
            out["map50_95"], out["map50"], out["per_class"] = maps
        if self.ref_images:
            # Agreement is measurable only where the reference finds something confident: with no reference box
            # there is nothing to agree on (a random-weight model's), and it is None, not 100%.
            out["box_agreement_compared"] = self.ref_total
            out["box_agreement"] = 100.0 * self.ref_matched / self.ref_total if self.ref_total else None
            if self.ref_total and self.own_total:
                recall, precision = out["box_agreement"], 100.0 * self.own_matched / self.own_total
                out["box_agreement_f1"] = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
            else:
                out["box_agreement_f1"] = None if not (self.ref_total or self.own_total) else 0.0
        return out

    def _coco_map(self) -> tuple[float, float, dict] | None:
        """(mAP50-95, mAP50, per class {name: {map50_95, map50, instances}}) from pycocotools; None when the images
        seen hold no ground-truth box. A class with no ground truth on these images has no row."""
        image_ids = sorted(set(self.image_ids))
        if not image_ids:
            return None
        has_gt = any(not a.get("iscrowd", 0) for a in self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=image_ids)))
        if not has_gt:
            return None
        instances = self._instances(image_ids)
        if not self.rows:  # no detections at all (pycocotools' loadRes cannot take an empty list)
            return 0.0, 0.0, {name: {"map50_95": 0.0, "map50": 0.0, "instances": n} for name, n in instances.items()}
        dets = np.concatenate(self.rows)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; its numbers are kept as is
            coco_dt = self.coco_gt.loadRes(dets)
            ev = COCOeval(self.coco_gt, coco_dt, "bbox")
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        self.evaluation = ev
        # precision[iou threshold, recall, category, area "all", maxDets 100], -1 where a category has no GT:
        # the per-class AP pycocotools averages into stats[0] (all thresholds) and stats[1] (IoU 0.5).
        precision = ev.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat in enumerate(ev.params.catIds):
            name = str(self.coco_gt.cats[cat].get("name", cat))
            if name not in instances:
                continue
            p_all, p_50 = precision[:, :, k], precision[0, :, k]
            per_class[name] = {"map50_95": float(p_all[p_all > -1].mean()) if (p_all > -1).any() else 0.0,
                               "map50": float(p_50[p_50 > -1].mean()) if (p_50 > -1).any() else 0.0,
                               "instances": instances[name]}
        return float(ev.stats[0]), float(ev.stats[1]), per_class

    def _instances(self, image_ids: list[int]) -> dict[str, int]:
        """Ground-truth boxes (not crowd) per class name on these images."""
        counts: dict[str, int] = {}
        for ann in self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=image_ids)):
            if not ann.get("iscrowd", 0):
                name = str(self.coco_gt.cats[ann["category_id"]].get("name", ann["category_id"]))
                counts[name] = counts.get(name, 0) + 1
        return counts


def _greedy_matches(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows of `a` (x1, y1, x2, y2, score, class) find a partner in `b`: same class, IoU >= 0.5.

    One-to-one and greedy by `a`'s score, as COCO matching: each detection of `a`,
    best first, takes the unmatched `b` detection it overlaps most.
    """
    if not len(a) or not len(b):
        return 0
    ious = torchvision.ops.box_iou(torch.from_numpy(a[:, :4]).double(), torch.from_numpy(b[:, :4]).double()).numpy()
    ious[a[:, 5][:, None] != b[:, 5][None, :]] = -1.0
    free = np.ones(len(b), dtype=bool)
    matched = 0
    for i in np.argsort(-a[:, 4], kind="stable"):
        row = np.where(free, ious[i], -1.0)
        j = int(row.argmax())
        if row[j] >= AGREEMENT_IOU:
            free[j] = False
            matched += 1
    return matched


class BoxMapAgreement:
    """The task's own metric between an engine and its reference: mAP50 of the engine's detections (conf 0.001, as
    for mAP) scored by pycocotools against the reference's confident boxes (score >= 0.25) as ground truth, with a
    bootstrap interval over images (tasks/map_bootstrap.py).

    Raw box agreement (both sides cut at 0.25) counts every box whose score crosses 0.25 by a rounding as lost: a
    correct FastestDet engine agreed on 80.7% of 819 boxes while scoring mAP 0.162 against its graph's 0.164. Here a
    box the engine scores 0.24 is still found, ranked a little lower; a broken engine's boxes are not found at all.
    """

    criterion = "mAP50 of its boxes against the reference's confident boxes"
    RESAMPLES = 200  # each draw re-accumulates every class

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes
        self.own: list[np.ndarray] = []  # per image (k, 6) x1, y1, x2, y2, score, class
        self.ref: list[np.ndarray] = []
        self.compared = 0
        self._cached: dict = {}

    def update(self, outputs, reference) -> None:
        classes = self.num_classes or DetectionTask._classes_of(reference)
        self.own += decode(outputs, classes)
        refs = decode(reference, classes, conf=AGREEMENT_SCORE)
        self.ref += refs
        self.compared += sum(len(r) for r in refs)
        self._cached = {}

    def estimate(self, confidence: float):
        from ..stats import Estimate, bootstrap_weights, percentile_interval
        from .map_bootstrap import map_under_weights

        if not self.compared:
            return None
        key = (len(self.own), confidence)
        if key not in self._cached:
            ev = self._evaluate()
            low = high = value = 0.0
            if ev is not None:
                everyone = np.ones((1, len(self.own)))
                value = 100.0 * float(map_under_weights(ev, everyone)[0, 1])
                draws = 100.0 * map_under_weights(ev, bootstrap_weights(len(self.own), self.RESAMPLES))[:, 1]
                draws = draws[np.isfinite(draws)]  # a draw holding no reference box measures nothing
                low, high = percentile_interval(draws, confidence) if len(draws) else (value, value)
            self._cached[key] = Estimate(value, min(low, value), max(high, value), confidence, len(self.own),
                                         "bootstrap")
        return self._cached[key]

    def _evaluate(self):
        """pycocotools' COCOeval of the engine's boxes against the reference's; None where the engine found none."""
        classes = {int(c) for r in self.ref for c in r[:, 5]} | {int(c) for o in self.own for c in o[:, 5]}
        annotations = []
        for i, boxes in enumerate(self.ref):
            for x1, y1, x2, y2, _, c in boxes:
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1,
                                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                    "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0})
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(len(self.ref))], "annotations": annotations,
                      "categories": [{"id": c + 1} for c in sorted(classes)]}
        rows = [np.column_stack([np.full(len(o), i), o[:, 0], o[:, 1], o[:, 2] - o[:, 0], o[:, 3] - o[:, 1],
                                 o[:, 4], o[:, 5] + 1]) for i, o in enumerate(self.own) if len(o)]
        if not rows:
            return None
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(np.concatenate(rows)), "bbox")
            ev.params.imgIds = list(range(len(self.ref)))
            ev.params.iouThrs = np.array([0.5])  # mAP50 alone: a tenth of the work of every bootstrap draw
            # every box either side may count (COCO's 100 per image would cut off a busy image's reference boxes)
            ev.params.maxDets = [max(MAX_NMS, max(len(o) for o in self.own), max(len(r) for r in self.ref))]
            ev.evaluate()
        return ev


class DetectionTask(Task):
    name = "detection"
    metrics = (
        Metric("map50_95", "mAP50-95", 4, points=100, short="mAP50-95"),
        Metric("map50", "mAP50", 4),
        Metric("box_agreement", "Box agreement with FP32 %", 2, points=1, short="box agreement %"),
    )
    headline_keys = ("map50_95", "box_agreement")
    agreement_key = "box_agreement"
    proxy_samples = 8  # a detector's output holds thousands of boxes per image: 8 images give plenty of values
    task_samples = None
    train_mode = "eval"  # BatchNorm statistics of a detector's small distillation batches would drift
    preprocess_steps = "read, letterbox or resize, normalise"
    postprocess_steps = "decode and NMS"

    def fidelity_sentences(self, metrics: dict[str, float], samples: int) -> list[str]:
        compared = metrics.get("box_agreement_compared")
        if not compared or metrics.get("box_agreement") is None:
            return []
        return [f"It finds {metrics['box_agreement']:.1f}% of the {compared} boxes FP32 finds with score 0.25 or "
                f"more on {samples} images (same class, IoU 0.5 or more)."]

    def classes(self, model, input_size) -> Classes:
        count = model_num_classes(model, input_size)
        return Classes(count, model_class_names(model, count))

    def prepare_datasets(self, model, input_size, datasets: dict) -> dict:
        """The model is a detector the adapter decodes, and every labeled split is read for the model's classes."""
        from ..data.detection import DetectionDataset, LetterboxedImages

        classes = self.classes(model, input_size)
        out = {}
        for split, dataset in datasets.items():
            if isinstance(dataset, DetectionDataset):
                out[split] = dataset.with_num_classes(classes.count, f"data.{split}", classes.names)
            elif split == "evaluation":
                raise WorkbenchError("data.evaluation: task detection scores with a detection source "
                                     "(coco or yolo_txt)")
            elif not isinstance(dataset, LetterboxedImages):
                # unlabeled letterboxed images are enough to calibrate and to distil, not to score
                raise WorkbenchError(f"data.{split}: task detection needs a detection source (coco or yolo_txt) or "
                                     "images with transform.letterbox")
            else:
                out[split] = dataset
        return out

    def for_model(self, dataset, classes, field: str):
        if hasattr(dataset, "with_num_classes"):
            found = classes()
            return dataset.with_num_classes(found.count, field, found.names)
        return dataset

    def output_layers(self, model) -> list[torch.nn.Module]:
        return detection_heads(model)  # boxes and classes

    def onnx_metadata(self, model, classes: Classes, input_size, dynamic_batch: bool,
                      dynamic_size: bool) -> dict[str, str]:
        """The keys Ultralytics writes into its ONNX exports and its AutoBackend reads back (`yolo val` and
        `yolo predict` take the task, class names, stride, size and batch from them), true of the graph as
        exported: values as Python literals.

        `args.dynamic` says whether the image size is dynamic (Ultralytics then letterboxes to its own `imgsz`,
        in rectangular batches); a graph of fixed size says False whatever its batch. `task` is "detect" only for
        an output in Ultralytics' layout, (B, 4 + classes, N). YOLOv5's (B, N, 5 + classes) with objectness is
        not a layout Ultralytics 8 decodes: its NMS would read the N rows as 4 + classes channels and `yolo val`
        would exit 0 with every metric 0. That graph's task names its layout instead, which Ultralytics refuses
        ("'YOLO' model does not support 'val' mode for '<the layout>' task"); workbench scores it itself.
        """
        from .. import __version__

        stride = getattr(model, "stride", None)
        stride = stride.tolist() if hasattr(stride, "tolist") else stride
        # a head's strides (Ultralytics' tensor, a list), or one number (a single-scale model's own attribute)
        stride = int(max(stride) if isinstance(stride, (list, tuple)) else stride) if stride is not None else 32
        names = classes.names or [str(i) for i in range(classes.count or 0)]
        layout = _output_layout(model, input_size, classes.count)
        dynamic = ", ".join(axis for axis, on in (("batch", dynamic_batch), ("height", dynamic_size),
                                                   ("width", dynamic_size)) if on)
        return {
            "description": "Exported by workbench (INT8 Q/DQ where calibrated)",
            "author": "workbench",
            "version": __version__,
            "task": "detect" if layout == ANCHOR_FREE else YOLOV5_TASK,
            "stride": str(stride),
            "batch": "1",
            "imgsz": str([int(input_size[1]), int(input_size[2])]),
            "names": str(dict(enumerate(names))),
            "channels": str(int(input_size[0])),
            "args": str({"batch": 1, "dynamic": bool(dynamic_size), "nms": False}),
            "workbench.output_layout": OUTPUT_LAYOUTS[layout],
            "workbench.dynamic_axes": dynamic or "none",
        }

    def scorer(self, recipe, dataset, compare_only: bool = False) -> DetectionScorer:
        d = recipe.detection
        return DetectionScorer(dataset.coco_gt, dataset.category_ids, len(dataset.category_ids), d.conf, d.iou,
                               d.max_det)

    def postprocess(self, outputs, recipe):
        d = recipe.detection
        return decode(outputs, self._classes_of(outputs), d.conf, d.iou, d.max_det)

    @staticmethod
    def _classes_of(outputs) -> int:
        shape = tuple(first_output(outputs).shape)  # (B, N, 5 + C) YOLOv5 or (B, 4 + C, N) anchor-free
        return shape[2] - 5 if shape[1] > shape[2] else shape[1] - 4

    def delta(self, scorer: DetectionScorer, reference: DetectionScorer, confidence: float = 0.95,
              resamples: int = 200, seed: int = 0):
        """mAP50-95 minus the reference's, x 100, with a paired bootstrap over images: both recomputed on the same
        draws (tasks/map_bootstrap.py). 200 draws: each recomputes mAP over every class."""
        from ..stats import bootstrap_weights, paired_statistic
        from .map_bootstrap import map_under_weights

        a, b = scorer.result(), reference.result()
        ev_a, ev_b = scorer.evaluation, reference.evaluation
        if "map50_95" not in a or "map50_95" not in b or ev_a is None or ev_b is None:
            return None
        if list(ev_a.params.imgIds) != list(ev_b.params.imgIds):
            return None
        def draws(scorer: DetectionScorer) -> np.ndarray:  # the reference is compared with every backend: once
            key = (resamples, seed)
            if scorer.draws.get(key) is None:
                weights = bootstrap_weights(len(scorer.evaluation.params.imgIds), resamples, seed)
                scorer.draws[key] = map_under_weights(scorer.evaluation, weights)[:, 0]
            return scorer.draws[key]

        return paired_statistic(draws(scorer), draws(reference), a["map50_95"], b["map50_95"],
                                len(ev_a.params.imgIds), confidence)

    def agreement_meter(self, num_classes) -> BoxMapAgreement:
        return BoxMapAgreement(num_classes)

    def agreement_counts(self, outputs, reference, num_classes) -> tuple[int, int]:
        """(reference boxes this output also finds, reference boxes) at the box agreement's score and IoU."""
        own = decode(outputs, num_classes, conf=AGREEMENT_SCORE)
        ref = decode(reference, num_classes, conf=AGREEMENT_SCORE)
        return (sum(_greedy_matches(r, o) for r, o in zip(ref, own)), sum(len(r) for r in ref))

    def output_kl(self, reference: torch.Tensor, output: torch.Tensor, num_classes: int | None) -> torch.Tensor:
        """Per image, the mean over boxes of the Bernoulli KL of each box's confidence (the score NMS ranks by,
        already a probability in YOLO heads)."""
        eps = 1e-7
        p = box_confidence(reference, num_classes).clamp(eps, 1 - eps)
        q = box_confidence(output, num_classes).clamp(eps, 1 - eps)
        return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean(1)

    def distiller(self, student, teacher, temperature: float, num_classes, image_size: float):
        """The raw outputs of the head's convolutions where both models have a known head, else the decoded output."""
        heads = HeadDistiller(student, teacher)
        if heads.student and heads.teacher:
            return heads
        heads.remove()
        return DecodedDistiller(num_classes, image_size)


def box_confidence(x: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Per box, the score NMS ranks by: objectness x best class (YOLOv5) or best class (YOLOv8/11)."""
    if detect_head_format(x, num_classes) == ANCHOR_FREE:
        return x[:, 4:, :].amax(1)
    return x[:, :, 4] * x[:, :, 5:].amax(2)


# Distillation from the FP32 teacher, with images only. Where the head is known, the raw outputs of the head's
# convolutions (before the decode) are matched by mean squared error scaled by the teacher's variance per
# convolution: every anchor and channel gets a dense signal, and the decoded boxes of background anchors, which
# mean nothing, get no weight. Models without a known head fall back to the decoded output: boxes by smooth-L1
# in units of the input size, scores by binary cross-entropy against the teacher's scores.

class HeadTaps:
    """Keeps the output of every convolution inside a detector's head on each forward (empty: no known head).

    Structured pruning leaves the head's output channels alone, so a pruned student's taps
    line up with the unpruned teacher's, name for name.
    """

    def __init__(self, model: nn.Module):
        self.outputs: dict[str, torch.Tensor] = {}
        heads = {id(h) for h in detection_heads(model)}
        convs = [(f"{name}.{n}", m) for name, head in model.named_modules() if id(head) in heads
                 for n, m in head.named_modules() if isinstance(m, nn.Conv2d)]
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in convs]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def __bool__(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def head_distillation(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [F.mse_loss(student[k].float(), teacher[k].float()) / (teacher[k].float().var() + 1e-6) for k in teacher]
    return torch.stack(losses).mean()


def decoded_distillation(student: torch.Tensor, teacher: torch.Tensor, num_classes: int,
                         image_size: float) -> torch.Tensor:
    if detect_head_format(teacher, num_classes) == ANCHOR_FREE:
        student, teacher = student.transpose(1, 2), teacher.transpose(1, 2)  # -> (B, N, 4 + C)
    box = F.smooth_l1_loss(student[..., :4] / image_size, teacher[..., :4] / image_size, beta=0.01)
    s, t = student[..., 4:].float().clamp(1e-6, 1 - 1e-6), teacher[..., 4:].float().clamp(0, 1)
    return box + F.binary_cross_entropy(s, t)


class HeadDistiller:
    """The head's convolutions of student and teacher, tapped on every forward of both."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        self.student, self.teacher = HeadTaps(student), HeadTaps(teacher)

    def loss(self, student_out, teacher_out) -> torch.Tensor:
        return head_distillation(self.student.outputs, self.teacher.outputs)

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()


class DecodedDistiller:
    def __init__(self, num_classes: int, image_size: float):
        self.num_classes, self.image_size = num_classes, image_size

    def loss(self, student_out, teacher_out) -> torch.Tensor:
        student, teacher = first_output(student_out).float(), first_output(teacher_out).detach().float()
        return decoded_distillation(student, teacher, self.num_classes, self.image_size)

    def remove(self) -> None:
        pass
