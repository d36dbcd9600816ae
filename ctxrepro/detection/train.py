"""Fast R-CNN fine-tuning (paper section 4.3: "we fine-tune this network"; Fast R-CNN's solver, DATA.md).

Each iteration takes `images_per_batch` images from a seeded shuffle of the training images and, with flips
on, their mirror images (Fast R-CNN appends a flipped copy of every image to the roidb), scales each one,
samples its RoIs (`sampling.sample_rois`) and takes one SGD step on the multi-task loss. Caffe's
convention: biases learn at `bias_lr_mult` times the rate, without weight decay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ctxrepro.detection.boxes import encode, flip
from ctxrepro.detection.model import BOX_STDS, FastRCNN, box_targets, multitask_loss
from ctxrepro.detection.roidb import Entry, image_scale, read_rgb, scale_image
from ctxrepro.detection.sampling import SamplingConfig, sample_rois


@dataclass(frozen=True)
class SolverConfig:
    """Fast R-CNN's VOC 2007 solver (DATA.md): 40k iterations of 2 images, lr 0.001 x0.1 at 30k,
    momentum 0.9, weight decay 5e-4, flips, shorter side 600 capped at 1000."""

    iterations: int = 40000
    images_per_batch: int = 2
    optimizer: str = "sgd"
    lr: float = 0.001
    lr_step: int = 30000
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0
    flip: bool = True
    scale: int = 600
    max_size: int = 1000
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"SolverConfig.optimizer={self.optimizer!r}: 'sgd' or 'adam'")


@dataclass(frozen=True)
class Batch:
    images: list[Tensor]  # (3, H, W) float 0..255, scaled
    rois: list[Tensor]  # (R_i, 4) in scaled pixels
    labels: Tensor  # (R,)
    targets: Tensor  # (R, 4) normalised regression targets (meaningful where labels > 0)


def image_order(n: int, flips: bool, seed: int) -> Iterator[tuple[int, bool]]:
    """Endless epochs of a seeded shuffle of (image index, flipped)."""
    items = [(i, f) for f in ((False, True) if flips else (False,)) for i in range(n)]
    rng = np.random.default_rng(seed)
    while True:
        for k in rng.permutation(len(items)):
            yield items[k]


def load_image(entry: Entry, flipped: bool, scale: int, max_size: int) -> tuple[np.ndarray, float]:
    """(scaled RGB image, scale factor); mirrored when `flipped`."""
    rgb = read_rgb(entry.path, entry.height, entry.width)
    if flipped:
        rgb = rgb[:, ::-1]
    factor = image_scale(entry.height, entry.width, scale, max_size)
    return np.ascontiguousarray(scale_image(rgb, factor)), factor


def to_tensor(rgb: np.ndarray, device: str | torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().to(device)


def make_batch(entries: Sequence[Entry], picks: Sequence[tuple[int, bool]], sampling: SamplingConfig,
               solver: SolverConfig, rng: np.random.Generator, device: str | torch.device) -> Batch:
    images, rois, labels, targets = [], [], [], []
    for index, flipped in picks:
        e = entries[index]
        props = flip(e.proposals, e.width) if flipped else e.proposals
        gts = flip(e.gt_boxes, e.width) if flipped else e.gt_boxes
        s = sample_rois(props, gts, e.gt_classes, sampling, rng)
        if len(s.rois) == 0:
            continue
        rgb, factor = load_image(e, flipped, solver.scale, solver.max_size)
        images.append(to_tensor(rgb, device))
        rois.append(torch.from_numpy(s.rois * factor).float().to(device))
        labels.append(torch.from_numpy(s.labels))
        # Targets are scale-invariant, so they come from the unscaled boxes (as Fast R-CNN's roidb)
        targets.append(box_targets(encode(torch.from_numpy(s.rois), torch.from_numpy(s.gt_boxes)), BOX_STDS))
    if not images:
        return Batch([], [], torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    return Batch(images, rois, torch.cat(labels).to(device), torch.cat(targets).float().to(device))


def build_optimizer(model: FastRCNN, solver: SolverConfig) -> torch.optim.Optimizer:
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    groups = [{"params": weights, "lr": solver.lr, "weight_decay": solver.weight_decay},
              {"params": biases, "lr": solver.lr * solver.bias_lr_mult, "weight_decay": 0.0}]
    if solver.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=solver.momentum)


def set_lr(opt: torch.optim.Optimizer, solver: SolverConfig, iteration: int) -> float:
    """Caffe's "step" policy: lr * gamma ^ floor(iteration / lr_step)."""
    lr = solver.lr * solver.gamma ** (iteration // solver.lr_step)
    for group, mult in zip(opt.param_groups, (1.0, solver.bias_lr_mult)):
        group["lr"] = lr * mult
    return lr


def train(model: FastRCNN, entries: Sequence[Entry], sampling: SamplingConfig, solver: SolverConfig, seed: int,
          device: str | torch.device, log: logging.Logger) -> list[dict]:
    """Fine-tune `model` in place; returns the loss history, one row per `log_every` iterations (mean over them)."""
    if not entries:
        raise ValueError("train: no training images")
    torch.manual_seed(seed)  # dropout draws from the global generator
    rng = np.random.default_rng(seed)
    order = image_order(len(entries), solver.flip, seed)
    opt = build_optimizer(model, solver)
    model.train()
    history, window = [], []
    for it in range(solver.iterations):
        lr = set_lr(opt, solver, it)
        batch = make_batch(entries, [next(order) for _ in range(solver.images_per_batch)], sampling, solver, rng,
                           device)
        if not batch.images:
            continue
        cls, box = multitask_loss(model(batch.images, batch.rois), batch.labels, batch.targets)
        loss = cls + box
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"detect: loss {loss.item()} at iteration {it} (lr {lr:g}): lower detect.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append((loss.item(), cls.item(), box.item(), (batch.labels > 0).float().mean().item()))
        if (it + 1) % solver.log_every == 0 or it + 1 == solver.iterations:
            mean = np.mean(window, axis=0)
            history.append({"iteration": it + 1, "loss": float(mean[0]), "loss_cls": float(mean[1]),
                            "loss_box": float(mean[2]), "fg_fraction": float(mean[3]), "lr": lr})
            log.info("iter %d/%d: loss %.4f (cls %.4f, box %.4f), fg %.2f, lr %g", it + 1, solver.iterations,
                     *mean, lr)
            window = []
    return history
