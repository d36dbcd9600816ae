"""Fast R-CNN training mini-batches as a pure function of (seed, iteration), built in DataLoader workers.

Section 4.3 fine-tunes with Fast R-CNN: each iteration takes `images_per_batch` images from a shuffle of the
training images and, with flips on, their mirror images (Fast R-CNN appends a flipped copy of every image to
the roidb), scales each one and samples its RoIs (`sampling.sample_rois`).

Here image position p (iteration t covers positions t*B .. t*B+B-1) is item p mod M of epoch p div M, an epoch
being a permutation of the M (image, flipped) items drawn from (seed, ORDER, epoch); the RoIs of iteration t
are drawn from (seed, ROIS, t). No batch depends on an earlier one, so reading, decoding, scaling and RoI
sampling run in any number of DataLoader workers (`detect.workers`) with the same result, and a resumed run
gets exactly the batches an uninterrupted one would have had.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ctxrepro.detection.boxes import encode, flip
from ctxrepro.detection.model import BOX_STDS, box_targets
from ctxrepro.detection.roidb import Entry, image_scale, read_rgb, scale_image
from ctxrepro.detection.sampling import SamplingConfig, sample_rois
from ctxrepro.seeds import derive_seed, generator

ORDER, ROIS, LOADER = 1, 2, 3  # derive_seed purposes under the detect seed


@dataclass(frozen=True)
class Batch:
    iteration: int
    images: list[Tensor]  # (3, H, W) float 0..255, scaled
    rois: list[Tensor]  # (R_i, 4) in scaled pixels
    labels: Tensor  # (R,)
    targets: Tensor  # (R, 4) normalised regression targets (meaningful where labels > 0)

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(self.iteration, [x.to(device) for x in self.images], [r.to(device) for r in self.rois],
                     self.labels.to(device), self.targets.to(device))


def load_image(entry: Entry, flipped: bool, scale: int, max_size: int) -> tuple[np.ndarray, float]:
    """(scaled RGB image, scale factor); mirrored when `flipped`."""
    rgb = read_rgb(entry.path, entry.height, entry.width)
    if flipped:
        rgb = rgb[:, ::-1]
    factor = image_scale(entry.height, entry.width, scale, max_size)
    return np.ascontiguousarray(scale_image(rgb, factor)), factor


def to_tensor(rgb: np.ndarray, device: str | torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().to(device)


@lru_cache(maxsize=4)
def _permutation(items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, ORDER, epoch)).permutation(items)


def picks(n: int, flips: bool, seed: int, iteration: int, per_batch: int) -> list[tuple[int, bool]]:
    """The (image index, flipped) pairs of `iteration`: positions iteration*per_batch.. of seeded epochs."""
    items = [(i, f) for f in ((False, True) if flips else (False,)) for i in range(n)]
    out = []
    for pos in range(iteration * per_batch, (iteration + 1) * per_batch):
        epoch, k = divmod(pos, len(items))
        out.append(items[int(_permutation(len(items), seed, epoch)[k])])
    return out


def make_batch(entries: Sequence[Entry], chosen: Sequence[tuple[int, bool]], sampling: SamplingConfig,
               scale: int, max_size: int, rng: np.random.Generator, iteration: int = 0) -> Batch:
    """The images (scaled, on the CPU) and sampled RoIs of `chosen`; images without RoIs are left out."""
    images, rois, labels, targets = [], [], [], []
    for index, flipped in chosen:
        e = entries[index]
        props = flip(e.proposals, e.width) if flipped else e.proposals
        gts = flip(e.gt_boxes, e.width) if flipped else e.gt_boxes
        s = sample_rois(props, gts, e.gt_classes, sampling, rng)
        if len(s.rois) == 0:
            continue
        rgb, factor = load_image(e, flipped, scale, max_size)
        images.append(to_tensor(rgb, "cpu"))
        rois.append(torch.from_numpy(s.rois * factor).float())
        labels.append(torch.from_numpy(s.labels))
        # Targets are scale-invariant, so they come from the unscaled boxes (as Fast R-CNN's roidb)
        targets.append(box_targets(encode(torch.from_numpy(s.rois), torch.from_numpy(s.gt_boxes)), BOX_STDS))
    if not images:
        return Batch(iteration, [], [], torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    return Batch(iteration, images, rois, torch.cat(labels), torch.cat(targets).float())


class IterationBatches(Dataset):
    """Item t is iteration t's Batch (the module docstring's rule); len = the iteration budget."""

    def __init__(self, entries: Sequence[Entry], sampling: SamplingConfig, per_batch: int, flips: bool, scale: int,
                 max_size: int, seed: int, iterations: int):
        if not entries:
            raise ValueError("detect: no training images")
        self.entries, self.sampling, self.per_batch, self.flips = list(entries), sampling, per_batch, flips
        self.scale, self.max_size, self.seed, self.iterations = scale, max_size, seed, iterations

    def __len__(self) -> int:
        return self.iterations

    def __getitem__(self, iteration: int) -> Batch:
        chosen = picks(len(self.entries), self.flips, self.seed, iteration, self.per_batch)
        rng = np.random.default_rng(derive_seed(self.seed, ROIS, iteration))
        return make_batch(self.entries, chosen, self.sampling, self.scale, self.max_size, rng, iteration)


def _worker_init(worker_id: int) -> None:
    # Batches never read the global RNGs (every draw is iteration-seeded); one thread per worker leaves the
    # other cores to the training process.
    torch.set_num_threads(1)


def make_loader(dataset: IterationBatches, start: int, workers: int) -> Iterator[Batch]:
    """Batches for iterations start.. in order; `workers` processes build them ahead (0: in this process)."""
    # Own generator: the DataLoader's base seed must not consume the global torch RNG (dropout's stream).
    return iter(DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=workers,
                           worker_init_fn=_worker_init, generator=generator(dataset.seed, LOADER, start),
                           prefetch_factor=2 if workers else None, collate_fn=_identity))


def _identity(batch: Batch) -> Batch:
    return batch
