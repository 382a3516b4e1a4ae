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


class RewriteError(WorkbenchError):
    """A model rewrite (BatchNorm folding, the residual-Add rule, a pruning or decode rewrite) would change what the
    float model computes: the message names the rewrite, the first module whose output differs and by how much."""
