"""Resumable training state: atomic checkpoints holding everything a bit-identical resume needs (issue 5).

A checkpoint holds the model, the optimizer, the AMP grad scaler (if any), every RNG state (torch, CUDA,
numpy, Python), the data sampler's position (the next step: batches are a pure function of seed and
step, see `pretext.data`), the step, the log history and the resolved training config. It is written
to a temporary file beside its path and renamed into place, so a run killed at any moment (SIGKILL
included) leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ctxrepro.io import atomic_write

# Config keys that may change between a checkpoint and its resume: they set the budget, the logging
# and the speed of a run, not its trajectory (compile changes kernels, not the maths).
RESUMABLE_KEYS = frozenset({"steps", "iterations", "max_seconds", "checkpoint_every", "log_every", "workers",
                            "heldout_images", "compile"})


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
    """The checkpoint at `path`, or None when there is none."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e}); delete it to start afresh") from e


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
    """The checkpoint at `path` when it belongs to this run, else None: none there, another record (the
    differences are logged as a warning: under `dvc repro` changed params mean a new run, whose first checkpoint
    overwrites the old state), or a `position` (step, iteration) beyond this run's `budget`."""
    ckpt = load_checkpoint(path)
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


def restore_state(ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a `save_state` checkpoint's model, optimizer and global RNG states."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    restore_rng(ckpt["rng"])


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str,
               **extra: Any) -> None:
    """Atomically checkpoint a verified-finite model and optimizer, every global RNG state and `extra`."""
    assert_finite_state(model, optimizer, where)
    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng(),
                       **extra}, path)
