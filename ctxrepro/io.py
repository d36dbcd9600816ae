"""Atomic file output: a stage's outputs are complete or absent.

Temporary files and folders carry their owner's process id (`.<name>.<pid>.<random>.tmp`), so a later
run can remove what a killed one left (`remove_stale_temps`) without touching a live run's work. A failed
write is one OSError naming the final path (`write_error`), whatever library wrapped it; `error_line`
makes the one line the command line prints for it.
"""

from __future__ import annotations

import contextlib
import errno
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
    A write failure (full disk, permission, file size limit) is raised as one OSError naming `path`, also
    when the writer wrapped it in its own error (torch.save's "unexpected pos" RuntimeError). What a killed
    earlier run left beside `path` under its temporary name is removed first.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_once(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    except OSError as e:
        raise write_error(e, path) from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = os_error_in(e)
        if cause is not None and cause.filename in (None, tmp):  # our file's write, not another file's read
            raise write_error(cause, path) from e
        raise


_SWEPT: set[Path] = set()  # folders this process has cleaned of stale temporary files


def _sweep_once(folder: Path) -> None:
    """`remove_stale_temps` of every name in `folder`, once per process (a folder of a million images is
    scanned once, not once per image)."""
    key = folder.resolve()
    if key not in _SWEPT:
        remove_stale_temps(folder)
        _SWEPT.add(key)


def os_error_in(e: BaseException | None) -> OSError | None:
    """`e` itself if it is an OSError, else the first OSError it was raised from or while handling."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(e: OSError, path: Path | str) -> OSError:
    """An OSError like `e` (same errno, so same subclass) naming the output `path` it failed to write."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    return OSError(e.errno, f"cannot write: {reason}", str(path))


def error_line(e: BaseException) -> str | None:
    """One line for a read or write failure: for an OSError, or a RuntimeError raised from one (torch's
    serialization wraps them), the path, what the errno means and its symbol; for another error raised from
    an OSError, its own message (ours name the file and what to do); None when `e` holds no OSError."""
    cause = os_error_in(e)
    if cause is None:
        return None
    if not isinstance(e, (OSError, RuntimeError)):
        return " ".join(str(e).split()) or error_line(cause)
    reason = cause.strerror or str(cause) or type(cause).__name__
    symbol = errno.errorcode.get(cause.errno, "") if isinstance(cause.errno, int) else ""
    where = f"{cause.filename}: " if cause.filename is not None else ""
    return f"{where}{reason}" + (f" ({symbol})" if symbol else "")


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


def remove_stale_temps(folder: Path | str, name: str | None = None, log: logging.Logger | None = None) -> int:
    """Delete `folder/.<name>.<pid>.*.tmp` (files and folders; any name when `name` is None) left by
    processes that no longer exist; return how many.

    Only this naming pattern is touched, and never an entry of a live process (a reused pid merely keeps
    a stale entry for one more run).
    """
    stem = ".+" if name is None else re.escape(name)
    pattern = re.compile(rf"^\.{stem}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
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
