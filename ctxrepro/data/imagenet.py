"""ILSVRC2012 in its published layout: the train tar of per-class tars, the flat val tar, and the
extracted tree `train/<wnid>/<wnid>_<k>.JPEG`, `val/ILSVRC2012_val_%08d.JPEG` (docs/DATA.md "Layouts").

The paper pretrains on the 1.3M train images without labels (section 3, "Implementation Details").
The 147 GB train tar is streamed: the outer tar is read sequentially and each class tar is opened as a
nested stream, so its images go straight to their folder with no second copy on disk. Files are copied
byte for byte: known junk (a PNG named .JPEG, CMYK JPEGs) is the resize stage's business.

Member names may hold spaces and any letters; what is unsafe or ambiguous (a folder, `..`, a control
character, a hidden name, a link or device, the same name twice in a class) stops the whole fetch with
an error naming the archive and member. The published tar has none of these, so one such member means
the file is not what it claims to be; skipping it would hide that.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tarfile
import unicodedata
from pathlib import Path
from typing import IO, Iterator

from ctxrepro.data.extract import (ArchiveError, Extracted, Reading, Tally, UnsafeArchiveError, open_stream, overlong,
                                   require_end)
from ctxrepro.data.registry import ChecksumError, HashingReader
from ctxrepro.io import atomic_write_json
from ctxrepro.progress import track

TRAIN_CLASSES = 1000  # class tars in the real ILSVRC2012_img_train.tar
CLASS_TAR = re.compile(r"^(n\d{8})\.tar$")
WNID = re.compile(r"^n\d{8}$")


def _flat_name(member: tarfile.TarInfo, label: str, seen: set[str]) -> str:
    """The member's file name, refused unless it is a new regular file with a safe name in the class folder."""
    name = member.name.removeprefix("./")
    reason = None
    if not member.isreg():
        reason = "expected only regular image files"
    elif "/" in name or "\\" in name:
        reason = "expected a plain file name, not a path with folders"
    elif name in ("", ".", ".."):
        reason = "not a file name"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        reason = "control character in the file name"
    elif name.startswith("."):
        reason = "hidden file name (starts with '.'), which the image lists would skip"
    elif overlong(name) is not None:
        reason = overlong(name)
    elif name in seen:
        reason = "the same name twice in one class tar (the second copy would overwrite the first)"
    if reason is not None:
        raise UnsafeArchiveError(label, member.name, reason)
    seen.add(name)
    return name


def iter_class_tars(fileobj: IO[bytes], label: str) -> Iterator[tuple[str, str, IO[bytes]]]:
    """Yield (wnid, label, stream) per class tar of a train tar read sequentially from `fileobj`.

    Each stream must be read before the next item is requested (stream mode). Anything but class tars
    `nXXXXXXXX.tar` is refused with an error naming the member; the tar must be whole (`require_end`).
    """
    seen: set[str] = set()
    with Reading(label) as at, open_stream(fileobj) as outer:
        for m in outer:
            at.member = name = m.name.removeprefix("./")
            if m.isdir() and name in ("", "."):
                continue
            match = CLASS_TAR.match(name)
            if not (m.isreg() and match):
                raise UnsafeArchiveError(label, m.name, "expected only class tars named nXXXXXXXX.tar")
            if name in seen:
                raise UnsafeArchiveError(label, m.name, "the same class tar twice")
            seen.add(name)
            yield match.group(1), f"{label}:{name}", outer.extractfile(m)
        require_end(outer, label, at.member)


def iter_class_images(stream: IO[bytes], label: str) -> Iterator[tuple[str, IO[bytes], int]]:
    """Yield (file name, stream, size) per image of one class tar; only plain, safe, new names pass."""
    seen: set[str] = set()
    with Reading(label) as at, open_stream(stream, "r|") as inner:
        for im in inner:
            at.member = im.name
            yield _flat_name(im, label, seen), inner.extractfile(im), im.size
        require_end(inner, label, at.member)


def _extract_class(stream: IO[bytes], label: str, folder: Path) -> Tally:
    tally = Tally()
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, size in iter_class_images(stream, label):
        with Reading(label, name), open(folder / name, "wb") as out:
            shutil.copyfileobj(image, out, 1 << 20)
        tally.add(name, size)
    return tally


