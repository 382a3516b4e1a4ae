"""The recipe's schema: every section of a recipe as a pydantic model, and nothing else.

A recipe names the model, the data, the task and an ordered list of stages:

    name: resnet20_int8
    model: {spec: "cifar_resnet:resnet20", weights: "${WORKBENCH_ASSETS}/models/cifar10_resnet20.th"}
    data:
      calibration: {source: imagefolder, path: ..., count: 512}
      evaluation: {source: imagefolder, path: ...}
    stages:
      - calibrate: {method: entropy}
      - export: {}
      - evaluate: {}

The stage list is typed by the stage registry, which sits above this module: recipe.py (the loader)
builds the full model from both. Everything low (data, models, stages' options) imports from here.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .targets import TargetSpec, TensorRTTarget, target_from_name


class StrictModel(BaseModel):
    """Base of every recipe section and stage's options: unknown keys, NaN/Inf and booleans given for numbers are
    errors (pydantic would take `count: true` as 1 and `std: .inf` as a number)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info) -> Any:
        given = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, bool) for v in given) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("true/false is not a number: give a number")
        return value


def _wants_number(annotation: Any) -> bool:
    """Whether a field (or its items) takes an int or float and not a bool."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    if any(a is bool or a is Any for a in args):
        return False
    return any(_wants_number(a) for a in args if a is not type(None))


# Bounds shared by several fields: beyond them a value is a typo or an attempt to exhaust the machine.
MAX_IMAGE_SIDE = 8192  # pixels of one side of a model input, a resize or a crop
MAX_BATCH = 16384  # images in one batch
MAX_SEED = 2**63  # torch.manual_seed and numpy take seeds below this
MAX_COUNT = 10_000_000  # samples in one split: the sampled index is built in memory
MAX_WORKERS = 64
CALIB_SET_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
ImageSide = Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)]


def check_batch_sizes(sizes: list[int]) -> list[int]:
    """A list of batch sizes to time: each listed once (a repeated size would overwrite its own timing)."""
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"each batch size once, e.g. [1, 8]; {sorted(sizes)} repeats one")
    return sizes


def check_calib_set_name(name: str) -> str:
    """A set name is a file name in calibration_data/: a path would read a YAML from anywhere."""
    if not re.fullmatch(CALIB_SET_NAME, name):
        raise ValueError(f"{name!r} is not a set name: use letters, digits, '_', '-' and '.', no '/' and no leading "
                         "'.' (`workbench calib-data list` shows the sets)")
    return name


def _check_input_size(size: tuple[int, int, int]) -> tuple[int, int, int]:
    c, h, w = size
    if not 1 <= c <= 64 or not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise ValueError(f"input_size is [channels, height, width] with 1 <= channels <= 64 and sides from 1 to "
                         f"{MAX_IMAGE_SIDE}, e.g. [3, 224, 224]")
    return size


InputSize = Annotated[tuple[int, int, int], AfterValidator(_check_input_size)]


class DetectorConfig(StrictModel):
    """What a detector's forward returns (README: the detector contract). The input side (letterbox or resize,
    channels, pixel scale) is data.transform's."""

    layout: Literal["anchor_objectness", "anchor_free"] | None = Field(
        None, description="anchor_objectness: (batch, boxes, 5 + classes) rows [box, objectness, class scores], score "
        "= objectness x class (YOLOv5, FastestDet); anchor_free: (batch, 4 + classes, boxes) columns [box, class "
        "scores] (YOLOv8/11). Unset: read from the output's shape (more boxes than channels). Declared, it wins over "
        "that reading and is checked on every forward.")
    boxes: Literal["cxcywh", "xyxy"] = Field("cxcywh", description="The four box numbers: centre x, centre y, "
                                                                   "width, height; or x1, y1, x2, y2.")
    units: Literal["pixels", "normalized"] = Field(
        "pixels", description="Box units: pixels of the network input (after letterbox/resize), or fractions of its "
                              "width and height (0..1).")
    scores: Literal["probabilities", "logits"] = Field(
        "probabilities", description="Objectness and class scores: already probabilities (sigmoid or softmax in "
                                     "forward), or logits (a sigmoid is applied after the model, kept float).")


