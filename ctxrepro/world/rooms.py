"""NYUv2-like rooms: boxes in a box, ray-cast with the NYU camera, so depth and normals are exact.

Stands in for NYU Depth v2 (paper section 4.2, surface normal estimation). Each image is a room (floor,
ceiling, four walls) holding a few axis-aligned or yawed boxes (tables with legs, cabinets, beds, crates),
seen by a pinhole camera with the NYU toolbox's RGB intrinsics from a random pose.

Conventions (what the loaders and the normals stage must assume):
- Pixel (row r, col c), 0-based, looks along d = ((c + 1 - cx) / fx, (r + 1 - cy) / fy, 1) in the camera
  frame: the toolbox's 1-based pixel grid (meshgrid(1:640, 1:480)) with its intrinsics.
- Depth is the camera-frame z of the hit point in metres (what the Kinect measures), not the ray length.
- Normals are in the camera frame (x right, y down, z forward, the OpenCV frame), unit length, and point
  toward the camera (dot(n, d) < 0). They are exact: one constant normal per hit plane.
- rawDepths is depth with Kinect-like noise, 1/1024 m quantisation and holes (0) at the image border, beyond the
  sensor's range, on dark glossy surfaces and in the shadows beside depth discontinuities.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from ctxrepro.world.noise import hsv_colour, sample_tile_points, texture_bank
from ctxrepro.world.spec import NYU_CX, NYU_CY, NYU_FX, NYU_FY, NYU_HEIGHT, NYU_WIDTH

LABEL_NAMES = ("wall", "floor", "ceiling", "table", "cabinet", "bed", "box")  # labels 1..7; 0 = unlabeled
SCENE_TYPES = ("bedroom", "living_room", "office", "kitchen", "dining_room")


@dataclass(frozen=True)
class Room:
    """One rendered frame, H x W = 480 x 640 (NumPy layout; the .mat writer transposes)."""

    image: np.ndarray  # (480, 640, 3) uint8
    depth: np.ndarray  # (480, 640) float32 metres, exact
    raw_depth: np.ndarray  # (480, 640) float32 metres, 0 = no reading
    normals: np.ndarray  # (480, 640, 3) float32, camera frame, unit, toward the camera
    labels: np.ndarray  # (480, 640) uint16, 1-based into LABEL_NAMES
    scene_type: str


@dataclass(frozen=True)
class _Box:
    centre: np.ndarray  # (3,) world, y up
    half: np.ndarray  # (3,) half extents in the box frame
    yaw: float  # rotation about the world y axis, radians
    label: int  # 1-based into LABEL_NAMES
    material: int  # index into the room's material list


@dataclass(frozen=True)
class _Material:
    colour: np.ndarray  # (3,) albedo in [0, 1]
    tile: int  # index into texture_bank()
    scale: float  # texels per metre
    contrast: float
    planks: float  # plank width in metres (0 = none)
    glossy: bool  # dark glossy: the Kinect often reads nothing there


@functools.lru_cache(maxsize=1)
def camera_rays() -> np.ndarray:
    """(3, H*W) float64 ray directions in the camera frame, z = 1 (row-major pixel order)."""
    rows, cols = np.mgrid[0:NYU_HEIGHT, 0:NYU_WIDTH].astype(np.float64)
    d = np.stack([(cols + 1.0 - NYU_CX) / NYU_FX, (rows + 1.0 - NYU_CY) / NYU_FY, np.ones_like(rows)])
    return d.reshape(3, -1)


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def camera_pose(rng: np.random.Generator, dims: np.ndarray) -> tuple:
    """(origin, R): R's columns are the camera's x (right), y (down), z (forward) axes in world coordinates."""
    origin = np.array([rng.uniform(0.3, 0.7) * dims[0], rng.uniform(1.1, 1.7), rng.uniform(0.25, 0.7)])
    yaw, pitch, roll = np.radians([rng.uniform(-40, 40), rng.uniform(5, 25), rng.uniform(-4, 4)])
    z = np.array([np.sin(yaw) * np.cos(pitch), -np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    x = np.cross(z, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    xr, yr = np.cos(roll) * x + np.sin(roll) * y, -np.sin(roll) * x + np.cos(roll) * y
    return origin, np.stack([xr, yr, z], axis=1)


def _table(rng: np.random.Generator, x: float, z: float, yaw: float, material: int) -> list:
    """A table top on four legs: five boxes sharing one yaw."""
    height, hl, hd = rng.uniform(0.65, 0.8), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5)
    rot = _yaw_matrix(yaw)
    boxes = [_Box(np.array([x, height - 0.02, z]), np.array([hl, 0.02, hd]), yaw, 4, material)]
    for sx in (-1, 1):
        for sz in (-1, 1):
            off = rot @ np.array([sx * (hl - 0.05), 0.0, sz * (hd - 0.05)])
            boxes.append(_Box(np.array([x + off[0], (height - 0.04) / 2, z + off[2]]),
                              np.array([0.025, (height - 0.04) / 2, 0.025]), yaw, 4, material))
    return boxes


def _furniture(rng: np.random.Generator, dims: np.ndarray, scene: str) -> list:
    """A few pieces on the floor, all beyond z = 1.3 m so the camera (z < 0.7 m) is never inside one."""
    w, _, d = dims
    boxes = []
    if scene in ("kitchen", "dining_room", "office", "living_room") or rng.random() < 0.3:
        boxes += _table(rng, rng.uniform(1.0, w - 1.0), rng.uniform(2.2, d - 1.2), rng.uniform(-0.5, 0.5), 3)
    if scene == "bedroom":
        hw, hh, hd = rng.uniform(0.45, 0.8), rng.uniform(0.25, 0.3), rng.uniform(0.95, 1.05)
        x = rng.choice([hw + 0.05, w - hw - 0.05])
        boxes.append(_Box(np.array([x, hh, d - hd - 0.05]), np.array([hw, hh, hd]), 0.0, 6, 5))
    for _ in range(int(rng.integers(1, 3))):  # cabinets against a side wall
        hw, hh, hd = rng.uniform(0.2, 0.3), rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.6)
        x = hw + 0.01 if rng.random() < 0.5 else w - hw - 0.01
        boxes.append(_Box(np.array([x, hh, rng.uniform(1.3 + hd, d - hd - 0.01)]), np.array([hw, hh, hd]),
                          0.0, 5, 4))
    for _ in range(int(rng.integers(0, 3))):  # loose crates
        s = rng.uniform(0.12, 0.3)
        boxes.append(_Box(np.array([rng.uniform(s + 0.3, w - s - 0.3), s, rng.uniform(1.4 + s, d - s - 0.3)]),
                          np.array([s, s, s * rng.uniform(0.7, 1.3)]), rng.uniform(-0.8, 0.8), 7, 6))
    return boxes


def _cast_room(o: np.ndarray, dirs: np.ndarray, dims: np.ndarray) -> tuple:
    """Exit point of every ray from inside the room box: (t, axis, sign of the ray along that axis)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(dirs > 0, dims[:, None], 0.0)
        t_axes = np.where(dirs != 0, (bound - o[:, None]) / dirs, np.inf)
    axis = np.argmin(t_axes, axis=0)
    t = np.take_along_axis(t_axes, axis[None], axis=0)[0]
    sign = np.sign(np.take_along_axis(dirs, axis[None], axis=0)[0])
    return t, axis, sign


