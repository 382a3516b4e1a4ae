"""Detection data: letterbox geometry, COCO JSON and YOLO txt datasets, subsets, and bad-input errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from workbench.data.detection import coco_dataset, detection_collate, letterbox, yolo_txt_dataset
from workbench.errors import DataError

ASSETS = Path(os.environ.get("WORKBENCH_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))

CATEGORIES = [7, 1, 3]  # deliberately unsorted and non-contiguous: sorted ids 1, 3, 7 give classes 0, 1, 2
INDEX = {1: 0, 3: 1, 7: 2}
# file, (width, height), image id, objects: (category_id, x, y, w, h, iscrowd) in pixels
SPECS = [
    ("a.png", (200, 150), 11, [(1, 40, 30, 80, 60, 0), (7, 150, 100, 30, 40, 0)]),
    ("b.png", (96, 160), 12, [(3, 10, 20, 50, 100, 0), (1, 60, 5, 30, 30, 1)]),  # the second is a crowd region
    ("c.png", (160, 96), 13, [(7, 5, 5, 40, 40, 0), (3, 70, 30, 60, 50, 0), (1, 20, 50, 30, 30, 0)]),
    ("d.png", (128, 128), 14, []),  # background only
]
COLOURS = {1: (230, 20, 20), 3: (20, 200, 40), 7: (30, 60, 220)}


def write_detection_set(root: Path, specs=SPECS) -> tuple[Path, Path, Path]:
    """images/, instances.json (COCO) and labels/ (YOLO txt, crowd regions left out) for the same objects."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"cat{c}"} for c in CATEGORIES]}
    for name, (w, h), image_id, objects in specs:
        img = Image.new("RGB", (w, h), (90, 90, 90))
        draw = ImageDraw.Draw(img)
        rows = []
        for cat, x, y, bw, bh, crowd in objects:
            draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=COLOURS[cat])
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": crowd,
            })
            if not crowd:
                rows.append(f"{INDEX[cat]} {(x + bw / 2) / w!r} {(y + bh / 2) / h!r} {bw / w!r} {bh / h!r}")
        img.save(images / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        if rows:
            (labels / f"{Path(name).stem}.txt").write_text("\n".join(rows) + "\n")
    ann = root / "instances.json"
    ann.write_text(json.dumps(coco))
    return images, ann, labels


def many_specs(n: int) -> list:
    return [(f"img{i:02d}.png", (64 + 8 * (i % 3), 48), 100 + i, [(CATEGORIES[i % 3], 4, 4, 20, 16, 0)])
            for i in range(n)]


# --- letterbox ---------------------------------------------------------------------------------------------------


def _red_extent(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """x1, y1, x2, y2 (exclusive) of the clearly red pixels."""
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80)
    ys, xs = np.nonzero(red)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("size", [(640, 640), (480, 640), (320, 256)])
def test_letterbox_maps_a_box_to_its_place_and_back(size):
    img = Image.new("RGB", (200, 150), (90, 90, 90))
    box = np.array([[40.0, 30.0, 120.0, 90.0]])  # xyxy, pixel edges
    ImageDraw.Draw(img).rectangle([40, 30, 119, 89], fill=(230, 20, 20))
    out, lb = letterbox(img, size)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    r = min(size[0] / 150, size[1] / 200)
    assert lb.ratio == pytest.approx(r) and (lb.orig_h, lb.orig_w) == (150, 200)
    mapped = lb.to_input(box)[0]
    # the red rectangle really is where to_input says (bilinear blurs its edges by at most a pixel)
    assert np.abs(np.array(_red_extent(out)) - mapped).max() <= 1.5
    assert np.abs(lb.to_original(lb.to_input(box)) - box).max() < 1e-9
    # everything outside the scaled image is grey 114, split evenly
    new_w, new_h = round(200 * r), round(150 * r)
    top, left = int(lb.pad_top), int(lb.pad_left)
    assert abs((size[0] - new_h - top) - top) <= 1 and abs((size[1] - new_w - left) - left) <= 1
    assert (out[:top] == 114).all() and (out[top + new_h :] == 114).all()
    assert (out[:, :left] == 114).all() and (out[:, left + new_w :] == 114).all()


def test_letterbox_odd_padding_uses_the_real_offset():
    # 97x160 into 480x640: scaled to 291x480, 349 columns of padding -> 174 left, 175 right.
    img = Image.new("RGB", (97, 160), (230, 20, 20))
    out, lb = letterbox(img, (480, 640))
    assert out.shape == (480, 640, 3)
    assert lb.pad_left == 174 and lb.pad_top == 0
    assert (out[:, 173] == 114).all() and (out[:, 174] != 114).any() and (out[:, 174 + 291] == 114).all()
    # a box drawn in the input maps back within a pixel, and is clipped to the image
    back = lb.to_original(np.array([[174.0, 0.0, 174.0 + 291.0, 480.0], [100.0, -20.0, 700.0, 500.0]]))
    assert np.abs(back[0] - [0, 0, 97, 160]).max() < 1e-9
    assert np.abs(back[1] - [0, 0, 97, 160]).max() < 1e-9


def test_letterbox_auto_pads_to_the_stride():
    out, lb = letterbox(Image.new("RGB", (200, 150)), (640, 640), stride=32, auto=True)
    assert out.shape == (480, 640, 3) and lb.pad_top == 0  # 640x480 is already a multiple of 32


# --- datasets ----------------------------------------------------------------------------------------------------


def test_coco_dataset_items_boxes_and_categories(tmp_path):
    images, ann, _ = write_detection_set(tmp_path)
    ds = coco_dataset(images, ann, size=(320, 320))
    assert len(ds) == 4 and ds.category_ids == [1, 3, 7] and ds.num_classes == 3
    assert ds.image_ids == [11, 12, 13, 14]  # sorted by file name
    x, t = ds[0]
    assert x.shape == (3, 320, 320) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert t["image_id"] == 11
    assert torch.equal(t["boxes"], torch.tensor([[40, 30, 120, 90], [150, 100, 180, 140]], dtype=torch.float32))
    assert t["labels"].tolist() == [0, 2] and t["labels"].dtype == torch.int64
    assert (t["letterbox"].orig_w, t["letterbox"].orig_h) == (200, 150)
    # the crowd region is ground truth for pycocotools but not a box to learn or match
    _, tb = ds[1]
    assert tb["boxes"].tolist() == [[10, 20, 60, 120]] and tb["labels"].tolist() == [1]
    assert len(ds.coco_gt.getAnnIds(imgIds=[12])) == 2
    _, td = ds[3]
    assert td["boxes"].shape == (0, 4) and td["labels"].shape == (0,)


def test_mixed_sizes_batch_together(tmp_path):
    images, ann, _ = write_detection_set(tmp_path)
    ds = coco_dataset(images, ann, size=(256, 320))
    x, targets = next(iter(DataLoader(ds, batch_size=4, collate_fn=detection_collate)))
    assert x.shape == (4, 3, 256, 320)
    assert [t["image_id"] for t in targets] == [11, 12, 13, 14]
    assert {(t["letterbox"].orig_w, t["letterbox"].orig_h) for t in targets} == {
        (200, 150), (96, 160), (160, 96), (128, 128)}


def test_coco_and_yolo_txt_give_the_same_boxes(tmp_path):
    images, ann, labels = write_detection_set(tmp_path)
    coco = coco_dataset(images, ann)
    yolo = yolo_txt_dataset(images, labels, num_classes=3)
    assert yolo.category_ids == [0, 1, 2] and len(yolo) == len(coco)
    for i in range(len(coco)):
        (xc, tc), (xy, ty) = coco[i], yolo[i]
        assert torch.equal(xc, xy)
        assert torch.allclose(tc["boxes"], ty["boxes"], atol=1e-3)
        assert torch.equal(tc["labels"], ty["labels"])
        assert tc["letterbox"] == ty["letterbox"]
    # the in-memory ground truth scores the same objects: same boxes, category id = class index
    gt = [(a["category_id"], *np.round(a["bbox"], 3)) for a in yolo.coco_gt.dataset["annotations"]]
    expected = [(INDEX[c], x, y, w, h) for *_, objs in SPECS for c, x, y, w, h, crowd in objs if not crowd]
    assert gt == expected
    assert min(a["id"] for a in yolo.coco_gt.dataset["annotations"]) == 1  # pycocotools reads id 0 as unmatched


def test_yolo_txt_num_classes_default_and_background_images(tmp_path):
    images, _, labels = write_detection_set(tmp_path)
    ds = yolo_txt_dataset(images, labels)
    assert ds.category_ids == [0, 1, 2]  # largest id + 1
    _, t = ds[3]  # d.png has no label file: a background image
    assert t["boxes"].shape == (0, 4) and ds.coco_gt.getAnnIds(imgIds=[t["image_id"]]) == []


def test_count_and_seed_give_deterministic_subsets(tmp_path):
    images, ann, labels = write_detection_set(tmp_path, many_specs(12))
    a = coco_dataset(images, ann, count=5, seed=3)
    b = coco_dataset(images, ann, count=5, seed=3)
    c = coco_dataset(images, ann, count=5, seed=4)
    assert a.image_ids == b.image_ids and len(set(a.image_ids)) == 5
    assert a.image_ids != c.image_ids
    # the ground truth holds exactly the chosen images and their annotations
    assert sorted(a.coco_gt.getImgIds()) == sorted(a.image_ids)
    assert {x["image_id"] for x in a.coco_gt.dataset["annotations"]} == set(a.image_ids)
    # YOLO txt picks the same files for the same count and seed
    y = yolo_txt_dataset(images, labels, count=5, seed=3)
    assert [r.path.name for r in y.records] == [r.path.name for r in a.records]
    with pytest.raises(DataError, match="count is 13 but .* holds only 12 images"):
        coco_dataset(images, ann, count=13)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_annotation_file_missing_not_json_not_coco(tmp_path):
    images, ann, _ = write_detection_set(tmp_path)
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=f"annotation file {missing} does not exist"):
        coco_dataset(images, missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=f"annotation file {broken} is not valid JSON"):
        coco_dataset(images, broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match=f"annotation file {other} is not COCO: no 'images'"):
        coco_dataset(images, other)
    other.write_text("[1, 2]")
    with pytest.raises(DataError, match=f"{other} is not COCO"):
        coco_dataset(images, other)


