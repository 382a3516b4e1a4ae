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
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model, field_validator, model_validator

from .errors import RecipeError

# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        "'DEFAULT' (needs the hub cache) or a file path.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the model factory.")
    trust_pickle: bool = Field(
        False, description="Allow unpickling a whole model object (runs code from the file: only for files you trust)."
    )
    input_size: tuple[int, int, int] = Field(
        (3, 224, 224), description="C, H, W of one input: used for export, latency and tracing."
    )
    pruned: str | None = Field(
        None, description="A pruned_model.pt written by a run's structured prune stage: reshapes the architecture to it and loads its weights."
    )


class TransformConfig(StrictModel):
    resize: int | None = Field(None, description="Resize the shorter side to this many pixels.", gt=0)
    crop: int | None = Field(None, description="Center crop to this square size.", gt=0)
    random_resized_crop: int | None = Field(
        None, description="Random resized crop to this size (seeded per sample; for calibration sets).", gt=0
    )
    scale: tuple[float, float] = Field((0.25, 1.0), description="Area range of random_resized_crop.")
    letterbox: tuple[int, int] | None = Field(
        None, description="Detection: letterbox every image into (height, width), keeping its aspect ratio (pad 114)."
    )
    stride: int = Field(32, gt=0, description="Detection: the model's largest stride (letterbox sizes must be multiples).")
    hflip: bool = Field(False, description="Training augmentation (data.finetune only): random horizontal flip.")
    pad_crop: int | None = Field(
        None, ge=1, description="Training augmentation (data.finetune only): pad by this many pixels, crop back at random (CIFAR-style)."
    )
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Per-channel mean (RGB, 0..1).")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Per-channel std (RGB, 0..1).")

    @field_validator("scale")
    @classmethod
    def _scale_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("scale must be two numbers with 0 < low <= high <= 1, e.g. [0.25, 1.0]")
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
    package: str | None = Field(None, description="package: the installed package that ships the images, e.g. skimage.")
    pattern: str | list[str] = Field(
        "**/*", description="Glob(s) relative to path or the package folder selecting image files, e.g. ['data/*.png', 'data/*.jpg']."
    )
    labels: Literal["none", "folder", "wnid_prefix"] | None = Field(
        None, description="Where labels come from; default: folder for imagefolder, none otherwise."
    )
    count: int | None = Field(None, gt=0, description="Number of samples; with random crops it may exceed the images.")
    seed: int = Field(0, description="Seed of the sampling and of random crops.")
    transform: TransformConfig | None = Field(None, description="Overrides data.transform for this split.")

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
    batch_size: int = Field(32, gt=0, description="Batch size of every loader.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")

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
    text = path.read_text(encoding="utf-8")
    return parse_recipe(text, source=str(path), overrides=overrides)


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with keys name, model, data, stages")
    lines = _line_map(node) if node is not None else {}
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
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {item!r}: value is not valid YAML: {e}") from None
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
