"""PASCAL VOC devkit annotations and image sets, as the devkit ships them (docs/DATA.md "Layouts").

VOC 2007 serves detection (paper section 4.3) and purity-coverage (4.5.1); VOC 2011 serves mining (4.5).
A devkit year folder (`VOCdevkit/VOC2007`, `TrainVal/VOCdevkit/VOC2011`) holds `Annotations/<id>.xml`,
`ImageSets/Main/<split>.txt` and `JPEGImages/<id>.jpg`. Boxes stay in the devkit's 1-based inclusive
pixel convention; converting is the caller's explicit step.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

# The devkit's class order (VOCinit.m); class indices everywhere follow it.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
SPLITS = ("train", "val", "trainval", "test")


@dataclass(frozen=True)
class BndBox:
    """Inclusive 1-based pixel box: width = xmax - xmin + 1 (the devkit's convention)."""

    xmin: int
    ymin: int
    xmax: int
    ymax: int


@dataclass(frozen=True)
class VocObject:
    name: str
    pose: str
    truncated: bool
    difficult: bool
    occluded: bool | None  # None in VOC2007, whose XML has no <occluded>
    bndbox: BndBox


@dataclass(frozen=True)
class VocAnnotation:
    filename: str
    width: int
    height: int
    depth: int
    objects: tuple[VocObject, ...]


@dataclass(frozen=True)
class VocSample:
    image_id: str
    image: Path
    annotation: VocAnnotation


def _text(node: ET.Element, tag: str, where: str, default: str | None = None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise ValueError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _int(node: ET.Element, tag: str, where: str, default: str | None = None) -> int:
    text = _text(node, tag, where, default)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: <{tag}> is {text!r}, not a number") from None
    # A few later-year files write coordinates like "273.0"; any real fraction is an error.
    if value != int(value):
        raise ValueError(f"{where}: <{tag}> is {text!r}, expected a whole pixel")
    return int(value)


def _flag(node: ET.Element, tag: str, where: str) -> bool:
    value = _int(node, tag, where, default="0")
    if value not in (0, 1):
        raise ValueError(f"{where}: <{tag}> is {value}, expected 0 or 1")
    return bool(value)


def _object(node: ET.Element, where: str) -> VocObject:
    name = _text(node, "name", where)
    where = f"{where} object {name!r}"
    box_node = node.find("bndbox")  # direct child only: person <part>s carry their own boxes
    if box_node is None:
        raise ValueError(f"{where}: missing <bndbox>")
    box = BndBox(*(_int(box_node, t, where) for t in ("xmin", "ymin", "xmax", "ymax")))
    if box.xmin > box.xmax or box.ymin > box.ymax:
        raise ValueError(f"{where}: box {box} has xmin > xmax or ymin > ymax")
    occluded = _flag(node, "occluded", where) if node.find("occluded") is not None else None
    # Later years omit pose/truncated/difficult on some objects; the devkit reads those as 0/Unspecified.
    return VocObject(name=name, pose=_text(node, "pose", where, default="Unspecified"),
                     truncated=_flag(node, "truncated", where), difficult=_flag(node, "difficult", where),
                     occluded=occluded, bndbox=box)


def parse_annotation(source: Path | str, *, text: str | None = None) -> VocAnnotation:
    """Parse one Annotations XML file (or `text`, with `source` naming it in errors)."""
    where = str(source)
    try:
        root = ET.fromstring(text) if text is not None else ET.parse(source).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{where}: not valid XML ({e})") from e
    size = root.find("size")
    if size is None:
        raise ValueError(f"{where}: missing <size>")
    return VocAnnotation(filename=_text(root, "filename", where), width=_int(size, "width", where),
                         height=_int(size, "height", where), depth=_int(size, "depth", where, default="3"),
                         objects=tuple(_object(o, where) for o in root.findall("object")))


def read_image_set(devkit_year_dir: Path, split: str) -> tuple[str, ...]:
    """Image ids of `ImageSets/Main/<split>.txt`, in file order (the devkit's order)."""
    path = Path(devkit_year_dir) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no image set {split!r} (splits: {', '.join(SPLITS)})")
    return tuple(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def read_class_image_set(devkit_year_dir: Path, cls: str, split: str) -> dict[str, int]:
    """`ImageSets/Main/<cls>_<split>.txt` as {image id: 1 present, -1 absent, 0 only difficult}."""
    if cls not in VOC_CLASSES:
        raise ValueError(f"unknown VOC class {cls!r}; classes: {', '.join(VOC_CLASSES)}")
    path = Path(devkit_year_dir) / "ImageSets" / "Main" / f"{cls}_{split}.txt"
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
            raise ValueError(f"{path} line {number}: expected '<id> <1|-1|0>', got {line!r}")
        labels[fields[0]] = int(fields[1])
    return labels


def load_split(devkit_year_dir: Path, split: str) -> tuple[VocSample, ...]:
    """Every image of a Main split with its parsed annotation, in the split file's order."""
    root = Path(devkit_year_dir)
    samples = []
    for image_id in read_image_set(root, split):
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{xml}: listed in ImageSets/Main/{split}.txt but missing")
        samples.append(VocSample(image_id, root / "JPEGImages" / f"{image_id}.jpg", parse_annotation(xml)))
    return tuple(samples)
