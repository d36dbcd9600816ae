"""Synthetic stand-ins for the data sets, at their real sizes, for benchmarks that must run without them.

- `pretrain_tree`: a resize-stage output (`manifest.csv` + train/val JPEGs, q95 4:4:4 as the resize stage
  writes them) of ImageNet-sized smooth random fields. Neighbouring patches continue each other, so relative
  position is learnable and the pretext loss can fall (bench/recipe_bench.py uses the same fields).
- `detect_roidb`: VOC-sized images with 1-3 textured boxes each (the ground truth) and ~2,000 random
  proposals per image, a quarter of them jittered copies of a ground-truth box (selective search gives
  ~2,000, some overlapping the objects), as `detection.roidb.Entry` rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ctxrepro.detection.roidb import Entry
from ctxrepro.pretext.data import MANIFEST_COLUMNS


def smooth_field(h: int, w: int, g: torch.Generator) -> np.ndarray:
    """(h, w, 3) uint8: colour noise at 4 octaves, bicubically upsampled and summed."""
    x = torch.zeros(1, 3, h, w)
    for cells in (4, 8, 16, 32):
        noise = torch.randn(1, 3, cells, max(1, cells * w // h), generator=g)
        x += F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False) * (32 / cells) ** 0.5
    x = (x - x.mean()) / x.std() * 45 + 120
    return x[0].clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def save_jpeg(rgb: np.ndarray, path: Path) -> None:
    """q95 with 4:4:4 chroma, the resize stage's encoding (bench/README.md "chroma")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95, subsampling=0)


def pretrain_tree(root: Path, counts: dict[str, int], sides: tuple[int, int], seed: int = 0) -> Path:
    """`counts[split]` images per split, each side uniform in `sides` (independently): the manifest's path."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for split, n in counts.items():
        for k in range(n):
            h, w = (int(v) for v in torch.randint(sides[0], sides[1] + 1, (2,), generator=g))
            rel = f"{split}/{k:05d}.jpg"
            save_jpeg(smooth_field(h, w, g), root / rel)
            rows.append({"split": split, "path": rel, "source": f"synthetic/{split}/{k}.JPEG", "orig_width": w,
                         "orig_height": h, "width": w, "height": h})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


def _boxes_in(h: int, w: int, n: int, min_side: int, rng: np.random.Generator) -> np.ndarray:
    """n random boxes (0-based inclusive x1 y1 x2 y2) inside an h x w image, sides >= min_side."""
    x = np.sort(rng.uniform(0, w - 1, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, h - 1, (n, 2)), axis=1)
    x[:, 1] = np.clip(np.maximum(x[:, 1], x[:, 0] + min_side), 0, w - 1)
    y[:, 1] = np.clip(np.maximum(y[:, 1], y[:, 0] + min_side), 0, h - 1)
    x[:, 0], y[:, 0] = np.minimum(x[:, 0], x[:, 1]), np.minimum(y[:, 0], y[:, 1])
    return np.round(np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1))


def _jittered(gt: np.ndarray, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """n copies of random ground-truth boxes, each side moved by up to 25% of the box size, clipped."""
    base = gt[rng.integers(0, len(gt), n)]
    size = np.tile(base[:, 2:] - base[:, :2] + 1, 2)  # (w, h, w, h)
    out = base + rng.uniform(-0.25, 0.25, (n, 4)) * size
    out = np.clip(np.round(out), 0, [w - 1, h - 1, w - 1, h - 1])
    lo, hi = np.minimum(out[:, :2], out[:, 2:]), np.maximum(out[:, :2], out[:, 2:])
    return np.concatenate([lo, hi], 1)


def detect_roidb(root: Path, n: int, size: tuple[int, int], proposals: int, seed: int = 0) -> list[Entry]:
    """n (h, w) = `size` images (portrait for odd indices) with objects, ground truth and proposals."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for k in range(n):
        h, w = size if k % 2 == 0 else size[::-1]
        rgb = smooth_field(h, w, g)
        gt = _boxes_in(h, w, int(rng.integers(1, 4)), min(h, w) // 6, rng)
        classes = rng.integers(1, 21, len(gt))
        for (x1, y1, x2, y2), c in zip(gt.astype(int), classes):
            texture = rng.integers(-25, 26, (y2 - y1 + 1, x2 - x1 + 1, 1))
            colour = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256])
            rgb[y1:y2 + 1, x1:x2 + 1] = np.clip(colour + texture, 0, 255).astype(np.uint8)
        path = root / f"{k:06d}.jpg"
        save_jpeg(rgb, path)
        near = proposals // 4
        props = np.concatenate([_jittered(gt, near, h, w, rng), _boxes_in(h, w, proposals - near, 8, rng)])
        entries.append(Entry(f"{k:06d}", path, h, w, gt, classes.astype(np.int64), props))
    return entries
