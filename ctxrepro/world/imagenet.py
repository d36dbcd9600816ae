"""ILSVRC2012 layout: a train tar of per-class tars (nXXXXXXXX.tar of nXXXXXXXX_<k>.JPEG) and a flat val tar
of ILSVRC2012_val_%08d.JPEG, 1-based (docs/DATA.md). Pretraining data for paper section 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctxrepro.world.archives import tar_bytes, tar_file
from ctxrepro.world.photos import JUNK_REASONS, encode_jpeg, junk_variant
from ctxrepro.world.scenes import imagenet_scene
from ctxrepro.world.spec import CATEGORIES, IMAGENET_TRAIN, IMAGENET_VAL, WNIDS, WorldSpec, stream

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"


def _entry(kind: str, category: str | None, junk: str | None = None) -> dict:
    return {"kind": kind, "category": category, "junk": junk}


def _image_numbers(seed: int, cls: int, count: int) -> np.ndarray:
    """Distinct, sorted, gappy image numbers k like the real ones (n01440764_10026.JPEG)."""
    rng = stream(seed, IMAGENET_TRAIN, cls, 0)
    return np.sort(rng.choice(np.arange(1, 20 * count + 20), size=count, replace=False))


def write_train(out_dir: Path, spec: WorldSpec, seed: int, scale: float | None) -> tuple:
    """Write ILSVRC2012_img_train.tar; returns (index entries, summary counts)."""
    cats = CATEGORIES[: spec.imagenet_classes]
    # junk file j goes into class j mod classes, after that class's regular images
    junk = [(reason, j % len(cats)) for j, reason in enumerate(JUNK_REASONS)] if spec.junk else []
    index, n_images = {}, 0
    with tar_file(out_dir / TRAIN_TAR) as outer:
        for c in sorted(range(len(cats)), key=lambda i: WNIDS[cats[i]]):
            cat, wnid = cats[c], WNIDS[cats[c]]
            mine = [reason for reason, jc in junk if jc == c]
            ks = _image_numbers(seed, c, spec.imagenet_train_per_class + len(mine))
            members = []
            for j, k in enumerate(ks):
                rng = stream(seed, IMAGENET_TRAIN, c, 1, j)
                scene = imagenet_scene(rng, cat, spec.image_size, scale)
                name = f"{wnid}_{int(k)}.JPEG"
                path = f"imagenet/train/{wnid}/{name}"
                if j < spec.imagenet_train_per_class:
                    members.append((name, encode_jpeg(scene.image, spec.jpeg_quality)))
                    index[path] = _entry("procedural", cat)
                    n_images += 1
                else:
                    reason = mine[j - spec.imagenet_train_per_class]
                    members.append((name, junk_variant(scene.image, reason, spec.jpeg_quality)))
                    index[path] = _entry("junk", cat, reason)
            members.sort(key=lambda m: m[0])
            outer.add_bytes(f"{wnid}.tar", tar_bytes(members), dirs=False)
    summary = {"classes": len(cats), "images": n_images, "junk": len(junk),
               "wnids": {cat: WNIDS[cat] for cat in cats}}
    return index, summary


def write_val(out_dir: Path, spec: WorldSpec, seed: int, scale: float | None, photos: list) -> tuple:
    """Write ILSVRC2012_img_val.tar: procedural scenes (classes balanced) and the photos, interleaved."""
    cats = CATEGORIES[: spec.imagenet_classes]
    items = [("procedural", j) for j in range(spec.imagenet_val)] + [("photo", p) for p in range(len(photos))]
    order = stream(seed, IMAGENET_VAL, 0).permutation(len(items))
    index, placed = {}, {}
    with tar_file(out_dir / VAL_TAR) as tar:
        for number, pos in enumerate(order, start=1):
            kind, j = items[pos]
            name = f"ILSVRC2012_val_{number:08d}.JPEG"
            if kind == "procedural":
                cat = cats[j % len(cats)]
                scene = imagenet_scene(stream(seed, IMAGENET_VAL, 1, j), cat, spec.image_size, scale)
                data = encode_jpeg(scene.image, spec.jpeg_quality)
            else:
                cat = photos[j].category
                data = encode_jpeg(photos[j].image, spec.jpeg_quality)
                placed[photos[j].name] = f"imagenet/val/{name}"
            tar.add_bytes(name, data, dirs=False)
            index[f"imagenet/val/{name}"] = _entry(kind, cat)
    return index, {"procedural": spec.imagenet_val, "photos": len(photos), "photo_paths": placed}
