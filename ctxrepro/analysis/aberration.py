"""Learnability of chromatic aberration (section 4.2, Figure 5): where in the image was this patch?

Section 4.2 trains a network to regress the absolute (x, y) position of patches and finds that, for
some images, it does much better than chance because lateral chromatic aberration (green shrunk
toward the lens centre, section 3.1) gives the position away; colour projection (section 3.1)
removes most of that cue. This module holds the pieces of that experiment:

- positions: a patch's target is its centre divided by the image size, (x / W, y / H) in [0, 1];
- training patches sit uniformly at random; evaluation patches sit on ONE grid of fractions shared
  by every image (docs/METHOD.md "The tiny-world prototype"), so the always-predict-the-centre RMSE is the same for every image (up
  to half-pixel rounding) and "the best 10% of images" ranks the regressor, not the grid;
- errors are Euclidean in normalised coordinates: per image MSE_i = mean over its patches of
  (dx^2 + dy^2); RMSE over a set of images = sqrt(mean of their MSE_i) (every image has the same
  number of patches, so this equals the RMS over their patches);
- the regressor is a narrow conv tower from `model` (affine-free batch norm) and a linear (x, y)
  output, trained with Adam on the mean squared error.

Nothing here reads params or files; `stages/aberration.py` chooses the images.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.pretext.color import PatchAugment, preprocess
from ctxrepro.pretext.model import build_tower
from ctxrepro.pretext.precision import autocast, check_amp
from ctxrepro.pretext.sampling import cut_patches
from ctxrepro.progress import track
from ctxrepro.seeds import derive_seed, generator

# Purposes of derived seeds (pretext.data uses 1..5; these streams are this study's own).
POSITIONS, ORDER, INIT, AUGMENT = 41, 42, 43, 44
REGRESSOR_COLORS = ("none", "projection")
CENTRE = 0.5  # "chance performance (always predicting the image center)", section 4.2


@dataclass(frozen=True)
class RegressorConfig:
    """The position regressor and its training (section 4.2; sizes from the issue's CPU prototype)."""

    tower: str = "small"  # model.TOWERS name; "small" is the 16-channel prototype tower
    patch: int = 32  # network input side in px (patches are sampled at this size)
    width: int | None = 16  # tower channel scale (None: the tower's default)
    fc_dim: int = 64  # fc6 size before the linear (x, y) output
    color: str = "none"  # "none" (raw pixels) or "projection" (section 3.1)
    steps: int = 800
    batch: int = 128
    lr: float = 1e-3  # Adam (docs/METHOD.md: Adam beat SGD at this scale)
    seed: int = 0
    amp: str = "none"  # autocast of the forward (ctxrepro.pretext.precision); the loss is float32

    def __post_init__(self) -> None:
        if self.color not in REGRESSOR_COLORS:
            raise ValueError(f"RegressorConfig.color={self.color!r} is not one of {REGRESSOR_COLORS}")
        check_amp(self.amp)
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"RegressorConfig: need steps >= 1, batch >= 1, lr > 0; got steps={self.steps}, "
                             f"batch={self.batch}, lr={self.lr}")


@dataclass(frozen=True)
class PatchSet:
    """Patches cut from a list of images, with their normalised centres."""

    patches: Tensor  # (N, 3, S, S) uint8
    boxes: Tensor  # (N, 2) int64 (y, x) top-left corners in their image
    targets: Tensor  # (N, 2) float32 (x / W, y / H) of the patch centre
    image: Tensor  # (N,) int64 index into the image list

    def __len__(self) -> int:
        return len(self.image)


def centre_targets(boxes: Tensor, height: int, width: int, patch: int) -> Tensor:
    """(x, y) of each patch centre over the image size: pixel i spans [i, i + 1), so the centre of a patch
    at column x0 is x0 + patch / 2."""
    y = (boxes[:, 0].double() + patch / 2.0) / height
    x = (boxes[:, 1].double() + patch / 2.0) / width
    return torch.stack([x, y], dim=1).float()


def _cut(image: Tensor, boxes: Tensor, patch: int, index: int) -> PatchSet:
    h, w = int(image.shape[1]), int(image.shape[2])
    return PatchSet(cut_patches(image, boxes, patch), boxes, centre_targets(boxes, h, w, patch),
                    torch.full((len(boxes),), index, dtype=torch.int64))


