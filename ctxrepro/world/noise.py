"""Vectorised noise and texture helpers shared by the scene and room renderers (no per-pixel loops)."""

from __future__ import annotations

import colorsys
import functools

import cv2
import numpy as np

TILE = 512  # side of every texture tile; a power of two so every lattice cell divides it
CELLS = (8, 16, 32, 64, 128)  # feature sizes (texels) of the bank's tiles, two tiles each


def noise_tile(rng: np.random.Generator, size: int, cell: int, octaves: int = 4) -> np.ndarray:
    """A periodic fractal noise tile in [0, 1]: bicubic lattices whose cells halve per octave.

    Each lattice is padded by two cells with wrap-around before upsampling, and the padding is cropped
    away afterwards, so the bicubic kernel sees a periodic lattice and the tile wraps seamlessly.
    """
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        n = size // cell
        grid = np.pad(rng.random((n, n), dtype=np.float32), 2, mode="wrap")
        big = cv2.resize(grid, ((n + 4) * cell, (n + 4) * cell), interpolation=cv2.INTER_CUBIC)
        out += amp * big[2 * cell:2 * cell + size, 2 * cell:2 * cell + size]
        total += amp
        amp *= 0.5
        cell = max(1, cell // 2)
    return np.clip(out / total, 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def texture_bank() -> tuple:
    """A fixed library of periodic noise tiles, two per feature size in CELLS (index = 2 * size + k).

    Built once from a constant seed, like texture assets shipped with a renderer: per-image randomness
    picks a tile, an offset and a scale, which keeps scenes varied without re-synthesising noise.
    """
    rng = np.random.default_rng(20150707)
    return tuple(noise_tile(rng, TILE, c) for c in CELLS for _ in range(2))


def noise_patch(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """(h, w) noise in [0, 1] with features of about `cell` pixels: a randomly placed, randomly
    oriented window of a bank tile (wrapping), nearest in feature size to `cell`."""
    size = int(np.argmin([abs(np.log(cell / c)) for c in CELLS]))
    tile = texture_bank()[2 * size + int(rng.integers(2))]
    if rng.random() < 0.5:
        tile = tile.T
    rows = (int(rng.integers(TILE)) + np.arange(h)) % TILE
    cols = (int(rng.integers(TILE)) + np.arange(w)) % TILE
    return tile[rows[:, None], cols[None, :]]


def sample_tile(tile: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a periodic tile at continuous texel coordinates on a 2-D grid (u = column)."""
    size = tile.shape[0]
    mx = np.mod(u, size).astype(np.float32)
    my = np.mod(v, size).astype(np.float32)
    return cv2.remap(tile, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def sample_tile_points(tile: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping lookup of a periodic tile at scattered texel coordinates (any shape)."""
    size = tile.shape[0]
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = (u - u0).astype(np.float32), (v - v0).astype(np.float32)
    i0, j0 = v0.astype(np.int64) % size, u0.astype(np.int64) % size
    i1, j1 = (i0 + 1) % size, (j0 + 1) % size
    top = tile[i0, j0] * (1 - fu) + tile[i0, j1] * fu
    bottom = tile[i1, j0] * (1 - fu) + tile[i1, j1] * fu
    return top * (1 - fv) + bottom * fv


def vertical_gradient(h: int, w: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """(h, w, 3) float image blending colour `top` at row 0 into `bottom` at the last row."""
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    col = (1.0 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(col, (h, w, 3)).copy()


def wobble(rng: np.random.Generator, n: int, amplitude: float, waves: int = 3) -> np.ndarray:
    """A smooth random curve of n samples (sum of sines with random periods): jitters long edges."""
    x = np.arange(n, dtype=np.float32)
    out = np.zeros(n, np.float32)
    for k in range(waves):
        period = n * rng.uniform(0.15, 1.2) / (k + 1)
        out += amplitude / (k + 1) * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return out


def hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """An RGB colour in [0, 255] from hue in [0, 1), saturation and value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0
