"""What DVC says about the checkout: which stage instances `dvc repro` would run and why, where its cache
lives and whether it copies files there, and the free disk under both."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

STATUS_TIMEOUT = 120.0  # seconds; `dvc status` hashes changed deps, which is quick unless data changed a lot
DEFAULT_CACHE_TYPE = "reflink,copy"  # DVC's default


def _flatten(entry, prefix: str = "") -> list[str]:
    """DVC's nested status entry ({"changed deps": {"params.yaml": {"pretrain.lr": "modified"}}}) as lines."""
    if isinstance(entry, str):
        return [f"{prefix}{entry}" if prefix else entry]
    lines = []
    for key, value in entry.items():
        if isinstance(value, dict):
            lines += _flatten(value, f"{prefix}{key}: ")
        else:
            lines.append(f"{prefix}{key}: {value}")
    return lines


def dvc_status(root: Path, timeout: float = STATUS_TIMEOUT) -> tuple[dict[str, list[str]] | None, str]:
    """({instance: reasons} of the stale instances, "") from `dvc status --json`, or (None, why it failed)."""
    try:
        done = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"dvc status did not answer ({e})"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return None, f"dvc status failed: {lines[-1] if lines else 'exit ' + str(done.returncode)}"
    try:
        raw = json.loads(done.stdout or "{}")
    except ValueError:
        return None, f"dvc status printed no JSON: {done.stdout[:200]!r}"
    stale = {}
    for name, entries in raw.items():
        stage = name.rsplit(":", 1)[-1]  # "dvc.yaml:stage" outside the root folder
        stale[stage] = [line for e in entries for line in _flatten(e)]
    return stale, ""


def _lock_paths(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """{instance: (deps, outs)} as dvc.lock records them (empty without a dvc.lock)."""
    path = root / "dvc.lock"
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {name: ([d["path"] for d in s.get("deps", [])], [o["path"] for o in s.get("outs", [])])
            for name, s in stages.items()}


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def would_run(root: Path, names: list[str], stale: dict[str, list[str]] | None,
              why_unknown: str) -> dict[str, list[str]]:
    """{instance: reasons} of what `dvc repro` would run: the stale instances, and those downstream of them
    (a dep that a rerun instance rewrites). Without a status, every instance, with the reason it is unknown."""
    if stale is None:
        return {n: [f"status unknown: {why_unknown}"] for n in names}
    runs = {n: list(stale[n]) for n in names if n in stale}
    graph = _lock_paths(root)
    changed = True
    while changed:
        changed = False
        for name in names:
            if name in runs or name not in graph:
                continue
            for upstream in list(runs):
                outs = graph.get(upstream, ([], []))[1]
                hit = next((d for d in graph[name][0] for o in outs if _overlaps(d, o)), None)
                if hit is not None:
                    runs[name] = [f"after {upstream} (dep {hit})"]
                    changed = True
                    break
    return {n: runs[n] for n in names if n in runs}


def _dvc_config(root: Path) -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    return config


def cache_setup(root: Path) -> tuple[Path, str, bool]:
    """(cache dir, cache.type, whether an output costs a second copy in the cache). reflink shares blocks only on
    copy-on-write file systems, so a list that can fall back to copy counts as copying (the safe side)."""
    config = _dvc_config(root)
    folder = Path(config.get("cache", "dir", fallback=".dvc/cache"))
    folder = folder if folder.is_absolute() else (root / ".dvc" / folder if config.has_option("cache", "dir")
                                                  else root / folder)
    kinds = config.get("cache", "type", fallback=DEFAULT_CACHE_TYPE)
    links = [k.strip() for k in kinds.split(",") if k.strip()]
    copies = not links or links[0] == "copy" or (links[0] == "reflink" and "copy" in links)
    return folder, kinds, copies


def existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (what disk_usage can stat before the folder exists)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing(path)).free


def same_device(a: Path, b: Path) -> bool:
    return os.stat(existing(a)).st_dev == os.stat(existing(b)).st_dev


def kept_states(root: Path) -> list[tuple[str, int]]:
    """(folder, bytes) of every kept resume state, one per stage instance and configuration, as `ctxrepro
    states` lists them (models/<stage>_state/<instance>/<config hash>/)."""
    from ctxrepro.states.listing import list_states

    found = []
    for row in list_states(root):
        found.append((os.path.relpath(row["path"], root), int(row["bytes"])))
    return found
