"""Box arithmetic in Fast R-CNN's convention (paper section 4.3 uses Fast R-CNN; docs/DATA.md "Selective search .mat").

Boxes are (N, 4) [x1 y1 x2 y2] in 0-based *inclusive* pixels: width = x2 - x1 + 1, as Fast R-CNN's roidb,
`bbox_overlaps` and `bbox_transform` use them. The devkit's 1-based files differ by exactly 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU with the +1 pixel convention (Fast R-CNN's bbox_overlaps); 0 where disjoint."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(inter > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    return boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h, w, h


def encode(rois: Tensor, gt: Tensor) -> Tensor:
    """Regression targets (dx, dy, dw, dh) taking `rois` to `gt` (R-CNN appendix C / Fast R-CNN)."""
    cx, cy, w, h = _centre_size(rois)
    gx, gy, gw, gh = _centre_size(gt)
    return torch.stack([(gx - cx) / w, (gy - cy) / h, torch.log(gw / w), torch.log(gh / h)], dim=1)


def decode(rois: Tensor, deltas: Tensor) -> Tensor:
    """The inverse of `encode`: deltas (N, 4k) applied to rois (N, 4) -> boxes (N, 4k).

    x2 = centre + w/2 - 1 makes decode(encode(r, g)) == g exactly in the +1 convention (py-faster-rcnn's
    transform omits the -1, a half-pixel bias later fixed in Detectron)."""
    cx, cy, w, h = (t[:, None] for t in _centre_size(rois))
    dx, dy, dw, dh = deltas[:, 0::4], deltas[:, 1::4], deltas[:, 2::4], deltas[:, 3::4]
    px, py = dx * w + cx, dy * h + cy
    pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
    out = torch.empty_like(deltas)
    out[:, 0::4] = px - 0.5 * pw
    out[:, 1::4] = py - 0.5 * ph
    out[:, 2::4] = px + 0.5 * pw - 1.0
    out[:, 3::4] = py + 0.5 * ph - 1.0
    return out


def clip(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip (N, 4k) boxes into a height x width image (0-based inclusive)."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, width - 1)
    out[:, 1::2] = out[:, 1::2].clamp(0, height - 1)
    return out


def flip(boxes: np.ndarray, width: int) -> np.ndarray:
    """Boxes of the horizontally mirrored image: x1' = W - 1 - x2, x2' = W - 1 - x1 (Fast R-CNN's flip)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([width - 1 - b[:, 2], b[:, 1], width - 1 - b[:, 0], b[:, 3]], axis=1)
