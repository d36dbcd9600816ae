"""The eight object categories, each drawn from parts in a fixed layout.

Paper section 3 argues that predicting the relative position of two patches requires recognising objects
and their parts ("where is the wheel relative to the window?"). So each category here is a fixed
arrangement of parts (a bus is a long box, a row of windows above, two wheels below), varied only in
colour, proportions within a narrow range, scale and facing direction: relative position is learnable,
and objects are detectable. Coordinates are normalised to the object's box (x right, y down), facing right.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ctxrepro.world.noise import hsv_colour, noise_patch

ASPECT = {  # width / height of the object's box
    "bus": 2.3, "car": 2.1, "diningtable": 1.6, "horse": 1.25,
    "motorbike": 1.6, "sofa": 2.0, "train": 3.2, "tvmonitor": 1.25,
}
SIDE_VIEW = ("bus", "car", "horse", "motorbike", "train")  # drawn facing right; flipped to face left
POSE = {"diningtable": "Unspecified", "sofa": "Frontal", "tvmonitor": "Frontal"}

_FIXED_ROLES = {
    "wheel": (25, 25, 28), "hub": (150, 150, 158), "dark": (38, 32, 30), "light": (250, 245, 205),
    "plate": (236, 236, 232), "window": (135, 165, 190),
}


@dataclass(frozen=True)
class Part:
    """One primitive: shape in rect | poly | circle | ellipse, its geometry, and its colour role.

    rect: (x0, y0, x1, y1); poly: ((x, y), ...); circle: (cx, cy, r) with r in units of the box height;
    ellipse: (cx, cy, rx, ry, angle_deg) with rx in box widths and ry in box heights.
    """

    shape: str
    geom: tuple
    role: str


def _row(x0: float, x1: float, y0: float, y1: float, n: int, fill: float, role: str) -> list:
    """n equal rectangles side by side in [x0, x1], each filling `fill` of its slot (windows, cushions)."""
    step = (x1 - x0) / n
    pad = step * (1.0 - fill) / 2.0
    return [Part("rect", (x0 + i * step + pad, y0, x0 + (i + 1) * step - pad, y1), role) for i in range(n)]


def _bus(rng: np.random.Generator) -> list:
    body = Part("poly", ((0.02, 0.05), (0.96, 0.05), (1.0, 0.12), (1.0, 0.83), (0.0, 0.83), (0.0, 0.1)), "body")
    parts = [body, Part("rect", (0.0, 0.56, 1.0, 0.62), "accent")]
    parts += _row(0.04, 0.78, 0.15, 0.45, int(rng.integers(5, 8)), 0.8, "window")
    parts += [Part("rect", (0.86, 0.13, 0.98, 0.5), "window"), Part("rect", (0.8, 0.15, 0.85, 0.8), "window")]
    for x in (0.2, 0.78):
        parts += [Part("circle", (x, 0.83, 0.15), "wheel"), Part("circle", (x, 0.83, 0.06), "hub")]
    return parts


def _car(rng: np.random.Generator) -> list:
    roof = rng.uniform(0.06, 0.14)
    parts = [
        Part("poly", ((0.0, 0.42), (0.3, 0.38), (0.72, 0.38), (0.97, 0.45), (1.0, 0.6), (1.0, 0.78),
                      (0.0, 0.78)), "body"),
        Part("poly", ((0.2, 0.42), (0.32, roof), (0.66, roof), (0.8, 0.42)), "body"),
        Part("poly", ((0.26, 0.4), (0.35, roof + 0.05), (0.47, roof + 0.05), (0.47, 0.4)), "window"),
        Part("poly", ((0.51, 0.4), (0.51, roof + 0.05), (0.64, roof + 0.05), (0.74, 0.4)), "window"),
        Part("ellipse", (0.97, 0.54, 0.02, 0.05, 0.0), "light"),
        Part("rect", (0.0, 0.47, 0.02, 0.56), "accent"),
    ]
    for x in (0.22, 0.79):
        parts += [Part("circle", (x, 0.78, 0.2), "wheel"), Part("circle", (x, 0.78, 0.09), "hub")]
    return parts


def _diningtable(rng: np.random.Generator) -> list:
    parts = [Part("rect", (0.14, 0.5, 0.18, 0.85), "wood_dark"), Part("rect", (0.82, 0.5, 0.86, 0.85), "wood_dark")]
    parts += [
        Part("poly", ((0.08, 0.18), (0.92, 0.18), (1.0, 0.42), (0.0, 0.42)), "wood"),
        Part("rect", (0.0, 0.42, 1.0, 0.5), "wood_dark"),
        Part("rect", (0.03, 0.5, 0.08, 1.0), "wood_dark"), Part("rect", (0.92, 0.5, 0.97, 1.0), "wood_dark"),
    ]
    for x in sorted(rng.uniform(0.2, 0.8, int(rng.integers(1, 4)))):
        parts.append(Part("ellipse", (float(x), rng.uniform(0.26, 0.34), 0.08, 0.045, 0.0), "plate"))
    if rng.random() < 0.6:
        parts.append(Part("rect", (0.47, 0.08, 0.53, 0.3), "accent"))
    return parts


def _horse(rng: np.random.Generator) -> list:
    parts = [Part("poly", ((0.16, 0.35), (0.1, 0.42), (0.05, 0.72), (0.12, 0.7), (0.18, 0.45)), "dark")]
    for x in (0.18, 0.28, 0.62, 0.72):
        parts += [Part("rect", (x, 0.48, x + 0.05, 0.95), "body"),
                  Part("rect", (x - 0.005, 0.95, x + 0.055, 1.0), "dark")]  # leg and hoof
    parts += [
        Part("ellipse", (0.45, 0.42, 0.3, 0.15, 0.0), "body"),
        Part("poly", ((0.62, 0.35), (0.74, 0.42), (0.87, 0.14), (0.78, 0.06)), "body"),
        Part("ellipse", (0.88, 0.14, 0.09, 0.055, 35.0), "body"),
        Part("poly", ((0.78, 0.07), (0.8, 0.0), (0.83, 0.08)), "body"),
        Part("poly", ((0.61, 0.33), (0.77, 0.05), (0.8, 0.08), (0.65, 0.37)), "dark"),
        Part("circle", (0.88, 0.11, 0.015), "dark"),
    ]
    return parts


def _motorbike(rng: np.random.Generator) -> list:
    parts = []
    for x in (0.2, 0.8):
        parts += [Part("circle", (x, 0.7, 0.29), "wheel"), Part("circle", (x, 0.7, 0.2), "hub"),
                  Part("circle", (x, 0.7, 0.06), "dark")]
    parts += [
        Part("poly", ((0.2, 0.7), (0.44, 0.42), (0.7, 0.42), (0.8, 0.7), (0.74, 0.7), (0.66, 0.5), (0.47, 0.5),
                      (0.26, 0.72)), "body"),
        Part("rect", (0.4, 0.5, 0.6, 0.7), "hub"),
        Part("ellipse", (0.56, 0.38, 0.12, 0.07, 0.0), "body"),
        Part("poly", ((0.28, 0.36), (0.46, 0.34), (0.46, 0.4), (0.3, 0.42)), "dark"),
        Part("poly", ((0.8, 0.7), (0.72, 0.18), (0.75, 0.17), (0.83, 0.7)), "hub"),
        Part("rect", (0.66, 0.13, 0.8, 0.18), "dark"),
        Part("ellipse", (0.8, 0.28, 0.025, 0.05, 0.0), "light"),
    ]
    return parts


def _sofa(rng: np.random.Generator) -> list:
    parts = [Part("poly", ((0.06, 0.14), (0.1, 0.08), (0.9, 0.08), (0.94, 0.14), (0.94, 0.58), (0.06, 0.58)), "body")]
    parts += _row(0.12, 0.88, 0.15, 0.55, int(rng.integers(2, 4)), 0.94, "cushion")
    parts += [Part("rect", (0.06, 0.52, 0.94, 0.78), "cushion")]
    for x0, x1 in ((0.0, 0.12), (0.88, 1.0)):
        parts += [Part("rect", (x0, 0.33, x1, 0.85), "body"),
                  Part("ellipse", ((x0 + x1) / 2, 0.33, 0.06, 0.05, 0.0), "body")]  # armrest, rounded top
    parts += [Part("rect", (0.02, 0.78, 0.98, 0.88), "body_dark"),
              Part("rect", (0.05, 0.88, 0.09, 1.0), "dark"), Part("rect", (0.91, 0.88, 0.95, 1.0), "dark")]
    return parts


def _train(rng: np.random.Generator) -> list:
    parts = [
        Part("rect", (0.0, 0.15, 0.82, 0.82), "body"),
        Part("poly", ((0.82, 0.15), (0.9, 0.15), (1.0, 0.5), (1.0, 0.82), (0.82, 0.82)), "body"),
        Part("rect", (0.0, 0.08, 0.88, 0.15), "hub"),
        Part("rect", (0.0, 0.55, 1.0, 0.6), "accent"),
        Part("poly", ((0.86, 0.22), (0.9, 0.22), (0.96, 0.45), (0.86, 0.45)), "window"),
        Part("rect", (0.02, 0.82, 0.95, 0.88), "dark"),
    ]
    parts += _row(0.03, 0.78, 0.25, 0.45, int(rng.integers(6, 10)), 0.75, "window")
    n = int(rng.integers(4, 7))
    for x in np.linspace(0.08, 0.88, n):
        parts.append(Part("circle", (float(x), 0.9, 0.08), "wheel"))
    return parts


def _tvmonitor(rng: np.random.Generator) -> list:
    return [
        Part("rect", (0.45, 0.78, 0.55, 0.9), "dark"),
        Part("poly", ((0.3, 0.9), (0.7, 0.9), (0.74, 1.0), (0.26, 1.0)), "dark"),
        Part("rect", (0.0, 0.0, 1.0, 0.78), "frame"),
        Part("rect", (0.06, 0.07, 0.94, 0.71), "screen"),
        Part("circle", (0.9, 0.745, 0.012), "light"),
    ]


LAYOUTS = {"bus": _bus, "car": _car, "diningtable": _diningtable, "horse": _horse, "motorbike": _motorbike,
           "sofa": _sofa, "train": _train, "tvmonitor": _tvmonitor}


def _role_colours(rng: np.random.Generator, category: str) -> dict:
    """Colour per part role: the body colour varies freely, functional parts keep their usual colours."""
    if category == "horse":
        body = np.array([(110, 70, 40), (60, 40, 30), (150, 120, 90), (200, 195, 185), (40, 35, 35)]
                        [int(rng.integers(5))], np.float32)
    else:
        body = hsv_colour(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.35, 0.95))
    wood = np.array([(120, 80, 45), (90, 60, 35), (160, 120, 80), (70, 45, 30)][int(rng.integers(4))], np.float32)
    colours = {k: np.array(v, np.float32) for k, v in _FIXED_ROLES.items()}
    colours["window"] = colours["window"] * np.float32(rng.uniform(0.55, 1.15))
    colours.update(
        body=body, body_dark=body * 0.6, cushion=np.clip(body * rng.uniform(0.8, 1.25), 0, 255),
        accent=hsv_colour(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.5, 1.0)),
        wood=wood, wood_dark=wood * 0.7, frame=np.array((30, 30, 34), np.float32) * rng.uniform(0.6, 2.0),
    )
    return colours


def _fixed(points: np.ndarray, wp: int, hp: int, flip: bool) -> np.ndarray:
    """Normalised (x, y) points to cv2's fixed-point pixel coordinates (shift 4 = 1/16 px)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2).copy()
    if flip:
        pts[:, 0] = 1.0 - pts[:, 0]
    return np.round(pts * (wp, hp) * 16.0).astype(np.int32)


