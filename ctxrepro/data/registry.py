"""The known archives of the data sets (docs/DATA.md "Archives") and how a file is verified against them.

The paper pretrains on ImageNet 2012 train (section 3, "Implementation Details") and evaluates on
VOC 2007 detection (4.3), NYUv2 surface normals (4.4) and VOC 2011 mining (4.5). Each data set is a
few archives with a known name, size and checksum. A checksum marked UNVERIFIED in docs/DATA.md never fails
a run: a mismatch only warns.

The same names are used by the builtin tiny world, whose archives are small: a file whose size differs
from the real one is "not the real archive" and is checked against an MD5SUMS file beside it instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

PLACES = ("extract", "imagenet_train", "imagenet_val", "file")

IMAGENET_HELP = (
    "ImageNet (ILSVRC2012) needs a login: register at https://image-net.org, download "
    "ILSVRC2012_img_train.tar (147,897,477,120 bytes) and ILSVRC2012_img_val.tar (6,744,924,160 bytes), "
    "put both (or symlinks to them) in one folder and set fetch.imagenet_source to that folder, or to an "
    "http(s) URL of a folder holding them (a mirror you are allowed to use)."
)


class ChecksumError(ValueError):
    """A file's size or digest differs from what it must be; the message names file, expected and actual."""


@dataclass(frozen=True)
class Checksum:
    algo: str  # a hashlib name: "md5" or "sha256"
    hexdigest: str
    verified: bool = True  # False: UNVERIFIED in docs/DATA.md, so a mismatch warns instead of failing


@dataclass(frozen=True)
class Archive:
    """One file of a data set as its publisher ships it, and how fetch places it under data/raw/<dataset>."""

    name: str
    dataset: str
    size: int | None  # bytes of the real file; None where docs/DATA.md has no exact value
    checksum: Checksum | None
    url: str | None  # official download location; None where a login is needed or none is known
    place: str  # one of PLACES
    extracts_to: str  # what the file becomes under the data set folder: finds already-extracted trees
    required: bool = True
    images: int | None = None  # image files inside the real archive, counted after extraction
    note: str = ""


_VOC = "http://host.robots.ox.ac.uk/pascal/VOC/"
_NYU = "http://horatio.cs.nyu.edu/mit/silberman/"
_FAIR = "https://dl.fbaipublicfiles.com/fair_self_supervision_benchmark/"

ARCHIVES: tuple[Archive, ...] = (
    Archive("ILSVRC2012_img_train.tar", "imagenet", 147_897_477_120,
            Checksum("md5", "1d675b47d978889d74fa0da5fadfb00e"), None, "imagenet_train", "train",
            images=1_281_167, note="a tar of 1000 tars nXXXXXXXX.tar; streamed, never unpacked twice"),
    Archive("ILSVRC2012_img_val.tar", "imagenet", 6_744_924_160,
            Checksum("md5", "29b22e2961454d5413ddabcf34fc5622"), None, "imagenet_val", "val",
            required=False, images=50_000, note="flat ILSVRC2012_val_%08d.JPEG; only evaluation uses it"),
    Archive("ILSVRC2012_devkit_t12.tar.gz", "imagenet", None,
            Checksum("md5", "fa75699e90414af021442c21a62c3abf"), None, "extract", "ILSVRC2012_devkit_t12",
            required=False, note="about 2.5 MB; labels, never needed for pretraining"),
    Archive("VOCtrainval_06-Nov-2007.tar", "voc2007", 460_032_000,
            Checksum("md5", "c52e279531787c972589f7e41ab4ae64"), _VOC + "voc2007/VOCtrainval_06-Nov-2007.tar",
            "extract", "VOCdevkit/VOC2007", images=5_011),
    Archive("VOCtest_06-Nov-2007.tar", "voc2007", 451_020_800,
            Checksum("md5", "b6e924de25625d8de591ea690078ad9f"), _VOC + "voc2007/VOCtest_06-Nov-2007.tar",
            "extract", "VOCdevkit/VOC2007", images=4_952, note="unpacks into the same VOCdevkit as trainval"),
    Archive("VOCtrainval_25-May-2011.tar", "voc2011", None,
            Checksum("md5", "6c3384ef61512963050cb5d687e5bf1e"), _VOC + "voc2011/VOCtrainval_25-May-2011.tar",
            "extract", "TrainVal/VOCdevkit/VOC2011", note="size UNVERIFIED in docs/DATA.md"),
    Archive("nyu_depth_v2_labeled.mat", "nyuv2", 2_972_037_809,
            Checksum("sha256", "2d724b0c0ab358aa1ce5df855e5bd14a2279ab7202efe22f32a30d612dcb86aa", verified=False),
            _NYU + "nyu_depth_v2/nyu_depth_v2_labeled.mat", "file", "nyu_depth_v2_labeled.mat", images=1_449,
            note="HDF5 (MATLAB v7.3); sha256 from two third-party records"),
    Archive("splits.mat", "nyuv2", 2_626, None, _NYU + "indoor_seg_sup/splits.mat", "file", "splits.mat",
            note="size UNVERIFIED; used only to tell the real file from a stand-in"),
    Archive("nyuv2_surfacenormal_metadata.zip", "nyuv2", 841_839_365,
            Checksum("md5", "e51209f4960b73c014d5fdeccc24b669", verified=False),
            _FAIR + "nyuv2_surfacenormal_metadata.zip", "extract", "surfacenormal_metadata", required=False,
            note="FAIR normals ground truth; normals can be computed from depth without it"),
    # Fast R-CNN's precomputed selective search boxes (data/scripts/fetch_selective_search_data.sh: this URL and
    # md5; "0.5G", no exact size published). Placed beside VOCdevkit, as proposals.source=mat reads VOC 2007's.
    Archive("selective_search_data.tgz", "voc2007", None,
            Checksum("md5", "7078c1db87a7851b31966b96774cd9b9"),
            "https://dl.dropboxusercontent.com/s/orrt7o6bp6ae0tc/selective_search_data.tgz", "extract",
            "selective_search_data", required=False,
            note="Fast R-CNN's selective search boxes, about 0.5 GB; needed only by proposals.source=mat"),
)