def _concat(parts: list[PatchSet]) -> PatchSet:
    if not parts:
        raise ValueError("no images given")
    return PatchSet(*(torch.cat([getattr(p, f) for p in parts]) for f in ("patches", "boxes", "targets", "image")))


def random_patches(images: Sequence[Tensor], per_image: int, patch: int, seed: int) -> PatchSet:
    """`per_image` patches per (3, H, W) uint8 image, top-left corners uniform over every position.

    Images are read once each, in order, and only their patches are kept (`images` may load lazily).
    """
    parts = []
    for i in range(len(images)):
        im = images[i]
        h, w = int(im.shape[1]), int(im.shape[2])
        if h < patch or w < patch:
            raise ValueError(f"image {i} is {w}x{h}, smaller than a {patch}px patch")
        g = generator(seed, POSITIONS, i)
        ys = torch.randint(0, h - patch + 1, (per_image,), generator=g)
        xs = torch.randint(0, w - patch + 1, (per_image,), generator=g)
        parts.append(_cut(im, torch.stack([ys, xs], dim=1), patch, i))
    return _concat(parts)


def grid_fractions(n: int, margin: float) -> Tensor:
    """n evenly spaced centre fractions in [margin, 1 - margin] (float64)."""
    if n < 1 or not 0.0 <= margin < 0.5:
        raise ValueError(f"grid_fractions: need n >= 1 and 0 <= margin < 0.5, got n={n}, margin={margin}")
    if n == 1:
        return torch.tensor([0.5], dtype=torch.float64)
    return torch.linspace(margin, 1.0 - margin, n, dtype=torch.float64)


def min_margin(sizes: list[tuple[int, int]], patch: int) -> float:
    """The smallest grid margin (rounded up to 1/100) at which a patch centred on every grid point of
    every (height, width) fits inside its image."""
    need = max(patch / (2.0 * min(h, w)) for h, w in sizes)
    if need > 0.5:
        raise ValueError(f"a {patch}px patch does not fit an image of size {min(min(s) for s in sizes)}")
    return math.ceil(need * 100 - 1e-9) / 100


def grid_patches(images: Sequence[Tensor], patch: int, fractions: Tensor) -> PatchSet:
    """For every image, patches centred at (fx * W, fy * H) for all fx, fy in `fractions` (row-major,
    y outer): the same normalised grid for every image."""
    parts = []
    for i in range(len(images)):
        im = images[i]
        h, w = int(im.shape[1]), int(im.shape[2])
        ys = torch.round(fractions * h - patch / 2.0).long()
        xs = torch.round(fractions * w - patch / 2.0).long()
        if ys.min() < 0 or xs.min() < 0 or ys.max() > h - patch or xs.max() > w - patch:
            raise ValueError(f"image {i} ({w}x{h}) cannot hold a {patch}px patch at every grid fraction "
                             f"{fractions.tolist()}; raise the margin")
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        parts.append(_cut(im, torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1), patch, i))
    return _concat(parts)


def build_regressor(cfg: RegressorConfig) -> nn.Sequential:
    """Tower (conv .. fc6, BN without affine, ReLU; Figure 3's tower at a small width) -> linear (x, y)."""
    tower = build_tower(cfg.tower, cfg.patch, cfg.width, cfg.fc_dim)
    return nn.Sequential(OrderedDict([("tower", tower), ("position", nn.Linear(cfg.fc_dim, 2))]))


def network_input(patches: Tensor, color: str, g: torch.Generator) -> Tensor:
    """uint8 patches -> mean-subtracted, optionally projected (section 3.1), RMS-50 float patches.

    No random downsampling: section 4.2 asks what the raw pixels give away.
    """
    return preprocess(patches, g, PatchAugment(downsample_prob=0.0, color=color))


