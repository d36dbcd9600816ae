"""ILSVRC2012 in its published layout: the train tar of per-class tars, the flat val tar, and the
extracted tree `train/<wnid>/<wnid>_<k>.JPEG`, `val/ILSVRC2012_val_%08d.JPEG` (DATA.md "Layouts").

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

import logging
import os
import re
import shutil
import tarfile
import unicodedata
from pathlib import Path
from typing import IO, Iterator

from ctxrepro.data.extract import Extracted, Reading, Tally, UnsafeArchiveError, open_stream, require_end
from ctxrepro.data.registry import HashingReader
from ctxrepro.progress import track

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
    elif name in seen:
        reason = "the same name twice in one class tar (the second copy would overwrite the first)"
    if reason is not None:
        raise UnsafeArchiveError(label, member.name, reason)
    seen.add(name)
    return name


def iter_tar_of_tars(fileobj: IO[bytes], label: str) -> Iterator[tuple[str, str, IO[bytes], int]]:
    """Yield (wnid, file name, stream, size) per image of a train tar read sequentially from `fileobj`.

    Each stream must be read before the next item is requested (both tars are in stream mode).
    Anything but class tars `nXXXXXXXX.tar` in the outer tar, or anything but plain files inside one,
    is refused with an error naming the member. Both tars must be whole (`extract.require_end`).
    """
    seen_classes: set[str] = set()
    with Reading(label) as at, open_stream(fileobj) as outer:
        for m in outer:
            at.member = name = m.name.removeprefix("./")
            if m.isdir() and name in ("", "."):
                continue
            match = CLASS_TAR.match(name)
            if not (m.isreg() and match):
                raise UnsafeArchiveError(label, m.name, "expected only class tars named nXXXXXXXX.tar")
            if name in seen_classes:
                raise UnsafeArchiveError(label, m.name, "the same class tar twice")
            seen_classes.add(name)
            inner_label, seen = f"{label}:{name}", set()
            with Reading(inner_label) as inner_at, open_stream(outer.extractfile(m), "r|") as inner:
                for im in inner:
                    inner_at.member = im.name
                    yield match.group(1), _flat_name(im, inner_label, seen), inner.extractfile(im), im.size
                require_end(inner, inner_label, inner_at.member)
        require_end(outer, label, at.member)


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
            with Reading(f"{Path(path).name}:{wnid}.tar", name), open(dest / wnid / name, "wb") as out:
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
