"""Tests for ctxrepro.normals.grid: the trunk's cells at their receptive-field centres, for the targets and for
the upsampled predictions (section 4.4)."""

import numpy as np
import pytest
import torch
from torch import nn

from ctxrepro.normals.data import coarse_targets, mirrored_targets
from ctxrepro.normals.grid import CellGrid, cell_centres, cell_grid, interpolation_matrix, receptive_field
from ctxrepro.normals.model import full_resolution
from ctxrepro.transfer.trunk import Trunk, TrunkSpec

FRAME = (480, 640)
BORDER = (200, 300)  # quadrant borders (row, column) of the synthetic normal map


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


QUADRANTS = _unit([[0, 0, -1], [1, 0, -1], [0, 1, -1], [-1, -1, -1]])  # TL, TR, BL, BR


def quadrant_map() -> np.ndarray:
    n = np.zeros((*FRAME, 3), np.float32)
    by, bx = BORDER
    n[:by, :bx], n[:by, bx:], n[by:, :bx], n[by:, bx:] = QUADRANTS
    return n


def alexnet_layers():
    return Trunk(TrunkSpec(tower="alexnet", width=8, conv6=8, conv6b=8, fc7=8)).layers()


def test_alexnet_trunk_centres_by_hand_at_227_px():
    # conv1 11/4 pad 5: cell 0 reads pixels -5..5, centre pixel 0 (0.5 px), step 4; pool1 3/2 reads cells 0..2:
    # 0.5 + 4 = 4.5, step 8; conv2 5 pad 2 keeps it; pool2: 4.5 + 8 = 12.5, step 16; conv3-5 (3, pad 1) keep
    # it; pool5: 12.5 + 16 = 28.5, step 32; conv6 3x3 without padding: 28.5 + 32 = 60.5; conv6b 1x1 keeps it.
    assert receptive_field(alexnet_layers()) == ((60.5, 32.0), (60.5, 32.0))
    # 227 px: conv1 (227 + 10 - 11) // 4 + 1 = 57, pools (ceil) 28, 14, 7, conv6 5 cells
    ys, xs = cell_centres(alexnet_layers(), (227, 227))
    np.testing.assert_array_equal(ys, [60.5, 92.5, 124.5, 156.5, 188.5])
    np.testing.assert_array_equal(xs, ys)


def test_alexnet_trunk_centres_by_hand_at_the_normals_input():
    # 480: conv1 120, pools 60, 30, 15, conv6 13; 640: conv1 160, pools 80, 40, 20, conv6 18
    ys, xs = cell_centres(alexnet_layers(), FRAME)
    np.testing.assert_array_equal(ys, 60.5 + 32 * np.arange(13))
    np.testing.assert_array_equal(xs, 60.5 + 32 * np.arange(18))
    # not an even tiling: cell 0 of 13 would sit at 480 / 26 = 18.5 px, 42 px from its true centre
    assert ys[0] - FRAME[0] / 26 == pytest.approx(42.0, abs=0.1)


def test_tiny_trunk_centres_at_the_tiny_input_scaled_to_the_frame():
    # small tower: conv1 5/2 pad 2: 0.5, step 2; pool1: 2.5, step 4; pool2: 6.5, step 8; pool5: 14.5, step 16;
    # conv6 3x3: 30.5. 144 px -> conv1 72, pools 36, 18, 9, conv6 7; 192 px -> 96, 48, 24, 12, conv6 10
    layers = Trunk(TrunkSpec(tower="small", width=4, conv6=8, conv6b=8, fc7=8, input_side=64)).layers()
    grid = cell_grid(layers, (144, 192), FRAME)
    assert grid.shape == (7, 10) and grid.size == FRAME
    np.testing.assert_allclose(grid.ys, (30.5 + 16 * np.arange(7)) * 480 / 144)
    np.testing.assert_allclose(grid.xs, (30.5 + 16 * np.arange(10)) * 640 / 192)
    assert grid.step == pytest.approx((16 * 480 / 144, 16 * 640 / 192))


def test_unknown_layers_are_refused():
    with pytest.raises(ValueError, match=r"layer up \(Upsample\)"):
        receptive_field([("conv", nn.Conv2d(3, 3, 3)), ("up", nn.Upsample(scale_factor=2))])


