"""The workbench's internal import graph, top-level and lazy (inside functions) imports alike; exits 1 on a cycle.

    python scripts/import_graph.py            # prints any cycle, folder loop, and stage importing another stage

A folder loop is a cycle between folders (qdq/ -> runtime/ -> qdq/) made of modules that do not form a cycle
themselves: the module check cannot see it, yet neither folder can then be understood, tested or moved without the
other. Each folder under workbench/ is one node, and so is each module on the ground floor (workbench/*.py).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "workbench"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in known and c != name:
                out.add(c)
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    edges = {name: imports(path, name, known) for name, path in files.items()}
    # Importing a.b.c first imports the packages a and a.b: a module depends on its parent packages' __init__.
    for name in list(edges):
        for dep in list(edges[name]):
            parts = dep.split(".")
            edges[name] |= {".".join(parts[:i]) for i in range(1, len(parts))} & known - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def folder(module: str) -> str:
    """The folder a module lives in, as one node: workbench.qdq.graph -> workbench.qdq; workbench.schema stays."""
    return ".".join(module.split(".")[:2])


def folder_loops(edges: dict[str, set[str]]) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """Cycles of the folder graph, each with the module imports that cross between its folders (what to move)."""
    between: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for a, deps in edges.items():
        for b in deps:
            if folder(a) != folder(b):
                between.setdefault(folder(a), {}).setdefault(folder(b), []).append((a, b))
    nodes = set(between) | {b for targets in between.values() for b in targets}
    found = cycles({n: set(between.get(n, {})) for n in nodes})
    return [(comp, sorted(imp for a in comp for b, imps in between.get(a, {}).items() if b in comp for imp in imps))
            for comp in found]


def without_registration(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ importing its own submodules is how registration works, not a cycle of dependencies."""
    return {name: {d for d in deps if not (d.startswith(name + ".") and not _is_module_file(name))}
            for name, deps in edges.items()}


def problems(edges: dict[str, set[str]]):
    """(module cycles, folder loops, stage-to-stage imports) of an import graph (without_registration's)."""
    stage_modules = {n for n in edges if n.startswith("workbench.stages.") and n != "workbench.stages.registry"}
    crossing = sorted((a, b) for a in stage_modules for b in edges[a] if b in stage_modules)
    return cycles(edges), folder_loops(edges), crossing


def _is_module_file(name: str) -> bool:
    return not (ROOT.parent / name.replace(".", "/")).is_dir()


if __name__ == "__main__":
    edges = without_registration(graph())
    found, loops, crossing = problems(edges)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    for comp, imports_between in loops:
        print("folder loop:", " <-> ".join(comp))
        for a, b in imports_between:
            print(f"    {a} -> {b}")
    for a, b in crossing:
        print(f"stage imports stage: {a} -> {b}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycles, "
          f"{len(loops)} folder loops, {len(crossing)} stage-to-stage imports")
    sys.exit(1 if found or loops or crossing else 0)
