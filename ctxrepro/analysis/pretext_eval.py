"""Accuracy on the relative-position pretext task itself (section 4.6).

Section 4.6 samples 500 random VOC 2007 images, 256 pairs of patches from each, and classifies them
into the eight positions of Figure 2 (38.4%, chance 12.5%); it repeats this with patches only from
inside ground-truth boxes of at least 240 px per side that are not truncated, occluded or difficult
(39.2%; 45.6% on cars), and on ImageNet training vs validation images (39.5% vs 40.3%).

Pairs come from the pretraining geometry (`pretext.sampling.sample_grid`: the checkpoint's patch, gap and
jitter): grids are drawn for an image (or a box) until they hold at least the wanted number of pairs,
and that many are chosen uniformly without replacement. Every choice is drawn from a generator seeded
by (seed, purpose, item), so a selection is reproducible and can be written out (`Selection.rows`).
240 px is exactly the smallest box that holds a 2x2 grid of 96 px patches with a 48 px gap
(96 + 144), so `min_box_side` is 2 * patch + gap. Patches are preprocessed as in training (section 3.1:
mean subtraction, the checkpoint's colour mode, RMS 50) without the random downsampling, which is a
training augmentation.

What every evaluation of the pretrained network shares (`load_pretrained`, `network_input`, `read_rgb`) lives in
`ctxrepro.pretext.export`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ctxrepro.pretext.export import Pretrained, load_pretrained, network_input, read_rgb  # noqa: F401 (re-exported)
from ctxrepro.pretext.precision import autocast
from ctxrepro.pretext.sampling import batch_pairs, cut_patches, sample_grid
from ctxrepro.progress import track
from ctxrepro.seeds import generator

CHANCE = 1.0 / 8.0
EVAL_PAIRS = 51  # seed purpose of pair selections (pretext.data's purposes are 1..5)


@dataclass(frozen=True)
class Selection:
    """Pairs chosen in one image, or inside one object box of it (boxes are in image coordinates either way)."""

    image: int  # index into the caller's image list
    boxes: Tensor  # (P, 2) int64 top-left corners in IMAGE coordinates
    pairs: Tensor  # (Q, 2) indices into boxes
    labels: Tensor  # (Q,) 0..7
    group: str = ""  # e.g. the box's class

    def rows(self) -> list[tuple[int, int, int, int, int, int]]:
        """(image, y1, x1, y2, x2, label) per pair: the recorded selection."""
        b = self.boxes[self.pairs].reshape(-1, 4).tolist()  # (Q, [y1, x1, y2, x2])
        return [(self.image, *r, lab) for r, lab in zip(b, self.labels.tolist())]


def sample_pairs(height: int, width: int, n_pairs: int, g: torch.Generator, patch: int, gap: int,
                 jitter: int, max_grids: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """`n_pairs` labelled pairs drawn uniformly without replacement from grids of one region.

    Grids are drawn until they hold at least n_pairs pairs (or `max_grids` grids; then all are kept).
    Returns (boxes, pairs, labels) with only the boxes the chosen pairs use; empty if no grid fits.
    """
    boxes, pairs, labels, counts = [], [], [], []
    total = 0
    for _ in range(max_grids):
        b, p, lab = sample_grid(height, width, g, patch, gap, jitter)
        if len(b) == 0:
            break
        boxes.append(b)
        pairs.append(p)
        labels.append(lab)
        counts.append(len(b))
        total += len(p)
        if total >= n_pairs:
            break
    if not boxes:
        z = torch.zeros((0, 2), dtype=torch.int64)
        return z, z.clone(), torch.zeros((0,), dtype=torch.int64)
    all_boxes, all_pairs, all_labels = torch.cat(boxes), batch_pairs(pairs, counts), torch.cat(labels)
    chosen = torch.randperm(len(all_pairs), generator=g)[:n_pairs]
    chosen_pairs = all_pairs[chosen]
    used, inverse = torch.unique(chosen_pairs.flatten(), return_inverse=True)
    return all_boxes[used], inverse.view(-1, 2), all_labels[chosen]


def select_images(sizes: list[tuple[int, int]], n_pairs: int, seed: int, purpose: int, patch: int, gap: int,
                  jitter: int) -> list[Selection]:
    """n_pairs pairs per (height, width) image; image i draws from generator(seed, EVAL_PAIRS, purpose, i).
    Images too small for a grid give no Selection (the caller counts them)."""
    out = []
    for i, (h, w) in enumerate(sizes):
        boxes, pairs, labels = sample_pairs(h, w, n_pairs, generator(seed, EVAL_PAIRS, purpose, i), patch, gap,
                                            jitter)
        if len(pairs):
            out.append(Selection(i, boxes, pairs, labels))
    return out


def select_regions(regions: list[tuple[int, int, int, int, int, str]], n_pairs: int, seed: int, purpose: int,
                   patch: int, gap: int, jitter: int) -> list[Selection]:
    """Pairs inside regions (image, y0, x0, height, width, group), 0-based: both patches of every pair lie
    inside the region. Region r draws from generator(seed, EVAL_PAIRS, purpose, r)."""
    out = []
    for r, (image, y0, x0, h, w, group) in enumerate(regions):
        boxes, pairs, labels = sample_pairs(h, w, n_pairs, generator(seed, EVAL_PAIRS, purpose, r), patch, gap,
                                            jitter)
        if len(pairs):
            offset = torch.tensor([[y0, x0]], dtype=torch.int64)
            out.append(Selection(image, boxes + offset, pairs, labels, group))
    return out


def _batches(selections: list[Selection], max_patches: int) -> Iterator[list[Selection]]:
    """Consecutive selections packed up to `max_patches` patches (a larger one goes alone)."""
    batch: list[Selection] = []
    total = 0
    for s in selections:
        if batch and total + len(s.boxes) > max_patches:
            yield batch
            batch, total = [], 0
        batch.append(s)
        total += len(s.boxes)
    if batch:
        yield batch


@torch.no_grad()
def predict_selections(pre: Pretrained, selections: list[Selection], load_image: Callable[[int], Tensor],
                       device: str, seed: int, max_patches: int = 512, desc: str = "pairs",
                       log: logging.Logger | None = None, amp: str = "none") -> list[Tensor]:
    """Predicted position (argmax of fc9) of every pair of every selection, in order (CPU int64 tensors);
    the network runs under `amp` autocast (ctxrepro.pretext.precision).

    `load_image(i)` returns image i as (3, H, W) uint8; consecutive selections of one image decode it once.
    """
    g = generator(seed, EVAL_PAIRS, 0, device=device)  # colour-dropping noise, if the model uses it
    cached: tuple[int, Tensor] | None = None
    out: list[Tensor] = []
    batches = list(_batches(selections, max_patches))
    for batch in track(batches, desc=desc, unit="batch", log=log):
        cuts = []
        for s in batch:
            if cached is None or cached[0] != s.image:
                cached = (s.image, load_image(s.image))
            cuts.append(cut_patches(cached[1], s.boxes, pre.patch))
        pairs = batch_pairs([s.pairs for s in batch], [len(s.boxes) for s in batch])
        x = network_input(torch.cat(cuts).to(device), pre, g)
        with autocast(device, amp):
            logits = pre.model(x, pairs.to(device))
        pred = logits.float().argmax(1).cpu()
        out.extend(pred.split([len(s.pairs) for s in batch]))
    return out


def accuracy(selections: list[Selection], predictions: list[Tensor]) -> tuple[float, int]:
    """(fraction of pairs predicted right, number of pairs); NaN accuracy for no pairs."""
    if not selections:
        return float("nan"), 0
    labels, preds = torch.cat([s.labels for s in selections]), torch.cat(predictions)
    return float((labels == preds).double().mean()), len(labels)


def accuracy_by_group(selections: list[Selection], predictions: list[Tensor]) -> dict[str, tuple[float, int]]:
    """accuracy() per `Selection.group`, groups sorted by name."""
    groups = sorted({s.group for s in selections})
    out = {}
    for name in groups:
        idx = [i for i, s in enumerate(selections) if s.group == name]
        out[name] = accuracy([selections[i] for i in idx], [predictions[i] for i in idx])
    return out


def confusion_counts(actual: np.ndarray, predicted: np.ndarray, n: int = 8) -> np.ndarray:
    """(n, n) int64 counts, rows = actual label, columns = predicted label."""
    actual, predicted = np.asarray(actual, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if actual.shape != predicted.shape:
        raise ValueError(f"confusion_counts: {actual.shape} actual vs {predicted.shape} predicted labels")
    if actual.size and (min(actual.min(), predicted.min()) < 0 or max(actual.max(), predicted.max()) >= n):
        raise ValueError(f"confusion_counts: labels outside 0..{n - 1}")
    return np.bincount(actual * n + predicted, minlength=n * n).reshape(n, n)


def eligible_boxes(objects, min_side: int) -> list[tuple[int, int, int, int, str]]:
    """(y0, x0, height, width, class) of VOC objects at least `min_side` px per side and not truncated,
    occluded or difficult (section 4.6), converted from the devkit's 1-based inclusive boxes."""
    out = []
    for o in objects:
        b = o.bndbox
        w, h = b.xmax - b.xmin + 1, b.ymax - b.ymin + 1
        if o.truncated or o.difficult or bool(o.occluded) or min(w, h) < min_side:
            continue
        out.append((b.ymin - 1, b.xmin - 1, h, w, o.name))
    return out
