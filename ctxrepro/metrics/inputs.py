"""The one checked reader of the `ctxrepro eval` commands' input files.

Every input goes through here, so every way a file can be unusable is one `EvalInputError` line naming
the file (and the line, where there is one), which the commands turn into exit 2: a missing file, a
folder where a file belongs, a file that cannot be read (the errno's meaning), an empty file, bytes that
are not UTF-8, and `.npy` files that are empty, truncated, hold no element or need pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


class EvalInputError(ValueError):
    """An input file an evaluation cannot use; the message names the file (and line). Each evaluation
    raises its own subclass (the readers' `error` argument)."""


def read_bytes(path: Path | str, what: str, error: type[EvalInputError] = EvalInputError) -> bytes:
    """The bytes of the file `path` (`what` names its role, e.g. "results file")."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: {what} is a folder, expected a file")
    if not path.exists():
        raise error(f"{path}: {what} not found")
    try:
        return path.read_bytes()
    except OSError as e:
        raise error(f"{path}: {what} cannot be read: {e.strerror or e}") from e


def read_text(path: Path | str, what: str, error: type[EvalInputError] = EvalInputError, *,
              empty_ok: bool = False) -> str:
    """The UTF-8 text of `path`; bytes that are not UTF-8 name the line and byte offset where they start."""
    data = read_bytes(path, what, error)
    if not data and not empty_ok:
        raise error(f"{path}: {what} is empty (0 bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise error(f"{path} line {line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start})") from None


def read_json(path: Path | str, what: str, error: type[EvalInputError] = EvalInputError) -> Any:
    """Parsed JSON of `path` (standard JSON only: NaN and Infinity are refused)."""
    text = read_text(path, what, error)

    def refuse(constant: str) -> float:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise error(f"{path} line {e.lineno}: {what} is not valid JSON ({e.msg}, column {e.colno})") from e
    except ValueError as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from e


def load_npy(path: Path | str, what: str, error: type[EvalInputError] = EvalInputError) -> np.ndarray:
    """A `.npy` array, memory-mapped (read one image at a time later); its header is checked against the
    file's size before anything maps it, so a cut file is named as such."""
    path = Path(path)
    shape, dtype, offset = _header(path, what, error)
    count = math.prod(shape)
    if count == 0:
        raise error(f"{path}: {what} holds no element (shape {shape})")
    size = path.stat().st_size
    if offset + count * dtype.itemsize > size:
        raise error(f"{path}: {what} is truncated: its header promises {count * dtype.itemsize} bytes of "
                    f"{dtype} data {shape}, the file holds {size - offset}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise error(f"{path}: {what} cannot be read as a .npy array ({e})") from e


def _header(path: Path, what: str, error: type[EvalInputError]) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file, or EvalInputError saying why it is not one."""
    if path.is_dir():
        raise error(f"{path}: {what} is a folder, expected a .npy file")
    if not path.exists():
        raise error(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise error(f"{path}: {what} is empty (0 bytes), expected a .npy array")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")
            shape, _, dtype = readers[version](f)
            offset = f.tell()
    except OSError as e:
        raise error(f"{path}: {what} cannot be read: {e.strerror or e}") from e
    except (ValueError, EOFError) as e:
        raise error(f"{path}: {what} is not a NumPy .npy array file ({e})") from e
    if dtype.hasobject:
        raise error(f"{path}: {what} is an object array (it needs pickle, which is never loaded)")
    return shape, dtype, offset
