"""Tests for ctxrepro.analysis.aberration and the aberration stage (section 4.2, Figure 5): targets, the shared
evaluation grid, RMSE on constructed cases, and a constructed case where aberration is the only cue."""

import json
import logging
import math

import cv2
import numpy as np
import pytest
import torch

from ctxrepro.analysis import aberration as A
from ctxrepro.config import BaseParams
from ctxrepro.stage import StageContext
from ctxrepro.world.scenes import chromatic_aberration


@pytest.fixture
def keep_threads():
    """The stage (and the slow test) set torch's thread count; restore it for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_centre_targets_divide_the_patch_centre_by_the_image_size():
    # a 8 px patch at (y=10, x=20) of a 40 x 100 (h x w) image: centre (24, 14) -> (0.24, 0.35)
    t = A.centre_targets(torch.tensor([[10, 20]]), 40, 100, 8)
    assert torch.allclose(t, torch.tensor([[0.24, 0.35]]))


def test_min_margin_and_grid_fractions():
    assert A.min_margin([(100, 200), (80, 120)], 16) == 0.1  # 16 / (2 * 80)
    assert A.min_margin([(100, 200), (80, 120)], 17) == 0.11  # 0.10625 rounded up
    assert torch.allclose(A.grid_fractions(3, 0.1), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert A.grid_fractions(1, 0.2).tolist() == [0.5]
    with pytest.raises(ValueError):
        A.grid_fractions(3, 0.5)


def test_grid_patches_share_one_normalised_grid_so_chance_is_equal():
    images = [torch.randint(0, 256, (3, 100, 200), dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)]
    s = A.grid_patches(images, 16, A.grid_fractions(3, 0.1))
    assert len(s) == 18 and s.image.tolist() == [0] * 9 + [1] * 9
    # image 0: x corners round(f * 200 - 8) = 12, 92, 172; image 1: y corners round(f * 80 - 8) = 0, 32, 64
    assert s.boxes[:3, 1].tolist() == [12, 92, 172] and s.boxes[9::3, 0].tolist() == [0, 32, 64]
    grid = torch.tensor([[x, y] for y in (0.1, 0.5, 0.9) for x in (0.1, 0.5, 0.9)])
    assert torch.allclose(s.targets[:9], grid) and torch.allclose(s.targets[9:], grid)
    y, x = s.boxes[13].tolist()
    assert torch.equal(s.patches[13], images[1][:, y:y + 16, x:x + 16])
    with pytest.raises(ValueError, match="margin"):
        A.grid_patches(images, 16, A.grid_fractions(3, 0.05))


def test_random_patches_are_seeded_and_inside():
    images = [torch.zeros((3, 30, 50), dtype=torch.uint8), torch.zeros((3, 20, 20), dtype=torch.uint8)]
    a, b = A.random_patches(images, 7, 10, seed=3), A.random_patches(images, 7, 10, seed=3)
    assert torch.equal(a.boxes, b.boxes) and not torch.equal(a.boxes, A.random_patches(images, 7, 10, 4).boxes)
    assert (a.boxes[:7, 0] <= 20).all() and (a.boxes[:7, 1] <= 40).all() and (a.boxes[7:] <= 10).all()
    with pytest.raises(ValueError, match="smaller"):
        A.random_patches([torch.zeros((3, 8, 40), dtype=torch.uint8)], 1, 10, 0)


def test_rmse_on_a_constructed_case():
    targets = torch.tensor([[0.2, 0.2], [0.8, 0.8], [0.2, 0.8], [0.8, 0.2]])
    pred = torch.tensor([[0.2, 0.2], [0.8, 0.5], [0.5, 0.8], [0.8, 0.6]])
    image = torch.tensor([0, 0, 1, 1])
    # squared errors 0, 0.09 | 0.09, 0.16 -> image MSE 0.045, 0.125
    assert torch.allclose(A.image_mse(pred, targets, image, 2), torch.tensor([0.045, 0.125], dtype=torch.float64))
    s = A.rmse_summary(pred, targets, image, 2, top_fraction=0.1)  # ceil(0.1 * 2) = 1 image: image 0
    assert s["best"].tolist() == [0]
    assert s["rmse_all"] == pytest.approx(math.sqrt(0.085))
    assert s["rmse_top"] == pytest.approx(math.sqrt(0.045))
    assert s["rmse_chance"] == pytest.approx(math.sqrt(0.18))  # every target is 0.3 from the centre per axis
    with pytest.raises(ValueError, match="no patches"):
        A.image_mse(pred, targets, image, 3)


def test_best_images_breaks_ties_by_index():
    assert A.best_images(torch.tensor([0.3, 0.1, 0.1, 0.5]), 0.5).tolist() == [1, 2]
    assert A.best_images(torch.tensor([0.3, 0.1, 0.2]), 0.1).tolist() == [1]


def grey_textures(n, size, scale, seed):
    """Grey noise textures: colour, and so position, comes only from the synthetic aberration."""
    rng = np.random.default_rng(seed)
    margin = 8 if scale else 0
    out = []
    for _ in range(n):
        canvas = cv2.GaussianBlur(rng.uniform(0, 255, (size + 2 * margin,) * 2 + (3,)).astype(np.float32), (0, 0), 1.0)
        canvas = np.repeat(canvas.mean(axis=2, keepdims=True), 3, axis=2)
        img = chromatic_aberration(canvas, margin, scale) if scale else canvas
        out.append(torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous())
    return out


@pytest.mark.slow
def test_regressor_locates_patches_only_through_aberration(keep_threads):
    """Section 4.2 on a constructed case: grey textures carry no position cue but the aberration, so the
    regressor beats chance on aberrated images, and is at chance after projection or without aberration."""
    torch.set_num_threads(1)
    cfg = dict(patch=16, width=8, fc_dim=32, steps=200, batch=64, lr=3e-3)
    results = {}
    for name, scale, color in (("raw", 0.9, "none"), ("projected", 0.9, "projection"), ("control", None, "none")):
        train = A.random_patches(grey_textures(40, 64, scale, 0), 32, 16, seed=0)
        test = A.grid_patches(grey_textures(10, 64, scale, 1), 16, A.grid_fractions(3, 0.15))
        model = A.train_regressor(train, A.RegressorConfig(color=color, **cfg))
        results[name] = A.evaluate(model, test, 10, color, 0.1)[1]
    chance = results["raw"]["rmse_chance"]
    # 3x3 grid at fractions 0.15, 0.5, 0.85 of 64 px: corners round(f * 64 - 8) = 2, 24, 46, so centres
    # 10/64, 32/64, 54/64, each 0.34375 (or 0) from the centre per axis
    assert chance == pytest.approx(math.sqrt(2 * (2 * 0.34375 ** 2) / 3))
    assert results["raw"]["rmse_all"] < 0.75 * chance
    assert results["projected"]["rmse_all"] > 0.9 * chance
    assert results["control"]["rmse_all"] > 0.9 * chance


def test_regressor_config_rejects_bad_values():
    with pytest.raises(ValueError, match="color"):
        A.RegressorConfig(color="drop")
    with pytest.raises(ValueError, match="steps"):
        A.RegressorConfig(steps=0)


def test_world_control_renders_the_same_layouts_without_aberration():
    ab = A.render_world_images(3, 0, 420, 96, 0.98)
    clean = A.render_world_images(3, 0, 420, 96, None)
    assert [im.shape for im in ab] == [im.shape for im in clean]
    assert all(im.dtype == torch.uint8 and im.shape[0] == 3 for im in ab)
    assert not all(torch.equal(a, c) for a, c in zip(ab, clean))


def test_aberration_stage_writes_metrics_and_figures(tmp_path, keep_threads):
    from stages import aberration as stage

    params = stage.Params(train_images=12, test_images=10, patches_per_image=8, grid=3, image_size=96, patch=16,
                          width=4, fc_dim=16, steps=5, batch=16, figure_images=2, profile_note="test")
    ctx = StageContext(base=BaseParams(seed=0), device="cpu", log=logging.getLogger("test"), root=tmp_path)
    stage.run(params, ctx)
    metrics = json.loads((tmp_path / "metrics" / "aberration.json").read_text())
    for key in ("rmse_top10", "rmse_top10_projected", "rmse_chance", "rmse_all", "rmse_all_projected",
                "rmse_top10_control", "rmse_top10_raw_on_control"):
        assert 0.0 <= metrics[key] < 1.5, key
    assert metrics["top_images"] == 1 and metrics["n_test_patches"] == 90
    assert metrics["profile_note"] == "test"
    rows = (tmp_path / "plots" / "aberration" / "sorted_rmse.csv").read_text().splitlines()
    assert rows[0] == "rank,raw,projected,control,chance" and len(rows) == 11
    raw = [float(r.split(",")[1]) for r in rows[1:]]
    assert raw == sorted(raw) and metrics["rmse_top10"] == pytest.approx(raw[0], abs=1e-5)
    assert (tmp_path / "plots" / "aberration" / "figure5.png").stat().st_size > 1000


def test_aberration_stage_on_resized_images_has_no_control(tmp_path, keep_threads):
    from test_pretext_data import write_dataset

    from stages import aberration as stage

    write_dataset(tmp_path)  # data/resized: 6 train images (one 40 x 40), 3 val images
    params = stage.Params(source="images", train_images=4, test_images=3, patches_per_image=4, grid=2, patch=16,
                          width=4, fc_dim=8, steps=3, batch=8, figure_images=1)
    ctx = StageContext(base=BaseParams(seed=0), device="cpu", log=logging.getLogger("test"), root=tmp_path)
    stage.run(params, ctx)
    metrics = json.loads((tmp_path / "metrics" / "aberration.json").read_text())
    assert "rmse_top10_control" not in metrics and "control" in metrics["control_note"]
    assert metrics["n_train_images"] == 4 and metrics["n_test_patches"] == 12 and metrics["source"] == "images"
    # val images are 128 x 128, 100 x 140 and 144 x 96: the margin fits a 16 px patch in the 96 px side
    assert metrics["margin"] == pytest.approx(0.09)
    header = (tmp_path / "plots" / "aberration" / "sorted_rmse.csv").read_text().splitlines()[0]
    assert header == "rank,raw,projected,chance"