def test_annotation_images_not_in_folder(tmp_path):
    images, ann, _ = write_detection_set(tmp_path)
    (images / "c.png").unlink()
    (images / "a.png").unlink()
    with pytest.raises(DataError, match=rf"2 of the 4 images listed in {ann} are not in {images} \(e.g. 'a.png'\)"):
        coco_dataset(images, ann)


def test_yolo_label_rows_malformed(tmp_path):
    images, _, labels = write_detection_set(tmp_path)
    label = labels / "c.txt"
    good = label.read_text().splitlines()
    for bad, why in [("1 0.5 0.5 0.2", "has 4 values"), ("1 0.5 half 0.2 0.2", "is not numbers"),
                     ("1.5 0.5 0.5 0.2 0.2", "is not a class index"), ("1 50 60 20 20", "is not normalised")]:
        label.write_text("\n".join([good[0], "", bad]) + "\n")
        with pytest.raises(DataError, match=f"label file {label} line 3: .*{why}"):
            yolo_txt_dataset(images, labels, num_classes=3)


def test_yolo_class_id_beyond_the_model(tmp_path):
    images, _, labels = write_detection_set(tmp_path)
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")
    expected = rf"label file {labels / 'a.txt'} line 2: class 5 is not below num_classes=3 \(the model has 3 classes"
    with pytest.raises(DataError, match=expected):
        yolo_txt_dataset(images, labels, num_classes=3)


