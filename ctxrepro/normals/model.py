"""Surface-normal estimation on NYUv2 by fine-tuning a transferred trunk (paper section 4.4, Table 2).

The paper fine-tunes its colour-dropping network "following the finetuning procedure of Wang et al. [57]";
the FAIR self-supervision benchmark's release of that protocol (docs/METHOD.md "Transfer") is what this follows:
- a codebook of 40 normals, k-means clusters of training normals (the benchmark's `vocab40.mat`, or
  `kmeans_codebook` on the training split when `normals.codebook: kmeans` asks for it);
- the trunk (conv1..conv6b of Figure 6, `ctxrepro.transfer.trunk.load_trunk`) with a small conv head that
  classifies every cell of the trunk's coarse output grid into a codeword (cross-entropy; cells without
  enough ground truth are ignored);
- decoding: the probability-weighted mean of the codewords, renormalised (`decode`);
- targets and predictions live at the cells' receptive-field centres (`ctxrepro.normals.grid`);
- evaluation at 480 x 640: the coarse normals are interpolated bilinearly between those centres and
  renormalised (`upsample_normals`), then scored by `ctxrepro.metrics.normals`.

Normals live in the camera frame of the ground truth (x right, y down, z forward for the tiny world and for
normals computed from depth); a horizontal flip of the image negates x.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.checkpoint import digest, restore_state, save_state
from ctxrepro.normals.grid import CellGrid, interpolation_matrix
from ctxrepro.pretext.model import xavier_init_
from ctxrepro.pretext.precision import autocast, check_amp, grad_scaler
from ctxrepro.seeds import derive_seed
from ctxrepro.states.folders import resume_state

IGNORE = -1  # target code of a cell without ground truth
HEAD_SEED, BATCH_SEED, KMEANS_SEED = 81, 82, 83  # seed purposes (derive_seed keys), shared by all inits


# ---------------------------------------------------------------------------------------------- codebook

def load_vocab(path: Path) -> np.ndarray:
    """The FAIR benchmark's `vocab40.mat` codebook as (K, 3) float64 unit rows.

    Its readers index it as loadmat(f)['vocabs'][0][0]['normals'][0][0] (a cell holding a struct).
    """
    from scipy.io import loadmat

    try:
        normals = np.asarray(loadmat(str(path))["vocabs"][0][0]["normals"][0][0], dtype=np.float64)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: expected vocabs{{1}}.normals (a K x 3 matrix) as in vocab40.mat ({e})") from e
    if normals.ndim != 2 or normals.shape[1] != 3:
        raise ValueError(f"{path}: vocabs{{1}}.normals has shape {normals.shape}, expected (K, 3)")
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def kmeans_codebook(normals: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means (cosine similarity, renormalised means) of (M, 3) unit normals: (k, 3) float64.

    Seeds by k-means++ from `seed`; a cluster left empty takes the point farthest from its own centre.
    """
    x = np.asarray(normals, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) < k:
        raise ValueError(f"kmeans_codebook: need at least k={k} normals of shape (M, 3), got {x.shape}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        dist = 1.0 - np.max(x @ np.array(centres).T, axis=1)  # cosine distance to the nearest centre
        p = np.clip(dist, 0.0, None)
        centres.append(x[rng.choice(len(x), p=p / p.sum())] if p.sum() > 0 else x[rng.integers(len(x))])
    c = np.array(centres)
    for _ in range(iters):
        sim = x @ c.T
        assign = np.argmax(sim, axis=1)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        empty = np.flatnonzero(np.bincount(assign, minlength=k) == 0)
        if empty.size:  # re-seed empty clusters at the worst-fitting points, one point each
            worst = np.argsort(sim[np.arange(len(x)), assign], kind="stable")[:empty.size]
            sums[empty] = x[worst]
        c = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return c


def assign_codes(normals: Tensor, valid: Tensor, codebook: Tensor) -> Tensor:
    """Nearest codeword (largest dot product) of (..., 3) normals; IGNORE where not valid."""
    codes = torch.argmax(normals @ codebook.T, dim=-1)
    return torch.where(valid, codes, torch.full_like(codes, IGNORE))


def decode(probs: Tensor, codebook: Tensor) -> Tensor:
    """(B, K, h, w) probabilities -> (B, 3, h, w) unit normals: the probability-weighted mean of the
    codewords, renormalised; where that mean is (numerically) zero, the most likely codeword."""
    mean = torch.einsum("bkhw,kc->bchw", probs, codebook)
    norm = mean.norm(dim=1, keepdim=True)
    best = codebook[probs.argmax(dim=1)].permute(0, 3, 1, 2)
    return torch.where(norm > 1e-6, mean / norm.clamp_min(1e-12), best)


def upsample_normals(normals: Tensor, grid: CellGrid) -> Tensor:
    """(B, 3, h, w) -> (B, 3, H, W) at `grid.size`: bilinear between the cells' receptive-field centres
    (`ctxrepro.normals.grid`; the nearest cell beyond the outermost centres), renormalised."""
    if tuple(normals.shape[2:]) != grid.shape:
        raise ValueError(f"coarse normals of grid {tuple(normals.shape[2:])}, but the trunk's grid is {grid.shape}")
    my = interpolation_matrix(grid.ys, grid.size[0]).to(normals)
    mx = interpolation_matrix(grid.xs, grid.size[1]).to(normals)
    up = torch.einsum("yi,bcij,xj->bcyx", my, normals, mx)
    return up / up.norm(dim=1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------- network

class NormalsNet(nn.Module):
    """Trunk (0..255 RGB -> conv6b map) + head: conv 3x3 (pad 1) + ReLU + conv 1x1 -> K codeword logits."""

    def __init__(self, trunk: nn.Module, in_channels: int, hidden: int, classes: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, classes, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.trunk(images))


@torch.no_grad()
def trunk_output(trunk: nn.Module, size: tuple[int, int], device: str) -> tuple[int, int, int]:
    """(channels, h, w) of the trunk's map for a (H, W) input: the coarse grid the head classifies."""
    was = trunk.training
    trunk.eval()
    out = trunk(torch.zeros(1, 3, *size, device=device))
    trunk.train(was)
    if out.dim() != 4 or min(out.shape[2:]) < 1:
        raise ValueError(f"the trunk maps a {size} input to shape {tuple(out.shape)}, not a (1, C, h, w) map")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def build_net(trunk: nn.Module, in_channels: int, hidden: int, classes: int, seed: int) -> NormalsNet:
    """The head starts from Caffe-Xavier weights drawn from `seed` (the same for every initialisation)."""
    net = NormalsNet(trunk, in_channels, hidden, classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, HEAD_SEED))
        xavier_init_(net.head)
    return net


# ---------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainSettings:
    """Fine-tuning settings (the `normals` params; section 4.4 follows Wang et al. 2015)."""

    steps: int = 2000
    batch: int = 8
    optimizer: str = "sgd"  # "sgd" | "adam"
    lr: float = 1e-3
    trunk_lr_mult: float = 1.0  # the trunk's learning rate relative to the head's
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip: bool = True  # random horizontal flips (the x component of the target normals changes sign)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000  # steps between resumable checkpoints
    amp: str = "none"  # autocast of the forward (ctxrepro.pretext.precision); the loss is float32

    def __post_init__(self) -> None:
        check_amp(self.amp)


@dataclass(frozen=True)
class TrainSet:
    """Training arrays: uint8 images (N, H, W, 3) at the input size (an array, or rows read from a file on
    demand: `normals.data.NpyRows`), coarse targets (N, h, w, 3) float32
    unit normals with their valid mask (N, h, w) at the trunk's output grid, and the targets of the
    mirrored images (`mirrored_*`): the cells are not placed symmetrically in the frame, so a mirrored
    image's cells see other pixels than the mirrored grid of the original's."""

    images: np.ndarray
    normals: np.ndarray
    valid: np.ndarray
    mirrored_normals: np.ndarray
    mirrored_valid: np.ndarray


def _optimizer(net: NormalsNet, s: TrainSettings) -> torch.optim.Optimizer:
    groups = [{"params": list(net.head.parameters()), "lr": s.lr},
              {"params": list(net.trunk.parameters()), "lr": s.lr * s.trunk_lr_mult}]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(groups, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"optimizer {s.optimizer!r} is not 'sgd' or 'adam'")


def _batch(data: TrainSet, idx: Tensor, flips: Tensor, codebook: Tensor, device: str) -> tuple[Tensor, Tensor]:
    """Images (B, 3, H, W) float 0..255 and target codes (B, h, w); mirrored images, with the targets of
    mirrored images, where `flips`."""
    i = idx.numpy()
    x = torch.from_numpy(data.images[i]).to(device).permute(0, 3, 1, 2).float()
    f = flips.to(device)
    x = torch.where(f[:, None, None, None], x.flip(3), x)
    n = torch.where(f[:, None, None, None], torch.from_numpy(data.mirrored_normals[i]).to(device),
                    torch.from_numpy(data.normals[i]).to(device))
    v = torch.where(f[:, None, None], torch.from_numpy(data.mirrored_valid[i]).to(device),
                    torch.from_numpy(data.valid[i]).to(device))
    return x, assign_codes(n, v, codebook)


def _update(net: NormalsNet, opt: torch.optim.Optimizer, x: Tensor, codes: Tensor, step: int, amp: str = "none",
            scaler: torch.amp.GradScaler | None = None) -> Tensor:
    """One SGD step on the per-cell cross-entropy (cells without ground truth ignored); the loss.

    The forward runs under `amp` autocast, the loss in float32; fp16 scales it (`scaler`)."""
    with autocast(x.device, amp):
        logits = net(x).float()
    if logits.shape[2:] != codes.shape[1:]:
        raise ValueError(f"the net's output grid {tuple(logits.shape[2:])} differs from the targets' "
                         f"{tuple(codes.shape[1:])}")
    loss = F.cross_entropy(logits, codes, ignore_index=IGNORE)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"normals fine-tuning: loss {loss.item()} at step {step}; lower the lr")
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.detach()


