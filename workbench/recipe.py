"""Recipes: YAML validated by a pydantic schema, with errors that name the field and line.

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

`load_recipe(path, overrides)` merges `key.path=value` overrides into the YAML
before validation, so both are checked the same way.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model,
                      field_validator, model_validator)

from .errors import RecipeError

# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


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


class ModelConfig(StrictModel):
    spec: str = Field(
        description="Model source and name: 'torchvision:resnet18', 'cifar_resnet:resnet20', "
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
        description="Let torchvision download a weights enum's file (e.g. weights: DEFAULT) into torch's hub cache; "
        "without it only an already cached file is used.",
    )
    input_size: InputSize = Field(
        (3, 224, 224), description="C, H, W of one input: used for export, latency and tracing."
    )
    pruned: str | None = Field(
        None, description="A pruned_model.pt written by a run's structured prune stage: reshapes the architecture to it and loads its weights."
    )


class TransformConfig(StrictModel):
    resize: ImageSide | None = Field(None, description="Resize the shorter side to this many pixels.")
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
    hflip: bool = Field(False, description="Training augmentation (data.finetune only): random horizontal flip.")
    pad_crop: int | None = Field(
        None, ge=1, le=MAX_IMAGE_SIDE,
        description="Training augmentation (data.finetune only): pad by this many pixels, crop back at random "
        "(CIFAR-style)."
    )
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Per-channel mean (RGB, 0..1).")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Per-channel std (RGB, 0..1).")

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


class DataSplit(StrictModel):
    source: Literal["imagefolder", "files", "hf", "package", "coco", "yolo_txt"] | None = Field(
        None,
        description="imagefolder: class sub-folders under path; files: every image under path (labels from "
        "the file name's WordNet-id prefix with labels: wnid_prefix); hf: a Hugging Face dataset "
        "(load_from_disk path, or name); package: images shipped inside an installed package; "
        "coco: images under path with a COCO JSON (annotations); yolo_txt: images under path with YOLO "
        "txt labels (label_dir).",
    )
    annotations: str | None = Field(None, description="coco: the COCO instances JSON for the images under path.")
    label_dir: str | None = Field(None, description="yolo_txt: folder of <image stem>.txt files (cls cx cy w h, normalised).")
    calib_set: str | None = Field(
        None, description="Name of a calibration-set definition in calibration_data/ (instead of source)."
    )
    path: str | None = Field(None, description="Folder (imagefolder, files, hf load_from_disk) or data_dir (hf imagefolder).")
    name: str | None = Field(None, description="hf: dataset name for datasets.load_dataset, e.g. 'imagefolder' or a hub id.")
    split: str = Field("train", description="hf: split to read.")
    image_column: str = Field("image", description="hf: column holding the images.")
    label_column: str | None = Field("label", description="hf: column holding the labels (null: unlabeled).")
    allow_download: bool = Field(
        False, description="hf: let datasets download from the Hugging Face Hub (a hub name); off, only local data is read."
    )
    package: str | None = Field(None, description="package: the installed package that ships the images, e.g. skimage.")
    pattern: str | list[str] = Field(
        "**/*", description="Glob(s) relative to path or the package folder selecting image files, e.g. ['data/*.png', 'data/*.jpg']."
    )
    labels: Literal["none", "folder", "wnid_prefix"] | None = Field(
        None, description="Where labels come from; default: folder for imagefolder, none otherwise. wnid_prefix: "
        "the ImageNet-1k class index (sorted WordNet ids) of the id before the first '_' of each file name."
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
                raise ValueError(f"{field}: hflip and pad_crop are training augmentation; set them on data.finetune.transform")
        return self


class DetectionConfig(StrictModel):
    conf: float = Field(0.001, ge=0, le=1, description="Score threshold before NMS (0.001 for mAP, as pycocotools-style evaluation expects).")
    iou: float = Field(0.6, gt=0, le=1, description="NMS IoU threshold.")
    max_det: int = Field(300, gt=0, description="Detections kept per image.")


class Recipe(StrictModel):
    name: str = Field(description="Run name: the run directory is <runs_dir>/<name>-<timestamp>.")
    task: Literal["classification", "detection"] = Field("classification", description="What the model's output means.")
    detection: DetectionConfig = Field(default_factory=DetectionConfig, description="Decoding and NMS for task: detection.")
    model: ModelConfig
    data: DataConfig
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present.")
    runs_dir: str = Field("runs", description="Where run directories are created.")
    stages: list[Any] = Field(description="Ordered stages, each a one-key mapping: - calibrate: {method: entropy}")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("name must be letters, digits, '_', '-' or '.', e.g. resnet20_int8")
        return v

    def stage_list(self) -> list[tuple[str, BaseModel]]:
        """The stages as (name, options) pairs, in order."""
        return [(next(iter(type(s).model_fields)), getattr(s, next(iter(type(s).model_fields)))) for s in self.stages]


@functools.lru_cache(maxsize=1)
def recipe_model() -> type[Recipe]:
    """The Recipe model with its stage list typed by the stage registry (built once)."""
    from .stages import STAGES

    members = []
    for name, spec in STAGES.items():
        wrapper = create_model(
            f"{name}_stage",
            __config__=ConfigDict(extra="forbid"),
            **{name: (spec.options, Field(default_factory=spec.options, description=spec.summary))},
        )
        members.append(Annotated[wrapper, Tag(name)])
    stage_union = Annotated[Union[tuple(members)], Discriminator(_stage_tag)]
    return create_model(
        "Recipe",
        __base__=Recipe,
        stages=(list[stage_union], Field(min_length=1, description=Recipe.model_fields["stages"].description)),
    )


def _stage_tag(value: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value))
    if isinstance(value, BaseModel):
        return next(iter(type(value).model_fields))
    return None


def recipe_json_schema() -> dict:
    return recipe_model().model_json_schema()


# ---------------------------------------------------------------------------
# Loading: YAML with line numbers, ${ENV} expansion, overrides, friendly errors
# ---------------------------------------------------------------------------

PathKey = tuple[Union[str, int], ...]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file; raise RecipeError naming field and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist: give the path of a .yaml recipe (see recipes/)")
    recipe = parse_recipe(read_yaml_text(path, "recipe file"), source=str(path), overrides=overrides)
    if recipe.model.spec.startswith("import:") and recipe.model.import_path is None:
        # `import:mymodels:net` finds mymodels.py beside the recipe, as a script finds its neighbours.
        recipe.model.import_path = str(path.resolve().parent)
    return recipe


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data, lines = load_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with keys name, model, data, stages")
    for item in overrides:
        _apply_override(data, item)
    data = _expand_env(data, (), source, lines)
    try:
        return recipe_model().model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source, lines)) from None


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with every relative path that exists here made absolute.

    A run's recipe.yaml is re-read later (the notebook, a re-run of its plan) from
    another working directory; relative paths would then point nowhere.
    """

    def fix(value):
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
            return os.path.abspath(value)
        return value

    data = recipe.model_dump(mode="json")
    model = data["model"]
    model["weights"] = fix(model.get("weights"))
    model["pruned"] = fix(model.get("pruned"))
    model["import_path"] = fix(model.get("import_path"))
    source, sep, rest = model["spec"].partition(":")
    if sep and source in ("file", "yolov5", "ultralytics"):
        model["spec"] = f"{source}:{fix(rest)}"
    for split in ("calibration", "evaluation", "finetune"):
        if data["data"].get(split):
            for key in ("path", "annotations", "label_dir"):
                data["data"][split][key] = fix(data["data"][split].get(key))
    return recipe_model().model_validate(data)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default written out, so a run says exactly what it did."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# A recipe is a few kilobytes. These limits stop hostile YAML (a "billion laughs" alias bomb, deep nesting,