class ModelConfig(StrictModel):
    spec: str = Field(
        description="Model source and name: 'torchvision:resnet18', 'timm:seresnet18', 'cifar_resnet:resnet20', "
        "'efficientnet_lite:efficientnet-lite0', 'import:package.module:factory', 'file:model.pt' "
        "(a whole pickled model). `workbench models list` shows them."
    )
    weights: str | None = Field(
        None,
        description="State dict to load into the architecture (torch.load weights_only=True; 'state_dict' or "
        "'model' wrappers and 'module.' prefixes are unwrapped). For torchvision: a weights enum name such as "
        "'DEFAULT' (read from torch's hub cache; downloaded only with allow_download) or a file path.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model factory.")
    trust_pickle: bool = Field(
        False,
        description="Allow unpickling a whole model object (runs code from the file: only for files you trust): "
        "needed by 'file:' specs, Ultralytics .pt files and model.pruned files in the old pickled format.",
    )
    trust_code: bool = Field(
        False,
        description="Allow an 'import:' spec to import a module and call the factory it names (runs that code, as "
        "Hugging Face's trust_remote_code). The module is looked up in import_path, then the working directory, "
        "then the installed packages.",
    )
    import_path: str | None = Field(
        None,
        description="Folder searched first for an 'import:' module; load_recipe sets it to the recipe's folder.",
    )
    allow_download: bool = Field(
        False,
        description="Let torchvision download a weights enum's file (e.g. weights: DEFAULT) into torch's hub cache, "
        "or Ultralytics its released weights by name (ultralytics:yolov8n.pt); without it only files already here "
        "are used.",
    )
    input_size: InputSize = Field(
        (3, 224, 224), description="C, H, W of one input: used for export, latency and tracing."
    )
    detector: DetectorConfig | None = Field(
        None, description="task: detection: what the model's forward returns (layout, box form and units, score "
        "form). Unset: YOLOv5's or YOLOv8/11's output, read from its shape.")
    pruned: str | None = Field(
        None, description="A pruned_model.pt written by a run's structured prune stage: reshapes the architecture to "
                          "it and loads its weights."
    )


class TransformConfig(StrictModel):
    resize: ImageSide | tuple[ImageSide, ImageSide] | None = Field(
        None, description="Resize the shorter side to this many pixels. Detection: [height, width] stretches every "
        "image to that size without keeping its aspect ratio (a model trained on plain resizes), instead of "
        "letterbox; boxes are mapped back to the original image per axis.")
    crop: ImageSide | None = Field(None, description="Center crop to this square size.")
    random_resized_crop: ImageSide | None = Field(
        None, description="Random resized crop to this size (seeded per sample; for calibration sets)."
    )
    scale: tuple[float, float] = Field((0.25, 1.0), description="Area range of random_resized_crop.")
    letterbox: tuple[ImageSide, ImageSide] | None = Field(
        None, description="Detection: letterbox every image into (height, width), keeping its aspect ratio (pad 114)."
    )
    stride: int = Field(
        32, gt=0, le=1024, description="Detection: the model's largest stride (letterbox sizes must be multiples).")
    channels: Literal["rgb", "bgr"] = Field(
        "rgb", description="Detection: the channel order the model was trained with (bgr: images read by OpenCV).")
    pixel_max: float = Field(
        1.0, gt=0, le=255, description="Detection: the value of a white pixel in the model's input: 1.0 (pixels / "
        "255, YOLO's) or 255 (raw 0..255). Detectors take no mean/std.")
    hflip: bool = Field(False, description="Training augmentation (data.finetune only): random horizontal flip.")
    pad_crop: int | None = Field(
        None, ge=1, le=MAX_IMAGE_SIDE,
        description="Training augmentation (data.finetune only): pad by this many pixels, crop back at random "
        "(CIFAR-style)."
    )
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Per-channel mean (RGB, 0..1).")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Per-channel std (RGB, 0..1).")

    @model_validator(mode="after")
    def _one_detector_fit(self) -> "TransformConfig":
        if self.letterbox is not None and isinstance(self.resize, tuple):
            raise ValueError("letterbox and resize: [height, width] are two ways to fit a detector's input; set one "
                             "(the one the model was trained with)")
        return self

    def detector_input(self) -> tuple[tuple[int, int], str] | None:
        """(size, fit) of a detector's input: letterbox or plain resize to [height, width]; None for a classifier's
        transform."""
        if self.letterbox is not None:
            return tuple(self.letterbox), "letterbox"
        if isinstance(self.resize, tuple):
            return tuple(self.resize), "resize"
        return None

    @field_validator("scale")
    @classmethod
    def _scale_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("scale must be two numbers with 0 < low <= high <= 1, e.g. [0.25, 1.0]")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:  # images are divided by it: 0 gives Inf, a negative std flips the image
            raise ValueError("std is a positive number per channel, e.g. [0.229, 0.224, 0.225]")
        return v