def test_empty_and_missing_folders(tmp_path):
    images, ann, labels = write_detection_set(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"images folder {empty} holds no images"):
        coco_dataset(empty, ann)
    with pytest.raises(DataError, match=f"images folder {empty} holds no images"):
        yolo_txt_dataset(empty, labels)
    with pytest.raises(DataError, match=f"images folder {tmp_path / 'gone'} does not exist"):
        yolo_txt_dataset(tmp_path / "gone", labels)
    with pytest.raises(DataError, match=f"none of the 4 images in {images} has a label file in {empty}"):
        yolo_txt_dataset(images, empty)


def test_unreadable_image_is_named(tmp_path):
    images, ann, labels = write_detection_set(tmp_path)
    (images / "b.png").write_bytes(b"not a png at all")
    ds = coco_dataset(images, ann)  # COCO JSON gives the sizes: the file is first opened when read
    ds[0]
    with pytest.raises(DataError, match=f"image {images / 'b.png'} cannot be read"):
        ds[1]
    with pytest.raises(DataError, match=f"image {images / 'b.png'} cannot be read"):
        yolo_txt_dataset(images, labels)  # YOLO txt needs every image's size up front


def test_image_size_differs_from_the_annotation(tmp_path):
    images, ann, _ = write_detection_set(tmp_path)
    Image.new("RGB", (100, 75)).save(images / "a.png")
    with pytest.raises(DataError, match=f"image {images / 'a.png'} is 100x75 but {ann} says 200x150"):
        coco_dataset(images, ann)[0]


# --- the real thing (skipped without the shared assets) ----------------------------------------------------------


def test_coco_tiny_val2017():
    root = ASSETS / "data" / "coco_tiny"
    if not (root / "val2017").is_dir():
        pytest.skip(f"shared assets not found at {ASSETS} (set WORKBENCH_ASSETS to ../shared/assets)")
    ds = coco_dataset(root / "val2017", root / "annotations" / "instances_val2017.json")
    assert len(ds) == 80 and ds.num_classes == 80
    # 815 annotations, 11 of them crowd regions: those stay in the ground truth only
    assert len(ds.coco_gt.getAnnIds()) == 815
    assert sum(len(r.boxes) for r in ds.records) == 804
    x, t = ds[0]
    assert (x.shape == (3, 640, 640)
            and max(t["letterbox"].orig_h, t["letterbox"].orig_w) * t["letterbox"].ratio == pytest.approx(640))
