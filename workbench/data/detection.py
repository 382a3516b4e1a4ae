"""Detection datasets: COCO JSON or YOLO txt labels, with YOLO letterbox preprocessing.

Every image is letterboxed into the network input (scaled to fit, padded with
grey 114) exactly as Ultralytics/YOLOv5 do, so a YOLO model sees the pixels it
was trained on. Ground-truth boxes stay in ORIGINAL pixels, and each dataset
carries a pycocotools COCO object for exactly its images: the scorer maps the
detections back through the image's `Letterbox` and lets pycocotools score
them, whichever label format the data came in.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..errors import DataError
from .sources import IMAGE_SUFFIXES, open_header, open_image_file

try:  # the resize YOLO models are trained with; see _resize_bilinear
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None

PAD_VALUE = 114


@dataclass(frozen=True)
class Letterbox:
    """How one image was mapped into the network input: x_input = x_orig * ratio + pad_left, y_input = y_orig *
    ratio_y + pad_top (ratio_y None: the letterbox's one ratio; a plain resize scales x and y apart)."""

    ratio: float
    pad_left: float
    pad_top: float
    orig_h: int
    orig_w: int
    ratio_y: float | None = None

    @property
    def ry(self) -> float:
        return self.ratio if self.ratio_y is None else self.ratio_y

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Boxes (n, 4) xyxy in network-input pixels -> original pixels, clipped to the image."""
        boxes = np.array(boxes_xyxy, dtype=np.float64, copy=True).reshape(-1, 4)
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - self.pad_left) / self.ratio
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - self.pad_top) / self.ry
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, self.orig_w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, self.orig_h)
        return boxes

    def to_input(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Boxes (n, 4) xyxy in original pixels -> network-input pixels (the inverse, no clipping)."""
        boxes = np.array(boxes_xyxy, dtype=np.float64, copy=True).reshape(-1, 4)
        boxes[:, [0, 2]] = boxes[:, [0, 2]] * self.ratio + self.pad_left
        boxes[:, [1, 3]] = boxes[:, [1, 3]] * self.ry + self.pad_top
        return boxes


def letterbox(
    img: Image.Image,
    size: tuple[int, int],
    stride: int = 32,
    auto: bool = False,
    color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE),
) -> tuple[np.ndarray, Letterbox]:
    """Scale `img` to fit `size` (h, w) keeping its aspect ratio, then pad evenly: (h, w, 3) uint8 RGB.

    As Ultralytics' LetterBox / YOLOv5's letterbox: r = min(h/ih, w/iw) (small
    images are scaled up too), the scaled size rounded to whole pixels, and the
    padding split with the odd pixel going right/bottom. auto=True pads only to
    the next multiple of `stride` (rectangular inference) instead of to `size`.
    """
    h, w = size
    pixels = np.asarray(img.convert("RGB"))
    ih, iw = pixels.shape[:2]
    r = min(h / ih, w / iw)
    new_w, new_h = int(round(iw * r)), int(round(ih * r))
    dw, dh = w - new_w, h - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (new_w, new_h) != (iw, ih):
        pixels = _resize_bilinear(pixels, new_w, new_h)
    # Ultralytics' rounding: a half pixel goes to the right/bottom side.
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    out = np.empty((new_h + top + bottom, new_w + left + right, 3), dtype=np.uint8)
    out[...] = np.asarray(color, dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = pixels
    # The offsets actually used (integers), as Ultralytics 8's scale_boxes: YOLOv5 kept dw/2
    # unrounded, which puts boxes half a pixel off whenever the padding is odd.
    return out, Letterbox(ratio=r, pad_left=float(left), pad_top=float(top), orig_h=ih, orig_w=iw)


def plain_resize(img: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Stretch `img` to `size` (h, w) without keeping its aspect ratio, as models trained on plain resizes see
    their images (FastestDet, many SSD-style heads): (h, w, 3) uint8 RGB, x and y scaled apart."""
    h, w = size
    pixels = np.asarray(img.convert("RGB"))
    ih, iw = pixels.shape[:2]
    if (ih, iw) != (h, w):
        pixels = _resize_bilinear(pixels, w, h)
    return pixels, Letterbox(ratio=w / iw, pad_left=0.0, pad_top=0.0, orig_h=ih, orig_w=iw, ratio_y=h / ih)


@dataclass(frozen=True)
class ImageInput:
    """How an image becomes a detector's input tensor (data.transform): letterbox or plain resize to the size,
    channel order, and the value of a white pixel (1.0: pixels / 255, as YOLO; 255: raw 0..255)."""

    fit: str = "letterbox"  # "letterbox" | "resize"
    channels: str = "rgb"  # "rgb" | "bgr"
    pixel_max: float = 1.0

    def __call__(self, img: Image.Image, size: tuple[int, int], stride: int) -> tuple[torch.Tensor, Letterbox]:
        pixels, lb = plain_resize(img, size) if self.fit == "resize" else letterbox(img, size, stride)
        if self.channels == "bgr":  # a model trained on cv2.imread's images
            pixels = np.ascontiguousarray(pixels[..., ::-1])
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)
        return (tensor if self.pixel_max == 1.0 else tensor.mul_(self.pixel_max)), lb

    def metadata(self, size: tuple[int, int]) -> dict[str, str]:
        """The exported graph's record of it (workbench.preprocess), so a deployment feeds the same pixels."""
        fit = f"letterbox to {size[0]}x{size[1]} (pad {PAD_VALUE})" if self.fit == "letterbox" else \
            f"plain resize to {size[0]}x{size[1]} (aspect ratio not kept)"
        return {"workbench.preprocess": f"{fit}; channels {self.channels.upper()}; pixels 0..{self.pixel_max:g}",
                "workbench.channels": self.channels, "workbench.resize": self.fit,
                "workbench.pixel_max": f"{self.pixel_max:g}"}


RGB_LETTERBOX = ImageInput()


def _resize_bilinear(pixels: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    # YOLO models are trained on cv2.resize(INTER_LINEAR): bilinear with no antialiasing. We use
    # cv2 when it is installed (it comes with ultralytics/yolov5) so the pixels are the ones the
    # model was trained on. PIL's BILINEAR is NOT equivalent: it antialiases when shrinking (a
    # wider filter, visibly softer images). Without cv2, torch's bilinear with antialias=False
    # computes the same half-pixel interpolation in float (at most 1 grey level away from cv2's
    # fixed-point arithmetic).
    if cv2 is not None:
        return cv2.resize(np.ascontiguousarray(pixels), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@dataclass(frozen=True)
class _Record:
    path: Path
    image_id: int
    width: int  # as the label file says; checked against the decoded image
    height: int
    boxes: np.ndarray  # (n, 4) float32 xyxy, original pixels, crowd boxes excluded
    labels: np.ndarray  # (n,) int64 contiguous class index
    label_file: Path | None = None  # YOLO txt labels: the file they came from (messages name its lines)


class DetectionDataset(Dataset):
    """Letterboxed images and their ground truth.

    item -> (float32 (3, H, W) RGB in 0..1, {"image_id", "boxes" (n, 4) xyxy original
    pixels, "labels" (n,) contiguous class index, "letterbox": Letterbox}).
    """

    def __init__(
        self,
        records: list[_Record],
        coco_gt: COCO,
        category_ids: list[int],
        size: tuple[int, int],
        stride: int,
        source: str,
        yolo_labels: bool = False,
        names_from: str | None = None,
        prep: ImageInput = RGB_LETTERBOX,
    ):
        self.prep = prep
        self.records = records
        self.coco_gt = coco_gt
        self.category_ids = category_ids  # contiguous class index -> COCO category id
        self.size = size
        self.stride = stride
        self.source = source  # the label file or folder, for messages
        self.yolo_labels = yolo_labels  # YOLO txt labels (the model's count sets the classes); else COCO JSON
        self.names_from = names_from  # where the class names came from (a data.yaml), None when unnamed
        self.image_ids = [r.image_id for r in records]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def names(self) -> list[str]:
        """Class names by class index (the categories' names; YOLO txt labels without names: '0', '1', ...)."""
        cats = self.coco_gt.cats
        return [str(cats[c].get("name", c)) for c in self.category_ids]

    def with_num_classes(self, num_classes: int, field: str, names: list[str] | None = None) -> "DetectionDataset":
        """This data scored for a model of `num_classes` classes.

        The model decides the class count, not the labels: a YOLO txt split that lacks the
        last class is scored for all of them (pycocotools skips classes without ground
        truth), and only a label id the model cannot predict is refused. A COCO JSON's
        categories are the classes (class index i = i-th sorted category id), so their
        count must be the model's: with fewer categories every label past a gap would shift. A data.yaml's
        names must be as many as the model's classes. `names`: the model's own, which name the classes of
        YOLO txt labels (over the data.yaml's, whose count they must match).
        """
        if not self.yolo_labels:
            if self.num_classes != num_classes:
                raise DataError(
                    f"{field}: {self.source} lists {self.num_classes} categories but the model has {num_classes} "
                    "classes; class index i is the i-th category (sorted ids), so the file must list every category "
                    "the model was trained on (COCO's instances JSON lists all 80, whichever images it holds)"
                )
            return self
        if self.names_from is not None and len(self.names) != num_classes:
            raise DataError(
                f"{field}: {self.names_from} names {len(self.names)} classes but the model has {num_classes}: the "
                "data.yaml of the dataset the model was trained on names every class it predicts"
            )
        for rec in self.records:
            if len(rec.labels) and int(rec.labels.max()) >= num_classes:
                try:
                    _read_yolo_labels(rec.label_file, num_classes)  # raises, naming the line
                except DataError as e:
                    raise DataError(f"{field}: {e}") from None
        own = self.names if self.names_from is not None else None
        chosen = names if names is not None and len(names) == num_classes else own
        gt = dict(self.coco_gt.dataset, categories=_yolo_categories(num_classes, chosen))
        return DetectionDataset(
            self.records, _coco_from_dict(gt), list(range(num_classes)), self.size, self.stride, self.source,
            yolo_labels=True, names_from=self.names_from if chosen is own else "the model", prep=self.prep,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        rec = self.records[index]
        img = open_image_file(rec.path)
        if img.size != (rec.width, rec.height):
            raise DataError(
                f"image {rec.path} is {img.width}x{img.height} but {self.source} says {rec.width}x{rec.height}: "
                "the boxes would not fit it; use the images the labels were made for"
            )
        tensor, lb = self.prep(img, self.size, self.stride)
        target = {
            "image_id": rec.image_id,
            "boxes": torch.from_numpy(rec.boxes),
            "labels": torch.from_numpy(rec.labels),
            "letterbox": lb,
        }
        return tensor, target


class LetterboxedImages(Dataset):
    """Images without labels, letterboxed as a detector sees them: for calibration and distillation.

    item -> (float32 (3, H, W) RGB in 0..1, {"boxes" (0, 4), "labels" (0,), "letterbox": Letterbox}).
    """

    category_ids: list[int] = []  # no classes: this set cannot be scored

    def __init__(self, samples: list, size: tuple[int, int], stride: int, prep: ImageInput = RGB_LETTERBOX):
        self.prep = prep
        self.samples = samples
        self.size = _check_size(size, stride)
        self.stride = stride

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        tensor, lb = self.prep(self.samples[index].opener().convert("RGB"), self.size, self.stride)
        return tensor, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "letterbox": lb}


def detection_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Images stacked (they share the letterbox size); targets kept as a list (box counts differ)."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def coco_dataset(
    images_dir: str | Path,
    annotations_json: str | Path,
    size: tuple[int, int] = (640, 640),
    stride: int = 32,
    count: int | None = None,
    seed: int = 0,
) -> DetectionDataset:
    """Images described by a COCO instances JSON; sorted category ids give the class index (COCO 80 -> 0..79)."""
    images_dir, annotations_json = Path(images_dir), Path(annotations_json)
    size = _check_size(size, stride)
    data = _load_coco_json(annotations_json)
    _image_files(images_dir)  # the folder exists and holds images

    try:
        categories = sorted(int(c["id"]) for c in data["categories"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{annotations_json}: every entry of 'categories' needs an integer 'id'") from None
    index_of = {cat: i for i, cat in enumerate(categories)}

    images = _coco_images(data["images"], annotations_json)
    inside = images_dir.resolve()
    for img in images.values():  # a file_name that is a symlink out of the folder is outside too
        if inside not in (images_dir / img["file_name"]).resolve().parents:
            raise DataError(f"{annotations_json}: image {img['id']}: 'file_name' {img['file_name']!r} resolves to "
                            f"a file outside {images_dir}; the images must lie inside the folder")
    missing = [img["file_name"] for img in images.values() if not (images_dir / img["file_name"]).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(images)} images listed in {annotations_json} are not in {images_dir} "
            f"(e.g. {missing[0]!r}); point images_dir at the folder the annotation file describes"
        )

    # Image order does not depend on the JSON's: sorted by file name, as the other sources sort paths.
    chosen = sorted(images, key=lambda i: images[i]["file_name"])
    chosen = _subset(chosen, count, seed, str(annotations_json))
    chosen_set = set(chosen)

    sizes = {}  # (width, height) of each chosen image: the JSON's, else the file's header
    for image_id in chosen:
        img = images[image_id]
        if img.get("width") is None or img.get("height") is None:
            sizes[image_id] = _image_size(images_dir / img["file_name"])
        else:
            sizes[image_id] = (img["width"], img["height"])

    annotations = []
    per_image: dict[int, list[dict]] = {i: [] for i in chosen}
    for ann in _coco_annotations(data["annotations"], images, annotations_json):
        if ann["image_id"] not in chosen_set:
            continue
        _check_box(ann, sizes[ann["image_id"]], annotations_json)
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in index_of:
            raise DataError(
                f"{annotations_json}: annotation {ann.get('id')} has category_id {ann.get('category_id')!r}, "
                "which is not in 'categories'"
            )
        ann = dict(ann)  # our copy: the caller's dict stays as it was
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))  # pycocotools' area ranges need it
        annotations.append(ann)
        per_image[ann["image_id"]].append(ann)
    # pycocotools records a match as the GT's id, and id 0 reads as "unmatched": renumber if any id is unusable
    # (absent or 0; duplicates were refused above).
    ids = [a.get("id") for a in annotations]
    if any(not _is_int(i) or i <= 0 for i in ids):
        for n, ann in enumerate(annotations, start=1):
            ann["id"] = n

    records = []
    for image_id in chosen:
        img = images[image_id]
        kept = [a for a in per_image[image_id] if not a["iscrowd"]]  # crowd regions: only pycocotools uses them
        xywh = np.array([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        labels = np.array([index_of[a["category_id"]] for a in kept], dtype=np.int64)
        width, height = sizes[image_id]
        records.append(_Record(images_dir / img["file_name"], image_id, int(width), int(height), boxes, labels))

    gt = {
        "images": [images[i] for i in chosen],
        "annotations": annotations,
        "categories": data["categories"],
    }
    if "info" in data:
        gt["info"] = data["info"]
    return DetectionDataset(records, _coco_from_dict(gt), categories, size, stride, str(annotations_json))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _coco_images(entries: list, path: Path) -> dict[int, dict]:
    """image id -> entry; ids are integers, each listed once (a repeated id would silently drop an image)."""
    images: dict[int, dict] = {}
    names: dict[str, int] = {}  # normalised file_name -> the image id that has it
    for img in entries:
        if not isinstance(img, dict) or not {"id", "file_name"} <= img.keys():
            raise DataError(f"{path}: an entry of 'images' has no 'id' or 'file_name' ({str(img)[:80]})")
        image_id, name = img["id"], img["file_name"]
        if not _is_int(image_id):
            raise DataError(f"{path}: image {image_id!r} ({str(name)[:80]}): 'id' must be an integer, as COCO's are")
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: image {image_id}: 'file_name' {name!r} is not a file name")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if "\0" in name or name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DataError(f"{path}: image {image_id}: 'file_name' {name!r} leaves the image folder; a COCO file_name "
                            "is a path inside the folder the annotations describe (e.g. 000000000139.jpg)")
        key = os.path.normpath(name)
        if key in names:
            raise DataError(f"{path}: images {names[key]} and {image_id} both have 'file_name' {name!r}; one file "
                            "would be scored twice, against two sets of boxes: give every image its own file")
        names[key] = image_id
        if image_id in images:
            raise DataError(
                f"{path}: image id {image_id} is listed twice ({images[image_id]['file_name']!r} and {name!r}); "
                "every image needs its own id, or one of them would silently not be scored"
            )
        for key in ("width", "height"):
            if img.get(key) is not None and not (_is_int(img[key]) and img[key] > 0):
                raise DataError(f"{path}: image {image_id} ({name}): '{key}' {img[key]!r} "
                                "is not a whole number above 0")
        images[image_id] = img
    return images


def _coco_annotations(entries: list, images: dict[int, dict], path: Path) -> list[dict]:
    """The annotations of the listed images, each an object, with no annotation id repeated.

    Annotations of images that 'images' does not list are skipped: trimming 'images' is the usual
    way to cut a validation subset, and boxes of images that are not scored cannot change the score.
    """
    seen: set[int] = set()
    listed = []
    for ann in entries:
        if not isinstance(ann, dict):
            raise DataError(f"{path}: an entry of 'annotations' is not an object ({str(ann)[:80]})")
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if not _is_int(image_id):
            raise DataError(f"{path}: annotation {ann_id!r}: 'image_id' {image_id!r} must be an integer image id")
        if image_id not in images:
            continue
        if _is_int(ann_id) and ann_id > 0:
            if ann_id in seen:
                raise DataError(f"{path}: annotation id {ann_id} is used twice; every annotation needs its own 'id'")
            seen.add(ann_id)
        listed.append(ann)
    return listed


# How far (pixels) a box may reach past the image's edge: COCO's own boxes stay within rounding of it.
BOX_TOLERANCE = 1.0


def _check_box(ann: dict, size: tuple[int, int], path: Path) -> None:
    """bbox [x, y, width, height]: finite numbers, a positive size, inside the image within BOX_TOLERANCE."""
    bbox, where = ann.get("bbox"), f"{path}: annotation {ann.get('id')!r} (image {ann['image_id']})"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f"{where}: 'bbox' {bbox!r} is not [x, y, width, height]")
    if not all(_is_number(v) for v in bbox):
        raise DataError(f"{where}: 'bbox' {bbox!r} holds a value that is not a finite number")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: 'bbox' {bbox!r} has width {w} and height {h}; both must be above 0")
    width, height = size
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        raise DataError(
            f"{where}: 'bbox' {bbox!r} reaches outside the {width}x{height} image; COCO boxes are "
            "[x, y, width, height] in the image's pixels"
        )
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        raise DataError(f"{where}: 'area' {ann['area']!r} is not a non-negative number")


def yolo_txt_dataset(
    images_dir: str | Path,
    labels_dir: str | Path,
    size: tuple[int, int] = (640, 640),
    stride: int = 32,
    num_classes: int | None = None,
    count: int | None = None,
    seed: int = 0,
) -> DetectionDataset:
    """Images with YOLO txt labels in one folder (labels_dir/<stem>.txt, rows "cls cx cy w h" normalised to 0..1).

    An image without a label file is a background image (no objects), as in Ultralytics. num_classes: the
    model's class count (class ids must be below it); None takes the largest id + 1 until `with_num_classes`
    gives the model's. Category id = class id in the COCO ground truth built here, so scoring is the same as
    for COCO JSON.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    paths = _image_files(images_dir)
    if not labels_dir.is_dir():
        raise DataError(f"labels folder {labels_dir} does not exist or is not a folder")
    label_files = [labels_dir / f"{p.stem}.txt" for p in paths]
    if not any(f.is_file() for f in label_files):
        raise DataError(
            f"none of the {len(paths)} images in {images_dir} has a label file in {labels_dir} "
            f"(e.g. {label_files[0].name} for {paths[0].name}); labels are <image stem>.txt"
        )
    return yolo_labeled_dataset(list(zip(paths, label_files)), size, stride, num_classes, count, seed,
                                str(labels_dir))


def yolo_data_yaml_dataset(file: str | Path, split: str, size: tuple[int, int] = (640, 640), stride: int = 32,
                           count: int | None = None, seed: int = 0, field: str = "data") -> DetectionDataset:
    """The `split` of an Ultralytics data.yaml (data/yolo_yaml.py): its images, the labels Ultralytics reads for
    them, and its class names."""
    from .yolo_yaml import label_path, read_data_yaml, split_images

    data = read_data_yaml(file, field)
    images = split_images(data, split, field)
    labels = [label_path(p) for p in images]
    if not any(f.is_file() for f in labels):
        raise DataError(
            f"{field}: none of the {len(images)} images of split '{split}' ({data.where(split)}) has a label file: "
            f"Ultralytics reads the labels of .../images/x.jpg from .../labels/x.txt (here {labels[0]}); put the "
            "labels folder beside the images folder"
        )
    # Label ids are checked against the model's class count (with_num_classes), after its count is checked against
    # the names: a wrong data.yaml is named as such, not through its first label past the names.
    dataset = yolo_labeled_dataset(list(zip(images, labels)), size, stride, None, count, seed,
                                   f"{data.file} ({split})", names=data.names)
    dataset.names_from = str(data.file)
    return dataset


def yolo_labeled_dataset(pairs: list[tuple[Path, Path]], size: tuple[int, int], stride: int,
                         num_classes: int | None, count: int | None, seed: int, source: str,
                         names: list[str] | None = None) -> DetectionDataset:
    """Images and their YOLO txt label files (missing: a background image)."""
    size = _check_size(size, stride)
    rows = [_read_yolo_labels(f, num_classes) if f.is_file() else np.zeros((0, 5)) for _, f in pairs]
    if num_classes is None:
        num_classes = len(names) if names else max((int(r[:, 0].max()) + 1 for r in rows if len(r)), default=1)

    records, images, annotations = [], [], []
    # Image ids are positions in the sorted file list: stable, and unique whatever the names are.
    for image_id, ((path, label_file), labels) in enumerate(zip(pairs, rows)):
        width, height = _image_size(path)
        cx, cy, w, h = (labels[:, k] * scale for k, scale in zip(range(1, 5), (width, height, width, height)))
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).reshape(-1, 4)
        cls = labels[:, 0].astype(np.int64)
        records.append(_Record(path, image_id, width, height, boxes.astype(np.float32), cls, label_file))
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for box, c in zip(boxes, cls):
            bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({
                "id": len(annotations) + 1,  # pycocotools reads id 0 as "unmatched"
                "image_id": image_id,
                "category_id": int(c),
                "bbox": [float(box[0]), float(box[1]), bw, bh],
                "area": bw * bh,
                "iscrowd": 0,
            })

    keep = _subset(list(range(len(records))), count, seed, source)
    kept_ids = {records[i].image_id for i in keep}
    gt = {
        "images": [images[i] for i in keep],
        "annotations": [a for a in annotations if a["image_id"] in kept_ids],
        "categories": _yolo_categories(num_classes, names),
    }
    return DetectionDataset([records[i] for i in keep], _coco_from_dict(gt), list(range(num_classes)), size, stride,
                            source, yolo_labels=True)


def _yolo_categories(num_classes: int, names: list[str] | None = None) -> list[dict]:
    return [{"id": c, "name": names[c] if names else str(c)} for c in range(num_classes)]


def _read_yolo_labels(path: Path, num_classes: int | None) -> np.ndarray:
    """(n, 5) float64 rows cls, cx, cy, w, h, every value checked."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"label file {path} cannot be read ({e})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"label file {path} line {lineno}"
        if len(fields) != 5:
            raise DataError(
                f"{where}: {line.strip()!r} has {len(fields)} values; YOLO detection labels are 'cls cx cy w h' "
                "(segmentation polygons are not supported)"
            )
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(f"{where}: {line.strip()!r} is not numbers; "
                            "YOLO detection labels are 'cls cx cy w h'") from None
        cls = values[0]
        if not np.isfinite(cls) or cls != int(cls) or cls < 0:
            raise DataError(f"{where}: class {fields[0]!r} is not a class index (a whole number from 0)")
        if num_classes is not None and cls >= num_classes:
            raise DataError(
                f"{where}: class {int(cls)} is not below num_classes={num_classes} (the model has {num_classes} "
                f"classes, ids 0..{num_classes - 1}); fix the label or use a model trained on these classes"
            )
        if not all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in values[1:]) or values[3] <= 0 or values[4] <= 0:
            raise DataError(
                f"{where}: box {' '.join(fields[1:])} is not normalised; cx cy w h must be in 0..1 (pixels divided "
                "by the image's width/height) with w, h > 0"
            )
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _load_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; give the COCO instances JSON (e.g. "
                        "instances_val2017.json)")
    try:
        with path.open() as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"annotation file {path} is not valid JSON ({e}); give a COCO instances JSON") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {path} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path} is not COCO: it holds a {type(data).__name__}, not an object")
    absent = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if absent:
        keys = ", ".join(map(repr, data)) or "none"
        raise DataError(
            f"annotation file {path} is not COCO: no {' / '.join(map(repr, absent))} list (its keys: {keys}); "
            "detection needs a COCO instances JSON"
        )
    return data