DATASETS: tuple[str, ...] = tuple(sorted({a.dataset for a in ARCHIVES}))


def archives_for(dataset: str) -> tuple[Archive, ...]:
    """The registered archives of `dataset`, in registry order (the order they are placed in)."""
    found = tuple(a for a in ARCHIVES if a.dataset == dataset)
    if not found:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    return found


def lookup(dataset: str, name: str) -> Archive | None:
    return next((a for a in archives_for(dataset) if a.name == name), None)


_MD5SUMS_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


def parse_md5sums(text: str, origin: str) -> dict[str, str]:
    """Parse `md5sum` output ("<32 hex> <space or *><name>" per line) into {basename: md5}."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _MD5SUMS_LINE.match(line.rstrip("\r"))
        if match is None:
            raise ChecksumError(f"{origin} line {number}: expected '<md5>  <file name>', got {line!r}")
        sums[match.group(2).strip().rsplit("/", 1)[-1]] = match.group(1).lower()
    return sums


class HashingReader:
    """A read-only binary stream that hashes and counts every byte read through it.

    Lets a single pass over a 147 GB tar both extract it (tarfile stream mode) and verify it.
    """

    def __init__(self, raw, algos: tuple[str, ...]):
        self._raw = raw
        self._hashers = {algo: hashlib.new(algo) for algo in algos}
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.update(data)
        return data

    def update(self, data: bytes) -> None:
        for h in self._hashers.values():
            h.update(data)
        self.size += len(data)

    def drain(self, chunk: int = 1 << 20) -> None:
        """Read to the end: tar padding after the end-of-archive blocks is part of the file's digest."""
        while self.read(chunk):
            pass

    def digests(self) -> dict[str, str]:
        return {algo: h.hexdigest() for algo, h in self._hashers.items()}


def hash_file(path, algos: tuple[str, ...], chunk: int = 1 << 20) -> tuple[int, dict[str, str]]:
    """(size, {algo: hexdigest}) of a file, read once."""
    with open(path, "rb") as f:
        reader = HashingReader(f, algos)
        reader.drain(chunk)
    return reader.size, reader.digests()


@dataclass(frozen=True)
class Verdict:
    real: bool  # the publisher's file: its expected image count applies
    checked_against: str | None  # "registry", the MD5SUMS it was listed in, or None (nothing to check)
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Expected:
    """What one file must match: the registry entry, an MD5SUMS listing beside it, or both.

    `official` is set when the file came from the registry's own URL: then it must be the real file.
    """

    archive: Archive
    listed_md5: str | None = None
    listed_in: str | None = None
    official: bool = False

    def algos(self) -> tuple[str, ...]:
        wanted = {"md5"}
        if self.archive.checksum is not None:
            wanted.add(self.archive.checksum.algo)
        return tuple(sorted(wanted))

    def check_size(self, where: str, size: int) -> None:
        """Before reading a file: a known archive of another size is an error unless an MD5SUMS vouches for it."""
        a = self.archive
        if a.size is None or size == a.size or (self.listed_md5 is not None and not self.official):
            return
        raise ChecksumError(f"{where}: {size:,} bytes, but the published {a.name} has {a.size:,} (docs/DATA.md) and no "
                            "MD5SUMS beside it lists this file: truncated, or another file under its name? If it is "
                            "deliberately not the published file, list its md5 in an MD5SUMS file beside it")

    def verify(self, where: str, size: int, digests: dict[str, str]) -> Verdict:
        """Check a complete file of `size` bytes with `digests` (from `algos()`); raise ChecksumError."""
        a, reg = self.archive, self.archive.checksum
        size_known = a.size is not None
        if self.official and size_known and size != a.size:
            raise ChecksumError(f"{where}: size mismatch: expected {a.size:,} bytes (docs/DATA.md), got {size:,}")
        if self.official or (size_known and size == a.size):
            return Verdict(True, *_against_registry(where, reg, digests, hint=""))
        if self.listed_md5 is not None:
            if digests["md5"] != self.listed_md5:
                raise ChecksumError(f"{where}: md5 mismatch: expected {self.listed_md5} (from {self.listed_in}), "
                                    f"got {digests['md5']}")
            return Verdict(_matches(reg, digests), self.listed_in)
        if size_known:
            self.check_size(where, size)
        hint = " (if this is deliberately not the published file, list its md5 in an MD5SUMS file beside it)"
        checked, warnings = _against_registry(where, reg, digests, hint=hint)
        return Verdict(_matches(reg, digests), checked, warnings)


def _matches(reg: Checksum | None, digests: dict[str, str]) -> bool:
    return reg is not None and digests.get(reg.algo) == reg.hexdigest


def _against_registry(where: str, reg: Checksum | None, digests: dict[str, str],
                      hint: str) -> tuple[str | None, tuple[str, ...]]:
    if reg is None:
        return None, ()
    actual = digests[reg.algo]
    if actual == reg.hexdigest:
        return "registry", ()
    text = f"{where}: {reg.algo} mismatch: expected {reg.hexdigest} (docs/DATA.md), got {actual}"
    if reg.verified:
        raise ChecksumError(text + hint)
    return None, (text + " (the expected value is UNVERIFIED in docs/DATA.md, so this only warns)",)
