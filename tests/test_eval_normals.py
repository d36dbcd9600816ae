"""`ctxrepro eval normals` (paper Table 2 metrics): hand-computed cases, pooling, exact median, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ctxrepro.metrics.normals import (KEYS, NormalsEvalError, angular_errors, evaluate_arrays, normals_command,
                                      order_statistics, pooled_metrics)


def _tilted(degrees: list[float], length: float = 1.0) -> np.ndarray:
    """Unit-ish vectors in the x-z plane at the given angles from +z, scaled by `length`."""
    r = np.radians(degrees)
    return length * np.stack([np.sin(r), np.zeros_like(r), np.cos(r)], axis=-1)


def _up(shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((*shape, 3))
    out[..., 2] = 1.0
    return out


def test_known_angles_by_hand():
    # errors 0, 10, 20, 45 degrees; predictions not unit length (they must be renormalised)
    pred = _tilted([0.0, 10.0, 20.0, 45.0], length=3.0).reshape(1, 1, 4, 3)
    gt = 0.5 * _up((1, 1, 4))
    m = evaluate_arrays(pred, gt)
    assert sorted(m) == sorted(KEYS)
    assert m["mean"] == pytest.approx(75.0 / 4, abs=1e-9)
    assert m["median"] == pytest.approx(15.0, abs=1e-9)  # (10 + 20) / 2
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 100 + 400 + 2025) / 4), abs=1e-9)
    assert (m["within_11.25"], m["within_22.5"], m["within_30"]) == (50.0, 75.0, 75.0)


def test_right_angle_and_opposite_are_exact():
    pred = np.array([[[[1.0, 0.0, 0.0], [0.0, 0.0, -2.0]]]])  # 90 and 180 degrees from +z
    m = evaluate_arrays(pred, _up((1, 1, 2)))
    assert m["mean"] == 135.0 and m["median"] == 135.0
    assert m["rmse"] == pytest.approx(math.sqrt((90.0 ** 2 + 180.0 ** 2) / 2))
    assert m["within_30"] == 0.0


def test_thresholds_count_errors_equal_to_them():
    # "within t" is error <= t: errors exactly at the thresholds count
    m = pooled_metrics(lambda: [np.array([11.25, 22.5, 30.0, 30.5])])
    assert (m["within_11.25"], m["within_22.5"], m["within_30"]) == (25.0, 50.0, 75.0)


def test_pooled_over_pixels_not_mean_of_image_means():
    gt = _up((2, 1, 3))
    pred = gt.copy()
    pred[0, 0, 0] = [1.0, 0.0, 0.0]  # image 0: one valid pixel at 90 degrees
    gt[0, 0, 1:] = 0.0  # ... its other two pixels have no ground truth (default mask: gt != 0)
    # image 1: three pixels with error 0
    m = evaluate_arrays(pred, gt)
    assert m["mean"] == pytest.approx(90.0 / 4)  # the mean of image means would be 45
    assert m["median"] == 0.0  # pooled errors [0, 0, 0, 90]
    assert m["rmse"] == pytest.approx(math.sqrt(90.0 ** 2 / 4))
    assert m["within_11.25"] == 75.0


def test_explicit_mask_replaces_the_default():
    gt = _up((1, 2, 2))
    pred = _tilted([0.0, 40.0, 80.0, 20.0]).reshape(1, 2, 2, 3)
    mask = np.array([[[False, True], [True, False]]])
    m = evaluate_arrays(pred, gt, mask)
    assert m["mean"] == pytest.approx(60.0) and m["median"] == pytest.approx(60.0)


def test_errors_are_float64_even_for_float32_inputs():
    # 0.01 degrees: cos rounds to 1.0 in float32, so a float32 dot would give 0; float64 after
    # renormalising the stored float32 vector recovers the angle
    pred = _tilted([0.01]).astype(np.float32).reshape(1, 1, 1, 3)
    err = angular_errors(pred[0], _up((1, 1)).astype(np.float32))
    assert err.dtype == np.float64
    assert err[0] == pytest.approx(0.01, rel=1e-4)


def test_dot_is_clipped_before_arccos():
    v = np.array([[[[0.3, 0.5, 0.7]]]])  # renormalised dot with itself may round above 1
    m = evaluate_arrays(v * 7.0, v)
    assert m["mean"] == 0.0 and not math.isnan(m["median"])


@pytest.mark.parametrize("limit", [0, 3, 50, 10 ** 9])
def test_exact_median_and_order_statistics_match_sorting(limit):
    rng = np.random.default_rng(0)
    images = [np.round(rng.uniform(0, 180, size), 1) for size in (17, 0, 40, 23)]  # many ties
    images.append(np.full(9, 12.5))
    images.append(np.array([0.0, 0.0]))
    pooled = np.sort(np.concatenate(images))
    ranks = [0, 5, len(pooled) // 2, len(pooled) - 1]
    got = order_statistics(lambda: iter(images), len(pooled), ranks, collect_limit=limit)
    assert got == [pooled[k] for k in ranks]
    m = pooled_metrics(lambda: iter(images), collect_limit=limit)
    assert m["median"] == np.median(pooled)
    assert m["mean"] == pytest.approx(pooled.mean())


def test_median_of_odd_count_is_the_middle_value():
    m = pooled_metrics(lambda: [np.array([5.0, 1.0]), np.array([100.0])], collect_limit=0)
    assert m["median"] == 5.0


def test_mismatched_shapes_name_both():
    with pytest.raises(NormalsEvalError, match=r"\(1, 2, 2, 3\).*\(1, 2, 3, 3\)"):
        evaluate_arrays(_up((1, 2, 2)), _up((1, 2, 3)))


def test_bad_mask_shape_and_dtype():
    with pytest.raises(NormalsEvalError, match=r"mask has shape \(1, 2\)"):
        evaluate_arrays(_up((1, 2, 2)), _up((1, 2, 2)), np.ones((1, 2), bool))
    with pytest.raises(NormalsEvalError, match="expected bool"):
        evaluate_arrays(_up((1, 2, 2)), _up((1, 2, 2)), np.ones((1, 2, 2), np.uint8))


def test_empty_mask_is_an_error():
    with pytest.raises(NormalsEvalError, match="no valid pixel"):
        evaluate_arrays(_up((2, 2, 2)), _up((2, 2, 2)), np.zeros((2, 2, 2), bool))
    with pytest.raises(NormalsEvalError, match="no valid pixel"):
        evaluate_arrays(_up((1, 2, 2)), np.zeros((1, 2, 2, 3)))  # default mask: all gt zero


def test_zero_prediction_at_a_valid_pixel_is_an_error():
    pred = _up((1, 1, 2))
    pred[0, 0, 1] = 0.0
    with pytest.raises(NormalsEvalError, match="pred: image 0 has 1 valid pixel"):
        evaluate_arrays(pred, _up((1, 1, 2)))


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("normals")(normals_command)
    return app


def test_command_writes_exactly_the_six_keys(tmp_path):
    pred = _tilted([0.0, 10.0, 20.0, 45.0]).reshape(1, 2, 2, 3).astype(np.float32)
    np.save(tmp_path / "p.npy", pred)
    np.save(tmp_path / "g.npy", _up((1, 2, 2)))
    np.save(tmp_path / "m.npy", np.array([[[True, True], [True, False]]]))
    out = tmp_path / "sub" / "metrics.json"
    res = CliRunner().invoke(_cli(), ["--pred", str(tmp_path / "p.npy"), "--gt", str(tmp_path / "g.npy"),
                                      "--mask", str(tmp_path / "m.npy"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert sorted(written) == sorted(KEYS)
    assert written["mean"] == pytest.approx(10.0, abs=1e-5)  # float32 inputs: 0, 10, 20 degrees
    assert written["median"] == pytest.approx(10.0, abs=1e-5)
    assert json.loads(res.stdout) == written


def test_command_reports_errors_with_exit_code_2(tmp_path):
    np.save(tmp_path / "p.npy", _up((1, 2, 2)))
    np.save(tmp_path / "g.npy", _up((1, 3, 2)))
    res = CliRunner().invoke(_cli(), ["--pred", str(tmp_path / "p.npy"), "--gt", str(tmp_path / "g.npy")])
    assert res.exit_code == 2
    assert "(1, 2, 2, 3)" in res.output and "(1, 3, 2, 3)" in res.output
    res = CliRunner().invoke(_cli(), ["--pred", str(tmp_path / "missing.npy"), "--gt", str(tmp_path / "g.npy")])
    assert res.exit_code == 2 and "missing.npy: --pred array not found" in res.output
