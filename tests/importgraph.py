"""Static import graph of the project (ast only, nothing imported): which ctxrepro modules a module needs,
lazy imports inside functions included. Used by the layout tests and to keep dvc.yaml's deps honest."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """`ctxrepro.pretext.engine` -> its file (module or package __init__), or None if it is not ours."""
    parts = name.split(".")
    if parts[0] not in ("ctxrepro", "stages"):
        return None
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def module_name(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def direct_imports(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere in its body (`from a import b` counts `a.b` when b is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if module_file(name) is not None:
                found.add(name)
    # a submodule import also runs its packages' __init__ files
    for name in list(found):
        parts = name.split(".")
        for i in range(1, len(parts)):
            if module_file(".".join(parts[:i])) is not None:
                found.add(".".join(parts[:i]))
    return found


def closure(start: str) -> set[str]:
    """Every project module that importing `start` may load."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(direct_imports(module_file(name)) - seen)
    return seen


def package_graph() -> dict[str, set[str]]:
    """ctxrepro's modules and subpackages as nodes (`ctxrepro.pretext`, `ctxrepro.stage`), edges by import."""
    def node(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if len(parts) > 1 else name

    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "ctxrepro").rglob("*.py")):
        src = node(module_name(path))
        graph.setdefault(src, set())
        for dst in direct_imports(path):
            if dst.startswith("ctxrepro.") and node(dst) != src:
                graph[src].add(node(dst))
    return graph
