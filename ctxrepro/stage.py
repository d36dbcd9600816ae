"""Running one DVC stage: parse its params section, log provenance, call its `run(params, ctx)`, then record in
its metrics files which commit its code came from and whether that code was clean.

A stage module is `stages/<name>.py` with a docstring (its one-line help), a frozen `Params` dataclass and
`run(params, ctx)`. This module is the only place that connects params.yaml to stage code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ctxrepro.config import (BaseParams, ParamsError, apply_overrides, check_references, load_params, load_yaml,
                             parse_dataclass, resolve_device, to_plain)
from ctxrepro.container import run_stage_in_container
from ctxrepro.io import atomic_write_json

# Pipeline order; one name everywhere: dvc.yaml stage, params section, CLI command, metrics file, module.
STAGE_ORDER = ("fetch", "resize", "pretrain", "convert", "proposals", "detect", "normals", "mine", "pretext_eval", "nn",
               "aberration", "linear_probe", "report")


class StageError(RuntimeError):
    """A failure the user can act on; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class StageContext:
    base: BaseParams
    device: str
    log: logging.Logger
    shard: tuple[int, int] = (0, 1)
    root: Path = field(default_factory=Path.cwd)
    params_path: Path = Path("params.yaml")  # the whole file: fetch checks the inputs other sections need


def available_stages() -> list[str]:
    """Stages whose module exists, in pipeline order (a stage that is not built yet does not exist)."""
    return [name for name in STAGE_ORDER if importlib.util.find_spec(f"stages.{name}") is not None]


def stage_help(name: str) -> str:
    """The first line of a stage module's docstring, read without importing it (importing pulls in torch)."""
    spec = importlib.util.find_spec(f"stages.{name}")
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def stage_shards(name: str) -> bool:
    """Whether a stage splits its work with --shard i/n: its module sets `SHARDS = True` (read without importing)."""
    spec = importlib.util.find_spec(f"stages.{name}")
    if spec is None or spec.origin is None:
        return False
    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SHARDS" for t in node.targets):
            return isinstance(node.value, ast.Constant) and node.value.value is True
    return False


def _git(root: Path, *args: str) -> str | None:
    """A git command's stdout in root; None without git or outside a checkout (a container, a tarball)."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit(root: Path) -> str | None:
    """HEAD's sha; None outside a git checkout."""
    out = _git(root, "rev-parse", "HEAD")
    return (out or "").strip() or None


def stage_spec(root: Path, name: str) -> dict:
    """The stage's entry in root's dvc.yaml (a foreach stage's `do` template); {} where there is none."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    spec = stages.get(name)
    return (spec.get("do", spec) if isinstance(spec, dict) else None) or {}


def spec_paths(entries: list | None) -> list[str]:
    """The paths of a dvc.yaml deps/outs/metrics list (an entry is a path or {path: options})."""
    return [str(next(iter(e))) if isinstance(e, dict) else str(e) for e in entries or ()]


def pipeline_outputs(root: Path) -> list[str]:
    """Every path a stage in root's dvc.yaml writes (outs, metrics, plots), cut before any `${...}` template."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    found = []
    for spec in stages.values():
        spec = (spec.get("do", spec) if isinstance(spec, dict) else None) or {}
        for kind in ("outs", "metrics", "plots"):
            found += [p.split("${")[0].rstrip("/") for p in spec_paths(spec.get(kind))]
    return [p for p in found if p]


def _produced(dep: str, outputs: list[str]) -> bool:
    """Whether a dep is (or holds, or sits inside) another stage's output: data, not code."""
    d = dep.rstrip("/")
    return any(d == o or d.startswith(o + "/") or o.startswith(d + "/") for o in outputs)


def code_provenance(root: Path, deps: list[str]) -> dict:
    """The commit the stage's code comes from, and whether its code deps are clean there.

    The code deps are the dvc.yaml deps that git tracks and no stage writes (data deps are DVC's, ignored by
    git, or other stages' metrics and plots, which git tracks but which are results, not code). `code_clean` is
    false when one of them has uncommitted changes or an untracked file inside it; `changed` names them. Without
    git every field is null: a metrics file then says it cannot tell.
    """
    unknown = {"commit": None, "code_clean": None, "changed": None}
    commit = git_commit(root)
    outputs = pipeline_outputs(root)
    # foreach templates and other stages' outputs (the report reads every metrics file) are no code
    fixed = [d for d in deps if "${" not in d and not _produced(d, outputs)]
    tracked = _git(root, "ls-files", "-z", "--", *fixed) if commit and fixed else ""
    if commit is None or tracked is None:
        return unknown
    files = [f for f in tracked.split("\0") if f]
    code = [d for d in fixed if any(f == d.rstrip("/") or f.startswith(d.rstrip("/") + "/") for f in files)]
    status = _git(root, "status", "--porcelain", "--", *code) if code else ""
    if status is None:
        return unknown
    changed = sorted(line[3:] for line in status.splitlines() if line[3:])
    return {"commit": commit, "code_clean": not changed, "changed": changed}