# a huge file) with a message long before it costs memory or time, and leave normal anchors and aliases usable.
MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000  # counted expanded: an alias counts the whole node it repeats, every time it is used
MAX_YAML_DEPTH = 64


def read_yaml_text(path: Path, what: str) -> str:
    """The text of a YAML file, refused (naming the file) when it is too large or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise RecipeError(f"{what} {path} is {size} bytes; the limit is {MAX_YAML_BYTES} bytes (1 MiB): "
                          "a recipe names its data, it does not hold it")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"{what} {path}: byte {e.start} (line {line}) is not UTF-8 ({raw[e.start:e.start + 1]!r}): "
                          "save the file as UTF-8") from None


def load_yaml(text: str, source: str) -> tuple[Any, dict[PathKey, int]]:
    """Parse YAML once, safely and within the limits above: the data and the line of every key path."""
    if len(text) > MAX_YAML_BYTES:
        raise RecipeError(f"{source}: {len(text)} characters of YAML; the limit is {MAX_YAML_BYTES} (1 MiB)")
    loader = _LimitedLoader(text, source)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    finally:
        loader.dispose()
    return data, (_line_map(node) if node is not None else {})


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts the expanded size and depth of every node as it is composed, and refuses
    duplicate keys (PyYAML keeps the last one silently) and keys that are not plain scalars."""

    def __init__(self, text: str, source: str):
        super().__init__(text)
        self.source = source
        self.depth = 0
        self.sizes: dict[int, int] = {}  # id(node) -> nodes it expands to; absent while it is being composed

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        where = f"{self.source}:{mark.line + 1}"
        alias = self.check_event(yaml.AliasEvent)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise RecipeError(f"{where}: the YAML is nested more than {MAX_YAML_DEPTH} levels deep; a recipe needs fewer than 10")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if alias and id(node) not in self.sizes:  # the anchor's node is still being composed: it contains itself
            raise RecipeError(f"{where}: an alias refers to the anchor it is inside of: the YAML would never end")
        if not alias:
            self.sizes[id(node)] = 1 + sum(self.sizes[id(child)] for child in self._children(node))
            if isinstance(node, yaml.MappingNode):
                self._check_keys(node)
        if self.sizes[id(node)] > MAX_YAML_NODES:
            raise RecipeError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} values (aliases counted each "
                              "time they are used, as in a 'billion laughs' bomb); a recipe needs a few hundred")
        return node

    @staticmethod
    def _children(node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    def _check_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode):
                raise RecipeError(f"{self.source}:{line}: a mapping key must be a plain name, not a list or mapping")
            if key.tag == "tag:yaml.org,2002:merge":  # '<<: *base' then overriding keys is YAML's normal reuse
                continue
            if key.value in seen:
                raise RecipeError(f"{self.source}:{line}: key {key.value!r} appears twice in one mapping (lines "
                                  f"{seen[key.value]} and {line}); YAML would silently keep the last: remove one")
            seen[key.value] = line


