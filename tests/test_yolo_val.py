"""The real consumer of the exported detectors: Ultralytics' own validator (`yolo val`) on the workbench's graphs.

An untrained model finds nothing in real images, so the images here are labelled with the exported graph's own
confident detections (the workbench's letterbox and decode): the workbench scores its graph well above chance on
them, and Ultralytics' validator, reading the same graph through its metadata, must score it the same. A graph
whose metadata lies about its size makes the validator feed it the wrong shape or letterbox wrongly, a graph that
cannot take the rectangular batches Ultralytics feeds a dynamic graph fails, and a mislabelled output layout scores
0: each shows up as a crash or a gap between the two numbers.
"""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_yolov5_checkpoint
from test_detection_data import write_detection_set

from workbench.cli import main

# Not imported here: importing ultralytics patches PIL and torch process-wide; workbench's import_ultralytics undoes it.
needs_ultralytics = pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                                       reason="ultralytics extra not installed")
NAMES = ["red"]  # one class: Ultralytics' validator runs the same NMS as the workbench (no multi-label)
SIZE = 128  # an image of 80x48 then letterboxes, in Ultralytics' rectangular batches, to 96x160: not the export size
LABEL_SCORE = 0.3  # the detections written as labels: confident ones, well apart from the rest


def wide_set(root: Path, n: int = 6) -> Path:
    """Ultralytics' layout (images/{train,val}, labels/{train,val}, data.yaml) of n 80x48 images."""
    specs = [(f"img{i:02d}.png", (80, 48), 100 + i, [(1, 6 + 4 * i, 6, 30, 24, 0)]) for i in range(n)]  # red boxes
    images, _, labels = write_detection_set(root / "src", specs)
    for split in ("train", "val"):
        shutil.copytree(images, root / "images" / split)
        shutil.copytree(labels, root / "labels" / split)
    shutil.rmtree(root / "src")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: {NAMES}\n")
    return root / "data.yaml"


def tiny_yolov8(path: Path, data_yaml: Path) -> Path:
    """An untrained YOLOv8n with one class, saved as Ultralytics saves a checkpoint, made to see something: its
    BatchNorm statistics from the set's images (at random init the features fade to nothing), random class and
    box logits with some boxes confident and box sides of one to a few strides (Ultralytics' init finds nothing)."""
    from workbench.data.detection import yolo_data_yaml_dataset
    from workbench.models.registry import import_ultralytics

    ultralytics = import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    dataset = yolo_data_yaml_dataset(data_yaml, "val", (SIZE, SIZE), 32)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False)
    model.names = dict(enumerate(NAMES))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the one batch
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    head = model.model[-1]
    for level, branch in enumerate(head.cv3):  # class logits: confident only at stride 8, where boxes are small
        branch[-1].weight.data.normal_(0, 0.3)
        branch[-1].bias.data.fill_(-4.0 if level == 0 else -30.0)
    for branch in head.cv2:  # the DFL's distance bins of each side: mass on the first few
        branch[-1].weight.data.normal_(0, 0.3)
        branch[-1].bias.data.copy_((-0.5 * torch.arange(head.reg_max)).repeat(4))
    yolo = ultralytics.YOLO("yolov8n.yaml")
    yolo.model = model
    yolo.save(str(path))
    return path


def export_run(tmp_path: Path, data_yaml: Path, model: Path, export: dict | None = None) -> Path:
    """The run directory of `workbench quantize MODEL --data DATA --imgsz SIZE` cut to calibrate and export (no
    engine, no evaluation), with `export` in place of its export options when given."""
    import yaml

    from workbench import api

    recipe = yaml.safe_load(api.quantize_recipe(model, data_yaml, SIZE, "max", trust_pickle=True,
                                                runs_dir=tmp_path / "runs"))
    recipe["stages"] = recipe["stages"][:2]
    assert list(recipe["stages"][1]) == ["export"]
    if export is not None:
        recipe["stages"][1]["export"] = export
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def self_label(graph: Path, data_yaml: Path) -> int:
    """Rewrite the val labels as the graph's own detections of score >= LABEL_SCORE (workbench's letterbox and
    decode); returns how many boxes were written."""
    from workbench.data.detection import yolo_data_yaml_dataset
    from workbench.runtime.runners import OrtRunner
    from workbench.tasks.detection import decode

    dataset = yolo_data_yaml_dataset(data_yaml, "val", (SIZE, SIZE), 32)
    runner = OrtRunner(graph, "default", "default")  # the arithmetic Ultralytics' ONNX Runtime session runs
    written = 0
    for i, record in enumerate(dataset.records):
        image, target = dataset[i]
        (det,) = decode(runner(image[None].numpy()), len(NAMES), conf=LABEL_SCORE)
        lb = target["letterbox"]
        # boxes inside the image only: a label clipped to the image is not the box the graph predicted
        x1, y1, x2, y2 = det[:, :4].T
        inside = ((x1 >= lb.pad_left) & (y1 >= lb.pad_top) & (x2 <= lb.pad_left + lb.orig_w * lb.ratio)
                  & (y2 <= lb.pad_top + lb.orig_h * lb.ratio))
        boxes = lb.to_original(det[:, :4])
        rows = [f"{int(c)} {(x1 + x2) / 2 / lb.orig_w:.6f} {(y1 + y2) / 2 / lb.orig_h:.6f} "
                f"{(x2 - x1) / lb.orig_w:.6f} {(y2 - y1) / lb.orig_h:.6f}"
                for (x1, y1, x2, y2), c in zip(boxes[inside], det[inside, 5])]
        label = data_yaml.parent / "labels" / "val" / f"{record.path.stem}.txt"
        label.write_text("\n".join(rows) + "\n" if rows else "")
        written += len(rows)
    return written


