"""The stages' names and one-line summaries read from their modules' source, without importing them.

`workbench stages` answers at interpreter speed: importing the stage modules builds every stage's pydantic options
and the quantization algorithms' registries (about 10x a bare interpreter start), to print ten lines. The registry
stays the one source of truth: each stage registers itself with `@register_stage("name", ...)` on a function whose
docstring's first line is its summary (StageSpec.summary), and a test holds this reading equal to the registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

STAGES_DIR = Path(__file__).resolve().parent / "stages"


def stage_summaries() -> dict[str, str]:
    """{stage name: summary}, in the registry's order (the stage modules' alphabetical import order)."""
    found = {}
    for path in sorted(STAGES_DIR.glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
                        and decorator.func.id == "register_stage" and decorator.args
                        and isinstance(decorator.args[0], ast.Constant)):
                    doc = ast.get_docstring(node, clean=False) or ""
                    found[decorator.args[0].value] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found
