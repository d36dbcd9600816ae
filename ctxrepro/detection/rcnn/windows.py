"""R-CNN fine-tuning batches (Caffe's window_data layer with R-CNN's pascal_finetune_train.prototxt).

Every ground-truth box and proposal of the training images is a window, labelled with the class of the
ground-truth box it overlaps most. Foreground: IoU >= fg_thresh; background: IoU in [bg_lo, bg_hi) (the
released window file lists every proposal, so R-CNN's background has no lower bound: bg_lo 0). A batch of
`batch` windows draws round(fg_fraction * batch) foreground windows and fills the rest with background ones,
each uniformly from all the images' windows (with replacement, as the data layer), mirrors each with
probability 1/2 when `flip`, and warps it with context padding (`warp`).

Batch t is drawn from (seed, WINDOWS, t) alone, so DataLoader workers build batches in any order and a
resumed run gets the batches an uninterrupted one would have had.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ctxrepro.detection.boxes import iou
from ctxrepro.detection.rcnn.warp import warp_windows
from ctxrepro.detection.roidb import Entry, read_rgb
from ctxrepro.seeds import derive_seed, generator

WINDOWS, LOADER = 11, 12  # derive_seed purposes under the detect seed


@dataclass(frozen=True)
class WindowConfig:
    """R-CNN's VOC 2007 fine-tuning (pascal_finetune_train.prototxt): 128 windows, 25% fg at IoU >= 0.5,
    bg below 0.5, 16 px context (at 227 px: the window's side is the network's input), mirrored."""

    pad: int = 16
    batch: int = 128
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_hi: float = 0.5
    bg_lo: float = 0.0
    flip: bool = True
    max_proposals: int = 0  # proposals per image used (`subsample`); 0 = all

    @property
    def fg_per_batch(self) -> int:
        return int(np.round(self.fg_fraction * self.batch))


def subsample(proposals: np.ndarray, n: int) -> np.ndarray:
    """At most `n` proposals (0: all), evenly spaced through the list: selective search lists similar boxes
    together, so its first n miss most objects (tiny world, 30 of ~360: 11% recall at IoU 0.5; evenly spaced 86%)."""
    if n <= 0 or len(proposals) <= n:
        return proposals
    return proposals[np.linspace(0, len(proposals) - 1, n).round().astype(np.int64)]


def image_windows(entry: Entry, max_proposals: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (G + P, 4): ground truth then proposals, best-overlap class (0 when no gt), best IoU)."""
    props = subsample(entry.proposals, max_proposals)
    boxes = np.concatenate([entry.gt_boxes, props]).reshape(-1, 4)
    if len(entry.gt_boxes) == 0:
        return boxes, np.zeros(len(boxes), dtype=np.int64), np.zeros(len(boxes))
    ov = iou(boxes, entry.gt_boxes)
    best = ov.argmax(axis=1)
    return boxes, entry.gt_classes[best], ov[np.arange(len(boxes)), best]


@dataclass(frozen=True)
class WindowPool:
    """All training windows: foreground and background lists of (image index, box, label)."""

    fg_image: np.ndarray
    fg_box: np.ndarray
    fg_label: np.ndarray
    bg_image: np.ndarray
    bg_box: np.ndarray


def window_pool(entries: Sequence[Entry], cfg: WindowConfig) -> WindowPool:
    fg, bg = ([], [], []), ([], [])
    for i, e in enumerate(entries):
        boxes, labels, best = image_windows(e, cfg.max_proposals)
        f = best >= cfg.fg_thresh
        b = (best < cfg.bg_hi) & (best >= cfg.bg_lo)
        fg[0].append(np.full(int(f.sum()), i)), fg[1].append(boxes[f]), fg[2].append(labels[f])
        bg[0].append(np.full(int(b.sum()), i)), bg[1].append(boxes[b])
    pool = WindowPool(np.concatenate(fg[0]).astype(np.int64), np.concatenate(fg[1]).reshape(-1, 4),
                      np.concatenate(fg[2]).astype(np.int64), np.concatenate(bg[0]).astype(np.int64),
                      np.concatenate(bg[1]).reshape(-1, 4))
    if len(pool.fg_image) == 0 or len(pool.bg_image) == 0:
        raise ValueError(f"R-CNN fine-tuning: {len(pool.fg_image)} foreground and {len(pool.bg_image)} background "
                         f"windows in {len(entries)} images: need both (check the proposals and ground truth)")
    return pool


class WindowBatches(Dataset):
    """Item t: iteration t's (windows (B, 3, side, side) float 0..255, labels (B,)); len = the budget."""

    def __init__(self, entries: Sequence[Entry], cfg: WindowConfig, side: int, fill: Sequence[float], seed: int,
                 iterations: int, cached_images: int = 256):
        self.entries, self.cfg, self.side, self.fill = list(entries), cfg, side, list(fill)
        self.seed, self.iterations = seed, iterations
        self.pool = window_pool(self.entries, cfg)
        self.cached_images = cached_images
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()  # decoded images, least recently used first

    def image(self, index: int) -> np.ndarray:
        if index in self._images:
            self._images.move_to_end(index)
            return self._images[index]
        e = self.entries[index]
        rgb = self._images[index] = read_rgb(e.path, e.height, e.width)
        if len(self._images) > self.cached_images:
            self._images.popitem(last=False)
        return rgb

    def __len__(self) -> int:
        return self.iterations

    def draw(self, iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image index, box, label, flipped) of each window of batch `iteration`, foreground first."""
        rng = np.random.default_rng(derive_seed(self.seed, WINDOWS, iteration))
        n_fg = self.cfg.fg_per_batch
        f = rng.integers(0, len(self.pool.fg_image), n_fg)
        b = rng.integers(0, len(self.pool.bg_image), self.cfg.batch - n_fg)
        flips = rng.random(self.cfg.batch) < 0.5 if self.cfg.flip else np.zeros(self.cfg.batch, dtype=bool)
        images = np.concatenate([self.pool.fg_image[f], self.pool.bg_image[b]])
        boxes = np.concatenate([self.pool.fg_box[f], self.pool.bg_box[b]])
        labels = np.concatenate([self.pool.fg_label[f], np.zeros(len(b), dtype=np.int64)])
        return images, boxes, labels, flips

    def __getitem__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, boxes, labels, flips = self.draw(iteration)
        out = np.empty((len(images), 3, self.side, self.side), dtype=np.float32)
        for i in np.unique(images):
            at = np.flatnonzero(images == i)
            out[at] = warp_windows(self.image(int(i)), boxes[at], self.side, self.cfg.pad, self.fill, flips[at])
        return torch.from_numpy(out), torch.from_numpy(labels)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # batches draw from their own seeds; the other cores stay with training


def window_loader(dataset: WindowBatches, start: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches for iterations start.. in order; `workers` processes build them ahead (0: in this process)."""
    return iter(DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=workers,
                           worker_init_fn=_worker_init, generator=generator(dataset.seed, LOADER, start),
                           prefetch_factor=2 if workers else None))
