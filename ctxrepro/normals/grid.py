"""Where the cells of the trunk's coarse output grid sit in the frame (section 4.4: targets and predictions).

The trunk's convolutions and pools do not tile the frame evenly: conv6 has no padding, so the AlexNet trunk's
cells sit 32 input px apart with the first centred at 60.5 px, not at 16 px, and the last cells overhang the
frame's far side by a different amount than the first. Training targets are the ground truth around each
cell's receptive-field centre, and the coarse predictions are interpolated back to full resolution between
those same centres, so targets and predictions refer to the same pixels.

Coordinates are continuous: pixel j covers [j, j + 1), its centre is at j + 0.5. A cell's receptive-field
centre follows from each layer's kernel k, stride s and padding p: output cell i of a layer reads input cells
i*s - p .. i*s - p + k - 1, centred at input cell i*s - p + (k - 1) / 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ctxrepro.pretext.model import conv_output
from ctxrepro.transfer.trunk import InputNorm

WINDOWED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
POINTWISE = (nn.ReLU, nn.LocalResponseNorm, nn.BatchNorm2d, nn.Dropout, nn.Identity, InputNorm)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def receptive_field(layers: Sequence[tuple[str, nn.Module]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """((offset_y, step_y), (offset_x, step_x)) in input px: output cell i is centred at offset + step * i."""
    offset, step = [0.5, 0.5], [1.0, 1.0]
    for name, m in layers:
        if isinstance(m, WINDOWED):
            k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
            d = _pair(m.dilation) if isinstance(m, nn.Conv2d) else (1, 1)
            for ax in (0, 1):
                offset[ax] += step[ax] * (d[ax] * (k[ax] - 1) / 2 - p[ax])
                step[ax] *= s[ax]
        elif not isinstance(m, POINTWISE):
            raise ValueError(f"layer {name} ({type(m).__name__}): no known receptive-field geometry")
    return (offset[0], step[0]), (offset[1], step[1])


def cell_centres(layers: Sequence[tuple[str, nn.Module]], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Receptive-field centres (input px) of the output rows and columns for a (H, W) input."""
    (oy, sy), (ox, sx) = receptive_field(layers)
    h, w = conv_output(list(layers), size[0])[1], conv_output(list(layers), size[1])[1]
    return oy + sy * np.arange(h), ox + sx * np.arange(w)


@dataclass(frozen=True)
class CellGrid:
    """The coarse grid in frame coordinates: centre rows `ys` (h,) and columns `xs` (w,), the spacing of
    neighbouring centres `step` (y, x), and the frame `size` (H, W), all in frame px."""

    ys: np.ndarray
    xs: np.ndarray
    step: tuple[float, float]
    size: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ys), len(self.xs)


def cell_grid(layers: Sequence[tuple[str, nn.Module]], input_size: tuple[int, int],
              frame_size: tuple[int, int]) -> CellGrid:
    """The trunk's cells for a frame resized (edges to edges) to `input_size`, in the frame's pixels."""
    ys, xs = cell_centres(layers, input_size)
    (_, sy), (_, sx) = receptive_field(layers)
    fy, fx = frame_size[0] / input_size[0], frame_size[1] / input_size[1]
    return CellGrid(ys * fy, xs * fx, (sy * fy, sx * fx), (int(frame_size[0]), int(frame_size[1])))


def _windows(centres: np.ndarray, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's pixels [lo, hi): those whose centres j + 0.5 lie in [c - step / 2, c + step / 2), clipped
    to the frame; empty for a centre outside the frame."""
    lo = np.clip(np.ceil(centres - step / 2 - 0.5), 0, n).astype(int)
    hi = np.clip(np.ceil(centres + step / 2 - 0.5), 0, n).astype(int)
    inside = (centres >= 0) & (centres < n)
    return lo, np.where(inside, np.maximum(hi, lo + 1), lo)


def window_means(values: np.ndarray, grid: CellGrid) -> tuple[np.ndarray, np.ndarray]:
    """Sums of (H, W, C) `values` over each cell's window, (h, w, C), and each window's pixel count (h, w)."""
    integral = np.zeros((values.shape[0] + 1, values.shape[1] + 1, values.shape[2]), np.float64)
    integral[1:, 1:] = values.astype(np.float64).cumsum(0).cumsum(1)
    y0, y1 = _windows(grid.ys, grid.step[0], values.shape[0])
    x0, x1 = _windows(grid.xs, grid.step[1], values.shape[1])
    sums = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    area = np.outer(y1 - y0, x1 - x0)
    return sums, area


def interpolation_matrix(centres: np.ndarray, n: int) -> Tensor:
    """(n, h) weights of linear interpolation between cells centred at `centres`, at the n pixel centres;
    beyond the first and last centre the nearest cell's value."""
    h = len(centres)
    m = torch.zeros(n, h, dtype=torch.float64)
    if h == 1:
        return m.fill_(1.0)
    t = torch.from_numpy(np.interp(np.arange(n) + 0.5, centres, np.arange(h, dtype=np.float64)))
    i0 = t.floor().long().clamp(max=h - 2)
    w = t - i0
    rows = torch.arange(n)
    m[rows, i0] = 1.0 - w
    m[rows, i0 + 1] += w
    return m
