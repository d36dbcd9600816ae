"""Resumable training state: atomic checkpoints holding everything a bit-identical resume needs (issue 5).

A checkpoint holds the model, the optimizer, the AMP grad scaler (if any), every RNG state (torch, CUDA,
numpy, Python), the data sampler's position (the next step: batches are a pure function of seed and
step, see `pretext.data`), the step, the log history and the resolved training config. It is written
to a temporary file beside its path and renamed into place, so a run killed at any moment (SIGKILL
included) leaves either the previous checkpoint or the new one, never a torn file.

Kept states (`ctxrepro.states`): a stage keeps one state folder per configuration of the keys that change
the maths, `<folder>/<config hash>/` holding `last.pt`, the one before it (`prev.pt`) and `last.json` (its
config and position, for listing). A changed param opens another folder and never overwrites a state; old
ones go only by `ctxrepro states --remove`. Every state is checked before it is trusted (readable as
plain tensors, the expected format and position, every tensor finite): a bad one is set aside as
`last.pt.<why>-<time>` with one log line, and the run resumes from `prev.pt` or starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ctxrepro.io import atomic_write, remove_stale_temps, temp_prefix

# Config keys that may change between a checkpoint and its resume: they set the budget, the logging
# and the speed of a run, not its trajectory (compile and channels_last change kernels, not the maths;
# decode says where JPEGs are decoded, not what is trained on).
RESUMABLE_KEYS = frozenset({"steps", "iterations", "max_seconds", "checkpoint_every", "log_every", "workers",
                            "heldout_images", "compile", "channels_last", "decode"})

STATE_FORMAT = 1  # written into every state; `check_state` refuses another


def prev_path(path: Path) -> Path:
    """Where the state before `path` is kept: `prev.pt` beside `last.pt`, else `<stem>.prev<suffix>`."""
    return path.with_name("prev.pt" if path.name == "last.pt" else f"{path.stem}.prev{path.suffix}")


def info_path(path: Path) -> Path:
    """`path`'s config and position as JSON (`last.json`), for listing states without loading their tensors."""
    return path.with_name(f"{path.stem}.json")


class CheckpointMismatch(ValueError):
    """A checkpoint whose training config differs from the run that wants to resume it."""


class NonFiniteState(ValueError):
    """A state about to be saved holds NaN or inf: saving it would make a poisoned "last good" checkpoint."""


def first_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in `tree` (nested dicts, lists) holding NaN or inf."""
    if isinstance(tree, torch.Tensor):
        return prefix if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in `path`'s directory, fsync, then os.replace.

    Refuses (NonFiniteState, naming the key) a state whose parameters, buffers or optimizer moments hold
    NaN or inf: a finite loss does not prove the update after it was finite (a huge lr can overflow a
    batch-norm running_var), and a resume from such a checkpoint goes straight to NaN.
    """
    bad = first_nonfinite(obj)
    if bad is not None:
        raise NonFiniteState(f"{bad} holds NaN or inf: not saved to {path}, which keeps its last good state")
    atomic_write(path, lambda f: torch.save(obj, f))


def capture_rng() -> dict[str, Any]:
    """Every global RNG state of this process, as tensors and plain values (loadable weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none. Only plain tensors and containers are unpickled
    (weights_only): a file that needs more, a torn or an empty one raises ValueError naming it and why."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for hostile or torn bytes; never unpickle unsafely
        raise ValueError(f"checkpoint {path} cannot be read ({unreadable_reason(path, e)}); "
                         f"delete it to start afresh") from None


def unreadable_reason(path: Path, error: BaseException) -> str:
    """Why torch.load failed, in a few words (never torch's advice to load with weights_only=False)."""
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            return "an empty file"
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, OSError) and "weights_only" not in first and first:  # the file itself cannot be read
        return f"{type(error).__name__}: {first[:160]}"
    # Anything else is the unpickler failing on bytes that are no plain-tensor checkpoint (UnpicklingError,
    # but also IndexError, KeyError, ... on random bytes): one reason, never torch's advice.
    return f"not a checkpoint of plain tensors ({type(error).__name__})"


