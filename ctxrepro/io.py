"""Atomic file output: a stage's outputs are complete or absent.

Temporary folders carry their owner's process id (`.<name>.<pid>.<random>.tmp`), so a later run can
remove what a killed one left (`remove_stale_temps`) without touching a live run's work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it into place.

    On any error the temporary file is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """JSON with sorted keys and a final newline, so `dvc metrics diff` and git diffs stay stable."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary names for `name` (see `remove_stale_temps`)."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: Path | str, name: str, log: logging.Logger | None = None) -> int:
    """Delete `folder/.<name>.<pid>.*.tmp` left by processes that no longer exist; return how many.

    Only this naming pattern is touched, and never an entry of a live process (a reused pid merely keeps
    a stale entry for one more run).
    """
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in sorted(folder.iterdir()):
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
        (log or logging.getLogger("ctxrepro.io")).warning("removed %s, left by a killed run (pid %s)", entry,
                                                          match.group(1))
    return removed


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` whole.

    On any error the temporary directory is removed and an existing `path` is left untouched. What a
    killed earlier run left beside `path` is removed first. When `path` is a symlink (data/raw on another
    disk), the link is kept and the directory it points to is replaced, beside its target.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp"))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists() or path.is_symlink():
        old = path.parent / f"{temp_prefix(path.name)}old.tmp"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