# Keys only some sources read (DataSplit refuses them under another source).
SOURCE_KEYS = {
    "annotations": ("coco",), "label_dir": ("yolo_txt",), "yaml": ("yolo",), "split": ("hf", "yolo"),
    "name": ("hf",), "image_column": ("hf",), "label_column": ("hf",), "allow_download": ("hf",),
    "package": ("package",),
}


class DataSplit(StrictModel):
    source: Literal["imagefolder", "files", "hf", "package", "coco", "yolo_txt", "yolo"] | None = Field(
        None,
        description="imagefolder: class sub-folders under path; files: every image under path (labels from "
        "the file name's WordNet-id prefix with labels: wnid_prefix); hf: a Hugging Face dataset "
        "(load_from_disk path, or name); package: images shipped inside an installed package; "
        "coco: images under path with a COCO JSON (annotations); yolo_txt: images under path with YOLO "
        "txt labels (label_dir); yolo: a split of an Ultralytics data.yaml (yaml, split).",
    )
    yaml: str | None = Field(None, description="yolo: the dataset's Ultralytics data.yaml (path, train/val/test, "
                             "names).")
    annotations: str | None = Field(None, description="coco: the COCO instances JSON for the images under path.")
    label_dir: str | None = Field(None, description="yolo_txt: folder of <image stem>.txt files (cls cx cy w h, "
                                                    "normalised).")
    calib_set: str | None = Field(
        None, description="Name of a calibration-set definition in calibration_data/ (instead of source)."
    )
    path: str | None = Field(None, description="Folder (imagefolder, files, hf load_from_disk) or data_dir (hf "
                                               "imagefolder).")
    name: str | None = Field(None, description="hf: dataset name for datasets.load_dataset, e.g. 'imagefolder' or a "
                                               "hub id.")
    split: str = Field("train", description="hf: split to read; yolo: train, val or test.")
    image_column: str = Field("image", description="hf: column holding the images.")
    label_column: str | None = Field("label", description="hf: column holding the labels (null: unlabeled).")
    allow_download: bool = Field(
        False, description="hf: let datasets download from the Hugging Face Hub (a hub name); off, only local data is "
                           "read."
    )
    package: str | None = Field(None, description="package: the installed package that ships the images, e.g. skimage.")
    pattern: str | list[str] = Field(
        "**/*", description="Glob(s) relative to path or the package folder selecting image files, e.g. "
                            "['data/*.png', 'data/*.jpg']."
    )
    labels: Literal["none", "folder", "wnid", "wnid_prefix"] | None = Field(
        None, description="Where labels come from; default: folder for imagefolder, none otherwise. folder: class "
        "sub-folders numbered 0..N-1 in sorted order. wnid: imagefolder class sub-folders named by WordNet id "
        "(n01440764/), numbered by the full ImageNet-1k list. wnid_prefix: the ImageNet-1k class index (sorted "
        "WordNet ids) of the id before the first '_' of each file name."
    )
    count: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Number of samples; with random crops it may exceed the images.")
    seed: int = Field(0, ge=0, lt=MAX_SEED, description="Seed of the sampling and of random crops (0 <= seed < 2**63).")
    transform: TransformConfig | None = Field(None, description="Overrides data.transform for this split.")

    @field_validator("calib_set")
    @classmethod
    def _plain_set_name(cls, v: str | None) -> str | None:
        return v if v is None else check_calib_set_name(v)

    @model_validator(mode="after")
    def _one_source(self) -> "DataSplit":
        if (self.source is None) == (self.calib_set is None):
            raise ValueError("give exactly one of 'source' or 'calib_set'")
        if self.source in ("imagefolder", "files") and not self.path:
            raise ValueError(f"source {self.source!r} needs 'path'")
        if self.source == "hf" and not (self.path or self.name):
            raise ValueError("source 'hf' needs 'path' (a saved dataset) or 'name'")
        if self.source == "coco" and not (self.path and self.annotations):
            raise ValueError("source 'coco' needs 'path' (the images) and 'annotations' (the COCO JSON)")
        if self.source == "yolo_txt" and not (self.path and self.label_dir):
            raise ValueError("source 'yolo_txt' needs 'path' (the images) and 'label_dir' (the txt labels)")
        if self.source == "yolo" and not self.yaml:
            raise ValueError("source 'yolo' needs 'yaml' (the dataset's data.yaml) and 'split' (train, val or test)")
        if self.source == "yolo" and self.split not in ("train", "val", "test"):
            raise ValueError(f"source 'yolo': split is train, val or test, not {self.split!r}")
        # A key another source reads, left over from switching sources, would silently do nothing.
        # (Set to something other than its default: a dumped recipe, read again, has every key.)
        stale = [k for k, sources in SOURCE_KEYS.items()
                 if self.source not in sources and getattr(self, k) != type(self).model_fields[k].default]
        if stale and self.source is not None:
            k = sorted(stale)[0]
            raise ValueError(f"'{k}' is for source {' or '.join(SOURCE_KEYS[k])}, and this split's source is "
                             f"{self.source}: remove it")
        if self.source == "package" and not self.package:
            raise ValueError("source 'package' needs 'package', e.g. package: skimage")
        return self