def _cast_box(o: np.ndarray, dirs: np.ndarray, box: _Box) -> tuple:
    """Slab test of the given rays against one yawed box: (t_near, hit, axis in the box frame, -normal sign,
    hit point in the box frame). Axis, sign and point are only meaningful where hit."""
    rot = _yaw_matrix(box.yaw)
    ol = rot.T @ (o - box.centre)
    dl = rot.T @ dirs
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-box.half[:, None] - ol[:, None]) / dl
        t2 = (box.half[:, None] - ol[:, None]) / dl
    lo = np.fmin(t1, t2)
    t_near = np.maximum(np.maximum(lo[0], lo[1]), lo[2])
    t_far = np.fmax(t1, t2).min(axis=0)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    # the entry face is the slab whose near distance is largest
    axis = np.where(lo[0] == t_near, 0, np.where(lo[1] == t_near, 1, 2))
    sign = np.sign(dl[axis, np.arange(axis.size)])
    return t_near, hit, axis, sign, ol[:, None] + t_near * dl


def _screen_rect(o: np.ndarray, rot: np.ndarray, box: _Box) -> np.ndarray | None:
    """Flat indices of the pixels a box can cover (its projected corners' bounding rectangle, padded by
    two pixels); None when part of the box lies behind the camera plane, meaning every pixel."""
    signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1)
    corners = box.centre[:, None] + _yaw_matrix(box.yaw) @ (signs * box.half[:, None])
    cam = rot.T @ (corners - o[:, None])
    if (cam[2] <= 0.05).any():
        return None
    cols = NYU_FX * cam[0] / cam[2] + NYU_CX - 1.0
    rows = NYU_FY * cam[1] / cam[2] + NYU_CY - 1.0
    c0, c1 = int(max(0, np.floor(cols.min()) - 2)), int(min(NYU_WIDTH, np.ceil(cols.max()) + 3))
    r0, r1 = int(max(0, np.floor(rows.min()) - 2)), int(min(NYU_HEIGHT, np.ceil(rows.max()) + 3))
    if c1 <= c0 or r1 <= r0:
        return np.zeros(0, np.int64)
    return (np.arange(r0, r1)[:, None] * NYU_WIDTH + np.arange(c0, c1)[None, :]).ravel()


