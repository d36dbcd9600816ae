"""generate(): write the whole tiny world into one folder, under the real archives' names.

The files are what the real fetch code downloads (docs/DATA.md), plus world_index.json (the kind of every
ImageNet and VOC image, keyed by its path under data/raw after extraction) and MD5SUMS.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ctxrepro.io import atomic_write_json, atomic_write_text
from ctxrepro.world import imagenet, nyu, voc
from ctxrepro.world.archives import md5_file
from ctxrepro.world.photos import load_photos
from ctxrepro.world.spec import WorldSpec

INDEX = "world_index.json"
ARCHIVES = (imagenet.TRAIN_TAR, imagenet.VAL_TAR, voc.TRAINVAL07, voc.TEST07, voc.TRAINVAL11,
            nyu.LABELED_MAT, nyu.SPLITS_MAT, nyu.NORMALS_ZIP)

_log = logging.getLogger(__name__)


def generate(out_dir: Path, spec: WorldSpec, seed: int, log: logging.Logger | None = None) -> dict:
    """Write every archive of the tiny world into out_dir; same seed and spec -> byte-identical files.

    Returns a summary: counts per data set, the photos placed and skipped, and the md5 of every file.
    """
    log = log or _log
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = spec.aberration_scale if spec.aberration else None
    photos, skipped = load_photos() if spec.photos else ([], {})
    for name, why in skipped.items():
        log.warning("photo %s skipped: %s", name, why)
    index: dict = {}
    summary: dict = {"seed": seed, "photos_skipped": skipped}
    steps = (
        ("imagenet_train", lambda: imagenet.write_train(out_dir, spec, seed, scale)),
        ("imagenet_val", lambda: imagenet.write_val(out_dir, spec, seed, scale, photos)),
        ("voc2007", lambda: voc.write_voc2007(out_dir, spec, seed, scale)),
        ("voc2011", lambda: voc.write_voc2011(out_dir, spec, seed, scale, photos)),
    )
    for name, step in steps:
        log.info("tiny world: writing %s", name)
        entries, summary[name] = step()
        index.update(entries)
    log.info("tiny world: rendering %d NYUv2 rooms", spec.nyu_images)
    summary["nyuv2"] = nyu.write_nyu(out_dir, spec, seed)
    atomic_write_json(out_dir / INDEX, index)
    md5 = {name: md5_file(out_dir / name) for name in sorted((*ARCHIVES, INDEX))}
    atomic_write_text(out_dir / "MD5SUMS", "".join(f"{h}  {name}\n" for name, h in md5.items()))
    summary["md5"] = md5
    return summary