class DataConfig(StrictModel):
    transform: TransformConfig = Field(default_factory=TransformConfig, description="Default preprocessing.")
    calibration: DataSplit | None = Field(None, description="Images that calibrate INT8 ranges.")
    evaluation: DataSplit | None = Field(None, description="Images that score every backend.")
    finetune: DataSplit | None = Field(None, description="Images for fine-tuning and QAT.")
    batch_size: BatchSize = Field(32, description="Batch size of every loader.")
    workers: int = Field(0, ge=0, description=f"DataLoader worker processes (at most {MAX_WORKERS}).")

    @field_validator("workers")
    @classmethod
    def _workers_bounded(cls, v: int) -> int:
        if v > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} DataLoader workers: each is a process holding its own copy of the "
                             "dataset, and more than the CPU cores only costs memory")
        return v

    @model_validator(mode="after")
    def _augment_only_for_training(self) -> "DataConfig":
        # Augmented calibration or evaluation images would make ranges and scores random.
        for name in ("transform", "calibration", "evaluation"):
            t = self.transform if name == "transform" else getattr(getattr(self, name), "transform", None)
            if t is not None and (t.hflip or t.pad_crop):
                field = "data.transform" if name == "transform" else f"data.{name}.transform"
                raise ValueError(f"{field}: hflip and pad_crop are training augmentation; set them on "
                                 "data.finetune.transform")
        return self


class DetectionConfig(StrictModel):
    conf: float = Field(0.001, ge=0, le=1, description="Score threshold before NMS (0.001 for mAP, as "
                                                       "pycocotools-style evaluation expects).")
    iou: float = Field(0.6, gt=0, le=1, description="NMS IoU threshold.")
    max_det: int = Field(300, gt=0, description="Detections kept per image.")


