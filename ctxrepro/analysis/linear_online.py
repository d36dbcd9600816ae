"""ImageNet linear probes trained online on a frozen trunk (Zhang et al. 2016/2017; Goyal et al. 2019's
released configs/legacy_tasks/imagenet_linear_tune): no feature dump, a fresh augmented view at every pass.

- Every training sample is a global position p = iteration * batch + slot. Pass p // n visits the n training
  images in a permutation seeded by (seed, SHUFFLE, pass); the image at p gets a random crop of its short-side
  resize and a random flip drawn from a generator seeded by (seed, AUGMENT, p). Batches are a pure function of
  the seed and the iteration, so a resumed run sees exactly the batches the uninterrupted one saw.
- The frozen trunk (`LayerTaps`, eval mode, no gradients) runs each batch once; each tapped layer's pooled
  features feed that layer's linear head, and every head trains in the same pass (one SGD over all heads: their
  parameters are disjoint, so the summed loss gives each head its own gradient).
- Features are standardised by a fixed sample's per-dimension mean and deviation (the first `stats_images`
  images of pass 0's permutation, one random view each), kept as buffers of the heads, so a checkpoint holds
  them. Goyal et al.'s code puts an affine-free batch norm before the linear layer instead.
- The schedule is Caffe's "step" policy: lr * gamma ** (i // lr_step) at iteration i (0-based), momentum and
  weight decay on the heads (`lr_at`).
- Checkpoints (`ctxrepro.checkpoint.save_state`) hold the heads, their standardisation, the optimizer, the
  iteration and the per-layer losses: a SIGKILLed run resumes bit-identically on the CPU (same threads).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ctxrepro.analysis.linear_heads import SgdConfig
from ctxrepro.analysis.linear_probe import AUGMENT, ImageViews, LayerTaps, ViewSpec, layer_dims, network_input, view_of
from ctxrepro.checkpoint import digest, restore_state, save_state
from ctxrepro.states.folders import resume_state
from ctxrepro.data.images import read_rgb
from ctxrepro.pretext.engine import autocast
from ctxrepro.progress import track
from ctxrepro.seeds import derive_seed, generator

SHUFFLE = 12  # seed purpose of each pass's image order
STATS = 13  # seed purpose of the standardisation sample's crops


def lr_at(iteration: int, cfg: SgdConfig) -> float:
    """The learning rate of 0-based `iteration`: Caffe's "step" policy, lr * gamma ** floor(iteration / lr_step)
    (Goyal et al.: 0.01, x0.1 at 40k, 80k and 120k of 140k)."""
    return cfg.lr * cfg.gamma ** (iteration // cfg.lr_step)


def passes(iterations: int, batch: int, images: int) -> float:
    """Fresh augmented views each training image contributes: iterations * batch / images."""
    return iterations * batch / max(1, images)


@dataclass(frozen=True)
class TrainSet:
    """Training images, their class indices (0..classes-1) and the random view they are cropped with."""

    paths: Sequence[Path]
    labels: np.ndarray
    classes: int
    spec: ViewSpec

    def identity(self) -> str:
        """A digest of the image names (folder/file) and labels: what a checkpoint must have been trained on."""
        names = "\n".join(f"{Path(p).parent.name}/{Path(p).name}" for p in self.paths)
        return digest([np.frombuffer(names.encode(), np.uint8), np.asarray(self.labels, np.int64)])


class Positions(Dataset):
    """Global sample position p -> (view (3, side, side) float 0..255, label) (module docstring)."""

    def __init__(self, data: TrainSet, seed: int, total: int):
        self.data, self.seed, self.total = data, seed, total
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.total

    def image(self, p: int) -> int:
        n = len(self.data.paths)
        epoch = p // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=generator(self.seed, SHUFFLE, epoch)).numpy())
        return int(self._perm[1][p % n])

    def __getitem__(self, p: int) -> tuple[Tensor, int]:
        i = self.image(p)
        return view_of(read_rgb(self.data.paths[i]), self.data.spec, generator(self.seed, AUGMENT, p)), \
            int(self.data.labels[i])


class LinearHeads(nn.Module):
    """One linear layer per tapped layer (zero-initialised) on standardised features."""

    def __init__(self, dims: dict[str, int], classes: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(d, classes) for k, d in dims.items()})
        for k, d in dims.items():
            nn.init.zeros_(self.heads[k].weight)
            nn.init.zeros_(self.heads[k].bias)
            self.register_buffer(f"mean_{k}", torch.zeros(d))
            self.register_buffer(f"std_{k}", torch.ones(d))

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.heads[k]((f.float() - getattr(self, f"mean_{k}")) / getattr(self, f"std_{k}"))
                for k, f in feats.items() if k in self.heads}


@dataclass(frozen=True)
class Runtime:
    """How a probe runs (not what it computes): device, autocast, images per evaluation batch, decoders."""

    device: str = "cpu"
    amp: str = "none"
    batch: int = 64
    workers: int = 0


def _features(taps: LayerTaps, x: Tensor, color: str, rt: Runtime) -> dict[str, Tensor]:
    with torch.no_grad(), autocast(rt.device, rt.amp):
        return {k: v.float() for k, v in taps(network_input(x.to(rt.device), color)).items()}


def standardise(heads: LinearHeads, taps: LayerTaps, data: TrainSet, images: int, seed: int, color: str,
                rt: Runtime) -> None:
    """Set the heads' mean/std buffers from the first `images` images of pass 0's order, one random view each."""
    order = torch.randperm(len(data.paths), generator=generator(seed, SHUFFLE, 0)).numpy()[:max(1, images)]
    views = ImageViews([data.paths[i] for i in order], data.spec, 1, derive_seed(seed, STATS))
    sums = {}
    for x in DataLoader(views, batch_size=rt.batch, num_workers=rt.workers):
        for k, f in _features(taps, x.flatten(0, 1), color, rt).items():
            f = f.double()
            s, q = sums.get(k, (0.0, 0.0))
            sums[k] = (s + f.sum(0), q + f.square().sum(0))
    for k, (s, q) in sums.items():
        mean = s / len(order)
        std = (q / len(order) - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        getattr(heads, f"mean_{k}").copy_(mean.float())
        getattr(heads, f"std_{k}").copy_(std.float())


@dataclass
class _Run:
    """What a checkpoint saves besides the heads, the optimizer and the global RNGs."""

    iteration: int = 0  # completed iterations
    seconds: float = 0.0  # training seconds over every invocation
    first: dict = field(default_factory=dict)  # per-layer loss of iteration 1
    last: dict = field(default_factory=dict)  # per-layer loss of the latest iteration

    def saved(self) -> dict:
        return {"iteration": self.iteration, "seconds": self.seconds, "first": self.first, "last": self.last}


def sgd_step(heads: LinearHeads, opt: torch.optim.Optimizer, feats: dict[str, Tensor], y: Tensor, lr: float,
             iteration: int) -> dict[str, float]:
    """One SGD step of every head on one batch of (unstandardised) features; the per-layer cross-entropies."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = heads(feats)
    losses = {k: F.cross_entropy(v, y.to(v.device)) for k, v in logits.items()}
    total = torch.stack(list(losses.values())).sum()
    if not torch.isfinite(total):
        raise FloatingPointError(f"linear heads: loss {total.item()} at iteration {iteration}; lower sgd.lr")
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def head_optimizer(heads: LinearHeads, cfg: SgdConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay over every head (the lr is set per iteration by `lr_at`)."""
    return torch.optim.SGD(heads.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _record(taps: LayerTaps, data: TrainSet, cfg: SgdConfig, seed: int, stats_images: int, amp: str,
            trunk: str) -> dict:
    """The identity of a run (stored in its checkpoints, compared on resume)."""
    return {**asdict(cfg), "layers": sorted(taps.grids), "grids": dict(sorted(taps.grids.items())),
            "view": asdict(data.spec), "seed": seed, "stats_images": stats_images, "amp": amp, "trunk": trunk,
            "data": data.identity(), "classes": data.classes}


def _start(heads: LinearHeads, opt: torch.optim.Optimizer, taps: LayerTaps, data: TrainSet, record: dict,
           cfg: SgdConfig, state: Path | None, color: str, rt: Runtime, log: logging.Logger
           ) -> tuple[_Run, Path | None]:
    """The run's start and where it checkpoints: `state` is a folder holding one state per configuration
    (`states.folders.resume_state`), or a single `.pt` file."""
    ckpt = None
    if state is not None:
        state, ckpt = resume_state(state, record, "iteration", cfg.iterations, log)
    if ckpt is None:
        standardise(heads, taps, data, record["stats_images"], record["seed"], color, rt)
        return _Run(), state
    restore_state(ckpt, heads, opt)
    return _Run(ckpt["iteration"], ckpt["seconds"], ckpt["first"], ckpt["last"]), state


def train_heads(taps: LayerTaps, data: TrainSet, cfg: SgdConfig, seed: int, color: str, rt: Runtime,
                log: logging.Logger, trunk: str, stats_images: int, state: Path | None = None,
                checkpoint_every: int = 5000, after_step: Callable[[int], None] | None = None
                ) -> tuple[LinearHeads, dict]:
    """Train every layer's head online (module docstring); resume from and checkpoint to `state` (None: neither).
    `trunk` is the frozen network's weight digest (part of the run's identity). Returns the heads and the
    training numbers (images/s over every invocation, passes, per-layer first and last losses)."""
    taps = taps.to(rt.device).eval()
    heads = LinearHeads(layer_dims(taps, data.spec.side), data.classes).to(rt.device)
    opt = head_optimizer(heads, cfg)
    record = _record(taps, data, cfg, seed, stats_images, rt.amp, trunk)
    run, state = _start(heads, opt, taps, data, record, cfg, state, color, rt, log)
    positions = Positions(data, seed, cfg.iterations * cfg.batch)
    loader = DataLoader(positions, batch_size=cfg.batch, sampler=range(run.iteration * cfg.batch, len(positions)),
                        num_workers=rt.workers)
    start, done = time.monotonic(), run.iteration
    for x, y in track(loader, desc="linear heads", unit="it", log=log):
        feats = _features(taps, x, color, rt)
        losses = sgd_step(heads, opt, feats, y, lr_at(run.iteration, cfg), run.iteration + 1)
        run.iteration += 1
        run.first = run.first or losses
        run.last = losses
        if after_step is not None:
            after_step(run.iteration)
        if state is not None and (run.iteration % checkpoint_every == 0 or run.iteration == cfg.iterations):
            seconds = run.seconds + time.monotonic() - start
            save_state(state, heads, opt, f"linear heads iteration {run.iteration}", config=record,
                       final=run.iteration == cfg.iterations, **{**run.saved(), "seconds": seconds})
    seconds = run.seconds + time.monotonic() - start if run.iteration > done else run.seconds
    return heads.eval(), {"images_per_second": round(run.iteration * cfg.batch / max(seconds, 1e-9), 1),
                          "passes": round(passes(cfg.iterations, cfg.batch, len(data.paths)), 3),
                          "loss_first": run.first, "loss_last": run.last,
                          "train_seconds": round(seconds, 1)}


def top1(taps: LayerTaps, heads: LinearHeads, paths: Sequence[Path], labels: np.ndarray, spec: ViewSpec,
         color: str, rt: Runtime) -> dict[str, float]:
    """Per-layer top-1 of `heads` on one `spec` view (the centre crop) of each image, streamed."""
    correct: dict[str, int] = {}
    labels, row = np.asarray(labels), 0
    with torch.no_grad():
        loader = DataLoader(ImageViews(paths, spec), batch_size=rt.batch, num_workers=rt.workers)
        for x in track(loader, desc="linear heads top-1", unit="batch"):
            y = labels[row:row + len(x)]
            for k, s in heads(_features(taps, x.flatten(0, 1), color, rt)).items():
                correct[k] = correct.get(k, 0) + int((s.argmax(1).cpu().numpy() == y).sum())
            row += len(x)
    return {k: v / max(1, len(labels)) for k, v in correct.items()}
