"""RoI mini-batch sampling, as Fast R-CNN's `_sample_rois` (section 4.3 fine-tunes with Fast R-CNN; docs/DATA.md).

Per image: the candidate RoIs are the ground-truth boxes followed by the proposals. Each RoI's label is the
class of the ground-truth box it overlaps most (IoU, +1 convention). Foreground: IoU >= fg_thresh, at most
round(fg_fraction * rois_per_image) of them drawn without replacement. Background: IoU in
[bg_lo, bg_hi), drawn without replacement to fill the rest; there may be fewer when candidates run out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxrepro.detection.boxes import iou


@dataclass(frozen=True)
class SamplingConfig:
    """Fast R-CNN's VOC 2007 defaults (docs/DATA.md "Fast R-CNN defaults"): 64 RoIs per image, 25% foreground at IoU >= 0.5,
    background at IoU in [0.1, 0.5)."""

    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_hi: float = 0.5
    bg_lo: float = 0.1

    def __post_init__(self) -> None:
        if self.rois_per_image < 1 or not 0.0 <= self.fg_fraction <= 1.0:
            raise ValueError(f"SamplingConfig: rois_per_image={self.rois_per_image} must be >= 1 and "
                             f"fg_fraction={self.fg_fraction} in [0, 1]")
        if not 0.0 <= self.bg_lo <= self.bg_hi <= 1.0:
            raise ValueError(f"SamplingConfig: need 0 <= bg_lo ({self.bg_lo}) <= bg_hi ({self.bg_hi}) <= 1")

    @property
    def fg_per_image(self) -> int:
        # np.round as Fast R-CNN (half to even; 0.25 * 64 = 16 exactly)
        return int(np.round(self.fg_fraction * self.rois_per_image))


@dataclass(frozen=True)
class RoiSample:
    rois: np.ndarray  # (R, 4) 0-based inclusive, foreground first
    labels: np.ndarray  # (R,) int64: class 1..20 for foreground, 0 for background
    gt_boxes: np.ndarray  # (R, 4) the box each RoI overlaps most (the regression target of foreground RoIs)
    overlaps: np.ndarray  # (R,) that IoU


def sample_rois(proposals: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray, cfg: SamplingConfig,
                rng: np.random.Generator) -> RoiSample:
    """One image's RoIs for a training step (module docstring)."""
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    rois = np.concatenate([gt_boxes, np.asarray(proposals, dtype=np.float64).reshape(-1, 4)])
    if len(gt_boxes) == 0:  # an image with only difficult objects: no label to learn; Fast R-CNN skips it too
        empty = np.zeros((0, 4))
        return RoiSample(empty, np.zeros(0, dtype=np.int64), empty, np.zeros(0))
    ov = iou(rois, gt_boxes)
    best = ov.argmax(axis=1)
    max_ov = ov[np.arange(len(rois)), best]
    fg = np.flatnonzero(max_ov >= cfg.fg_thresh)
    n_fg = min(cfg.fg_per_image, len(fg))
    fg = rng.choice(fg, size=n_fg, replace=False) if n_fg else fg[:0]
    bg = np.flatnonzero((max_ov < cfg.bg_hi) & (max_ov >= cfg.bg_lo))
    n_bg = min(cfg.rois_per_image - n_fg, len(bg))
    bg = rng.choice(bg, size=n_bg, replace=False) if n_bg else bg[:0]
    keep = np.concatenate([fg, bg]).astype(np.int64)
    labels = np.asarray(gt_classes, dtype=np.int64)[best[keep]]
    labels[n_fg:] = 0
    return RoiSample(rois[keep], labels, gt_boxes[best[keep]], max_ov[keep])
