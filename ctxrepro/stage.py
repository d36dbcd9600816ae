"""Running one DVC stage: parse its params section, log provenance, call its `run(params, ctx)`.

A stage module is `stages/<name>.py` with a docstring (its one-line help), a frozen `Params` dataclass and
`run(params, ctx)`. This module is the only place that connects params.yaml to stage code.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ctxrepro.config import BaseParams, ParamsError, load_params, resolve_device, to_plain
from ctxrepro.container import run_stage_in_container

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


def git_commit(root: Path) -> str:
    """HEAD's sha, with '-dirty' when tracked files differ; 'unknown' outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def run_stage(name: str, params_path: Path, sets: list[str], shard: str = "0/1") -> None:
    """Parse, validate and log everything before the stage writes anything, then run it."""
    if name not in STAGE_ORDER or importlib.util.find_spec(f"stages.{name}") is None:
        raise ParamsError(f"unknown stage '{name}'; available: {', '.join(available_stages())}")
    module = importlib.import_module(f"stages.{name}")
    base, params = load_params(params_path, name, module.Params, sets)
    shard_t = parse_shard(shard)
    if base.runtime == "docker":
        # Before resolve_device: a CPU-only host must still be able to hand a cuda run to the container.
        run_stage_in_container(Path.cwd(), name, params_path, list(sets), shard,
                               gpus=False if base.device == "cpu" else None)
        return
    device = resolve_device(base.device)
    if base.threads:
        import torch

        torch.set_num_threads(base.threads)
    log = logging.getLogger(f"ctxrepro.stage.{name}")
    root = Path.cwd()
    log.info("stage %s, commit %s, python %s", name, git_commit(root), sys.version.split()[0])
    log.info("device: %s", describe_device(device))
    resolved = {"base": to_plain(base), name: to_plain(params)}
    log.info("resolved params:\n%s", yaml.safe_dump(resolved, sort_keys=False).rstrip())
    if shard_t != (0, 1):
        log.info("shard %d of %d", *shard_t)
    module.run(params, StageContext(base=base, device=device, log=log, shard=shard_t, root=root,
                                    params_path=Path(params_path)))