def _rasterise(part: Part, wp: int, hp: int, flip: bool) -> np.ndarray:
    """The part's pixel mask (uint8 0/1) on the (hp, wp) object canvas."""
    mask = np.zeros((hp, wp), np.uint8)
    g = part.geom
    if part.shape == "rect":
        pts = _fixed(((g[0], g[1]), (g[2], g[1]), (g[2], g[3]), (g[0], g[3])), wp, hp, flip)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=4)
    elif part.shape == "poly":
        cv2.fillPoly(mask, [_fixed(g, wp, hp, flip)], 1, lineType=cv2.LINE_8, shift=4)
    elif part.shape == "circle":
        c = _fixed((g[0], g[1]), wp, hp, flip)[0]
        cv2.circle(mask, (int(c[0]), int(c[1])), int(round(g[2] * hp * 16)), 1, -1, cv2.LINE_8, 4)
    elif part.shape == "ellipse":
        c = _fixed((g[0], g[1]), wp, hp, flip)[0]
        axes = (int(round(g[2] * wp * 16)), int(round(g[3] * hp * 16)))
        angle = -g[4] if flip else g[4]
        cv2.ellipse(mask, (int(c[0]), int(c[1])), axes, angle, 0, 360, 1, -1, cv2.LINE_8, 4)
    else:
        raise ValueError(f"unknown part shape {part.shape!r}")
    return mask


