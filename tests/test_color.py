"""Tests for ctxrepro.pretext.color: section 3.1 preprocessing (downsampling, colour, RMS)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxrepro.pretext.color import (PatchAugment, preprocess, project_colors, projection_matrix, random_downsample,
                                    resample_down_up)

# B = I - a^T a / 6 for a = [-1, 2, -1], written out by hand
B_HAND = np.array([[5 / 6, 1 / 3, -1 / 6], [1 / 3, 1 / 3, 1 / 3], [-1 / 6, 1 / 3, 5 / 6]])
A = np.array([-1.0, 2.0, -1.0])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_patches(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=gen(seed), dtype=torch.uint8)


def test_projection_matrix_hand_values_and_properties():
    b = projection_matrix().double().numpy()
    np.testing.assert_allclose(b, B_HAND, atol=1e-7)
    np.testing.assert_allclose(b @ A, 0, atol=1e-6)  # B a^T = 0
    np.testing.assert_allclose(b @ b, b, atol=1e-6)  # idempotent (a projection)
    np.testing.assert_allclose(b @ np.ones(3), np.ones(3), atol=1e-6)  # gray unchanged


def test_project_colors_removes_green_magenta_per_pixel():
    gray = torch.rand(2, 1, 5, 6) * 100
    k = torch.rand(2, 1, 5, 6) * 30
    x = gray.expand(2, 3, 5, 6) + k * torch.tensor(A, dtype=torch.float32).view(1, 3, 1, 1)
    torch.testing.assert_close(project_colors(x), gray.expand(2, 3, 5, 6), rtol=1e-5, atol=1e-4)


def test_preprocess_projection_equals_numpy_reference():
    x = rand_patches(6, 12)
    out = preprocess(x, gen(0), PatchAugment(downsample_prob=0.0, color="projection"))
    xc = x.double().numpy()
    xc = xc - xc.mean(axis=(2, 3), keepdims=True)
    y = np.einsum("ij,pjhw->pihw", B_HAND, xc)
    y = y * 50 / np.sqrt((y ** 2).mean(axis=(1, 2, 3), keepdims=True))
    assert out.dtype == torch.float32 and out.shape == (6, 3, 12, 12)
    np.testing.assert_allclose(out.numpy(), y, rtol=1e-4, atol=1e-3)
    along_a = np.einsum("i,pihw->phw", A, out.numpy())
    assert np.abs(along_a).max() < 1e-3


def test_drop_keeps_one_channel_and_gaussian_noise_is_one_percent():
    n, size = 300, 32
    x = rand_patches(n, size, seed=1).float()
    out = preprocess(x, gen(2), PatchAugment.for_patch(size, downsample_prob=0.0, color="drop"))
    xc = x - x.mean(dim=(2, 3), keepdim=True)
    std = out.std(dim=(2, 3))  # (n, 3)
    kept = std.argmax(dim=1)
    idx = torch.arange(n)
    scale = out[idx, kept].std(dim=(1, 2)) / xc[idx, kept].std(dim=(1, 2))  # RMS rescale
    torch.testing.assert_close(out[idx, kept], xc[idx, kept] * scale[:, None, None],
                               rtol=1e-4, atol=1e-3)
    ratio = std.sort(dim=1).values[:, :2] / std.max(dim=1, keepdim=True).values
    assert ((ratio > 0.009) & (ratio < 0.011)).all()  # 1024 px: std estimate within ~5%
    counts = torch.bincount(kept, minlength=3)
    assert (counts > 70).all()  # each channel kept about n / 3 = 100 times
    torch.testing.assert_close(out.square().mean(dim=(1, 2, 3)).sqrt(), torch.full((n,), 50.0))


def test_drop_uniform_noise_is_released_code_uniform():
    n, size = 100, 32
    x = rand_patches(n, size, seed=3)
    out = preprocess(x, gen(4), PatchAugment.for_patch(size, downsample_prob=0.0,
                                                       color="drop_uniform"))
    xc = x.float() - x.float().mean(dim=(2, 3), keepdim=True)
    kept = out.std(dim=(2, 3)).argmax(dim=1)
    idx = torch.arange(n)
    scale = out[idx, kept].std(dim=(1, 2)) / xc[idx, kept].std(dim=(1, 2))  # RMS rescale
    mask = torch.ones(n, 3, dtype=torch.bool)
    mask[idx, kept] = False
    noise = out[mask] / scale.repeat_interleave(2)[:, None, None]  # back to the 0..255 scale
    assert noise.abs().max() <= 0.5 + 1e-4
    assert abs(noise.std().item() - 1 / np.sqrt(12)) < 0.01  # U[-0.5, 0.5] std


@pytest.mark.parametrize("color", ["projection", "drop", "drop_uniform", "none"])
def test_rms_is_target_and_constant_patch_stays_zero(color):
    x = rand_patches(8, 16, seed=5).float()
    x[3] = 77.0  # constant patch: nothing to normalise
    cfg = PatchAugment.for_patch(16, color=color, rms=20.0)
    out = preprocess(x, gen(6), cfg)
    assert torch.isfinite(out).all()
    rms = out.square().mean(dim=(1, 2, 3)).sqrt()
    keep = torch.arange(8) != 3
    torch.testing.assert_close(rms[keep], torch.full((7,), 20.0))
    if color in ("projection", "none"):
        assert torch.count_nonzero(out[3]) == 0


def test_resample_matrix_equals_interpolate_down_then_up():
    x = torch.rand(4, 3, 20, 20) * 255
    sides = torch.tensor([3, 7, 10, 19])
    out = resample_down_up(x, sides, 3, 19)
    for i, s in enumerate(sides.tolist()):
        small = F.interpolate(x[i:i + 1], size=(s, s), mode="area")
        ref = F.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-4, atol=1e-3)


def test_downsampled_sides_follow_the_paper_formula():
    # with p = 1 every patch is resampled; identify each patch's side by matching the output
    size, n = 16, 400
    cfg = PatchAugment(downsample_prob=1.0, min_side=2, max_side=15, color="none")
    x = torch.rand(n, 3, size, size) * 255
    out = random_downsample(x, gen(7), cfg)
    cands = torch.stack([resample_down_up(x, torch.full((n,), s), 2, 15) for s in range(2, 16)])
    err = (cands - out[None]).abs().amax(dim=(2, 3, 4))  # (sides, n)
    sides = err.argmin(dim=0) + 2
    assert (err.min(dim=0).values < 1e-3).all()
    # s = floor(sqrt(U (15^2 - 2^2) + 2^2)): P(s <= k) = ((k + 1)^2 - 4) / 221
    for k in (5, 9, 12):
        expect = ((k + 1) ** 2 - 4) / 221
        sigma = np.sqrt(expect * (1 - expect) / n)
        assert abs((sides <= k).float().mean().item() - expect) < 4 * sigma


def test_downsampling_removes_checkerboard_with_probability_p():
    size, n = 16, 3000
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy + xx) % 2 * 2 - 1).float()  # +-1, finest possible detail
    ramp = yy.float() * 4  # coarse content that survives downsampling
    patch = (128 + 40 * board + ramp).expand(n, 3, size, size)
    cfg = PatchAugment.for_patch(size, color="none")  # p = 0.33, sides 2..15
    out = preprocess(patch, gen(8), cfg)
    full = preprocess(patch[:1], gen(8), PatchAugment.for_patch(size, downsample_prob=0.0,
                                                                color="none"))
    energy = (out * board).mean(dim=(1, 2, 3))
    reference = (full * board).mean().item()
    lowered = energy < 0.5 * reference
    assert torch.allclose(energy[~lowered], torch.tensor(reference), rtol=1e-4)
    sigma = np.sqrt(0.33 * 0.67 / n)
    assert abs(lowered.float().mean().item() - 0.33) < 4 * sigma


def test_for_patch_scaling_and_validation():
    assert (PatchAugment.for_patch(96).min_side, PatchAugment.for_patch(96).max_side) == (10, 95)
    assert PatchAugment.for_patch(96) == PatchAugment()
    cfg = PatchAugment.for_patch(48, color="drop")
    assert (cfg.min_side, cfg.max_side, cfg.color) == (5, 47, "drop")
    assert (PatchAugment.for_patch(32).min_side, PatchAugment.for_patch(32).max_side) == (3, 31)
    with pytest.raises(ValueError, match="color"):
        PatchAugment(color="gray")
    with pytest.raises(ValueError, match="min_side"):
        PatchAugment(min_side=20, max_side=10)
    with pytest.raises(ValueError, match="max_side=95"):
        preprocess(rand_patches(2, 48), gen(0), PatchAugment(downsample_prob=1.0))
    with pytest.raises(ValueError, match="P, 3, S, S"):
        preprocess(torch.zeros(2, 1, 8, 8), gen(0), PatchAugment.for_patch(8))


def test_deterministic_and_dtype_independent():
    x = rand_patches(20, 24, seed=9)
    cfg = PatchAugment.for_patch(24, color="drop", downsample_prob=0.5)
    a = preprocess(x, gen(10), cfg)
    b = preprocess(x.float(), gen(10), cfg)
    torch.testing.assert_close(a, b)
    c = preprocess(x, gen(11), cfg)
    assert not torch.allclose(a, c)
    assert preprocess(x[:0], gen(0), cfg).shape == (0, 3, 24, 24)
