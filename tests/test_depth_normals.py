"""Normals from depth by local plane fitting (ctxrepro.normals.depth): analytic planes, depth edges, holes,
and the tiny world's rendered rooms, whose normals are exact."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ctxrepro.normals.depth import NYU_INTRINSICS, PlaneFit, back_project, normals_from_depth

SMALL_K = (130.0, 131.0, 80.5, 60.5)  # intrinsics of a 120 x 160 test camera


def _degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between vectors, via atan2(|a x b|, a . b): exact near 0, where arccos of a float32 unit
    vector's dot product would read its rounding as ~0.01 degrees."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    cross = np.linalg.norm(np.cross(a, b), axis=-1)
    return np.degrees(np.arctan2(cross, np.einsum("...i,...i->...", a, b)))


def _plane_depth(normal: np.ndarray, offset: float, shape=(120, 160), k=SMALL_K) -> np.ndarray:
    """Depth of the plane {X : normal . X = offset} seen through every pixel (ray X = Z * (x, y, 1))."""
    rays = back_project(np.ones(shape), k)
    return offset / np.einsum("...i,i->...", rays, normal)


def test_back_project_uses_the_toolbox_one_based_convention():
    pts = back_project(np.full((2, 3), 2.0), (100.0, 200.0, 2.0, 1.0))
    # pixel (row 0, col 0) is (1, 1) in 1-based units: x = (1 - cx) / fx * Z, y = (1 - cy) / fy * Z
    np.testing.assert_allclose(pts[0, 0], [2.0 * (1 - 2.0) / 100.0, 0.0, 2.0])
    np.testing.assert_allclose(pts[1, 2], [2.0 * (3 - 2.0) / 100.0, 2.0 * (2 - 1.0) / 200.0, 2.0])


def test_nyu_intrinsics_match_the_world_camera():
    from ctxrepro.world.spec import NYU_CX, NYU_CY, NYU_FX, NYU_FY

    assert NYU_INTRINSICS == (NYU_FX, NYU_FY, NYU_CX, NYU_CY)


def test_tilted_plane_is_recovered_everywhere():
    n = np.array([0.3, -0.4, -1.0])
    n /= np.linalg.norm(n)  # faces the camera: n . ray < 0 for every ray of the test camera
    depth = _plane_depth(n, -2.5)
    assert depth.min() > 2.0 and depth.max() < 4.5  # a slanted wall 2-4.4 m away
    est, has = normals_from_depth(depth, fit=PlaneFit(window=5, step=1, min_points=9), intrinsics=SMALL_K)
    assert has.all()  # borders too: the window is clipped to the image, 9 points remain in a corner
    assert _degrees(est, n).max() < 1e-3


def test_normals_point_toward_the_camera():
    n = np.array([-0.2, 0.5, 1.0])
    n /= np.linalg.norm(n)  # the same plane given with the normal facing away
    est, has = normals_from_depth(_plane_depth(n, 3.0), fit=PlaneFit(window=3, step=1, min_points=3),
                                  intrinsics=SMALL_K)
    assert has.all() and _degrees(est, -n).max() < 1e-3


def test_depth_gate_keeps_planes_apart_at_an_edge():
    depth = np.full((40, 60), 2.0)
    depth[:, 30:] = 3.0  # two fronto-parallel walls; the gate (5%) must not mix them
    fit = PlaneFit(window=7, step=1, min_points=6)
    est, has = normals_from_depth(depth, fit=fit, intrinsics=SMALL_K)
    assert has.all()
    assert _degrees(est, np.array([0.0, 0.0, -1.0])).max() < 1e-3
    # without the gate the fit straddles the step next to it: that is what the gate is for
    ungated, _ = normals_from_depth(depth, fit=PlaneFit(window=7, step=1, min_points=6, max_rel_depth=10.0),
                                    intrinsics=SMALL_K)
    assert _degrees(ungated[:, 29], np.array([0.0, 0.0, -1.0])).min() > 10.0


def test_holes_and_sparse_windows_have_no_normal():
    depth = np.full((30, 30), 2.0)
    depth[10:20, 10:20] = 0.0  # a hole with one lonely reading in it
    depth[15, 15] = 2.0
    est, has = normals_from_depth(depth, fit=PlaneFit(window=5, step=1, min_points=9), intrinsics=SMALL_K)
    assert not has[10:20, 10:20].any()  # holes, and the lone reading with 1 point in its window (< 9)
    assert (est[~has] == 0).all()
    assert has[:8].all() and has[22:].all()
    # an explicit mask leaves readings out as well
    mask = np.ones_like(has)
    mask[:, :5] = False
    _, has2 = normals_from_depth(depth, mask, fit=PlaneFit(window=5, step=1, min_points=9), intrinsics=SMALL_K)
    assert not has2[:, :5].any() and has2[:8, 5:].all()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="odd"):
        PlaneFit(window=4)
    with pytest.raises(ValueError, match="half-width"):
        PlaneFit(window=21, step=3)
    with pytest.raises(ValueError, match="shape"):
        normals_from_depth(np.ones((2, 2, 2)))


def _planar_interior(normals: np.ndarray, window: int) -> np.ndarray:
    """Pixels whose whole window shows one plane (the exact normal is the same throughout)."""
    box = np.ones((window, window), np.uint8)
    same = np.ones(normals.shape[:2], bool)
    for c in range(3):
        same &= cv2.dilate(normals[..., c], box) - cv2.erode(normals[..., c], box) < 1e-4
    return same


@pytest.mark.slow
def test_tiny_world_room_planar_regions_match_exact_normals():
    from ctxrepro.world.rooms import render_room
    from ctxrepro.world.spec import NYU, stream

    room = render_room(stream(3, NYU, 1, 0))
    fit = PlaneFit()
    planar = _planar_interior(room.normals, fit.window) & (room.raw_depth > 0)
    assert planar.mean() > 0.3
    exact, has = normals_from_depth(room.depth, fit=fit)
    assert has[planar].all()
    assert np.median(_degrees(exact[planar], room.normals[planar])) < 0.05
    # the sensor's reading: noise growing with depth squared, 1 mm steps, holes
    noisy, has = normals_from_depth(room.raw_depth, fit=fit)
    sel = planar & has
    assert sel.sum() > 0.9 * planar.sum()
    assert np.median(_degrees(noisy[sel], room.normals[sel])) < 5.0
