"""Byte-reproducible archive writing: tar, zip and gzip with fixed times and owners, written atomically.

The same seed must give byte-identical archives (so DVC caches and MD5SUMS are stable), so every
timestamp, owner and mode that the formats record is fixed here.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

from ctxrepro.data.registry import hash_file

# 2007-11-06 00:00:00 UTC, the VOC2007 release day: every member's mtime.
MTIME = 1194307200
ZIP_DATE = (2007, 11, 6, 0, 0, 0)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place on success, delete it on error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class TarWriter:
    """A tar being written member by member with fixed metadata (GNU format, root:root, fixed mtime)."""

    def __init__(self, fileobj) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)
        self._dirs: set[str] = set()

    def _info(self, name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = kind, mode, size, MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    def add_dirs(self, name: str) -> None:
        """Directory entries for every parent of `name` not written yet, outermost first (as tar -c does)."""
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self._dirs:
                self._dirs.add(d)
                self._tar.addfile(self._info(d + "/", tarfile.DIRTYPE, 0o755))

    def add_bytes(self, name: str, data: bytes, dirs: bool = True) -> None:
        if dirs:
            self.add_dirs(name)
        self._tar.addfile(self._info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


@contextlib.contextmanager
def tar_file(path: Path) -> Iterator[TarWriter]:
    """Write a tar at `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = TarWriter(f)
        yield writer
        writer.close()


def tar_bytes(members: list) -> bytes:
    """An in-memory tar of (name, bytes) pairs without directory entries (the ImageNet per-class tars)."""
    buf = io.BytesIO()
    writer = TarWriter(buf)
    for name, data in members:
        writer.add_bytes(name, data, dirs=False)
    writer.close()
    return buf.getvalue()


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    """gzip with mtime 0 and no file name in the header, so equal input gives equal output."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=level) as gz:
        gz.write(data)
    return buf.getvalue()


def write_zip(path: Path, members: list) -> None:
    """A zip of (name, bytes, compress) members with fixed dates; names ending in '/' are directories."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name, data, compress in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.create_system = 3  # unix, whatever the host
            if name.endswith("/"):
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b"")
                continue
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            zf.writestr(info, data)


def md5_file(path: Path) -> str:
    """The md5 the fetch code will check this file against (MD5SUMS)."""
    return hash_file(path, ("md5",))[1]["md5"]
