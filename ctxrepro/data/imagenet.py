"""ILSVRC2012 in its published layout: the train tar of per-class tars, the flat val tar, and the
extracted tree `train/<wnid>/<wnid>_<k>.JPEG`, `val/ILSVRC2012_val_%08d.JPEG` (DATA.md "Layouts").

The paper pretrains on the 1.3M train images without labels (section 3, "Implementation Details").
The 147 GB train tar is streamed: the outer tar is read sequentially and each class tar is opened as a
nested stream, so its images go straight to their folder with no second copy on disk. Files are copied
byte for byte: known junk (a PNG named .JPEG, CMYK JPEGs) is the resize stage's business.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import IO, Iterator

from ctxrepro.data.extract import STREAM_BUFSIZE, Extracted, Tally, UnsafeArchiveError
from ctxrepro.data.registry import HashingReader
from ctxrepro.progress import track

CLASS_TAR = re.compile(r"^(n\d{8})\.tar$")
WNID = re.compile(r"^n\d{8}$")
_FLAT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _flat_name(member: tarfile.TarInfo, label: str) -> str:
    """The member's file name, refused unless it is a regular file with a plain name (no folders)."""
    name = member.name.removeprefix("./")
    if not member.isreg():
        raise UnsafeArchiveError(label, member.name, "expected only regular image files")
    if not _FLAT_NAME.match(name):
        raise UnsafeArchiveError(label, member.name, "expected a plain file name without folders")
    return name


def iter_tar_of_tars(fileobj: IO[bytes], label: str) -> Iterator[tuple[str, str, IO[bytes], int]]:
    """Yield (wnid, file name, stream, size) per image of a train tar read sequentially from `fileobj`.

    Each stream must be read before the next item is requested (both tars are in stream mode).
    Anything but class tars `nXXXXXXXX.tar` in the outer tar, or anything but plain files inside one,
    is refused with an error naming the member.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*", bufsize=STREAM_BUFSIZE) as outer:
        for m in outer:
            name = m.name.removeprefix("./")
            if m.isdir() and name in ("", "."):
                continue
            match = CLASS_TAR.match(name)
            if not (m.isreg() and match):
                raise UnsafeArchiveError(label, m.name, "expected only class tars named nXXXXXXXX.tar")
            inner_label = f"{label}:{name}"
            with tarfile.open(fileobj=outer.extractfile(m), mode="r|", bufsize=STREAM_BUFSIZE) as inner:
                for im in inner:
                    yield match.group(1), _flat_name(im, inner_label), inner.extractfile(im), im.size


def extract_train_tar(path: Path, dest: Path, *, algos: tuple[str, ...] = (), total: int | None = None,
                      log: logging.Logger | None = None) -> Extracted:
    """Stream the train tar of tars into `dest/<wnid>/<file>`, hashing the outer file on the way.

    `total` (the expected image count, when known) only feeds the progress ETA.
    """
    tally = Tally()
    dest.mkdir(parents=True, exist_ok=True)
    made: set[str] = set()
    with open(path, "rb") as f:
        reader = HashingReader(f, algos)
        images = iter_tar_of_tars(reader, Path(path).name)
        for wnid, name, stream, size in track(images, total=total, desc=f"extract {Path(path).name}",
                                              unit="img", log=log):
            if wnid not in made:
                (dest / wnid).mkdir(exist_ok=True)
                made.add(wnid)
            with open(dest / wnid / name, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
            tally.add(name, size)
        reader.drain()
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
