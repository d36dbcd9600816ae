"""Selective search proposals for VOC 2007, once for every detect run (section 4.3 via Fast R-CNN; docs/DATA.md)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctxrepro.config import param
from ctxrepro.data.voc import SPLITS, load_split
from ctxrepro.detection import proposals as P
from ctxrepro.io import atomic_write_json
from ctxrepro.stage import StageContext, StageError

VOC07 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
MATS = Path("data/raw/voc2007/selective_search_data")  # fetch places Fast R-CNN's selective_search_data.tgz here
OUT = Path("data/proposals/voc2007")  # one <image_id>.npz per image; a persistent, keyed cache
INDEX = "index.json"  # written last: its presence says the cache is complete for these settings
METRICS = Path("metrics/proposals.json")
RECALL_AT = (0.5, 0.7)


@dataclass(frozen=True)
class Params:
    source: str = param("opencv", choices=("opencv", "mat"),
                        help="opencv: compute selective search; mat: read Fast R-CNN's voc_2007_<split>.mat, "
                             "which fetch places in data/raw/voc2007/selective_search_data")
    mode: str = param("fast", choices=P.MODES, help="OpenCV selective search mode (Fast R-CNN's boxes: fast)")
    max_boxes: int = param(0, min=0, help="cap per image, a seeded subset (0: all, as Fast R-CNN)")
    min_side: int = param(0, min=0, help="drop boxes thinner than this many pixels (0: keep all)")
    splits: tuple[str, ...] = param(("trainval", "test"), choices=SPLITS, help="VOC 2007 image sets to cover")
    workers: int = param(4, min=1, help="selective search threads (OpenCV releases the GIL)")


def _images(root: Path, splits: tuple[str, ...]) -> dict[str, dict]:
    """{split: {image id: (path, non-difficult ground-truth boxes 0-based)}}."""
    out = {}
    for split in splits:
        try:
            samples = load_split(root / VOC07, split)
        except (OSError, ValueError) as e:
            raise StageError(f"proposals: {e} (run `dvc repro fetch`)") from e
        out[split] = {s.image_id: (s.image, np.array([[o.bndbox.xmin - 1, o.bndbox.ymin - 1, o.bndbox.xmax - 1,
                                                        o.bndbox.ymax - 1] for o in s.annotation.objects
                                                       if not o.difficult], dtype=float).reshape(-1, 4))
                      for s in samples}
    return out


def run(params: Params, ctx: StageContext) -> None:
    root, log = ctx.root, ctx.log
    cfg = P.SearchConfig(mode=params.mode, max_boxes=params.max_boxes, min_side=params.min_side, seed=ctx.base.seed)
    by_split = _images(root, params.splits)
    images = {i: v[0] for split in by_split.values() for i, v in split.items()}
    cache = root / OUT
    cache.mkdir(parents=True, exist_ok=True)
    (cache / INDEX).unlink(missing_ok=True)  # incomplete until rewritten below
    start = time.monotonic()
    if params.source == "mat":
        counts, computed = {}, 0
        for split, items in by_split.items():
            mat = root / MATS / f"voc_2007_{split}.mat"
            try:
                counts.update(P.convert_mat(mat, {i: v[0] for i, v in items.items()}, cache, cfg))
            except (OSError, ValueError) as e:
                raise StageError(f"proposals: {e}") from e
            computed += len(items)
    else:
        try:
            counts, computed = P.compute_opencv(images, cache, cfg, params.workers, log)
        except ValueError as e:
            raise StageError(f"proposals: {e}") from e
    seconds = time.monotonic() - start
    removed = P.prune(cache, set(images))
    boxes = P.load_proposals(cache, sorted(images))
    metrics = {"source": params.source, "mode": params.mode, "images": len(images), "computed": computed,
               "reused": len(images) - computed, "removed": len(removed), "seconds": round(seconds, 2),
               "seconds_per_computed_image": round(seconds / computed, 3) if computed else None,
               "boxes_per_image": {}, "recall": {}}
    for split, items in by_split.items():
        metrics["boxes_per_image"][split] = round(sum(counts[i] for i in items) / max(len(items), 1), 1)
        metrics["recall"][split] = P.recall({i: boxes[i] for i in items}, {i: v[1] for i, v in items.items()},
                                            RECALL_AT)
    log.info("proposals: %s", metrics)
    atomic_write_json(cache / INDEX, {"settings": {"source": params.source, **asdict(cfg)}, "boxes": counts})
    atomic_write_json(root / METRICS, metrics)
