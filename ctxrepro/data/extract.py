"""Safe extraction of the data sets' tar, tar.gz and zip archives (docs/DATA.md "Archives").

Every member is checked before anything is written: absolute paths, `..` components, over-long names,
names seen before in the archive, links that leave the target (or pass through another link), device
files and fifos are refused with an error naming the member and the archive. Tars are read in stream
mode (one sequential pass, so the same pass can hash the file) and each member is then extracted with
Python's `tarfile.data_filter` as a second line of defence. The caller extracts into a temporary folder
and renames it, so a refusal leaves nothing behind.

A tar must end with its two zero end-of-archive blocks: Python's stream mode would otherwise take a file
cut at a member boundary (or garbage at a header) as a normal end. Every read error (truncation, bad
compression, garbage) becomes one `BrokenArchiveError` naming the archive and the member being read.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ctxrepro.data.registry import HashingReader, hash_file

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# tarfile's stream mode reads 10 KiB at a time by default; 1 MiB reads cut the per-call overhead of
# reading and hashing (a 425 MiB tar of tars: 2.4 s CPU instead of 3.2 s on the 2-core dev machine).
STREAM_BUFSIZE = 1 << 20
# Linux's limits (ext4, xfs, btrfs, tmpfs): longer names fail with ENAMETOOLONG halfway through extraction.
NAME_MAX, PATH_MAX = 255, 4096


class ArchiveError(ValueError):
    """An archive that cannot be placed; `archive`, `member` (None: before the first) and `reason`."""

    def __init__(self, message: str, archive: str, member: str | None, reason: str):
        super().__init__(message)
        self.archive, self.member, self.reason = archive, member, reason


class UnsafeArchiveError(ArchiveError):
    """An archive member that would write outside the target or create a special file."""

    def __init__(self, archive: str, member: str, reason: str):
        super().__init__(f"refusing member {member!r} of {archive}: {reason}", archive, member, reason)


class BrokenArchiveError(ArchiveError):
    """An archive that is truncated, corrupt or not an archive at all."""

    def __init__(self, archive: str, member: str | None, reason: str):
        at = f"at member {member!r}" if member else "at its start"
        super().__init__(f"cannot read {archive} {at}: {reason}", archive, member, reason)


# What reading a damaged tar or zip raises (writes are not among them: a full disk is an OSError).
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, zipfile.BadZipFile)


class Reading:
    """A context that turns READ_ERRORS into one BrokenArchiveError naming `label` and the current `member`."""

    def __init__(self, label: str, member: str | None = None):
        self.label, self.member = label, member

    def __enter__(self) -> "Reading":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if isinstance(err, READ_ERRORS):
            reason = " ".join(str(err).split()) or kind.__name__
            raise BrokenArchiveError(self.label, self.member, f"{reason} (truncated or corrupt?)") from err
        return False


class _EndInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # an all-zero header block: the first end-of-archive block
            tf.end_block_seen = True
            raise


class CheckedTar(tarfile.TarFile):
    """A TarFile that notes whether its members ended at a zero block (see `require_end`)."""

    tarinfo = _EndInfo
    end_block_seen = False


def open_stream(fileobj, mode: str = "r|*") -> CheckedTar:
    return CheckedTar.open(fileobj=fileobj, mode=mode, bufsize=STREAM_BUFSIZE)


def require_end(tf: CheckedTar, label: str, last: str | None) -> None:
    """Refuse a tar whose members stopped without the two zero end-of-archive blocks (call after iterating)."""
    if not (tf.end_block_seen and tf.fileobj.read(tarfile.BLOCKSIZE) == tarfile.NUL * tarfile.BLOCKSIZE):
        raise BrokenArchiveError(label, last, "the archive ends without its end-of-archive blocks (truncated?)")


@dataclass
class Tally:
    """What an extraction wrote: regular files, their bytes, and how many are images (by suffix)."""

    files: int = 0
    bytes: int = 0
    images: int = 0

    def add(self, name: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        self.images += name.lower().endswith(IMAGE_SUFFIXES)

    def merge(self, other: "Tally") -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.images += other.images


@dataclass
class Extracted:
    """An extraction's tally plus the archive's own size and digests (for verification by the caller)."""

    tally: Tally
    size: int
    digests: dict[str, str] = field(default_factory=dict)


def archive_kind(path: Path) -> str:
    """'tar' or 'zip', from the file name (every registered archive is named by its format)."""
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    raise ValueError(f"{path}: not a known archive type (expected one of {', '.join(TAR_SUFFIXES)}, .zip)")


def overlong(name: str) -> str | None:
    """Why `name` is too long to create on common file systems (a component over NAME_MAX bytes, the whole
    over PATH_MAX), or None."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > PATH_MAX:
        return f"the name is {size} bytes long (at most {PATH_MAX})"
    longest = max((len(p.encode("utf-8", "surrogateescape")) for p in re.split(r"[\\/]", name)), default=0)
    if longest > NAME_MAX:
        return f"a path component is {longest} bytes long (at most {NAME_MAX})"
    return None