def _cast(o: np.ndarray, rot: np.ndarray, dirs: np.ndarray, dims: np.ndarray, boxes: list) -> dict:
    """Nearest hit per ray: depth t, world normal, label, material and 2-D texture coordinates (metres)."""
    t, axis, sign = _cast_room(o, dirs, dims)
    n = dirs.shape[1]
    normal = np.zeros((3, n))
    normal[axis, np.arange(n)] = -sign  # the room's inner faces point into the room, toward the camera
    label = np.where(axis == 1, np.where(sign < 0, 2, 3), 1).astype(np.uint16)
    material = np.where(axis == 1, np.where(sign < 0, 1, 2), 0).astype(np.int64)
    in_plane = np.array([[1, 2], [0, 2], [0, 1]])  # the two in-plane axes of a face, by its normal axis
    point = o[:, None] + t * dirs
    st = np.take_along_axis(point, in_plane[axis].T, axis=0)
    face = np.where(axis == 1, -1, axis * 2 + (sign > 0))  # walls 0, 1, 4, 5 (posters); -1 elsewhere
    for box in boxes:
        idx = _screen_rect(o, rot, box)
        idx = np.arange(n) if idx is None else idx
        tb, hit, baxis, bsign, lp = _cast_box(o, dirs[:, idx], box)
        keep = hit & (tb < t[idx])
        idx, tb, baxis, bsign, lp = idx[keep], tb[keep], baxis[keep], bsign[keep], lp[:, keep]
        t[idx] = tb
        local = np.zeros((3, idx.size))
        local[baxis, np.arange(idx.size)] = -bsign
        normal[:, idx] = _yaw_matrix(box.yaw) @ local
        label[idx], material[idx], face[idx] = box.label, box.material, -1
        st[:, idx] = np.take_along_axis(lp, in_plane[baxis].T, axis=0)
    return {"t": t, "normal": normal, "label": label, "material": material, "st": st, "face": face}


def _materials(rng: np.random.Generator) -> list:
    """Wall, floor, ceiling, table, cabinet, bed, crate: colours and textures drawn per room."""
    def mat(h, s, v, scale, contrast, planks=0.0, glossy=False):
        return _Material(hsv_colour(h, s, v) / 255.0, int(rng.integers(len(texture_bank()))), scale, contrast,
                         planks, glossy)
    return [
        mat(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.7, 0.95), 60.0, 0.12),
        mat(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.7), 90.0, 0.35,
            planks=rng.uniform(0.1, 0.2) if rng.random() < 0.6 else 0.0),
        mat(0.1, 0.03, 0.95, 40.0, 0.05),
        mat(rng.uniform(0.03, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.3, 0.6), 120.0, 0.3),
        mat(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.1, 0.8), 80.0, 0.15, glossy=rng.random() < 0.5),
        mat(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.5, 0.9), 150.0, 0.25),
        mat(0.09, 0.45, 0.65, 100.0, 0.3),
    ]


def _albedo(rng: np.random.Generator, hits: dict, mats: list) -> np.ndarray:
    """(3, N) albedo in [0, 1]: per-material textures in plane coordinates, plank stripes, a poster."""
    material, st = hits["material"], hits["st"]
    out = np.zeros((3, material.size), np.float32)
    for k, m in enumerate(mats):
        sel = np.flatnonzero(material == k)
        if not sel.size:
            continue
        s, t = st[0, sel], st[1, sel]
        tex = sample_tile_points(texture_bank()[m.tile], s * m.scale, t * m.scale)
        if m.planks:  # stripes along one floor axis, each plank its own shade
            plank = np.floor(s / m.planks).astype(np.int64) % 29
            tex = 0.5 * tex + 0.5 * rng.uniform(0.0, 1.0, 29).astype(np.float32)[plank]
        out[:, sel] = m.colour[:, None] * (1.0 - m.contrast + 2.0 * m.contrast * tex)[None, :]
    _poster(rng, hits, out)
    return out


