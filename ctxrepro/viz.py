"""Figures shared by the evaluation stages: image montages (Figures 4 and 5), confusion matrices, plot CSVs.

Everything draws on matplotlib's object API (`Figure` + Agg canvas), never `pyplot`, so no global figure
state leaks between calls, and every file is written atomically (`ctxrepro.io`): a figure is complete or
absent. Images are HxWx3 uint8 arrays or (3, H, W) uint8 tensors.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ctxrepro.io import atomic_write_bytes, atomic_write_text

GREEN, RED, GREY, WHITE = (40, 170, 60), (210, 40, 40), (150, 150, 150), (255, 255, 255)


def to_hwc(image) -> np.ndarray:
    """(3, H, W) tensor/array or (H, W, 3) array -> (H, W, 3) uint8 array."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"to_hwc: expected a 3-D image, got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape[2] != 3:
        raise ValueError(f"to_hwc: expected 3 channels, got shape {arr.shape}")
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


def letterbox(image, size: int, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Scale an image to fit a size x size tile (aspect kept, centred on `fill`)."""
    img = to_hwc(image)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    # nearest for enlargement keeps small patches crisp (their pixels are the point of Figure 4)
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    small = np.asarray(Image.fromarray(img).resize((nw, nh), resample))
    tile = np.empty((size, size, 3), np.uint8)
    tile[:] = fill
    y, x = (size - nh) // 2, (size - nw) // 2
    tile[y:y + nh, x:x + nw] = small
    return tile


def frame(tile: np.ndarray, colour: tuple[int, int, int], width: int = 2) -> np.ndarray:
    """A copy of `tile` with a coloured border of `width` px drawn inside it."""
    out = tile.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out


def grid(rows: Sequence[Sequence[np.ndarray | None]], tile: int, pad: int = 2,
         group_gaps: Sequence[int] = (), gap: int = 10, fill: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Tiles (each tile x tile x 3; None = empty) into one image; an extra `gap` px before each column
    index in `group_gaps`. Returns the composed (H, W, 3) uint8 array."""
    n_cols = max((len(r) for r in rows), default=0)
    if not rows or n_cols == 0:
        raise ValueError("grid: no tiles")
    xs = [pad + c * (tile + pad) + gap * sum(1 for g in group_gaps if g <= c) for c in range(n_cols)]
    out = np.empty((pad + len(rows) * (tile + pad), xs[-1] + tile + pad, 3), np.uint8)
    out[:] = fill
    for r, row in enumerate(rows):
        y = pad + r * (tile + pad)
        for c, t in enumerate(row):
            if t is None:
                continue
            if t.shape != (tile, tile, 3):
                raise ValueError(f"grid: tile ({r}, {c}) has shape {t.shape}, expected {(tile, tile, 3)}")
            out[y:y + tile, xs[c]:xs[c] + tile] = t
    return out


def column_centres(n_cols: int, tile: int, pad: int = 2, group_gaps: Sequence[int] = (), gap: int = 10) -> list[float]:
    """x centre (px) of each column of a `grid` built with the same arguments."""
    return [pad + c * (tile + pad) + gap * sum(1 for g in group_gaps if g <= c) + tile / 2 for c in range(n_cols)]


def _figure(width_px: int, height_px: int, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(path: Path | str, image) -> None:
    """An image array/tensor as a PNG file, written atomically."""
    buf = io.BytesIO()
    Image.fromarray(to_hwc(image)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_annotated(path: Path | str, image: np.ndarray, title: str = "",
                   labels: Sequence[tuple[float, str]] = (), header_px: int = 40, footer: str = "") -> None:
    """`image` at 1:1 scale under a header strip holding `title` and column `labels` ((x px, text)),
    with an optional `footer` line; PNG, written atomically."""
    h, w = image.shape[:2]
    footer_px = 22 if footer else 0
    fig = _figure(w, h + header_px + footer_px)
    ax = fig.add_axes((0, footer_px / (h + header_px + footer_px), 1, h / (h + header_px + footer_px)))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    top = 1 - 4 / (h + header_px + footer_px)
    if title:
        fig.text(0.5, top, title, ha="center", va="top", fontsize=10)
    for x, text in labels:
        fig.text(x / w, 1 - (header_px - 4) / (h + header_px + footer_px), text, ha="center", va="bottom",
                 fontsize=8)
    if footer:
        fig.text(0.01, 4 / (h + header_px + footer_px), footer, ha="left", va="bottom", fontsize=7)
    atomic_write_bytes(path, _png(fig))


def paste_patches(height: int, width: int, patches: Sequence, centres: np.ndarray, scale: float = 1.0,
                  fill: tuple[int, int, int] = WHITE) -> np.ndarray:
    """A height x width canvas with each patch (scaled by `scale`) centred at its (x, y) in [0, 1]
    coordinates (x / width, y / height); later patches cover earlier ones; clipped at the border."""
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = fill
    for patch, (cx, cy) in zip(patches, np.asarray(centres, dtype=np.float64)):
        p = to_hwc(patch)
        side = max(1, round(p.shape[0] * scale))
        p = np.asarray(Image.fromarray(p).resize((side, side), Image.BILINEAR)) if side != p.shape[0] else p
        y0, x0 = round(cy * height - side / 2), round(cx * width - side / 2)
        ya, xa = max(0, y0), max(0, x0)
        yb, xb = min(height, y0 + side), min(width, x0 + side)
        if yb > ya and xb > xa:
            canvas[ya:yb, xa:xb] = p[ya - y0:yb - y0, xa - x0:xb - x0]
    return canvas


def plot_confusion(path: Path | str, counts: np.ndarray, labels: Sequence[str], title: str = "",
                   xlabel: str = "predicted", ylabel: str = "actual") -> None:
    """A confusion matrix as a PNG: cells shaded by row-normalised rate, annotated with counts."""
    counts = np.asarray(counts)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"plot_confusion: counts {counts.shape} do not match {n} labels")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = _figure(520, 480)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of row")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, _png(fig))


def write_csv(path: Path | str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV file (for DVC plots or recorded selections), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"write_csv {path}: row {row!r} has {len(row)} fields, header has {len(header)}")
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())
