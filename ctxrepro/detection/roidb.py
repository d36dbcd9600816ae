"""The images, ground truth and proposals of one VOC split, and Fast R-CNN's image scaling (section 4.3).

Fast R-CNN's "roidb": per image its ground-truth boxes (0-based inclusive, difficult ones left out of
training by default, as py-faster-rcnn's `use_diff=False`), classes (1..20 in the devkit's order; 0 is
background) and selective-search proposals. Images are scaled so the shorter side is `scale`, unless the
longer side would then pass `max_size` (Fast R-CNN: 600 / 1000).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxrepro.data import images
from ctxrepro.data.voc import VOC_CLASSES, load_split
from ctxrepro.detection.proposals import load_proposals


@dataclass(frozen=True)
class Entry:
    image_id: str
    path: Path
    height: int
    width: int
    gt_boxes: np.ndarray  # (G, 4) float64, 0-based inclusive
    gt_classes: np.ndarray  # (G,) int64 in 1..20
    proposals: np.ndarray  # (P, 4) float64, 0-based inclusive


def check_boxes(boxes: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    """Boxes must lie inside the image with x1 <= x2, y1 <= y2; anything else is an error naming `where`."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = ((b[:, 0] > b[:, 2]) | (b[:, 1] > b[:, 3]) | (b[:, 0] < 0) | (b[:, 1] < 0)
           | (b[:, 2] > width - 1) | (b[:, 3] > height - 1))
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} box(es) outside the {width}x{height} image or inverted, "
                         f"e.g. {b[bad][0].tolist()} (0-based x1 y1 x2 y2)")
    return b


def load_roidb(devkit: Path, split: str, proposals_dir: Path, use_difficult: bool = False) -> list[Entry]:
    """Every image of `ImageSets/Main/<split>.txt` with its ground truth and cached proposals, in file order."""
    samples = load_split(devkit, split)
    props = load_proposals(proposals_dir, [s.image_id for s in samples])
    entries = []
    for s in samples:
        ann = s.annotation
        objs = [o for o in ann.objects if use_difficult or not o.difficult]
        unknown = sorted({o.name for o in objs} - set(VOC_CLASSES))
        if unknown:
            raise ValueError(f"{devkit}/Annotations/{s.image_id}.xml: unknown class(es) {unknown}")
        gt = np.array([[o.bndbox.xmin - 1, o.bndbox.ymin - 1, o.bndbox.xmax - 1, o.bndbox.ymax - 1] for o in objs],
                      dtype=np.float64).reshape(-1, 4)
        where = f"{proposals_dir}/{s.image_id}.npz"
        entries.append(Entry(s.image_id, s.image, ann.height, ann.width,
                             check_boxes(gt, ann.height, ann.width, f"{devkit}/Annotations/{s.image_id}.xml"),
                             np.array([VOC_CLASSES.index(o.name) + 1 for o in objs], dtype=np.int64),
                             check_boxes(props[s.image_id], ann.height, ann.width, where)))
    return entries


def read_rgb(path: Path, height: int, width: int) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; unreadable files and sizes that disagree with the annotation are
    errors naming the file."""
    rgb = images.read_rgb(path)
    if rgb.shape[:2] != (height, width):
        raise ValueError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}, its annotation says {width}x{height}")
    return rgb


def image_scale(height: int, width: int, scale: int, max_size: int) -> float:
    """Fast R-CNN's factor: shorter side -> `scale`, unless the longer side would pass `max_size`."""
    factor = scale / min(height, width)
    if round(factor * max(height, width)) > max_size:
        factor = max_size / max(height, width)
    return factor


def scale_image(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Bilinear resize by `factor` (cv2.INTER_LINEAR, as Fast R-CNN's prep_im_for_blob)."""
    import cv2

    if factor == 1.0:
        return rgb
    return cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