def test_interpolation_matrix_by_hand():
    # pixel centres 0.5 .. 4.5 between cells at 1.5 and 3.5: clamped, then linear
    m = interpolation_matrix(np.array([1.5, 3.5]), 5).numpy()
    np.testing.assert_allclose(m, [[1, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    assert (interpolation_matrix(np.array([7.0]), 3).numpy() == 1).all()


def test_targets_are_the_normals_at_each_cells_receptive_field_centre():
    grid = cell_grid(alexnet_layers(), FRAME, FRAME)
    normals, valid = quadrant_map(), np.ones(FRAME, bool)
    targets, ok = coarse_targets(normals, valid, grid, min_valid=0.5)
    assert ok.all() and targets.shape == (13, 18, 3)
    clear = 0
    for i, cy in enumerate(grid.ys):
        for j, cx in enumerate(grid.xs):
            if abs(cy - BORDER[0]) > 16 and abs(cx - BORDER[1]) > 16:  # the window (one step) is one quadrant
                np.testing.assert_allclose(targets[i, j], normals[int(cy), int(cx)], atol=1e-6)
                clear += 1
    assert clear == 12 * 17  # one row (188.5) and one column (284.5) of centres lie within 16 px of a border
    # the straddling cell (188.5, 60.5) averages the rows whose centres lie in [172.5, 204.5): 172..203,
    # 28 rows of TL and 4 of BL
    np.testing.assert_allclose(targets[4, 0], _unit(28 * QUADRANTS[0] + 4 * QUADRANTS[2]), atol=1e-6)


def test_mirrored_targets_follow_the_cells_of_the_mirrored_image():
    grid = cell_grid(alexnet_layers(), FRAME, FRAME)
    targets, ok = mirrored_targets(quadrant_map(), np.ones(FRAME, bool), grid, min_valid=0.5)
    # column 0 of a mirrored image (centre 60.5) sees the original's x = 640 - 60.5 (TR / BR), x negated
    np.testing.assert_allclose(targets[0, 0], QUADRANTS[1] * [-1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(targets[-1, 0], QUADRANTS[3] * [-1, 1, 1], atol=1e-6)
    # the last column (604.5) sees x = 35.5: TL; a flipped copy of the original grid would have used 604.5
    np.testing.assert_allclose(targets[0, -1], QUADRANTS[0] * [-1, 1, 1], atol=1e-6)


def test_a_perfect_coarse_prediction_upsampled_is_exact_away_from_the_borders():
    grid = cell_grid(alexnet_layers(), FRAME, FRAME)
    normals = quadrant_map()
    targets, _ = coarse_targets(normals, np.ones(FRAME, bool), grid, min_valid=0.5)
    pred = full_resolution(targets, grid, np.float32)
    cos = np.clip(np.einsum("hwc,hwc->hw", pred.astype(np.float64), normals), -1, 1)
    err = np.degrees(np.arccos(cos))
    y, x = np.mgrid[0:FRAME[0], 0:FRAME[1]] + 0.5
    # a pixel reads the two cells around it (each < 32 px away), whose windows reach 16 px further
    away = (np.abs(y - BORDER[0]) > 48) & (np.abs(x - BORDER[1]) > 48)
    assert away.mean() > 0.6 and err[away].max() < 1e-2
    assert err[~away].max() > 1.0  # near the borders interpolation mixes quadrants: the test can fail


def test_cells_centred_outside_the_frame_have_no_target():
    grid = CellGrid(np.array([-5.0, 10.0]), np.array([10.0]), (8.0, 8.0), (20, 20))
    targets, ok = coarse_targets(np.tile(np.float32([0, 0, -1]), (20, 20, 1)), np.ones((20, 20), bool), grid, 0.5)
    assert ok[:, 0].tolist() == [False, True] and (targets[0, 0] == 0).all()
    with pytest.raises(ValueError, match=r"\(20, 20\) frame"):
        coarse_targets(np.zeros((10, 10, 3), np.float32), np.ones((10, 10), bool), grid, 0.5)
    with pytest.raises(ValueError, match=r"trunk's grid is \(2, 1\)"):
        full_resolution(np.zeros((3, 3, 3), np.float32), grid)