def _line_map(node: yaml.Node, prefix: PathKey = ()) -> dict[PathKey, int]:
    lines = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[prefix + (key.value,)] = key.start_mark.line + 1
            lines.update({k: v for k, v in _line_map(value, prefix + (key.value,)).items() if k != prefix + (key.value,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, prefix + (i,)))
    return lines


def _apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override; `stages.calibrate.x` addresses the first calibrate stage."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is missing an '=' sign: write key.path=value, e.g. stages.calibrate.method=entropy")
    value = load_yaml(raw, f"override {item!r}: value")[0] if raw != "" else None
    parts = key.split(".")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(target, list):
            target = _list_item(target, part, parts[: i + 1])
        else:
            if not isinstance(target, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[:i])} is not a mapping")
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = [] if part == "stages" else {}
            target = nxt
    last = parts[-1]
    if isinstance(target, list):
        idx = _list_index(target, last, parts)
        target[idx] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError(f"override {item!r}: {'.'.join(parts[:-1])} is not a mapping")


def _list_index(items: list, part: str, parts: list[str]) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(items) <= idx < len(items):
            raise RecipeError(f"override {'.'.join(parts)}: index {idx} is out of range (the list has {len(items)} items)")
        return idx
    for idx, entry in enumerate(items):
        if isinstance(entry, dict) and part in entry:
            return idx
    names = [next(iter(e)) for e in items if isinstance(e, dict) and len(e) == 1]
    raise RecipeError(f"override {'.'.join(parts)}: the recipe has no stage {part!r} (it has: {', '.join(names) or 'none'})")


