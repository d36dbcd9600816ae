"""Procedural scenes: objects placed on a laid-out backdrop, with exact VOC-style annotations.

ImageNet-layout images hold one dominant object of their class; VOC-layout images hold 1-4 objects with
exact boxes (from the drawn pixels), some truncated by the border or too small to count (difficult).
Optional lateral chromatic aberration scales the green channel toward the image centre (paper section 3.1,
"chromatic aberration"); the scene is rendered with a margin and cropped so that no empty border tells the
network where a patch came from (docs/METHOD.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ctxrepro.world import backgrounds
from ctxrepro.world.objects import ASPECT, pose_of, render_object
from ctxrepro.world.spec import INDOOR, OUTDOOR

# Object height relative to its distance below the horizon (real height over camera height), so objects
# lower in the frame are larger: a perspective cue shared by the whole world.
SIZE = {"bus": 1.9, "car": 0.95, "diningtable": 0.55, "horse": 1.2, "motorbike": 0.8, "sofa": 0.6,
        "train": 2.1, "tvmonitor": 0.45}


@dataclass(frozen=True)
class Annotation:
    """One object as VOC annotates it: box in 1-based inclusive pixels of its visible extent."""

    category: str
    pose: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    truncated: bool
    difficult: bool
    occluded: bool


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: tuple


@dataclass(frozen=True)
class _Placement:
    category: str
    x0: int  # top-left corner in view coordinates (may lie outside the view)
    y0: int
    wp: int
    hp: int
    flip: bool


def aberration_margin(w: int, h: int, scale: float | None) -> int:
    """Pixels to render beyond each border so that resampling green never reads outside the canvas."""
    if scale is None or scale >= 1.0:
        return 0
    return int(math.ceil((1.0 / scale - 1.0) * math.hypot(w, h) / 2.0)) + 2


def chromatic_aberration(canvas: np.ndarray, margin: int, scale: float) -> np.ndarray:
    """Scale the green channel by `scale` about the centre of the view, then crop the margin away.

    Green at output pixel p is read at c + (p - c) / scale, i.e. the green image shrinks toward the
    centre c, as lateral chromatic aberration of a real lens does (paper section 3.1).
    """
    h2, w2 = canvas.shape[:2]
    cx, cy = (w2 - 1) / 2.0, (h2 - 1) / 2.0
    inv = 1.0 / scale
    m = np.array([[inv, 0.0, cx - cx * inv], [0.0, inv, cy - cy * inv]], np.float64)
    green = cv2.warpAffine(np.ascontiguousarray(canvas[..., 1]), m, (w2, h2),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    out = canvas.copy()
    out[..., 1] = green
    return out[margin:h2 - margin, margin:w2 - margin] if margin else out


def _shadow(img: np.ndarray, p: _Placement, m: int) -> None:
    """A soft dark ellipse under the object, so it stands on the ground rather than floats."""
    cx, cy = p.x0 + m + p.wp / 2.0, p.y0 + m + p.hp
    ax, ay = max(2.0, p.wp * 0.55), max(2.0, p.hp * 0.07)
    x0, x1 = int(max(0, cx - ax - 4)), int(min(img.shape[1], cx + ax + 4))
    y0, y1 = int(max(0, cy - ay - 4)), int(min(img.shape[0], cy + ay + 4))
    if x1 <= x0 or y1 <= y0:
        return
    shade = np.zeros((y1 - y0, x1 - x0), np.float32)
    cv2.ellipse(shade, (int(cx - x0), int(cy - y0)), (int(ax), int(ay)), 0, 0, 360, 1.0, -1)
    shade = cv2.GaussianBlur(shade, (0, 0), max(1.0, ay / 2.0))
    img[y0:y1, x0:x1] *= (1.0 - 0.45 * shade)[..., None]


def _compose(rng: np.random.Generator, img: np.ndarray, places: list, m: int, w: int, h: int) -> tuple:
    """Draw objects far to near onto the canvas; returns (label map of the view, per-object pixel counts)."""
    labels = np.full(img.shape[:2], -1, np.int16)
    counts = []
    for i, p in enumerate(places):
        _shadow(img, p, m)
        rgb, mask = render_object(rng, p.category, p.wp, p.hp, p.flip)
        cx0, cy0 = p.x0 + m, p.y0 + m  # canvas coordinates of the object's top-left
        a0, b0 = max(0, cx0), max(0, cy0)
        a1, b1 = min(img.shape[1], cx0 + p.wp), min(img.shape[0], cy0 + p.hp)
        sub = mask[b0 - cy0:b1 - cy0, a0 - cx0:a1 - cx0]
        img[b0:b1, a0:a1][sub] = rgb[b0 - cy0:b1 - cy0, a0 - cx0:a1 - cx0][sub]
        labels[b0:b1, a0:a1][sub] = i
        # pixels of the object inside the view, to tell truncation (some fall outside) from occlusion
        vx0, vy0 = max(0, p.x0), max(0, p.y0)
        vx1, vy1 = min(w, p.x0 + p.wp), min(h, p.y0 + p.hp)
        inside = int(mask[vy0 - p.y0:vy1 - p.y0, vx0 - p.x0:vx1 - p.x0].sum()) if vx1 > vx0 and vy1 > vy0 else 0
        counts.append((int(mask.sum()), inside))
    return labels[m:m + h, m:m + w], counts


def _annotate(places: list, labels: np.ndarray, counts: list) -> tuple:
    """VOC annotations from the final label map: exact visible boxes and the flags VOC records."""
    out = []
    short = min(labels.shape)
    for i, p in enumerate(places):
        vis = labels == i
        n_vis = int(vis.sum())
        if n_vis == 0:
            continue  # hidden entirely behind nearer objects: VOC would not annotate it
        rows, cols = np.flatnonzero(vis.any(axis=1)), np.flatnonzero(vis.any(axis=0))
        total, inside = counts[i]
        bw, bh = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        out.append(Annotation(
            category=p.category, pose=pose_of(p.category, p.flip),
            xmin=int(cols[0]) + 1, ymin=int(rows[0]) + 1, xmax=int(cols[-1]) + 1, ymax=int(rows[-1]) + 1,
            truncated=inside < total, occluded=n_vis < 0.95 * inside,
            difficult=bool(min(bw, bh) < max(10, 0.06 * short) or n_vis < 0.3 * total)))
    return tuple(out)


def _finish(rng: np.random.Generator, canvas: np.ndarray, m: int, scale: float | None) -> np.ndarray:
    """Camera effects: aberration (with crop), exposure, sensor noise; quantise to uint8."""
    if m:
        canvas = chromatic_aberration(canvas, m, scale)
    canvas = canvas * np.float32(rng.uniform(0.85, 1.15)) + np.float32(rng.uniform(-12, 12))
    # sensor noise: uniform with std 2 (cheaper to draw than Gaussian, looks the same after JPEG)
    canvas += (rng.random(canvas.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(6.93)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _size(rng: np.random.Generator, long_side: float, aspects: tuple, probs: tuple) -> tuple:
    r = float(rng.choice(aspects, p=probs))
    return int(round(long_side * min(1.0, r))), int(round(long_side * min(1.0, 1.0 / r)))


def _backdrop(rng: np.random.Generator, indoor: bool, w: int, h: int, m: int, ground: float):
    maker = backgrounds.indoor if indoor else backgrounds.outdoor
    return maker(rng, h + 2 * m, w + 2 * m, ground + m)


def imagenet_scene(rng: np.random.Generator, category: str, image_size: int, scale: float | None) -> Scene:
    """One dominant object of `category`, centred-ish, standing on the ground; size varies around image_size."""
    w, h = _size(rng, image_size * rng.uniform(0.85, 1.25), (1.0, 4 / 3, 3 / 2, 3 / 4), (0.2, 0.4, 0.2, 0.2))
    wp = int(w * rng.uniform(0.45, 0.9))
    hp = int(wp / (ASPECT[category] * rng.uniform(0.92, 1.08)))
    if hp > 0.85 * h:
        wp, hp = int(wp * 0.85 * h / hp), int(0.85 * h)
    y_bottom = rng.uniform(max(hp + 2, 0.6 * h), 0.98 * h)
    horizon = float(np.clip(y_bottom - hp * rng.uniform(0.3, 1.0), 0.15 * h, 0.75 * h))
    x0 = int(w / 2 + rng.uniform(-0.12, 0.12) * w - wp / 2)
    flip = bool(rng.random() < 0.5)
    m = aberration_margin(w, h, scale)
    bg = _backdrop(rng, category in INDOOR, w, h, m, horizon)
    canvas = bg.image
    places = [_Placement(category, x0, int(y_bottom - hp), max(8, wp), max(8, hp), flip)]
    labels, counts = _compose(rng, canvas, places, m, w, h)
    return Scene(_finish(rng, canvas, m, scale), _annotate(places, labels, counts))


def _overlaps(a: _Placement, b: _Placement) -> bool:
    ix = max(0, min(a.x0 + a.wp, b.x0 + b.wp) - max(a.x0, b.x0))
    iy = max(0, min(a.y0 + a.hp, b.y0 + b.hp) - max(a.y0, b.y0))
    inter = ix * iy
    aa, ab = a.wp * a.hp, b.wp * b.hp
    return inter > 0.3 * (aa + ab - inter) or inter > 0.5 * min(aa, ab)


def _visible_fraction(p: _Placement, w: int, h: int) -> float:
    ix = max(0, min(w, p.x0 + p.wp) - max(0, p.x0))
    iy = max(0, min(h, p.y0 + p.hp) - max(0, p.y0))
    return ix * iy / float(p.wp * p.hp)


def _sample_places(rng: np.random.Generator, cats: list, w: int, h: int, ground: np.ndarray) -> list:
    """Rejection-sample object boxes: on the ground, perspective-scaled, some cut by the border."""
    places: list = []
    for cat in cats:
        for _ in range(30):
            xc = rng.uniform(-0.05, 1.05) * w
            g = float(ground[int(np.clip(xc, 0, w - 1))])
            yb = g + (1.06 * h - g) * rng.random() ** 0.7
            hp = int((yb - g) * SIZE[cat] * rng.uniform(0.7, 1.4))
            wp = int(hp * ASPECT[cat] * rng.uniform(0.92, 1.08))
            if hp < 10 or wp > 1.3 * w or hp > 1.2 * h:
                continue
            p = _Placement(cat, int(xc - wp / 2), int(yb - hp), wp, hp, bool(rng.random() < 0.5))
            if _visible_fraction(p, w, h) >= 0.5 and not any(_overlaps(p, q) for q in places):
                places.append(p)
                break
    return sorted(places, key=lambda q: q.y0 + q.hp)  # far (higher base) first, near last


def voc_scene(rng: np.random.Generator, image_size: int, scale: float | None) -> Scene:
    """1-4 objects of one setting (outdoor vehicles and horses, or indoor furniture) with exact boxes."""
    w, h = _size(rng, image_size * rng.uniform(1.15, 1.4), (4 / 3, 3 / 4, 3 / 2), (0.6, 0.25, 0.15))
    indoor = bool(rng.random() < 0.45)
    pool = INDOOR if indoor else OUTDOOR
    n = int(rng.choice((1, 2, 3, 4), p=(0.35, 0.3, 0.2, 0.15)))
    cats = [pool[int(k)] for k in rng.integers(0, len(pool), n)]
    ground = h * (rng.uniform(0.45, 0.7) if indoor else rng.uniform(0.3, 0.6))
    m = aberration_margin(w, h, scale)
    bg = _backdrop(rng, indoor, w, h, m, ground)
    places = _sample_places(rng, cats, w, h, bg.ground_row[m:m + w] - m)
    if not places:  # every try failed (rare): fall back to one mid-sized object in the middle
        cat = cats[0]
        hp = int(h * 0.4)
        places = [_Placement(cat, int(w / 2 - hp * ASPECT[cat] / 2), int(h * 0.9) - hp,
                             int(hp * ASPECT[cat]), hp, False)]
    canvas = bg.image
    labels, counts = _compose(rng, canvas, places, m, w, h)
    return Scene(_finish(rng, canvas, m, scale), _annotate(places, labels, counts))
