"""One resume state per configuration: `<folder>/<config hash>/last.pt` (issue 22).

A stage instance (a pretrain variant, a detect row, a normals init) keeps its resume states under one folder,
a DVC `persist: true` out. Inside it, each configuration of the keys that change the maths gets its own
folder, named by a hash of the run's record without the keys that do not (`checkpoint.RESUMABLE_KEYS`: step
budgets, logging and checkpoint frequency, workers, where decoding runs, compile). A run with changed params
therefore opens another folder and leaves every kept state as it was: going back to the old params resumes
where that run stopped. A changed budget or worker count resumes the same state. States are removed only by
`ctxrepro states --remove` (`states.listing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ctxrepro.checkpoint import (RESUMABLE_KEYS, CheckpointMismatch, info_path, load_verified, prev_path, resumable,
                                 write_info)

LAST = "last.pt"
HASH_CHARS = 12


def _plain(value: Any) -> Any:
    """`value` as JSON-comparable data: tuples as lists, integral floats as ints (YAML's 1 and 1.0 agree)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_hash(record: dict[str, Any], resumable_keys: frozenset[str] = RESUMABLE_KEYS) -> str:
    """The name of `record`'s state folder: a hash of every key but `resumable_keys`."""
    maths = {k: v for k, v in record.items() if k not in resumable_keys}
    text = json.dumps(_plain(maths), sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=HASH_CHARS // 2).hexdigest()


def differences(saved: dict[str, Any], current: dict[str, Any], resumable_keys: frozenset[str] = RESUMABLE_KEYS,
                only_current: bool = False) -> list[str]:
    """`key: saved -> current` for every maths key that differs (`only_current`: only keys `current` has)."""
    keys = set(current) if only_current else set(saved) | set(current)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(keys - resumable_keys)
            if _plain(saved.get(k)) != _plain(current.get(k))]


def read_info(path: Path) -> dict[str, Any] | None:
    """The `last.json` beside a state (config, position, step), or None when absent or unreadable."""
    try:
        info = json.loads(info_path(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def kept_folders(folder: Path) -> list[Path]:
    """The configuration folders under `folder` that hold a state."""
    if not folder.is_dir():
        return []
    return [d for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.startswith(".") and ((d / LAST).is_file() or prev_path(d / LAST).is_file())]


def adopt_legacy(folder: Path, position: str, log: logging.Logger,
                 resumable_keys: frozenset[str] = RESUMABLE_KEYS) -> None:
    """Move a state of the single-file layout (`<folder>/last.pt`) into its configuration's folder."""
    old = folder / LAST
    if not old.is_file():
        return
    ckpt = load_verified(old, position, log)  # a bad one is set aside (and reported) here
    if ckpt is None:
        return
    target = folder / config_hash(ckpt["config"], resumable_keys)
    if (target / LAST).exists():
        log.warning("state %s: its configuration's folder %s already holds a state; left where it is", old, target)
        return
    target.mkdir(parents=True, exist_ok=True)
    os.replace(old, target / LAST)
    write_info(ckpt, target / LAST)
    log.info("state %s moved into its configuration's folder %s", old, target)


def state_path(folder: Path, record: dict[str, Any], log: logging.Logger, position: str = "step",
               resumable_keys: frozenset[str] = RESUMABLE_KEYS, announce: bool = True) -> Path:
    """`<folder>/<config hash of record>/last.pt`; with `announce` (one process of a job), first move a legacy
    `<folder>/last.pt` into its folder and log, for every other kept state, the keys in which it differs."""
    folder = Path(folder)
    path = folder / config_hash(record, resumable_keys) / LAST
    if not announce:
        return path
    adopt_legacy(folder, position, log, resumable_keys)
    for kept in kept_folders(folder):
        if kept == path.parent:
            continue
        info = read_info(kept / LAST) or {}
        if not isinstance(info.get("config"), dict):
            log.info("kept state %s is not resumed: its last.json is missing", kept)
            continue
        diffs = differences(info["config"], record, resumable_keys)
        if not diffs and not path.parent.exists():  # the same maths under an older hash (other resumable keys)
            os.replace(kept, path.parent)
            log.info("kept state %s renamed %s: its config hashes so now", kept, path.parent.name)
            continue
        log.info("kept state %s (%s %s) is not resumed: it differs in %s", kept, info.get("position"), info.get("at"),
                 "; ".join(diffs) or "no maths key (an older copy of this configuration)")
    return path


def find_state(state: Path, record: dict[str, Any], position: str, log: logging.Logger,
               resumable_keys: frozenset[str] = RESUMABLE_KEYS, announce: bool = True, budget: int | None = None
               ) -> tuple[Path, dict[str, Any] | None]:
    """Where a run with `record` checkpoints, and the checked state there (None: none, or all bad).

    `state` is the instance's folder: the run's state is `<state>/<config hash>/last.pt`, else the `prev.pt`
    beside it when the last is bad (`checkpoint.load_verified`); every other configuration's state is left
    alone. A state beyond `budget` is an error naming it (CheckpointMismatch), never a silent restart. A
    `state` naming a `.pt` file is that single file, whatever config it holds (the caller compares configs).
    """
    state = Path(state)
    if state.suffix == ".pt":
        return state, load_verified(state, position, log)
    path = state_path(state, record, log, position, resumable_keys, announce)

    def belongs(ckpt: dict[str, Any]) -> str | None:
        found = config_hash(ckpt["config"], resumable_keys)
        return None if found == path.parent.name else f"has a config hashing to {found}, not its folder's"

    ckpt = load_verified(path, position, log, belongs)
    if ckpt is not None and budget is not None and ckpt[position] > budget:
        raise CheckpointMismatch(f"state {path} is at {position} {ckpt[position]}, beyond this run's {budget}: "
                                 f"raise the budget to resume it, or remove it with "
                                 f"`ctxrepro states --remove {path.parent.name}`")
    return path, ckpt


def resume_state(state: Path, record: dict[str, Any], position: str, budget: int, log: logging.Logger,
                 resumable_keys: frozenset[str] = RESUMABLE_KEYS) -> tuple[Path, dict[str, Any] | None]:
    """Where this run checkpoints, and the checked state it resumes (None: it starts at 0).

    `state` is the instance's folder (`find_state`): a changed param never touches another configuration's
    state, and a state beyond this run's `budget` is an error naming it. A `state` naming a `.pt` file keeps
    the single-file rules of `checkpoint.resumable` (another config starts afresh and overwrites it).
    """
    state = Path(state)
    if state.suffix == ".pt":
        return state, resumable(state, record, position, budget, log)
    path, ckpt = find_state(state, record, position, log, resumable_keys, budget=budget)
    if ckpt is None:
        log.info("no state for this configuration: starting at %s 0, checkpointing to %s", position, path)
        return path, None
    log.info("resuming state %s at %s %d", path, position, ckpt[position])
    return path, ckpt