class Recipe(StrictModel):
    name: str = Field(description="Run name: the run directory is <runs_dir>/<name>-<timestamp>.")
    task: str = Field("classification", description="What the model's output means (a registered task: "
                      "classification, detection).")
    detection: DetectionConfig = Field(default_factory=DetectionConfig, description="Decoding and NMS for task: "
                                                                                    "detection.")
    model: ModelConfig
    data: DataConfig
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    runs_dir: str = Field("runs", description="Where run directories are created.")
    log_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Also log the training stages' per-epoch metrics and the final table to "
        "TensorBoard (<run dir>/tensorboard) and/or MLflow (MLFLOW_TRACKING_URI); each needs its package installed.")
    stages: list[Any] = Field(description="Ordered stages, each a one-key mapping: - calibrate: {method: entropy}")
    target: Annotated[TargetSpec, BeforeValidator(target_from_name)] = Field(
        default_factory=TensorRTTarget, description="The deployment target whose arithmetic calibration, every PTQ "
        "algorithm, sensitivity, mixed precision, QAT and the exported graph use: tensorrt (default: s8 symmetric "
        "activations, per-channel s8 weights), openvino (u8 asymmetric activations; 7-bit weights for a CPU without "
        "VNNI; {name: openvino, cpu: auto|avx2|avx512_vnni|amx}), fixed_point (per-tensor, power-of-two scales, for "
        "FPGA/DSP toolchains).")

    @model_validator(mode="before")
    @classmethod
    def _data_yaml_shorthand(cls, data: Any) -> Any:
        """`data: data.yaml`: an Ultralytics dataset, calibrated and fine-tuned on its train split, scored on its val
        split, letterboxed to the model's input size (a detector's default: 640)."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), str):
            return data
        data = dict(data)
        model = dict(data.get("model") or {})
        model.setdefault("input_size", [3, 640, 640])
        data["model"] = model
        size = list(model["input_size"])[1:] if isinstance(model["input_size"], (list, tuple)) else [640, 640]
        yaml_file = data["data"]
        data["data"] = {
            "transform": {"letterbox": size},
            "calibration": {"source": "yolo", "yaml": yaml_file, "split": "train"},
            "finetune": {"source": "yolo", "yaml": yaml_file, "split": "train"},
            "evaluation": {"source": "yolo", "yaml": yaml_file, "split": "val"},
        }
        data.setdefault("task", "detection")
        return data

    @model_validator(mode="after")
    def _plain_resize_for_detectors(self) -> "Recipe":
        transforms = [("data.transform", self.data.transform)] + [
            (f"data.{n}.transform", getattr(self.data, n).transform) for n in ("calibration", "evaluation", "finetune")
            if getattr(self.data, n) is not None and getattr(self.data, n).transform is not None]
        if self.task != "detection" and self.model.detector is not None:
            raise ValueError("model.detector: declares a detector's output, for task: detection; remove it or set "
                             "task: detection")
        for field, t in transforms:
            if self.task != "detection" and isinstance(t.resize, tuple):
                raise ValueError(f"{field}.resize: [height, width] is a detector's plain resize (task: detection); a "
                                 "classifier resizes its shorter side (resize: 256) and crops (crop: 224)")
        return self

    @field_validator("log_to")
    @classmethod
    def _each_tracker_once(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each tracker once: {v} names one twice (it would log everything twice)")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("name must be letters, digits, '_', '-' or '.', e.g. resnet20_int8")
        return v

    def stage_list(self) -> list[tuple[str, BaseModel]]:
        """The stages as (name, options) pairs, in order."""
        return [(next(iter(type(s).model_fields)), getattr(s, next(iter(type(s).model_fields)))) for s in self.stages]




def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default written out, so a run says exactly what it did; but no default
    that the run never read (a detector's images are only scaled to 0..1: ImageNet's mean/std beside letterbox would
    say otherwise)."""
    data = recipe.model_dump(mode="json")
    if recipe.task == "detection":
        dumped = data["data"]
        pairs = [(recipe.data.transform, dumped["transform"])] + [
            (split.transform, dumped[name]["transform"]) for name in ("calibration", "evaluation", "finetune")
            if (split := getattr(recipe.data, name)) is not None and split.transform is not None]
        for transform, written in pairs:
            for key in ("mean", "std"):
                # another value stays: the recipe read back must be the one that ran (resume hashes it)
                if getattr(transform, key) == TransformConfig.model_fields[key].default:
                    written.pop(key)
    return yaml.safe_dump(data, sort_keys=False)