class ClassJournal:
    """The class tars of one train tar already extracted into a folder that outlives a killed fetch.

    `source.json` identifies the train tar (name, size, mtime); `done.json` maps each finished class tar to
    its md5 and tally, rewritten atomically after the class's files reached the disk. A journal of another
    file is discarded whole.
    """

    def __init__(self, folder: Path, source: Path):
        st = source.stat()
        self.folder, self.tree = folder, folder / "train"
        ident = {"name": source.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            same = json.loads((folder / "source.json").read_text()) == ident
            self.done = json.loads((folder / "done.json").read_text()) if same else {}
        except (OSError, ValueError):
            same, self.done = False, {}
        if not same:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            atomic_write_json(folder / "source.json", ident)

    def record(self, wnid: str, md5: str, tally: Tally) -> None:
        os.sync()  # the class's files before the record that says they are there
        self.done[wnid] = {"md5": md5, "files": tally.files, "bytes": tally.bytes, "images": tally.images}
        atomic_write_json(self.folder / "done.json", self.done)


def _place_class(wnid: str, label: str, stream: IO[bytes], work: Path, journal: ClassJournal | None) -> Tally:
    """Extract one class tar into work/<wnid>, or only re-hash it when the journal has it already."""
    hashed = HashingReader(stream, ("md5",))
    done = journal.done.get(wnid) if journal is not None else None
    if done is None:
        shutil.rmtree(work / wnid, ignore_errors=True)  # a class a killed run was writing
        tally = _extract_class(hashed, label, work / wnid)
    hashed.drain()  # the padding after the inner end blocks is part of the class tar's bytes
    md5 = hashed.digests()["md5"]
    if done is None:
        if journal is not None:
            journal.record(wnid, md5, tally)
        return tally
    if md5 != done["md5"]:
        shutil.rmtree(journal.folder, ignore_errors=True)
        raise ChecksumError(f"{label}: md5 {md5} differs from the copy extracted before an interruption "
                            f"({done['md5']}): the file changed; the partial extraction was discarded, run again")
    return Tally(done["files"], done["bytes"], done["images"])


def extract_train_tar(path: Path, dest: Path, *, algos: tuple[str, ...] = (), classes: int | None = None,
                      log: logging.Logger | None = None, resume: Path | None = None) -> Extracted:
    """Stream the train tar of tars into `dest/<wnid>/<file>`, hashing the outer file on the way.

    With `resume` (a folder outside the stage's temporary output), extraction goes there first and each
    finished class tar is journaled: a rerun after a kill still reads and hashes the whole file (its
    checksum needs every byte) but writes only the class tars not yet done; the tree moves to `dest` at the
    end and the folder is removed. `classes` (the expected count, when known) only feeds the progress ETA.
    """
    journal = ClassJournal(resume, Path(path)) if resume is not None else None
    work = journal.tree if journal is not None else dest
    work.mkdir(parents=True, exist_ok=True)
    tally, name = Tally(), Path(path).name
    with open(path, "rb") as f:
        reader = HashingReader(f, algos)
        try:
            for wnid, label, stream in track(iter_class_tars(reader, name), total=classes,
                                             desc=f"extract {name}", unit="class", log=log):
                tally.merge(_place_class(wnid, label, stream, work, journal))
        except ArchiveError:  # a refused file is no work to resume (a kill or a full disk is)
            if journal is not None:
                shutil.rmtree(journal.folder, ignore_errors=True)
            raise
        reader.drain()
    if journal is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work), str(dest))  # a rename on one file system
        shutil.rmtree(journal.folder)  # consumed: a failed verification after this starts afresh
    return Extracted(tally, reader.size, reader.digests())


def _files(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))


def train_classes(root: Path) -> tuple[str, ...]:
    """The sorted WNIDs with a folder under `root/train` (root = data/raw/imagenet)."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no ImageNet train folder (run the fetch stage)")
    with os.scandir(train) as it:
        return tuple(sorted(e.name for e in it if e.is_dir() and WNID.match(e.name)))


def list_train_images(root: Path) -> tuple[Path, ...]:
    """Every file under `root/train/<wnid>/`, sorted by (wnid, name); junk included (resize sorts it out)."""
    train = Path(root) / "train"
    return tuple(train / wnid / name for wnid in train_classes(root) for name in _files(train / wnid))


def list_val_images(root: Path) -> tuple[Path, ...]:
    """Every file under `root/val/`, sorted by name (ILSVRC2012_val_%08d.JPEG sorts by index)."""
    val = Path(root) / "val"
    if not val.is_dir():
        raise FileNotFoundError(f"{val}: no ImageNet val folder (fetch it with ILSVRC2012_img_val.tar)")
    return tuple(val / name for name in _files(val))
