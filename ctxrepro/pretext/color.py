"""Per-patch preprocessing against trivial solutions (section 3.1), batched on any device.

Order (docs/METHOD.md "Pretext task", the released code's `prep_image`):
1. random downsampling: with probability p, resample the patch to s x s,
   s = floor(sqrt(U * (max^2 - min^2) + min^2)), then back to S x S ("to as little as 100
   total pixels ... to build robustness to pixelation");
2. mean subtraction, per patch and per channel (the released code subtracts the kept channel's
   own mean; doing the same for every mode keeps the modes comparable and makes the dropped
   channels' noise and the kept channel share a zero mean);
3. colour handling: "projection" (B = I - a^T a / (a a^T), a = [-1, 2, -1], on every pixel),
   "drop" (keep one random channel, the others Gaussian noise with std = drop_noise x the kept
   channel's std; paper ~1/100), "drop_uniform" (the released code: noise uniform in
   [-0.5, 0.5] on the 0..255 scale), or "none";
4. scale each patch to RMS `rms` over all its values (released code: 50, "roughly the same as
   the usual AlexNet inputs"). An all-constant patch stays all zeros.

Downsampling is separable and linear, so for a side s it is one S x S matrix M_s = U_s D_s
(D_s: area average S -> s, U_s: bilinear s -> S, half-pixel centres, as F.interpolate with
mode "area" then "bilinear", align_corners=False) applied as M_s X M_s^T. The matrices for all
sides are precomputed once per (S, min, max, device); a batch is then a single batched matmul,
with no loop over patches or over sides. Area averaging (not the released code's un-antialiased
bilinear resize) models a lower-resolution sensor and cannot alias fine texture back in.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

COLOR_MODES = ("projection", "drop", "drop_uniform", "none")
GREEN_MAGENTA_AXIS = (-1.0, 2.0, -1.0)  # section 3.1: a = [-1, 2, -1]
RMS_EPS = 1e-6  # below this RMS a patch is treated as constant and left at zero


@dataclass(frozen=True)
class PatchAugment:
    """Preprocessing settings (section 3.1). min_side/max_side are for 96 px patches (paper);
    use `PatchAugment.for_patch(size)` to scale them to another patch size."""

    downsample_prob: float = 0.33  # released code: random() < .33
    min_side: int = 10  # section 3: "as little as 100 total pixels"
    max_side: int = 95  # released code: sqrt(U * (95^2 - 10^2) + 10^2)
    color: str = "projection"  # "projection" | "drop" | "drop_uniform" | "none"
    drop_noise: float = 0.01  # section 3.1: noise std ~1/100 of the kept channel's std
    rms: float = 50.0  # released code: RMS 50

    def __post_init__(self) -> None:
        if self.color not in COLOR_MODES:
            raise ValueError(f"PatchAugment.color={self.color!r} is not one of {COLOR_MODES}")
        if not 0.0 <= self.downsample_prob <= 1.0:
            raise ValueError(f"PatchAugment.downsample_prob={self.downsample_prob} not in [0, 1]")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(f"PatchAugment: need 1 <= min_side <= max_side, got "
                             f"min_side={self.min_side}, max_side={self.max_side}")
        if self.drop_noise < 0 or self.rms <= 0:
            raise ValueError(f"PatchAugment: need drop_noise >= 0 and rms > 0, got "
                             f"drop_noise={self.drop_noise}, rms={self.rms}")

    @classmethod
    def for_patch(cls, size: int, **changes: object) -> "PatchAugment":
        """Settings for `size` px patches: sides scaled from the paper's 10..95 at 96 px (same
        smallest area fraction; the largest is size - 1), other fields default or `changes`."""
        sides = {"min_side": max(1, round(10 * size / 96)), "max_side": max(1, size - 1)}
        return cls(**{**sides, **changes})  # type: ignore[arg-type]


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """U[0, 1) drawn on the generator's device (pass one on the patches' device to avoid copies)."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def resample_matrix(size: int, side: int) -> Tensor:
    """S x S matrix M with M x = bilinear_up(area_down(x, side), size) for a length-S signal x."""
    eye_big = torch.eye(size, dtype=torch.float64)[None]
    down = F.interpolate(eye_big, size=side, mode="area")[0].T  # (side, S)
    eye_small = torch.eye(side, dtype=torch.float64)[None]
    up = F.interpolate(eye_small, size=size, mode="linear", align_corners=False)[0].T  # (S, side)
    return up @ down


@functools.lru_cache(maxsize=16)
def _matrix_table(size: int, min_side: int, max_side: int, device: str) -> Tensor:
    """Stacked resample matrices for sides min_side..max_side: (max - min + 1, S, S) float32."""
    mats = [resample_matrix(size, s) for s in range(min_side, max_side + 1)]
    return torch.stack(mats).to(device=device, dtype=torch.float32)