def workbench_map(graph: Path, data_yaml: Path) -> float:
    """The workbench's own mAP50-95 of the graph on the val split (the evaluate stage's scorer and decode)."""
    from workbench.data.detection import detection_collate, yolo_data_yaml_dataset
    from workbench.runtime.runners import OrtRunner
    from workbench.tasks.detection import DetectionScorer

    dataset = yolo_data_yaml_dataset(data_yaml, "val", (SIZE, SIZE), 32)
    scorer = DetectionScorer(dataset.coco_gt, dataset.category_ids, len(NAMES), iou=0.7)
    runner = OrtRunner(graph, "default", "default")
    for i in range(len(dataset)):
        images, targets = detection_collate([dataset[i]])
        scorer.update(runner(images.numpy()), targets)
    return scorer.result()["map50_95"]


def yolo_val(graph: Path, data_yaml: Path, tmp_path: Path, **args) -> float:
    """Ultralytics' validator, as `yolo val model=GRAPH data=DATA [args]` runs it; its mAP50-95."""
    from workbench.models.registry import import_ultralytics

    ultralytics = import_ultralytics()
    metrics = ultralytics.YOLO(str(graph)).val(data=str(data_yaml), device="cpu", plots=False, verbose=False,
                                               project=str(tmp_path / "yolo"), name="val", **args)
    return float(metrics.box.map)


@needs_ultralytics
@pytest.mark.parametrize("export, val_args", [
    # `workbench quantize`'s own export of an Ultralytics model (batch, height and width dynamic); rect=False
    # letterboxes to squares as the workbench does (an untrained model's boxes change with the canvas)
    (None, {"imgsz": SIZE, "rect": False}),
    ({"dynamic_batch": False}, {}),  # fixed in every axis: Ultralytics takes the size and batch from the metadata
    ({}, {"imgsz": SIZE, "rect": False}),  # a recipe's default (dynamic batch, fixed size): the README's command
], ids=["quantize", "static", "dynamic-batch"])
def test_yolo_val_scores_an_ultralytics_export_as_the_workbench_does(tmp_path, export, val_args):
    data_yaml = wide_set(tmp_path / "set")
    graph = export_run(tmp_path, data_yaml, tiny_yolov8(tmp_path / "best.pt", data_yaml), export) / "model.onnx"
    assert self_label(graph, data_yaml) >= 20  # boxes to score against, in 3 or more of the 6 images
    ours = workbench_map(graph, data_yaml)
    theirs = yolo_val(graph, data_yaml, tmp_path, iou=0.7, **val_args)
    assert ours > 0.3  # below 1: the confident boxes that cross the border (no labels) are false positives to both
    assert theirs == pytest.approx(ours, abs=0.02)  # measured: 0.589 and 0.580; pycocotools' AP is not Ultralytics'
    if export is None:  # `yolo val` as is: rectangular batches (here 96x160), which the graph must accept
        yolo_val(graph, data_yaml, tmp_path, imgsz=SIZE)


@needs_ultralytics
def test_yolo_val_refuses_a_yolov5_export_by_its_layout(tmp_path):
    """YOLOv5's (B, N, 5 + classes) output is no layout Ultralytics 8 decodes: `yolo val` refuses it, naming the
    layout, instead of exiting 0 with every metric 0."""
    data_yaml = wide_set(tmp_path / "set")
    graph = export_run(tmp_path, data_yaml, make_tiny_yolov5_checkpoint(tmp_path / "best.pt", nc=1)) / "model.onnx"
    with pytest.raises(NotImplementedError, match=r"5 \+ classes\) with objectness, which Ultralytics 8 cannot"):
        yolo_val(graph, data_yaml, tmp_path)
