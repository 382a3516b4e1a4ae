"""YAML read safely and within limits, with the line of every key: recipes and calibration-set files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from .errors import RecipeError, printable

PathKey = tuple[Union[str, int], ...]


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
    try:
        loader = _LimitedLoader(text, source)  # its reader refuses control characters (BEL, \x01) right here
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {printable(str(e))}") from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {printable(str(e))}{_quoting_hint(e, text)}") from None
    finally:
        loader.dispose()
    return data, (_line_map(node) if node is not None else {})


def _quoting_hint(error: yaml.YAMLError, text: str) -> str:
    """A `${VAR}` unquoted inside `{...}` or `[...]` reads as a nested mapping start: say to quote the value."""
    mark = getattr(error, "problem_mark", None)
    lines = text.splitlines()
    if mark is None or "flow" not in str(getattr(error, "context", "")) or not 0 <= mark.line < len(lines):
        return ""
    if "${" not in lines[mark.line]:
        return ""
    return ('\nA value holding ${VAR} inside {...} or [...] must be quoted, e.g. '
            'path: "${WORKBENCH_ASSETS}/data/cifar10/test" (or write the mapping one key per line).')


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
            raise RecipeError(f"{where}: the YAML is nested more than {MAX_YAML_DEPTH} levels deep; a recipe needs "
                              "fewer than 10")
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
            lines.update({k: v for k, v in _line_map(value, prefix + (key.value,)).items()
                          if k != prefix + (key.value,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_map(item, prefix + (i,)))
    return lines



def dump_yaml(data: Any, comment: str | None = None) -> str:
    """`data` as YAML (a generated recipe is built as a mapping and dumped, never pasted together as text), under a
    one-line comment: its newlines and control characters escaped, so no text in it can add a key."""
    head = f"# {printable(comment, keep='')}\n" if comment is not None else ""
    return head + yaml.safe_dump(data, sort_keys=False, allow_unicode=False)
