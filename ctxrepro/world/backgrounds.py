"""Scene layout for the procedural images: sky, distant hills and ground outdoors; wall and floor indoors.

docs/METHOD.md ("The tiny-world prototype"): most of the pretext signal on procedural scenes came from
scene layout (sky, ground, horizon, perspective), so the backgrounds carry that structure. Long straight
lines that continue across the whole image would let the network read relative position across the gap
(the shortcut the paper's gap and jitter block, section 3), so every long boundary is jittered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxrepro.world.noise import noise_patch, sample_tile, texture_bank, vertical_gradient, wobble

SKIES = (  # (top, horizon) colours: clear day, overcast, dusk
    ((55, 105, 200), (175, 205, 240)),
    ((135, 140, 150), (205, 205, 210)),
    ((60, 55, 115), (240, 165, 105)),
)
GROUNDS = ((80, 130, 50), (150, 130, 80), (95, 95, 100), (220, 222, 228), (200, 180, 130), (110, 85, 60))
WALLS = ((215, 205, 185), (190, 205, 215), (225, 215, 200), (180, 190, 165), (235, 230, 225), (200, 170, 150))
FLOORS = ((150, 105, 65), (120, 80, 50), (170, 150, 120), (110, 115, 125), (160, 60, 55))


@dataclass(frozen=True)
class Background:
    """A rendered backdrop (float RGB in [0, 255]) and, per column, the row where the ground starts."""

    image: np.ndarray
    ground_row: np.ndarray


def _jitter(rng: np.random.Generator, colour, spread: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0.0, spread, 3), 0, 255).astype(np.float32)


def _ground_plane(rng: np.random.Generator, rows: np.ndarray, w: int, h: int, horizon: float,
                  cell: float) -> tuple:
    """Texture of a ground plane seen in perspective, for the given image rows (column vector).

    A pixel at row y sees the plane at depth Z proportional to 1 / (y - horizon) and lateral position
    X = (x - w/2) / (y - horizon) in the same units; sampling a periodic tile at (X, Z) gives isotropic
    texture on the plane with true perspective foreshortening. Returns (texture, y - horizon).
    """
    xs = np.arange(w, dtype=np.float32)[None, :]
    dy = np.maximum(rows - np.float32(horizon), 1.0)
    k = np.float32(h * 0.5 * cell)  # texels per unit of (X, Z): sets the texture scale near the bottom
    u = (xs - np.float32(w * 0.5)) / dy * k + np.float32(rng.uniform(0, 256))
    v = np.broadcast_to(k * np.float32(h * 0.5) / dy + np.float32(rng.uniform(0, 256)), u.shape)
    bank = texture_bank()
    tile = bank[int(rng.integers(len(bank)))]
    return sample_tile(tile, u, v), np.broadcast_to(dy, u.shape)


def outdoor(rng: np.random.Generator, h: int, w: int, horizon: float) -> Background:
    """Sky with clouds over hazy hills and a textured ground plane; the horizon wobbles."""
    top, low = SKIES[int(rng.integers(len(SKIES)))]
    low = _jitter(rng, low)
    img = vertical_gradient(h, w, _jitter(rng, top), low)
    # one noise field serves as clouds in the sky and as shading on the hills (disjoint regions)
    noise = noise_patch(rng, h, w, cell=max(8, h // 3))
    clouds = np.clip((noise - 0.5) * 3.0, 0.0, 1.0) * np.float32(rng.uniform(0.3, 0.8))
    img += clouds[..., None] * (np.float32(235.0) - img)

    ground_row = (horizon + wobble(rng, w, h * 0.012)).astype(np.float32)
    hill_top = ground_row - np.abs(wobble(rng, w, h * rng.uniform(0.03, 0.1), waves=4)) - h * 0.01
    rows = np.arange(h, dtype=np.float32)[:, None]
    hills = (rows >= hill_top[None, :]) & (rows < ground_row[None, :])
    hill_col = 0.6 * _jitter(rng, GROUNDS[int(rng.integers(len(GROUNDS)))]) + 0.4 * low
    img[hills] = hill_col[None, :] * (0.85 + 0.3 * noise[hills])[:, None]

    r0 = int(np.clip(np.floor(ground_row.min()), 0, h))
    tex, dy = _ground_plane(rng, rows[r0:], w, h, float(horizon), cell=rng.uniform(0.3, 1.2))
    base = _jitter(rng, GROUNDS[int(rng.integers(len(GROUNDS)))], 12.0)
    haze = (0.6 * np.exp(-dy / np.float32(0.12 * h)))[..., None]  # distance fades toward the horizon colour
    col = base * (0.7 + 0.6 * tex)[..., None] * (1.0 - haze) + haze * low
    ground = rows[r0:] >= ground_row[None, :]
    np.copyto(img[r0:], col, where=ground[..., None])
    return Background(img, ground_row)


def _wall_corner(rng: np.random.Generator, h: int, w: int, floor: float) -> tuple:
    """Floor and ceiling boundaries of a room corner: two slanted segments meeting at column xc, each
    wobbling by about 0.7% of the height so no edge can be extrapolated across the patch gap."""
    xc = rng.uniform(0.2, 0.8) * w
    xs = np.arange(w, dtype=np.float32)
    s_left, s_right = rng.uniform(-0.25, 0.05), rng.uniform(-0.05, 0.25)
    slope = np.where(xs < xc, s_left, s_right)
    floor_row = floor + slope * (xs - xc) + wobble(rng, w, h * 0.007)
    ceil0 = rng.uniform(-0.15, 0.18) * h
    ceil_row = ceil0 - 0.7 * slope * (xs - xc) + wobble(rng, w, h * 0.007)
    return xc, floor_row.astype(np.float32), ceil_row.astype(np.float32)


def indoor(rng: np.random.Generator, h: int, w: int, floor: float) -> Background:
    """Two walls meeting at a corner, a ceiling band, a baseboard, and a plank or carpet floor."""
    xc, floor_row, ceil_row = _wall_corner(rng, h, w, floor)
    wall = _jitter(rng, WALLS[int(rng.integers(len(WALLS)))], 10.0)
    xs = np.arange(w, dtype=np.float32)[None, :]
    rows = np.arange(h, dtype=np.float32)[:, None]
    corner = xc + wobble(rng, h, w * 0.008)[:, None]
    light = np.where(xs < corner, np.float32(rng.uniform(0.75, 0.95)), np.float32(rng.uniform(0.95, 1.1)))
    paint = 0.93 + 0.1 * noise_patch(rng, h, w, cell=int(rng.choice((8, 16, 32))))
    img = wall * (light * (1.05 - 0.25 * rows / h) * paint)[..., None]
    np.copyto(img, _jitter(rng, (238, 238, 235), 6.0) * 0.9, where=(rows < ceil_row[None, :])[..., None])
    board = (rows >= floor_row[None, :] - h * 0.025) & (rows < floor_row[None, :])
    trim = _jitter(rng, (240, 240, 235) if rng.random() < 0.5 else (90, 65, 45), 10.0)
    np.copyto(img, trim, where=board[..., None])

    r0 = int(np.clip(np.floor(floor_row.min()), 0, h))
    vanish = float(floor) - h * 0.35  # the floor's horizon lies above the floor line (camera looks down)
    tex, dy = _ground_plane(rng, rows[r0:], w, h, vanish, cell=rng.uniform(0.3, 1.2))
    base = _jitter(rng, FLOORS[int(rng.integers(len(FLOORS)))], 10.0)
    if rng.random() < 0.6:  # planks: stripes receding toward the vanishing point, each its own shade
        u = (xs - np.float32(w * 0.5)) / dy * np.float32(h * 0.5)
        plank = np.floor(u / np.float32(rng.uniform(12, 30))).astype(np.int64) % 37
        plank_shade = rng.uniform(0.0, 1.0, 37).astype(np.float32)[plank]
        tex = 0.5 * tex + 0.5 * plank_shade
    col = base * (0.75 + 0.5 * tex)[..., None]
    np.copyto(img[r0:], col, where=(rows[r0:] >= floor_row[None, :])[..., None])
    return Background(img, floor_row)