def resample_down_up(x: Tensor, sides: Tensor, min_side: int, max_side: int) -> Tensor:
    """Down to sides[i] x sides[i] and back up, per patch, in one batched matmul: x (K, C, S, S)."""
    size = x.shape[-1]
    table = _matrix_table(size, min_side, max_side, str(x.device))
    m = table[(sides.to(x.device) - min_side).long()][:, None]  # (K, 1, S, S)
    return m @ x @ m.transpose(-1, -2)


def random_downsample(x: Tensor, generator: torch.Generator, cfg: PatchAugment) -> Tensor:
    """Step 1: with prob cfg.downsample_prob, down to s x s and back (s as in the module doc)."""
    n, size = x.shape[0], x.shape[-1]
    if cfg.max_side > size:
        raise ValueError(f"PatchAugment.max_side={cfg.max_side} exceeds the {size}px patch; "
                         f"use PatchAugment.for_patch({size})")
    apply = _rand((n,), generator, x.device) < cfg.downsample_prob
    u = _rand((n,), generator, x.device)
    lo2, hi2 = cfg.min_side ** 2, cfg.max_side ** 2
    sides = torch.floor(torch.sqrt(u * (hi2 - lo2) + lo2)).long().clamp(cfg.min_side, cfg.max_side)
    idx = apply.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = resample_down_up(x[idx], sides[idx], cfg.min_side, cfg.max_side)
    return out


def projection_matrix() -> Tensor:
    """B = I - a^T a / (a a^T), a = [-1, 2, -1] (section 3.1), float32 (3, 3)."""
    a = torch.tensor([GREEN_MAGENTA_AXIS], dtype=torch.float64)
    return (torch.eye(3, dtype=torch.float64) - a.T @ a / (a @ a.T)).float()


def project_colors(x: Tensor) -> Tensor:
    """Multiply every pixel of x (..., 3, H, W) by B: removes the green-magenta component."""
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"project_colors: need (..., 3, H, W), got shape {tuple(x.shape)}")
    b = projection_matrix().to(device=x.device, dtype=x.dtype)
    return torch.einsum("ij,...jhw->...ihw", b, x)


def drop_colors(x: Tensor, generator: torch.Generator, noise: str, drop_noise: float) -> Tensor:
    """Keep one random channel per patch; replace the others by noise (section 3.1).

    x is mean-subtracted (P, 3, S, S). noise "gaussian": std = drop_noise x the kept channel's
    std; "uniform": U[-0.5, 0.5] (released code, 0..255 scale). Draws: channel (P,), noise.
    """
    n, _, h, w = x.shape
    rows = torch.arange(n, device=x.device)
    keep = torch.floor(_rand((n,), generator, x.device) * 3).long().clamp(max=2)
    # noise only for the two dropped channels: Gaussian draws dominate this step's cost
    dropped = (keep[:, None] + torch.tensor([1, 2], device=x.device)) % 3  # (P, 2)
    kept = x[rows, keep]  # (P, S, S)
    if noise == "gaussian":
        std = kept.square().mean(dim=(1, 2)).sqrt()  # zero mean after step 2
        fill = _randn((n, 2, h, w), generator, x.device) * (drop_noise * std)[:, None, None, None]
    else:
        fill = _rand((n, 2, h, w), generator, x.device) - 0.5
    out = torch.empty_like(x)
    out[rows, keep] = kept
    out[rows[:, None], dropped] = fill
    return out


def normalize_rms(x: Tensor, rms: float) -> Tensor:
    """Step 4: scale each patch to root-mean-square `rms` over its channels and pixels."""
    now = x.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return x * (rms / now.clamp_min(RMS_EPS))


def preprocess(patches: Tensor, generator: torch.Generator, cfg: PatchAugment) -> Tensor:
    """Steps 1-4 of the module docstring on (P, 3, S, S) uint8/float 0..255 patches -> float32.

    Runs on the patches' device; random draws use `generator` (its device) in a fixed order:
    downsample (apply, side), then colour (channel, noise).
    """
    if patches.dim() != 4 or patches.shape[1] != 3 or patches.shape[2] != patches.shape[3]:
        raise ValueError(f"preprocess: need (P, 3, S, S) patches, got {tuple(patches.shape)}")
    x = patches.to(torch.float32)
    if x.shape[0] == 0:
        return x
    if cfg.downsample_prob > 0:
        x = random_downsample(x, generator, cfg)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    if cfg.color == "projection":
        x = project_colors(x)
    elif cfg.color == "drop":
        x = drop_colors(x, generator, "gaussian", cfg.drop_noise)
    elif cfg.color == "drop_uniform":
        x = drop_colors(x, generator, "uniform", cfg.drop_noise)
    return normalize_rms(x, cfg.rms)

