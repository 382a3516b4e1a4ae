"""Text shared by the report's sections (report.py's and the stages' own): names from the user's files as safe
markdown, numbers as the tables show them, which images a training stage scored on."""

from __future__ import annotations

from .errors import printable

MARKDOWN_SPECIAL = "\\`*_|<>[]#"


def md_text(text: object) -> str:
    """Text from the user's files (a class, layer or node name) as literal markdown: its special characters
    backslash-escaped, so a `|` cannot add a table column, nor `<script>` or `**` change the page; newlines and
    control characters (ESC) written as escapes, so a name cannot end a table row or recolour a terminal."""
    return "".join("\\" + c if c in MARKDOWN_SPECIAL else c for c in printable(str(text), keep=""))


def md_name(name: object) -> str:
    """A name as inline code where it can be (no backtick or pipe in it), else as escaped text."""
    name = printable(str(name), keep="")
    return f"`{name}`" if not any(c in name for c in "`|") else md_text(name)


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def training_subset(stage: dict, metrics: dict) -> str:
    """Which images a training stage's per-epoch score is on, against the evaluate stage's table."""
    samples = stage["eval"].get("samples")
    table = metrics.get("stages", {}).get("evaluate", {}).get("samples")
    if samples is None:
        return "the evaluation subset"
    if table is not None and table != samples:
        return (f"{samples} evaluation images drawn with seed 0 (the table above uses all {table}, so its numbers "
                "differ)")
    return f"the {samples} evaluation images"