@dataclass
class _Run:
    """What a checkpoint saves besides the model, the optimizer and the global RNGs."""

    batches: torch.Generator  # draws every step's images and flips
    step: int = 0  # completed steps
    seconds: float = 0.0  # training seconds of earlier invocations
    window: list[Tensor] = field(default_factory=list)  # losses since the last logged mean
    losses: list[float] = field(default_factory=list)  # the logged means

    def saved(self) -> dict:
        return {"batches": self.batches.get_state(), "step": self.step, "seconds": self.seconds,
                "window": self.window, "losses": self.losses}


def _record(net: NormalsNet, data: TrainSet, codebook: np.ndarray, s: TrainSettings) -> dict:
    """The identity of a run (stored in its checkpoints, compared on resume): settings, start weights, data."""
    return {**asdict(s), "start_weights": digest(net.state_dict().values()),
            "data": digest([data.images, data.normals, data.valid, data.mirrored_normals, data.mirrored_valid,
                            codebook])}


def _start(net: NormalsNet, opt: torch.optim.Optimizer, record: dict, s: TrainSettings, state: Path | None,
           log: logging.Logger) -> tuple[_Run, Path | None]:
    """A fresh run, or the one checkpointed in `state` when its record matches; and where it checkpoints."""
    run = _Run(torch.Generator().manual_seed(derive_seed(s.seed, BATCH_SEED)))
    ckpt = None
    if state is not None:
        state, ckpt = resume_state(state, record, "step", s.steps, log)
    if ckpt is not None:
        restore_state(ckpt, net, opt)
        run.batches.set_state(ckpt["batches"])
        run.step, run.seconds, run.window, run.losses = ckpt["step"], ckpt["seconds"], ckpt["window"], ckpt["losses"]
    return run, state


