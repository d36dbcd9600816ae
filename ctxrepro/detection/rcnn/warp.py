"""Warping a proposal to the network's input with context padding (R-CNN's "warp" crop mode, rcnn_im_crop.m).

The box is grown about its centre by side / (side - 2 * pad) in each direction, so that after warping to
side x side the original box fills the inner (side - 2 * pad) square and `pad` pixels of image context
surround it (R-CNN: 16 px at 227). Where the grown box leaves the image, the part inside the image is warped
to its share of the window and the rest of the window holds `fill` (R-CNN subtracts the mean image from the
warped pixels and leaves zeros outside; our networks subtract their mean inside `InputNorm`, so the mean
colour here becomes the same zeros). Rounding follows the MATLAB code: coordinates are rounded half away from
zero in its 1-based pixels. The resize is bilinear without antialiasing, pixel centres aligned (MATLAB's
imresize with 'antialiasing' false, and OpenCV's INTER_LINEAR that Caffe's window_data layer uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _round(x: float) -> int:
    """MATLAB's round: half away from zero."""
    return int(np.sign(x) * np.floor(abs(x) + 0.5))


@dataclass(frozen=True)
class Crop:
    """Where one window's pixels come from and go to (0-based, inclusive source box)."""

    x1: int
    y1: int
    x2: int
    y2: int
    left: int  # destination offset (pad_w, pad_h) inside the side x side window
    top: int
    width: int  # destination size of the warped image part
    height: int


def context_crop(box: Sequence[float], image_w: int, image_h: int, side: int, pad: int) -> Crop:
    """rcnn_im_crop's geometry for one 0-based inclusive box (module docstring)."""
    x1, y1, x2, y2 = (float(v) + 1.0 for v in box)  # the MATLAB code's 1-based pixels
    if pad <= 0:
        bx = [_round(x1), _round(y1), _round(x2), _round(y2)]
        return Crop(bx[0] - 1, bx[1] - 1, bx[2] - 1, bx[3] - 1, 0, 0, side, side)
    scale = side / (side - 2 * pad)
    half_h, half_w = (y2 - y1 + 1) / 2, (x2 - x1 + 1) / 2
    cx, cy = x1 + half_w, y1 + half_h
    bx = [_round(cx - half_w * scale), _round(cy - half_h * scale), _round(cx + half_w * scale),
          _round(cy + half_h * scale)]
    unclipped_w, unclipped_h = bx[2] - bx[0] + 1, bx[3] - bx[1] + 1
    pad_x, pad_y = max(0, 1 - bx[0]), max(0, 1 - bx[1])
    bx = [max(1, bx[0]), max(1, bx[1]), min(image_w, bx[2]), min(image_h, bx[3])]
    sx, sy = side / unclipped_w, side / unclipped_h
    width, height = _round((bx[2] - bx[0] + 1) * sx), _round((bx[3] - bx[1] + 1) * sy)
    left, top = _round(pad_x * sx), _round(pad_y * sy)
    width, height = min(width, side - left), min(height, side - top)
    return Crop(bx[0] - 1, bx[1] - 1, bx[2] - 1, bx[3] - 1, left, top, max(width, 1), max(height, 1))


def warp_windows(image: np.ndarray, boxes: np.ndarray, side: int, pad: int, fill: Sequence[float],
                 flips: np.ndarray | None = None) -> np.ndarray:
    """(N, 3, side, side) float32 windows of an (H, W, 3) RGB image, one per 0-based box; `flips[i]` mirrors
    window i left-right (Caffe's window_data layer mirrors the warped window)."""
    import cv2

    h, w = image.shape[:2]
    src = np.ascontiguousarray(image, dtype=np.float32)
    out = np.empty((len(boxes), side, side, 3), dtype=np.float32)
    out[:] = np.asarray(fill, dtype=np.float32)
    for i, box in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        c = context_crop(box, w, h, side, pad)
        part = src[c.y1:c.y2 + 1, c.x1:c.x2 + 1]
        out[i, c.top:c.top + c.height, c.left:c.left + c.width] = cv2.resize(
            part, (c.width, c.height), interpolation=cv2.INTER_LINEAR)
    if flips is not None:
        out[np.asarray(flips, dtype=bool)] = out[np.asarray(flips, dtype=bool)][:, :, ::-1]
    return out.transpose(0, 3, 1, 2)
