"""Resumable training state: atomic checkpoints holding everything a bit-identical resume needs (issue 5).

A checkpoint holds the model, the optimizer, the AMP grad scaler (if any), every RNG state (torch, CUDA,
numpy, Python), the data sampler's position (the next step: batches are a pure function of seed and
step, see `pretext.data`), the step, the log history and the resolved training config. It is written
to a temporary file beside its path and renamed into place, so a run killed at any moment (SIGKILL
included) leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctxrepro.io import atomic_write

# Config keys that may change between a checkpoint and its resume: they set the budget, the logging
# and the speed of a run, not its trajectory (compile changes kernels, not the maths).
RESUMABLE_KEYS = frozenset({"steps", "max_seconds", "checkpoint_every", "log_every", "workers",
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
