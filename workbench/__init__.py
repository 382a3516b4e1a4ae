"""workbench: recipe-driven INT8 quantization and pruning for PyTorch vision models."""

from .api import load_run, run
from .errors import WorkbenchError
from .quant.ptq import Int8Config, quantize_
from .recipe import Recipe, load_recipe, parse_recipe

__version__ = "0.1.0"

__all__ = ["Int8Config", "Recipe", "WorkbenchError", "load_recipe", "load_run", "parse_recipe", "quantize_", "run"]