def _poster(rng: np.random.Generator, hits: dict, albedo: np.ndarray) -> None:
    """Paint one poster on one wall, in that wall's coordinates (along the wall, height above the floor)."""
    face = int(rng.choice([0, 1, 4, 5]))  # walls x = 0, x = W, z = 0, z = D (face = 2 * axis + side)
    st = hits["st"]
    along, height = (st[1], st[0]) if face < 2 else (st[0], st[1])
    a0, h0 = rng.uniform(0.3, 1.5), rng.uniform(1.0, 1.6)
    sel = (hits["face"] == face) & (along > a0) & (along < a0 + rng.uniform(0.4, 1.0))
    sel &= (height > h0) & (height < h0 + rng.uniform(0.3, 0.7))
    albedo[:, sel] = (hsv_colour(rng.random(), 0.7, 0.8) / 255.0)[:, None]


def _shade(rng: np.random.Generator, o: np.ndarray, dirs: np.ndarray, hits: dict, albedo: np.ndarray,
           dims: np.ndarray) -> np.ndarray:
    """Colour from albedo and the exact normals: ambient light plus a ceiling lamp with distance falloff."""
    lamp = np.array([rng.uniform(0.3, 0.7) * dims[0], dims[1] - 0.05, rng.uniform(0.4, 0.7) * dims[2]])
    point = o[:, None] + hits["t"] * dirs
    to_lamp = lamp[:, None] - point
    dist2 = (to_lamp ** 2).sum(axis=0)
    cos = np.maximum(0.0, (hits["normal"] * to_lamp).sum(axis=0) / np.sqrt(dist2 + 1e-12))
    light = rng.uniform(0.25, 0.4) + rng.uniform(1.2, 2.0) * cos / (1.0 + 0.15 * dist2)
    rgb = np.clip(albedo * light[None, :].astype(np.float32), 0.0, 1.0) ** np.float32(1 / 1.2) * 255.0
    rgb = rgb.T.reshape(NYU_HEIGHT, NYU_WIDTH, 3)
    rgb += (rng.random(rgb.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(6.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _raw_depth(rng: np.random.Generator, depth: np.ndarray, image: np.ndarray, glossy: np.ndarray) -> np.ndarray:
    """Kinect-like reading: noise growing with depth squared, 1/1024 m steps, and the sensor's holes."""
    raw = depth + rng.standard_normal(depth.shape, dtype=np.float32) * np.float32(1.4e-3) * depth ** 2
    raw = np.round(raw * 1024.0) / 1024.0  # ~1 mm steps, binary-exact: float32 low bits stay zero
    holes = depth > rng.uniform(5.0, 7.0)  # beyond the sensor's range
    lum = image.mean(axis=2)
    holes |= glossy & (lum < 110) & (rng.random(depth.shape) < 0.8)  # dark glossy surfaces
    # the projector-camera baseline is horizontal, so a depth edge shadows a few pixels beside it
    jump = np.zeros(depth.shape, np.uint8)
    jump[:, 1:] = np.abs(np.diff(depth, axis=1)) > 0.05 * depth[:, 1:]
    holes |= cv2.dilate(jump, np.ones((1, int(rng.integers(3, 9))), np.uint8)).astype(bool)
    left, top, right, bottom = (int(rng.integers(a, b)) for a, b in ((8, 41), (0, 11), (0, 13), (0, 11)))
    holes[:, :left] = True  # the depth camera's view does not cover the RGB frame's borders
    holes[:top, :] = True
    holes[:, NYU_WIDTH - right:] = True  # an empty slice when right == 0
    holes[NYU_HEIGHT - bottom:, :] = True
    return np.where(holes, np.float32(0.0), raw).astype(np.float32)


def render_room(rng: np.random.Generator) -> Room:
    """One NYUv2-like frame: a random room, furniture and camera pose, ray-cast exactly (see module doc)."""
    dims = np.array([rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.0), rng.uniform(3.5, 7.0)])
    scene = SCENE_TYPES[int(rng.integers(len(SCENE_TYPES)))]
    boxes = _furniture(rng, dims, scene)
    o, rot = camera_pose(rng, dims)
    dirs = rot @ camera_rays()  # world directions whose camera-frame z is 1, so t is the depth
    hits = _cast(o, rot, dirs, dims, boxes)
    mats = _materials(rng)
    image = _shade(rng, o, dirs, hits, _albedo(rng, hits, mats), dims)
    depth = hits["t"].reshape(NYU_HEIGHT, NYU_WIDTH).astype(np.float32)
    normals = (rot.T @ hits["normal"]).T.reshape(NYU_HEIGHT, NYU_WIDTH, 3).astype(np.float32)
    glossy = np.array([m.glossy for m in mats])[hits["material"]].reshape(NYU_HEIGHT, NYU_WIDTH)
    raw = _raw_depth(rng, depth, image, glossy)
    return Room(image, depth, raw, normals, hits["label"].reshape(NYU_HEIGHT, NYU_WIDTH), scene)
