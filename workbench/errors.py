"""Errors a user can act on.

Every error that comes from the user's input (recipe, files, data) is a
`WorkbenchError`: the CLI prints its message without a traceback and exits
with its `exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """A problem with the user's input: the message names what and what to do."""

    exit_code = 2


class RecipeError(WorkbenchError):
    """The recipe (file or command-line override) does not validate."""


class ModelLoadError(WorkbenchError):
    """The model spec, checkpoint or weights cannot be resolved or loaded."""


class DataError(WorkbenchError):
    """A data source is missing, empty or holds unreadable files."""


class CalibrationError(WorkbenchError):
    """Calibration met data it cannot turn into ranges (NaN/Inf, no batches)."""


class ExportError(WorkbenchError):
    """The ONNX export or its check failed."""


class PruningError(WorkbenchError):
    """Structured pruning cannot be applied to this model as asked."""


class RewriteError(WorkbenchError):
    """A model rewrite (BatchNorm folding, the residual-Add rule, a pruning or decode rewrite) would change what the
    float model computes: the message names the rewrite, the first module whose output differs and by how much."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (from `timeout`, a scheduler, `kill`), raised where Ctrl-C would be so that a run ends the same way:
    recorded as interrupted, in the stage it was in, and resumable."""


def printable(text: str, keep: str = "\n\t") -> str:
    """`text` with every control character but those in `keep` (newline and tab) written as an escape (ESC as
    \\x1b): a message quotes paths, keys and file contents, which must not move the cursor or recolour the terminal,
    nor forge lines in a log. `keep=""` gives one line."""
    return "".join(c if c in keep or c.isprintable() else repr(c)[1:-1] for c in text)


def shown_path(path) -> str:
    """A path as a message shows it: as is, or quoted with escapes where it holds a newline or a control character
    (a path 'd.yaml\\ndetection: ...' must not read as two lines)."""
    text = str(path)
    return text if printable(text, keep="") == text else repr(text)
