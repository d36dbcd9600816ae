"""PASCAL VOC devkit layout: VOC2007 trainval and test tars, and the VOC2011 TrainVal tar (docs/DATA.md).

VOC 2007 is the detection benchmark of paper section 4.1 and the purity-coverage set of 4.5.1; VOC 2011
is the mining set of section 4.5. Annotations follow the devkit: 1-based inclusive boxes, truncated and
difficult flags, and <occluded> only from 2008 on (with the 2008+ files' alphabetical tag order).
ImageSets/Main has the split lists and one list per VOC class with " 1" / "-1" / " 0" (only difficult).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctxrepro.world.archives import tar_file
from ctxrepro.world.photos import encode_jpeg
from ctxrepro.world.scenes import voc_scene
from ctxrepro.world.spec import VOC2007, VOC2011, VOC_CLASSES, WorldSpec, stream

TRAINVAL07, TEST07, TRAINVAL11 = "VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar", "VOCtrainval_25-May-2011.tar"


def _xml(node: tuple, depth: int = 0) -> list:
    """Lines of (tag, value) where value is text or a list of nodes; tab-indented like the devkit's files."""
    tag, value = node
    pad = "\t" * depth
    if isinstance(value, list):
        return [f"{pad}<{tag}>", *[line for child in value for line in _xml(child, depth + 1)], f"{pad}</{tag}>"]
    return [f"{pad}<{tag}>{value}</{tag}>"]


def annotation_xml(image_id: str, scene_objects: tuple, size: tuple, year: int, photo: bool) -> str:
    """The annotation file of one image: VOC2007 field order, or the 2008+ one with <occluded>."""
    w, h = size
    source = "ctxrepro package photograph" if photo else "ctxrepro tiny world"
    if year == 2007:
        objs = [("object", [("name", o.category), ("pose", o.pose), ("truncated", int(o.truncated)),
                            ("difficult", int(o.difficult)),
                            ("bndbox", [("xmin", o.xmin), ("ymin", o.ymin), ("xmax", o.xmax), ("ymax", o.ymax)])])
                for o in scene_objects]
        tree = ("annotation", [
            ("folder", "VOC2007"), ("filename", f"{image_id}.jpg"),
            ("source", [("database", "The VOC2007 Database"), ("annotation", "PASCAL VOC2007"),
                        ("image", source), ("flickrid", "0")]),
            ("owner", [("flickrid", "ctxrepro"), ("name", "ctxrepro")]),
            ("size", [("width", w), ("height", h), ("depth", 3)]), ("segmented", 0), *objs])
    else:
        objs = [("object", [("bndbox", [("xmax", o.xmax), ("xmin", o.xmin), ("ymax", o.ymax), ("ymin", o.ymin)]),
                            ("difficult", int(o.difficult)), ("name", o.category), ("occluded", int(o.occluded)),
                            ("pose", o.pose), ("truncated", int(o.truncated))])
                for o in scene_objects]
        tree = ("annotation", [
            ("filename", f"{image_id}.jpg"), ("folder", f"VOC{year}"), *objs, ("segmented", 0),
            ("size", [("depth", 3), ("height", h), ("width", w)]),
            ("source", [("annotation", f"PASCAL VOC{image_id[:4]}"),
                        ("database", f"The VOC{image_id[:4]} Database"), ("image", source)])])
    return "\n".join(_xml(tree)) + "\n"


def class_flag(objects: tuple, cls: str) -> int:
    """1 if a non-difficult object of cls is present, 0 if only difficult ones, -1 if none (devkit rule)."""
    mine = [o for o in objects if o.category == cls]
    if not mine:
        return -1
    return 0 if all(o.difficult for o in mine) else 1


def _image_sets(splits: dict, objects: dict) -> list:
    """(file name, text) of ImageSets/Main: one list per split and one per (class, split)."""
    files = []
    for split, ids in splits.items():
        files.append((f"{split}.txt", "".join(f"{i}\n" for i in ids)))
        for cls in VOC_CLASSES:
            files.append((f"{cls}_{split}.txt", "".join(f"{i} {class_flag(objects[i], cls):2d}\n" for i in ids)))
    return sorted(files)


def _write_tar(path: Path, root: str, images: dict, xmls: dict, splits: dict, objects: dict) -> None:
    with tar_file(path) as tar:
        for i in sorted(xmls):
            tar.add_bytes(f"{root}/Annotations/{i}.xml", xmls[i].encode())
        for name, text in _image_sets(splits, objects):
            tar.add_bytes(f"{root}/ImageSets/Main/{name}", text.encode())
        for i in sorted(images):
            tar.add_bytes(f"{root}/JPEGImages/{i}.jpg", images[i])


def _counts(objects: dict) -> dict:
    flat = [o for objs in objects.values() for o in objs]
    return {"images": len(objects), "objects": len(flat), "truncated": sum(o.truncated for o in flat),
            "difficult": sum(o.difficult for o in flat), "occluded": sum(o.occluded for o in flat)}