def train_regressor(data: PatchSet, cfg: RegressorConfig, log: logging.Logger | None = None,
                    label: str = "regressor") -> nn.Module:
    """Adam on the mean squared position error, batches drawn with replacement from `data`."""
    if len(data) == 0:
        raise ValueError("train_regressor: no training patches")
    torch.manual_seed(derive_seed(cfg.seed, INIT))
    model = build_regressor(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = generator(cfg.seed, ORDER)
    aug = generator(cfg.seed, AUGMENT)
    model.train()
    for step in track(range(cfg.steps), desc=f"train {label}", unit="step", log=log):
        idx = torch.randint(len(data), (cfg.batch,), generator=order)
        with autocast("cpu", cfg.amp):
            pred = model(network_input(data.patches[idx], cfg.color, aug))
        loss = F.mse_loss(pred.float(), data.targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: non-finite loss {float(loss)} at step {step}; lower the lr")
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, patches: Tensor, color: str, batch: int = 1024, amp: str = "none") -> Tensor:
    """(N, 2) predicted (x, y) float32 for uint8 patches, in eval mode (colour modes here draw no noise)."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    with autocast("cpu", amp):
        out = [model(network_input(patches[i:i + batch], color, g)).float() for i in range(0, len(patches), batch)]
    return torch.cat(out) if out else torch.zeros((0, 2))


def image_mse(pred: Tensor, targets: Tensor, image: Tensor, n_images: int) -> Tensor:
    """Per image mean of the squared Euclidean error (dx^2 + dy^2) over its patches, float64 (n_images,)."""
    sq = (pred.double() - targets.double()).square().sum(dim=1)
    total = torch.zeros(n_images, dtype=torch.float64).index_add_(0, image, sq)
    count = torch.zeros(n_images, dtype=torch.float64).index_add_(0, image, torch.ones_like(sq))
    if (count == 0).any():
        raise ValueError(f"image_mse: image(s) {torch.nonzero(count == 0).flatten().tolist()} have no patches")
    return total / count


def best_images(mse: Tensor, fraction: float) -> Tensor:
    """Indices of the ceil(fraction * n) images with the lowest MSE (ties: lower index first)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"best_images: fraction={fraction} not in (0, 1]")
    k = max(1, math.ceil(fraction * len(mse) - 1e-9))
    order = sorted(range(len(mse)), key=lambda i: (float(mse[i]), i))
    return torch.tensor(order[:k], dtype=torch.int64)


def rmse_summary(pred: Tensor, targets: Tensor, image: Tensor, n_images: int, top_fraction: float) -> dict:
    """RMSE over all images, over the best `top_fraction` of images (section 4.2's "top 10%"), and the
    always-predict-the-centre RMSE over the same patches."""
    mse = image_mse(pred, targets, image, n_images)
    best = best_images(mse, top_fraction)
    chance = image_mse(torch.full_like(targets, CENTRE), targets, image, n_images)
    return {"rmse_all": float(mse.mean().sqrt()), "rmse_top": float(mse[best].mean().sqrt()),
            "rmse_chance": float(chance.mean().sqrt()), "rmse_chance_top": float(chance[best].mean().sqrt()),
            "per_image_rmse": mse.sqrt(), "best": best}


def evaluate(model: nn.Module, data: PatchSet, n_images: int, color: str, top_fraction: float,
             amp: str = "none") -> tuple[Tensor, dict]:
    """Predictions on `data` (under `amp` autocast) and their `rmse_summary`."""
    pred = predict(model, data.patches, color, amp=amp)
    return pred, rmse_summary(pred, data.targets, data.image, n_images, top_fraction)


def render_world_images(n: int, seed: int, key: int, image_size: int, scale: float | None) -> list[Tensor]:
    """n tiny-world ImageNet-style scenes (categories in turn) as (3, H, W) uint8 tensors.

    Image j is drawn from the world's stream (seed, key, j): the same (seed, key) with `scale=None`
    renders the same layouts without aberration (sizes and object placements are drawn before the
    aberration margin; background texture noise differs), which is the control of section 4.2's claim.
    """
    from ctxrepro.world.scenes import imagenet_scene
    from ctxrepro.world.spec import CATEGORIES, stream

    images = []
    for j in range(n):
        scene = imagenet_scene(stream(seed, key, j), CATEGORIES[j % len(CATEGORIES)], image_size, scale)
        images.append(torch.from_numpy(np.ascontiguousarray(scene.image)).permute(2, 0, 1).contiguous())
    return images