def check_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise when anything but the budget/logging keys differs (names every difference)."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_KEYS)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {current.get(k)!r}" for k in keys
             if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointMismatch(f"checkpoint {path} was trained with other params ({'; '.join(diffs)}); "
                                 f"its state is not resumed")


def assert_finite_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Raise FloatingPointError naming the first non-finite parameter, buffer or optimizer state tensor:
    a checkpoint must never hold a state that cannot be resumed."""
    named = [(f"model {k}", v) for k, v in model.state_dict().items()]
    named += [(f"optimizer state {i}.{k}", v) for i, st in optimizer.state_dict()["state"].items()
              for k, v in st.items()]
    for name, value in named:
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            raise FloatingPointError(f"{where}: {name} holds non-finite values; the checkpoint is not written "
                                     f"(the last good one is kept): lower the learning rate")


def digest(arrays: Iterable[Any]) -> str:
    """A BLAKE2b hex digest of arrays' dtypes, shapes and bytes: the identity of a run's starting weights and
    training data, stored with its checkpoints. Arrays are tensors, numpy arrays or anything with `shape`,
    `dtype` and row slicing (a file of rows); they are read in chunks of rows, so files stay on disk."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = a.detach().cpu().numpy() if torch.is_tensor(a) else a if hasattr(a, "shape") else np.asarray(a)
        h.update(f"{np.dtype(a.dtype).str}{tuple(a.shape)};".encode())
        if len(a.shape) == 0:
            h.update(np.ascontiguousarray(a).data)
            continue
        row = np.dtype(a.dtype).itemsize * int(np.prod(a.shape[1:]))
        step = max(1, (64 << 20) // max(row, 1))
        for lo in range(0, a.shape[0], step):
            h.update(np.ascontiguousarray(a[lo:lo + step]).data)
    return h.hexdigest()


def resumable(path: Path, record: dict[str, Any], position: str, budget: int,
              log: logging.Logger) -> dict[str, Any] | None:
    """The checked checkpoint at `path` (or its `prev.pt`, `load_verified`) when it belongs to this run, else
    None: none there, another record (the differences are logged as a warning: this single file is overwritten
    at the run's first checkpoint; `ctxrepro.states.folders.resume_state` keeps one state per config instead),
    or a `position` (step, iteration) beyond this run's `budget`."""
    ckpt = load_verified(path, position, log)
    if ckpt is None:
        log.info("no checkpoint at %s: starting at %s 0", path, position)
        return None
    try:
        check_config(ckpt["config"], record, path)
        if ckpt[position] > budget:
            raise CheckpointMismatch(f"checkpoint {path} is at {position} {ckpt[position]}, beyond this run's {budget}")
    except CheckpointMismatch as e:
        log.warning("%s: starting afresh at %s 0", e, position)
        return None
    log.info("resuming from %s at %s %d", path, position, ckpt[position])
    return ckpt


class BadState(ValueError):
    """A state file that must not be trusted; `why` is one word for the name it is set aside under."""

    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why


def check_state(path: Path, position: str, accept: Callable[[dict[str, Any]], str | None] | None = None
                ) -> dict[str, Any]:
    """The state at `path` after every check a resume relies on: it unpickles as plain tensors (weights_only),
    holds a config mapping and a non-negative integer `position` (its format's keys), and every floating-point
    tensor in it (weights, optimizer moments, buffers) is finite; `accept(state)`, when given, returns what else
    is wrong with it (its config) or None. Raises BadState saying what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle safely: torn, empty, hostile or foreign bytes
        raise BadState("unreadable", f"unreadable, {unreadable_reason(path, e)}") from None
    if not isinstance(ckpt, dict):
        raise BadState("format", f"holds a {type(ckpt).__name__}, not a state dict")
    missing = sorted({"config", position} - set(ckpt))
    if missing:
        raise BadState("format", f"lacks {', '.join(missing)}")
    if ckpt.get("format", STATE_FORMAT) != STATE_FORMAT:
        raise BadState("format", f"has format {ckpt['format']!r}, this code reads {STATE_FORMAT}")
    step = ckpt[position]
    if not isinstance(ckpt["config"], dict) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise BadState("format", f"has no config mapping or a bad {position} {step!r}")
    bad = first_nonfinite(ckpt)
    if bad is not None:
        raise BadState("nonfinite", f"{bad} holds NaN or inf")
    problem = accept(ckpt) if accept is not None else None
    if problem is not None:
        raise BadState("config", problem)
    return ckpt


def set_aside(path: Path, why: str) -> Path:
    """Rename a bad state to `<name>.<why>-<UTC time>` beside it (kept for inspection, never loaded again)."""
    aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    os.replace(path, aside)
    return aside


def load_verified(path: Path, position: str, log: logging.Logger,
                  accept: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any] | None:
    """The state at `path`, else the previous one beside it (`prev.pt`), each checked by `check_state`; None
    when neither is there or both are bad. A bad one is set aside and reported in one warning line: the path,
    what is wrong, and what happens next."""
    candidates = [p for p in (path, prev_path(path)) if p.is_file()]
    for i, candidate in enumerate(candidates):
        try:
            ckpt = check_state(candidate, position, accept)
        except BadState as e:
            try:
                aside = set_aside(candidate, e.why)
            except OSError as moved:
                raise ValueError(f"state {candidate} {e}, and it cannot be set aside ({moved.strerror}): "
                                 f"move it away to go on") from None
            later = candidates[i + 1:]
            then = f"resuming from {later[0].name}" if later else "starting afresh"
            log.warning("state %s %s: set aside as %s; %s", candidate, e, aside.name, then)
            continue
        if candidate != path:
            log.info("state %s: using the previous good state %s (%s %d)", path, candidate.name, position,
                     ckpt[position])
        return ckpt
    return None


def write_state(state: dict[str, Any], path: Path, final: bool = False) -> None:
    """Atomically write a checked-finite state to `path` (NonFiniteState otherwise), keeping the one it replaces
    as `prev.pt` (a hard link, so `path` is never absent), and its config and position in `last.json` (for
    `ctxrepro states`). A `final` state (the end of the run's budget) drops `prev.pt`: the run is done, and a
    finished state costs its size once, not twice."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise NonFiniteState(f"{bad} holds NaN or inf: not saved to {path}, which keeps its last good state")
    previous = prev_path(path)
    for name in (path.name, previous.name):  # temp files a killed writer left (a VGG-16 state is 1.1 GB)
        remove_stale_temps(path.parent, name)
    if path.is_file() and not final:
        link = path.with_name(f"{temp_prefix(previous.name)}link.tmp")
        try:
            os.link(path, link)
            os.replace(link, previous)
        except OSError:  # no hard links here: the previous state moves, and `load_verified` finds it as prev.pt
            with contextlib.suppress(OSError):
                link.unlink()
            os.replace(path, previous)
    atomic_write(path, lambda f: torch.save({**state, "format": STATE_FORMAT}, f))
    write_info(state, path)
    if final:
        previous.unlink(missing_ok=True)


def write_info(state: dict[str, Any], path: Path) -> None:
    """`info_path(path)`: the state's config, position name and value, and when it was written."""
    position = next((k for k in ("step", "iteration", "epoch") if k in state), None)
    info = {"format": STATE_FORMAT, "config": state.get("config"), "position": position,
            "at": state.get(position), "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(info_path(path), lambda f: f.write(json.dumps(info, sort_keys=True, default=repr).encode()))


def restore_state(ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_state` checkpoint's model, optimizer and global RNG states."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt["rng"])


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str, *,
               final: bool = False, **extra: Any) -> None:
    """Atomically checkpoint a verified-finite model and optimizer, every global RNG state and `extra` (keeping
    the state it replaces as prev.pt until the `final` one, `write_state`)."""
    assert_finite_state(model, optimizer, where)
    write_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng(), **extra},
                path, final)
