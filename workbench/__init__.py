"""workbench: recipe-driven INT8 quantization and pruning for PyTorch vision models.

The API mirrors the CLI: run, sensitivity, validate, check_onnx, build, bench, open_run (and load_run);
`quantize_(model, Int8Config(...), forward_loop, example)` is the quantization verb on its own.
Attributes are imported on first use, so `import workbench` (and the CLI) does not load torch.
"""

from __future__ import annotations

import importlib
import logging
import warnings

__version__ = "0.1.0"

# Not the user's business, and printed on every run before: torch's note that no CUDA runtime is found (a CPU
# machine), the FutureWarning modelopt's import raises about torch.jit.script, tqdm's note about notebook widgets.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="IProgress not found")

_EXPORTS = {
    "run": "api", "sensitivity": "api", "validate": "api", "check_onnx": "api", "build": "api", "bench": "api",
    "open_run": "api", "load_run": "api", "quantize": "api",
    "Int8Config": "quant.config", "quantize_": "quant.ptq",
    "Recipe": "schema", "load_recipe": "recipe", "parse_recipe": "recipe",
    "WorkbenchError": "errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