def stamp_metrics(root: Path, spec: dict, since: float, record: dict) -> list[Path]:
    """Add `provenance: record` to each of the stage's metrics files (dvc.yaml `metrics`; a foreach item's
    `${...}` matches any) written at or after `since`: the files this run wrote, each rewritten atomically."""
    stamped = []
    for pattern in spec_paths(spec.get("metrics")):
        for path in sorted(root.glob(re.sub(r"\$\{[^}]*\}", "*", pattern))):
            if not path.is_file() or path.stat().st_mtime < since:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if isinstance(data, dict):
                atomic_write_json(path, {**data, "provenance": record})
                stamped.append(path)
    return stamped


def describe_code(record: dict) -> str:
    if record["commit"] is None:
        return "commit unknown (no git here)"
    state = "clean" if record["code_clean"] else f"uncommitted changes in {', '.join(record['changed'])}"
    return f"commit {record['commit']}, code deps {state}"


def parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = (-1, 0)
    if not sep or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise ParamsError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return shard


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()})"
    return f"cpu ({platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def check_params(params_path: Path) -> list[str]:
    """Parse `base` and every stage's section of a params file, with the keys one section takes from another
    (`convert.rows.*.variant` from `pretrain.variants`, ...); return the stages checked. `dvc repro` checks
    its dependencies before any stage runs, so a row naming a missing variant fails there with DVC's own
    "[Errno 2]" on models/pretrain/<variant>.pt: this names the key instead (`make repro` runs it first)."""
    return [name for name in resolve_params(params_path) if name != "base"]


def run_stage(name: str, params_path: Path, sets: list[str], shard: str = "0/1",
              preflight: Callable[[Path, str, dict], object] | None = None) -> None:
    """Parse, validate and log everything before the stage writes anything, then run it.

    `preflight(root, name, sections)` (the CLI passes ctxrepro.preflight.check.stage_check) runs after the
    params parse and before any data is read; it raises to stop the stage. Passed in rather than imported, so
    that the preflight's code is no dependency of every stage's outputs."""
    if name not in STAGE_ORDER or importlib.util.find_spec(f"stages.{name}") is None:
        raise ParamsError(f"unknown stage '{name}'; available: {', '.join(available_stages())}")
    module = importlib.import_module(f"stages.{name}")
    base, params = load_params(params_path, name, module.Params, sets)
    shard_t = parse_shard(shard)
    if shard_t != (0, 1) and not stage_shards(name):
        sharded = [s for s in available_stages() if stage_shards(s)]
        raise ParamsError(f"--shard {shard}: stage {name} does not split its work (only {', '.join(sharded)} does); "
                          "run it without --shard")
    if base.runtime == "docker":
        # Before resolve_device: a CPU-only host must still be able to hand a cuda run to the container.
        run_stage_in_container(Path.cwd(), name, params_path, list(sets), shard,
                               gpus=False if base.device == "cpu" else None)
        return
    if preflight is not None:
        sections = apply_overrides(load_yaml(params_path), sets)
        sections[name] = to_plain(params)
        preflight(Path.cwd(), name, sections)
    device = resolve_device(base.device)
    if base.threads:
        import torch

        torch.set_num_threads(base.threads)
    log = logging.getLogger(f"ctxrepro.stage.{name}")
    root = Path.cwd()
    spec = stage_spec(root, name)
    record = code_provenance(root, spec_paths(spec.get("deps")))
    log.info("stage %s, %s, python %s", name, describe_code(record), sys.version.split()[0])
    log.info("device: %s", describe_device(device))
    resolved = {"base": to_plain(base), name: to_plain(params)}
    log.info("resolved params:\n%s", yaml.safe_dump(resolved, sort_keys=False).rstrip())
    if shard_t != (0, 1):
        log.info("shard %d of %d", *shard_t)
    # A second's margin: file times come from a coarser clock than time.time().
    started = time.time() - 1.0
    module.run(params, StageContext(base=base, device=device, log=log, shard=shard_t, root=root,
                                    params_path=Path(params_path)))
    stamp_metrics(root, spec, started, record)


def resolve_params(params_path: Path) -> dict:
    """Every section of a params file parsed by its stage (defaults filled, values and the keys one section
    takes from another checked, as `load_params` checks them for one stage), as plain data."""
    data = load_yaml(params_path)
    resolved = {"base": to_plain(parse_dataclass(BaseParams, data.get("base", {}), "base"))}
    for name in available_stages():
        if name not in data:
            raise ParamsError(f"params file {params_path} has no section '{name}'")
        section = parse_dataclass(importlib.import_module(f"stages.{name}").Params, data[name], name)
        check_references(section, data, name)
        resolved[name] = to_plain(section)
    return resolved