def _list_item(items: list, part: str, parts: list[str]) -> Any:
    entry = items[_list_index(items, part, parts)]
    # `stages.calibrate.method` means the options inside the one-key stage mapping.
    if isinstance(entry, dict) and part in entry and not part.isdigit():
        if entry[part] is None:
            entry[part] = {}
        return entry[part]
    return entry


def _expand_env(value: Any, where: PathKey, source: str, lines: dict[PathKey, int]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, where + (k,), source, lines) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where + (i,), source, lines) for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            var = m.group(1)
            if var not in os.environ:
                raise RecipeError(
                    f"{source}{_line_suffix(where, lines)}: {_path_str(where)} uses ${{{var}}}, which is not set. "
                    f"Set it, e.g. export {var}=../shared/assets"
                )
            return os.environ[var]

        return _ENV.sub(sub, value)
    return value


def _path_str(loc: PathKey) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _line_suffix(loc: PathKey, lines: dict[PathKey, int]) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f":{lines[loc[:n]]}"
    return ""


def _clean_loc(loc: tuple) -> PathKey:
    # A tagged union repeats the stage name in the location: ('stages', 0, 'calibrate', 'calibrate', 'method').
    if len(loc) >= 4 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] == loc[3]:
        return tuple(loc[:2]) + tuple(loc[3:])
    return tuple(loc)


def _stage_names() -> list[str]:
    from .stages import STAGES

    return list(STAGES)


def _format_errors(err: ValidationError, source: str, lines: dict[PathKey, int]) -> str:
    messages = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        where = f"{source}{_line_suffix(loc, lines)}"
        kind = e["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            messages.append(
                f"{where}: '{_path_str(loc)}' is not a valid key.{hint} Valid keys here: {', '.join(valid)}"
            )
        elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
            names = _stage_names()
            given = e.get("ctx", {}).get("tag")
            if given is None and isinstance(e.get("input"), dict):
                given = ",".join(map(str, e["input"]))
            close = difflib.get_close_matches(str(given), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            messages.append(
                f"{where}: '{_path_str(loc)}' must be a one-key mapping naming a stage, got {given!r}.{hint} "
                f"Stages: {', '.join(names)}"
            )
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            options = re.findall(r"'([^']*)'", expected)
            close = difflib.get_close_matches(str(e.get("input")), options, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            messages.append(f"{where}: {_path_str(loc)}: {e['msg']} (got {e.get('input')!r}).{hint}")
        elif kind == "missing":
            messages.append(f"{where}: '{_path_str(loc)}' is required but missing.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            messages.append(f"{where}: {_path_str(loc)}: {msg} (got {e.get('input')!r})")
    head = f"recipe {source} is not valid ({len(messages)} problem{'s' if len(messages) > 1 else ''}):"
    return "\n".join([head] + [f"  - {m}" for m in messages])


def _valid_keys(loc: PathKey) -> list[str]:
    """Field names of the model found at `loc` (used to suggest a close match for a misspelt key)."""
    model: Any = recipe_model()
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is None:
            return []
        if isinstance(part, int):
            continue
        if part == "stages":
            model = "stages"
            continue
        if model == "stages":
            from .stages import STAGES

            model = STAGES[part].options if part in STAGES else None
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = _model_in(field.annotation) if field else None
    if model == "stages":
        return _stage_names()
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