def _image_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"images folder {root} does not exist or is not a folder")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"images folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header alone."""
    try:
        with open_header(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} cannot be read ({e}): remove or replace the file") from None


def _subset(items: list, count: int | None, seed: int, source: str) -> list:
    # The same seeded permutation as datasets.sample_subset, without cycling: a repeated image would count twice.
    if count is None:
        return items
    if count > len(items):
        raise DataError(f"count is {count} but {source} holds only {len(items)} images; lower count")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[order[i]] for i in range(count)]


def _check_size(size, stride: int) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise DataError(f"detection input size {h}x{w} must be positive multiples of the stride {stride}")
    return h, w


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


# The detection sources' rows in data/registry.py: a recipe's split, letterboxed to `size` (data.transform.letterbox).

def coco_split(split, size: tuple[int, int], stride: int, field: str):
    return coco_dataset(split.path, split.annotations, size, stride, count=split.count, seed=split.seed)


def yolo_txt_split(split, size: tuple[int, int], stride: int, field: str):
    return yolo_txt_dataset(split.path, split.label_dir, size, stride, count=split.count, seed=split.seed)


def yolo_split(split, size: tuple[int, int], stride: int, field: str):
    return yolo_data_yaml_dataset(split.yaml, split.split, size, stride, count=split.count, seed=split.seed,
                                  field=field)