def member_parts(name: str, archive: str) -> tuple[str, ...]:
    """A member name as path components, refusing absolute paths, `..` and over-long names (leading `./` is
    dropped)."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(archive, name, "absolute path")
    too_long = overlong(name)
    if too_long is not None:
        raise UnsafeArchiveError(archive, name, too_long)
    parts = tuple(p for p in re.split(r"[\\/]", name) if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "'..' in the path escapes the target")
    return parts


class _Guard:
    """Tracks what was extracted so far, to refuse writes through links and links that escape."""

    def __init__(self, archive: str):
        self.archive = archive
        self.kinds: dict[tuple[str, ...], str] = {}  # path -> "dir" | "file" | "symlink"

    def path(self, name: str, kind: str) -> tuple[str, ...]:
        parts = member_parts(name, self.archive)
        for i in range(1, len(parts)):
            if self.kinds.get(parts[:i]) == "symlink":
                raise UnsafeArchiveError(self.archive, name, f"writes through the symlink {'/'.join(parts[:i])}")
        previous = self.kinds.get(parts)
        # A name twice is refused, never "the last copy wins" (tar's append-an-update habit): the published
        # archives hold each name once, so a second copy means the file is not what it claims to be. Only a
        # folder may be named again (its entry after files inside it, or twice).
        if previous is not None and not (previous == kind == "dir"):
            raise UnsafeArchiveError(self.archive, name, f"the same name twice (an earlier {previous}): "
                                                         "duplicate members are refused")
        return parts

    def symlink(self, name: str, target: str) -> tuple[str, ...]:
        """Allow a relative target that climbs only through real directories, then stays inside."""
        parts = self.path(name, "symlink")
        if target.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", target):
            raise UnsafeArchiveError(self.archive, name, f"symlink to the absolute path {target!r}")
        stack = list(parts[:-1])
        descended = False
        for comp in re.split(r"[\\/]", target):
            if comp in ("", "."):
                continue
            if comp == "..":
                # '..' after a name could climb out of whatever that name links to: refuse it.
                if descended or not stack:
                    raise UnsafeArchiveError(self.archive, name,
                                             f"symlink target {target!r} leaves the target or climbs through a link")
                stack.pop()
            else:
                descended = True
                stack.append(comp)
        self.kinds[parts] = "symlink"
        return parts

    def hardlink(self, name: str, target: str) -> tuple[str, ...]:
        parts = self.path(name, "file")
        try:
            target_parts = member_parts(target, self.archive)
        except UnsafeArchiveError as e:
            raise UnsafeArchiveError(self.archive, name, f"hard link to {target!r}: {e.reason}") from None
        if self.kinds.get(target_parts) != "file":
            raise UnsafeArchiveError(self.archive, name,
                                     f"hard link to {target!r}, which is not an earlier regular file of the archive")
        self.kinds[parts] = "file"
        return parts

    def mark(self, parts: tuple[str, ...], kind: str) -> None:
        for i in range(1, len(parts)):
            self.kinds.setdefault(parts[:i], "dir")
        self.kinds[parts] = kind


def _check_tar_member(guard: _Guard, m: tarfile.TarInfo) -> tuple[str, ...]:
    if m.ischr() or m.isblk():
        raise UnsafeArchiveError(guard.archive, m.name, "device file")
    if m.isfifo():
        raise UnsafeArchiveError(guard.archive, m.name, "fifo")
    if m.issym():
        return guard.symlink(m.name, m.linkname)
    if m.islnk():
        return guard.hardlink(m.name, m.linkname)
    if m.isdir():
        return guard.path(m.name, "dir")
    if m.isreg():
        return guard.path(m.name, "file")
    raise UnsafeArchiveError(guard.archive, m.name, f"unsupported member type {m.type!r}")


def extract_tar_stream(fileobj, dest: Path, *, label: str, tally: Tally | None = None) -> Tally:
    """Extract a tar (any compression) read sequentially from `fileobj` into `dest`, member by member."""
    tally = tally if tally is not None else Tally()
    guard = _Guard(label)
    dest.mkdir(parents=True, exist_ok=True)
    with Reading(label) as at, open_stream(fileobj) as tf:
        for m in tf:
            at.member = m.name
            parts = _check_tar_member(guard, m)
            if not parts:
                continue  # the archive's root folder ("./") is `dest` itself
            try:
                tf.extract(m, dest, filter="data")
            except tarfile.FilterError as e:
                raise UnsafeArchiveError(label, m.name, str(e)) from e
            kind = "dir" if m.isdir() else "symlink" if m.issym() else "file"
            guard.mark(parts, kind)
            if kind == "file":
                tally.add(m.name, m.size if m.isreg() else (dest.joinpath(*parts)).stat().st_size)
        require_end(tf, label, at.member)
    return tally


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16  # unix mode bits, when the zip was made on unix
    if info.is_dir():
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "fifo"
    return "file"


def extract_zip(path: Path, dest: Path, *, label: str | None = None, tally: Tally | None = None) -> Tally:
    """Extract a zip into `dest` with the same refusals as tars (zipfile itself would silently rename)."""
    label = label or path.name
    tally = tally if tally is not None else Tally()
    guard = _Guard(label)
    dest.mkdir(parents=True, exist_ok=True)
    with Reading(label) as at, zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            at.member = info.filename
            kind = _zip_kind(info)
            if kind in ("device file", "fifo"):
                raise UnsafeArchiveError(label, info.filename, kind)
            if kind == "symlink":
                parts = guard.symlink(info.filename, zf.read(info).decode("utf-8"))
            else:
                parts = guard.path(info.filename, kind)
            if not parts:
                continue
            target = dest.joinpath(*parts)
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif kind == "symlink":
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(zf.read(info).decode("utf-8"), target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                tally.add(info.filename, info.file_size)
            guard.mark(parts, kind)
    return tally


def extract_archive(path: Path, dest: Path, *, algos: tuple[str, ...] = ()) -> Extracted:
    """Extract `path` (tar, tar.gz/tgz or zip) into `dest`; return the tally and the file's digests.

    Tars are hashed in the same sequential pass that extracts them; zips need random access, so they are
    hashed in a separate pass first.
    """
    path = Path(path)
    if archive_kind(path) == "zip":
        size, digests = hash_file(path, algos) if algos else (path.stat().st_size, {})
        return Extracted(extract_zip(path, dest), size, digests)
    with open(path, "rb") as f:
        reader = HashingReader(f, algos)
        tally = extract_tar_stream(reader, dest, label=path.name)
        reader.drain()
    return Extracted(tally, reader.size, reader.digests())
