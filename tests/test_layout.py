"""The package's shape (README "Architecture"): one folder per part of the paper, no cycles, small files, and
dvc.yaml deps that name every module a stage runs. All static: nothing here imports torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from importgraph import ROOT, closure, direct_imports, module_file, module_name, package_graph

# How a stage runs, not what it computes: a change here must not re-run the pipeline.
RUNTIME = {"ctxrepro", "ctxrepro.cli", "ctxrepro.config", "ctxrepro.stage", "ctxrepro.io", "ctxrepro.progress",
           "ctxrepro.profiles", "ctxrepro.container", "stages"}
LIBRARY = sorted((ROOT / "ctxrepro").rglob("*.py"))
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules_lazy_imports_included():
    graph = {module_name(p): {m for m in direct_imports(p) if m.startswith("ctxrepro")} for p in LIBRARY}
    # a package's __init__ is imported by its submodules implicitly; that edge is not a cycle
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    assert _cycles(graph) == []


def test_no_import_cycles_between_subpackages():
    assert _cycles(package_graph()) == []


def test_the_library_never_imports_stages():
    offenders = {module_name(p): sorted(m for m in direct_imports(p) if m.split(".")[0] == "stages") for p in LIBRARY}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_few_top_level_modules_and_no_prefix_families():
    top = sorted(p.stem for p in (ROOT / "ctxrepro").glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= 12, top
    prefixes = [name.split("_")[0] for name in top if "_" in name]
    families = {p for p in prefixes if sum(name.startswith(p + "_") or name == p for name in top) > 1}
    assert families == set(), families


@pytest.mark.parametrize("path", LIBRARY + sorted((ROOT / "stages").glob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_under_400_lines_and_functions_under_60(path: Path):
    source = path.read_text()
    assert len(source.splitlines()) < 400
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if node.end_lineno - start + 1 > 60:
                long.append((node.name, node.end_lineno - start + 1))
    assert long == []


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_deps_name_every_module_the_stage_runs(stage: str):
    block = STAGES[stage].get("do", STAGES[stage])
    deps = [d if isinstance(d, str) else next(iter(d)) for d in block["deps"]]
    needed = {m for m in closure(f"stages.{stage}") if m not in RUNTIME}
    missing = sorted(str(module_file(m).relative_to(ROOT)) for m in needed
                     if not _covered(module_file(m), deps) and not module_file(m).name == "__init__.py")
    assert missing == []
    stale = [d for d in deps if d.startswith(("ctxrepro", "stages")) and not (ROOT / d).exists()]
    assert stale == []


def test_dvc_deps_follow_the_paper_folders():
    """A change under pretext/ re-runs pretrain; a change in report/ re-runs only the report."""
    def deps(stage):
        block = STAGES[stage].get("do", STAGES[stage])
        return [d if isinstance(d, str) else next(iter(d)) for d in block["deps"]]

    assert "ctxrepro/pretext" in deps("pretrain")
    touched = ROOT / "ctxrepro" / "report" / "tables.py"
    assert [s for s in STAGES if _covered(touched, deps(s))] == ["report"]
