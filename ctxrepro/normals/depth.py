"""Surface normals from a depth map by local plane fitting (paper section 4.4; the issue's fallback when the
FAIR benchmark's ground-truth zip is not given).

Method, per pixel:
1. Back-project every pixel with the NYU toolbox's RGB intrinsics (camera_params.m) in the toolbox's 1-based
   pixel convention: X = (c + 1 - cx) / fx * Z, Y = (r + 1 - cy) / fy * Z, with (r, c) 0-based. The frame is
   x right, y down, z forward (OpenCV's), the frame of the tiny world's exact normals.
2. Take the neighbours in a `window` x `window` square around the pixel (every `step`-th row and column),
   keep those with a depth reading whose depth is within `max_rel_depth` x the centre's depth of the centre's
   (so a plane is not fitted across a depth discontinuity: a box edge against the wall behind it).
3. Fit a plane by total least squares: the normal is the eigenvector of the kept points' 3x3 covariance with
   the smallest eigenvalue. At least `min_points` neighbours (and the centre itself) must have a reading.
4. Orient the normal toward the camera (dot with the viewing ray < 0), as NYUv2's ground truth does.

Defaults: a 21 x 21 window sampled every 2 px (121 points) and a 5% depth gate. Kinect noise grows with
depth squared (about 1.3 cm at 3 m); a 21-px window spans about 12 cm at 3 m. Measured on the tiny world's
noisy rawDepths (6 rooms, pixels whose whole window lies on one plane): median error 1.3-3.4 degrees with this
window, 5.2 with 13 x 13 and 9.7 with 9 x 9; a wider window would blur creases more. Sums are over
coordinates relative to the centre point (float32 offsets, float64 covariance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxrepro.config import param

# NYU toolbox intrinsics of the RGB camera (camera_params.m): fx, fy, cx, cy in 1-based pixel units.
NYU_INTRINSICS = (518.857901, 519.469611, 325.582449, 253.736166)
PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # upper triangle of a 3x3 covariance


@dataclass(frozen=True)
class PlaneFit:
    """Settings of the local plane fit (see the module docstring for why these defaults)."""

    window: int = param(21, min=3, help="odd side of the neighbourhood in pixels")
    step: int = param(2, min=1, help="use every step-th row and column of the window (must divide window // 2)")
    min_points: int = param(24, min=3, help="fewer valid neighbours than this (of 121 by default): no normal")
    max_rel_depth: float = param(0.05, help="leave out neighbours whose depth differs from the centre's by more "
                                            "than this fraction of it (no plane across a depth edge)")

    def __post_init__(self) -> None:
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"PlaneFit.window={self.window}: must be an odd number >= 3")
        if self.step < 1 or (self.window // 2) % self.step:
            raise ValueError(f"PlaneFit.step={self.step}: must divide the window's half-width {self.window // 2}, "
                             f"so the sampled offsets are symmetric and include the centre")
        if self.min_points < 3:
            raise ValueError(f"PlaneFit.min_points={self.min_points}: a plane needs at least 3 points")
        if self.max_rel_depth <= 0:
            raise ValueError(f"PlaneFit.max_rel_depth={self.max_rel_depth}: must be > 0")


def back_project(depth: np.ndarray, intrinsics: tuple[float, float, float, float] = NYU_INTRINSICS) -> np.ndarray:
    """(H, W, 3) float64 camera-frame points of a (H, W) depth map in metres (step 1 of the module doc)."""
    fx, fy, cx, cy = intrinsics
    h, w = depth.shape
    z = depth.astype(np.float64)
    cols = (np.arange(w, dtype=np.float64) + 1.0 - cx) / fx
    rows = (np.arange(h, dtype=np.float64) + 1.0 - cy) / fy
    return np.stack([cols[None, :] * z, rows[:, None] * z, z], axis=-1)


def _moments(points: np.ndarray, valid: np.ndarray, fit: PlaneFit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, first and second moments of the gated neighbours, relative to each centre point."""
    h, w, _ = points.shape
    r = fit.window // 2
    padded = np.zeros((h + 2 * r, w + 2 * r, 3))
    padded[r:r + h, r:r + w] = points
    pvalid = np.zeros((h + 2 * r, w + 2 * r), bool)
    pvalid[r:r + h, r:r + w] = valid
    z = points[..., 2]
    gate = (fit.max_rel_depth * z).astype(np.float32)
    count = np.zeros((h, w), np.float32)
    first = np.zeros((h, w, 3), np.float32)
    second = np.zeros((h, w, 6), np.float32)
    for dy in range(-r, r + 1, fit.step):
        for dx in range(-r, r + 1, fit.step):
            # float32 is plenty for offsets within the depth gate (centimetres), and twice as fast
            rel = (padded[r + dy:r + dy + h, r + dx:r + dx + w] - points).astype(np.float32)
            keep = pvalid[r + dy:r + dy + h, r + dx:r + dx + w] & (np.abs(rel[..., 2]) <= gate)
            rel *= keep[..., None]
            count += keep
            first += rel
            for k, (a, b) in enumerate(PAIRS):
                second[..., k] += rel[..., a] * rel[..., b]
    return count, first, second


def normals_from_depth(depth: np.ndarray, valid: np.ndarray | None = None, fit: PlaneFit = PlaneFit(),
                       intrinsics: tuple[float, float, float, float] = NYU_INTRINSICS) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals (H, W, 3) float32 toward the camera, and where they exist (H, W) bool.

    depth: (H, W) metres; valid: where depth holds a reading (default: depth > 0 and finite). Pixels
    without a normal are zero in the output.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"normals_from_depth: depth has shape {depth.shape}; expected (H, W)")
    ok = np.isfinite(depth) & (depth > 0)
    valid = ok if valid is None else (np.asarray(valid, bool) & ok)
    points = back_project(np.where(valid, depth, 0.0), intrinsics)
    count, first, second = _moments(points, valid, fit)
    safe = np.maximum(count.astype(np.float64), 1.0)
    mean = first.astype(np.float64) / safe[..., None]
    cov = np.empty(depth.shape + (3, 3))
    for k, (a, b) in enumerate(PAIRS):
        cov[..., a, b] = cov[..., b, a] = second[..., k].astype(np.float64) / safe - mean[..., a] * mean[..., b]
    has = valid & (count >= fit.min_points)
    _, vectors = np.linalg.eigh(cov[has])
    normal = vectors[:, :, 0]  # eigh sorts eigenvalues ascending: column 0 is the plane normal
    rays = points[has] / depth[has, None].astype(np.float64)  # the viewing ray through each pixel (z = 1)
    normal *= np.where(np.einsum("ij,ij->i", normal, rays) > 0, -1.0, 1.0)[:, None]
    out = np.zeros(depth.shape + (3,), np.float32)
    out[has] = normal
    return out, has