def _screen(rng: np.random.Generator, hp: int, wp: int) -> np.ndarray:
    """A lit screen: a smooth two-colour picture, so a monitor's interior differs from its frame."""
    a = hsv_colour(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.6, 1.0))
    b = hsv_colour(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 1.0))
    t = noise_patch(rng, hp, wp, cell=max(8, hp // 3))[..., None]
    return (1 - t) * a + t * b


def render_object(rng: np.random.Generator, category: str, wp: int, hp: int, flip: bool) -> tuple:
    """Draw one object on a (hp, wp) canvas: returns (rgb float32 in [0, 255], mask bool)."""
    parts = LAYOUTS[category](rng)
    colours = _role_colours(rng, category)
    rows = np.linspace(1.1, 0.8, hp, dtype=np.float32)[:, None]  # lit from above
    shade = rows * (0.88 + 0.24 * noise_patch(rng, hp, wp, cell=max(8, hp // 5)))
    rgb = np.zeros((hp, wp, 3), np.float32)
    mask = np.zeros((hp, wp), bool)
    screen = _screen(rng, hp, wp) if category == "tvmonitor" else None
    for part in parts:
        sel = _rasterise(part, wp, hp, flip).astype(bool)
        if part.role == "screen":
            rgb[sel] = screen[sel]
        else:
            rgb[sel] = colours[part.role][None, :] * shade[sel][:, None]
        mask |= sel
    return np.clip(rgb, 0, 255), mask


def pose_of(category: str, flip: bool) -> str:
    """VOC's pose field: side views face right unless flipped (VOC 'Left' = facing left)."""
    if category in SIDE_VIEW:
        return "Left" if flip else "Right"
    return POSE[category]