def _dominant(objects: tuple) -> str | None:
    """The index's category for a VOC image: the class of its largest box (the XML lists them all)."""
    if not objects:
        return None
    return max(objects, key=lambda o: (o.xmax - o.xmin + 1) * (o.ymax - o.ymin + 1)).category


def _split_half(rng: np.random.Generator, ids: list) -> tuple:
    """(train, val): a random half each, both sorted, like the devkit's lists."""
    train = sorted(rng.permutation(np.array(ids)).tolist()[: (len(ids) + 1) // 2])
    return train, sorted(set(ids) - set(train))


def _procedural(rng: np.random.Generator, spec: WorldSpec, scale: float | None, image_id: str, year: int) -> tuple:
    """(jpeg bytes, xml text, objects) of one rendered VOC image."""
    scene = voc_scene(rng, spec.voc_size, scale)
    h, w = scene.image.shape[:2]
    xml = annotation_xml(image_id, scene.objects, (w, h), year, photo=False)
    return encode_jpeg(scene.image, spec.jpeg_quality), xml, scene.objects


def write_voc2007(out_dir: Path, spec: WorldSpec, seed: int, scale: float | None) -> tuple:
    """Both 2007 tars; trainval and test ids interleave as in the real release (000001 ... 00NNNN)."""
    n = spec.voc07_trainval + spec.voc07_test
    ids = [f"{k:06d}" for k in range(1, n + 1)]
    perm = stream(seed, VOC2007, 0).permutation(n)
    trainval = sorted(ids[k] for k in perm[: spec.voc07_trainval])
    test = sorted(ids[k] for k in perm[spec.voc07_trainval:])
    train, val = _split_half(stream(seed, VOC2007, 1), trainval)
    images, xmls, objects, index = {}, {}, {}, {}
    for k, i in enumerate(ids):
        images[i], xmls[i], objects[i] = _procedural(stream(seed, VOC2007, 2, k), spec, scale, i, 2007)
        index[f"voc2007/VOCdevkit/VOC2007/JPEGImages/{i}.jpg"] = {
            "kind": "procedural", "category": _dominant(objects[i]), "junk": None}
    root = "VOCdevkit/VOC2007"
    for name, keep, splits in ((TRAINVAL07, trainval, {"train": train, "val": val, "trainval": trainval}),
                               (TEST07, test, {"test": test})):
        _write_tar(out_dir / name, root, {i: images[i] for i in keep}, {i: xmls[i] for i in keep}, splits, objects)
    summary = {"trainval": len(trainval), "test": len(test), "train": len(train), "val": len(val), **_counts(objects)}
    return index, summary


def _voc2011_ids(rng: np.random.Generator, n: int) -> list:
    """n distinct ids like the real ones (2008_000002 ... 2011_003276), sorted."""
    years = rng.integers(2008, 2012, n)
    numbers = rng.choice(np.arange(1, 8 * n + 8), size=n, replace=False)
    return sorted(f"{y}_{k:06d}" for y, k in zip(years, numbers))


def write_voc2011(out_dir: Path, spec: WorldSpec, seed: int, scale: float | None, photos: list) -> tuple:
    """The 2011 TrainVal tar: procedural scenes plus the package photos (no objects annotated on those)."""
    n = spec.voc11_trainval + len(photos)
    ids = _voc2011_ids(stream(seed, VOC2011, 0), n)
    slots = stream(seed, VOC2011, 1).permutation(n)  # which ids hold photos: the last len(photos) slots
    images, xmls, objects, index = {}, {}, {}, {}
    placed = {}
    for k, slot in enumerate(slots):
        i = ids[slot]
        path = f"voc2011/TrainVal/VOCdevkit/VOC2011/JPEGImages/{i}.jpg"
        if k < spec.voc11_trainval:
            images[i], xmls[i], objects[i] = _procedural(stream(seed, VOC2011, 2, k), spec, scale, i, 2011)
            index[path] = {"kind": "procedural", "category": _dominant(objects[i]), "junk": None}
            continue
        photo = photos[k - spec.voc11_trainval]
        h, w = photo.image.shape[:2]
        images[i], objects[i] = encode_jpeg(photo.image, spec.jpeg_quality), ()
        xmls[i] = annotation_xml(i, (), (w, h), 2011, photo=True)
        index[path] = {"kind": "photo", "category": photo.category, "junk": None}
        placed[photo.name] = path
    train, val = _split_half(stream(seed, VOC2011, 3), ids)
    _write_tar(out_dir / TRAINVAL11, "TrainVal/VOCdevkit/VOC2011", images, xmls,
               {"train": train, "val": val, "trainval": ids}, objects)
    summary = {"trainval": len(ids), "train": len(train), "val": len(val), "photos": len(photos),
               "photo_paths": placed, **_counts(objects)}
    return index, summary
