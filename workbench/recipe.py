"""Loading recipes: YAML with line numbers, ${ENV} expansion, `key.path=value` overrides, errors that name
the field, the line and the closest valid key; the Recipe model typed by the stage and task registries.

`load_recipe(path, overrides)` merges `key.path=value` overrides into the YAML before validation, so both
are checked the same way. The sections themselves are in schema.py.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model

from .errors import RecipeError
from .schema import Recipe, dump_recipe
from .stages import STAGES
from .tasks import TASK_NAMES
from .yaml_io import MAX_YAML_DEPTH, PathKey, load_yaml, read_yaml_text

__all__ = ["Recipe", "dump_recipe", "load_recipe", "parse_recipe", "recipe_json_schema", "recipe_model",
           "with_absolute_paths"]


@functools.lru_cache(maxsize=1)
def recipe_model() -> type[Recipe]:
    """The Recipe model with its stage list typed by the stage registry and its task by the task registry
    (built once)."""
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
        task=(Literal[TASK_NAMES], Field("classification", description=Recipe.model_fields["task"].description)),
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
    from .models.registry import spec_names_file

    def fix(value):
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
            return os.path.abspath(value)
        return value

    data = recipe.model_dump(mode="json")
    model = data["model"]
    model["weights"] = fix(model.get("weights"))
    model["pruned"] = fix(model.get("pruned"))
    model["import_path"] = fix(model.get("import_path"))
    if spec_names_file(model["spec"]):
        source, _, rest = model["spec"].partition(":")
        model["spec"] = f"{source}:{fix(rest)}"
    for split in ("calibration", "evaluation", "finetune"):
        if data["data"].get(split):
            for key in ("path", "annotations", "label_dir", "yaml"):
                data["data"][split][key] = fix(data["data"][split].get(key))
    return recipe_model().model_validate(data)



def _apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override; `stages.calibrate.x` addresses the first calibrate stage."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is missing an '=' sign: write key.path=value, e.g. "
                          "stages.calibrate.method=entropy")
    parts = key.split(".")
    if len(parts) > MAX_YAML_DEPTH:
        raise RecipeError(f"override {key[:60]!r}...: its key has {len(parts)} parts; the limit is {MAX_YAML_DEPTH} "
                          "(a recipe's fields are a few levels deep, e.g. stages.calibrate.method)")
    value = load_yaml(raw, f"override {item!r}: value")[0] if raw != "" else None
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
        if not last.lstrip("-").isdigit():  # `stages.calibrate={...}`: the stage's options, as stages.0.calibrate
            target[idx] = {last: value}
        else:
            target[idx] = value
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise RecipeError(f"override {item!r}: {'.'.join(parts[:-1])} is not a mapping")


def _list_index(items: list, part: str, parts: list[str]) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(items) <= idx < len(items):
            raise RecipeError(f"override {'.'.join(parts)}: index {idx} is out of range (the list has {len(items)} "
                              "items)")
        return idx
    for idx, entry in enumerate(items):
        if isinstance(entry, dict) and part in entry:
            return idx
    names = [next(iter(e)) for e in items if isinstance(e, dict) and len(e) == 1]
    raise RecipeError(f"override {'.'.join(parts)}: the recipe has no stage {part!r} "
                      f"(it has: {', '.join(names) or 'none'})")


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
            if given is None and isinstance(e.get("input"), str):  # `- export`: a stage named without its options
                word = e["input"]
                write = f"'- {word}: {{}}'" if word in names else "'- STAGE: {}' with STAGE one of the stages"
                messages.append(f"{where}: '{_path_str(loc)}' is the bare word {word!r}; a stage is a one-key mapping "
                                f"of its name to its options: write {write}. Stages: {', '.join(names)}")
                continue
            if given is None:
                given = type(e.get("input")).__name__ if e.get("input") is not None else "nothing"
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