def train_normals(net: NormalsNet, data: TrainSet, codebook: np.ndarray, s: TrainSettings, device: str,
                  log: logging.Logger, state: Path | None = None) -> dict[str, float]:
    """Fine-tune the whole net (trunk and head), resuming from and checkpointing to `state` (None: neither; a
    folder keeps one state per configuration, `states.folders.resume_state`);
    returns the last logged mean loss, the training time over all resumes and the steps.

    Batches are drawn with replacement from a generator seeded by (seed, BATCH_SEED), independent of the
    initialisation, so every initialisation sees the same images in the same order and flips. A checkpoint
    holds that generator's state with the model's, the optimizer's and the global RNGs, so a killed run
    resumed from it continues bit-identically (CPU, same threads).
    """
    net.to(device).train()
    book = torch.as_tensor(codebook, dtype=torch.float32, device=device)
    opt = _optimizer(net, s)
    record = _record(net, data, codebook, s) if state is not None else {}  # before a resume loads weights
    run, state = _start(net, opt, record, s, state, log)
    start, elapsed = time.monotonic(), run.seconds
    scaler = grad_scaler(device, s.amp)  # fp16 only; rebuilt on resume (its scale settles in a few steps)
    for step in range(run.step + 1, s.steps + 1):
        idx = torch.randint(len(data.images), (s.batch,), generator=run.batches)
        flips = torch.rand(s.batch, generator=run.batches) < (0.5 if s.flip else 0.0)  # drawn either way
        x, codes = _batch(data, idx, flips, book, device)
        if not (codes == IGNORE).all():  # a batch without any ground truth teaches nothing
            run.window.append(_update(net, opt, x, codes, step, s.amp, scaler))
        run.step, elapsed = step, run.seconds + time.monotonic() - start
        if (step % s.log_every == 0 or step == s.steps) and run.window:
            run.losses.append(float(torch.stack(run.window).mean()))
            run.window = []
            log.info("normals step %d/%d: loss %.4f (%.1fs)", step, s.steps, run.losses[-1], elapsed)
        if state is not None and (step % s.checkpoint_every == 0 or step == s.steps):
            save_state(state, net, opt, f"normals step {step}", final=step == s.steps, config=record,
                       **{**run.saved(), "seconds": elapsed})
    # the seconds of the last checkpoint: a rerun that resumes at the end reports the same
    return {"train_loss": run.losses[-1] if run.losses else math.nan, "train_seconds": round(elapsed, 2),
            "steps": s.steps}


@torch.no_grad()
def predict_coarse(net: NormalsNet, images: np.ndarray, codebook: np.ndarray, batch: int,
                   device: str, amp: str = "none") -> np.ndarray:
    """Decoded unit normals (N, h, w, 3) float32 on the trunk's output grid for uint8 images (N, H, W, 3)."""
    net.to(device).eval()
    book = torch.as_tensor(codebook, dtype=torch.float32, device=device)
    out = []
    for lo in range(0, len(images), batch):
        x = torch.from_numpy(images[lo:lo + batch]).to(device).permute(0, 3, 1, 2).float()
        with autocast(device, amp):
            logits = net(x)
        probs = torch.softmax(logits.float(), dim=1)
        out.append(decode(probs, book).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def full_resolution(coarse: np.ndarray, grid: CellGrid, dtype=np.float16) -> np.ndarray:
    """One image's coarse (h, w, 3) normals upsampled to the frame (H, W, 3) and renormalised, as stored."""
    t = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32)).permute(2, 0, 1)[None]
    return upsample_normals(t, grid)[0].permute(1, 2, 0).numpy().astype(dtype)
