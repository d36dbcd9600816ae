"""Feature bank and candidate search for visual data mining (paper section 4.5).

Every image is cut into a dense grid of patches at several scales; each patch is embedded once by the
pretrained tower (fc6, `ContextNet.embed`) with the preprocessing it was trained with, minus the
augmentation (section 4.5: "When sampling patches do not use any of the data augmentation preprocessing
steps (e.g. downsampling)"). Features are centred and L2-normalised, so a dot product is a normalised
correlation.

For each constellation's four patches, an image's match is its best correlation over all of that image's
patches (every scale); the image's score is the sum of its four best matches, layout ignored; the top-k
images (the constellation's own image excluded) are kept with the positions and sides of their four
matches, ready for `mining.verify_batch`.

Memory stays bounded at any scale: the bank is an (images, max patches, D) float16 array (a memory map on
disk when a scratch folder is given), and the search streams it in blocks of images whose similarity
matrix fits `block_mb`, for `query_batch` constellations at a time: one matrix product per block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ctxrepro.data.images import read_rgb
from ctxrepro.pretext.color import COLOR_MODES, RMS_EPS, PatchAugment, preprocess
from ctxrepro.pretext.precision import autocast, check_amp
from ctxrepro.pretext.sampling import cut_patches
from ctxrepro.progress import track

# What PIL raises on a file that is not a decodable image; anything else is a bug and stops the run.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
FEATURE_EPS = 1e-6  # a feature vector with a smaller norm (a flat patch after ReLU) correlates 0 with all


@dataclass(frozen=True)
class BankSpec:
    """How patches are cut and embedded (section 4.5 with the pretrained network's own geometry)."""

    patch: int  # side in px of a patch at every scale (the pretext task's sampled patch side)
    net_size: int  # the network's input side (patches are area-resized to it, as in pretraining)
    scales: tuple[float, ...] = (1.0, 0.75, 0.5)  # image scales; a patch covers patch / scale px
    grid_step: int = 2  # grid strides per patch side; constellation neighbours are this many strides apart
    max_side: int = 0  # images are first shrunk so their longer side is at most this (0: never)
    color: str = "projection"  # the colour handling the network was trained with (section 3.1)
    drop_views: bool = True  # colour-dropping nets: average fc6 over the three kept channels
    batch_patches: int = 512  # patches per forward pass
    amp: str = "none"  # autocast of the network (ctxrepro.pretext.precision); features are float32

    def __post_init__(self) -> None:
        if self.color not in COLOR_MODES:
            raise ValueError(f"BankSpec.color={self.color!r} is not one of {COLOR_MODES}")
        check_amp(self.amp)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"BankSpec.scales={self.scales}: need at least one positive scale")
        if self.patch < 2 or self.grid_step < 1 or self.patch // self.grid_step < 1:
            raise ValueError(f"BankSpec: patch={self.patch} and grid_step={self.grid_step} give no stride")

    @property
    def stride(self) -> int:
        return self.patch // self.grid_step


@dataclass(frozen=True)
class GridLayout:
    """Where one image's patches sit in its row of the feature bank: one (offset, rows, cols) per scale.

    Patch (r, c) of scale k has index offsets[k] + r * cols[k] + c within the image.
    """

    offsets: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def count(self) -> int:
        return int(sum(r * c for r, c in zip(self.rows, self.cols)))


@dataclass(frozen=True)
class ScaleGrid:
    """One scale's grid on one image: resized size, grid shape and origin (in resized pixels)."""

    width: int
    height: int
    rows: int
    cols: int
    x0: int
    y0: int


def image_grids(width: int, height: int, spec: BankSpec) -> list[ScaleGrid]:
    """The grid of every scale: patches every `stride` px, the grid centred in the resized image."""
    base = min(1.0, spec.max_side / max(width, height)) if spec.max_side else 1.0
    grids = []
    for s in spec.scales:
        w, h = max(1, round(width * base * s)), max(1, round(height * base * s))
        rows = (h - spec.patch) // spec.stride + 1 if h >= spec.patch else 0
        cols = (w - spec.patch) // spec.stride + 1 if w >= spec.patch else 0
        rows, cols = (rows, cols) if rows and cols else (0, 0)
        y0 = ((h - spec.patch) - (rows - 1) * spec.stride) // 2 if rows else 0
        x0 = ((w - spec.patch) - (cols - 1) * spec.stride) // 2 if cols else 0
        grids.append(ScaleGrid(w, h, rows, cols, x0, y0))
    return grids


def layout_of(grids: Sequence[ScaleGrid]) -> GridLayout:
    counts = [g.rows * g.cols for g in grids]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    return GridLayout(tuple(int(o) for o in offsets), tuple(g.rows for g in grids), tuple(g.cols for g in grids))


def grid_geometry(width: int, height: int, grids: Sequence[ScaleGrid], patch: int,
                  stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-left boxes (y, x) in resized px, centres (x, y) and sides in ORIGINAL image px) per patch."""
    boxes, centers, sides = [], [], []
    for g in grids:
        if not g.rows:
            continue
        ys = g.y0 + stride * np.arange(g.rows)
        xs = g.x0 + stride * np.arange(g.cols)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        fx, fy = g.width / width, g.height / height  # the rounded resize's true factors
        boxes.append(np.stack([yy.ravel(), xx.ravel()], axis=1))
        centers.append(np.stack([(xx.ravel() + patch / 2) / fx, (yy.ravel() + patch / 2) / fy], axis=1))
        sides.append(np.full(yy.size, patch / np.sqrt(fx * fy)))
    if not boxes:
        return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    return (np.concatenate(boxes).astype(np.int64), np.concatenate(centers).astype(np.float32),
            np.concatenate(sides).astype(np.float32))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels."""
    with Image.open(path) as im:
        return im.size


class _PatchSource(torch.utils.data.Dataset):
    """Image i -> (i, uint8 patches (P, 3, patch, patch) of all scales, or None, why it failed)."""

    def __init__(self, paths: Sequence[Path], grids: Sequence[list[ScaleGrid]], spec: BankSpec):
        self.paths, self.grids, self.spec = list(paths), list(grids), spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            rgb = read_rgb(self.paths[i])
        except DECODE_ERRORS as e:
            return i, None, f"{type(e).__name__}: {e}"
        h, w = rgb.shape[:2]
        out = []
        for g in self.grids[i]:
            if not g.rows:
                continue
            # area averaging: a real lower resolution, no aliasing (the same filter as pretraining's resize)
            small = cv2.resize(rgb, (g.width, g.height), interpolation=cv2.INTER_AREA)
            boxes, _, _ = grid_geometry(w, h, [g], self.spec.patch, self.spec.stride)
            image = torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1)
            out.append(cut_patches(image, torch.from_numpy(boxes), self.spec.patch))
        return i, torch.cat(out).contiguous(), ""


def drop_views(x: Tensor, cfg: PatchAugment, net_size: int, g: torch.Generator) -> Tensor:
    """The three colour-dropping inputs of mean-subtracted patches x (P, 3, S, S): (3P, 3, n, n), view k
    keeping channel k, the other two noise as in training (color.drop_colors), RMS `cfg.rms`.

    Cheaper than training's order (drop, RMS, then area-resize to n, three times) and the same in
    expectation: the area resize is linear and per channel, so it is done once, up front; each view's RMS
    scale is the one training computes at S px (kept channel plus its noise's expected energy).
    """
    p, _, s, _ = x.shape
    small = F.interpolate(x, size=(net_size, net_size), mode="area") if s != net_size else x
    energy = x.square().mean(dim=(2, 3))  # (P, 3): mean square = variance after mean subtraction
    views = []
    for k in range(3):
        std = energy[:, k].sqrt()
        if cfg.color == "drop":
            fill = torch.randn((p, 2, net_size, net_size), generator=g) * (cfg.drop_noise * std)[:, None, None, None]
            noise_energy = 2 * cfg.drop_noise ** 2 * energy[:, k]
        else:  # drop_uniform: U[-0.5, 0.5] on the 0..255 scale, variance 1/12 per channel
            fill = torch.rand((p, 2, net_size, net_size), generator=g) - 0.5
            noise_energy = torch.full_like(std, 2 / 12)
        out = torch.empty_like(small)
        out[:, k] = small[:, k]
        out[:, [c for c in range(3) if c != k]] = fill.to(x.device)
        rms = ((energy[:, k] + noise_energy) / 3).sqrt()
        views.append(out * (cfg.rms / rms.clamp_min(RMS_EPS))[:, None, None, None])
    return torch.cat(views)


@torch.no_grad()
def embed(model: nn.Module, patches: Tensor, spec: BankSpec, g: torch.Generator, device: str) -> Tensor:
    """uint8 patches -> centred, unit-norm fc6 features (P, D) float32 on the CPU.

    No downsampling (section 4.5). A colour-dropping network sees, per patch, one kept channel with noise
    in the others; with drop_views its fc6 is averaged over the three choices of the kept channel (the
    expectation over training's random choice, and deterministic), else one channel is drawn as in training.
    channels_last: measured 2.1x faster for the small tower on the CPU (its ceil-mode max pools above all).
    """
    cfg = PatchAugment.for_patch(spec.patch, color=spec.color, downsample_prob=0.0)
    x = patches.to(device)
    n = len(x)
    if spec.color.startswith("drop") and spec.drop_views:
        x = x.float()
        x = drop_views(x - x.mean(dim=(2, 3), keepdim=True), cfg, spec.net_size, g)
    else:
        x = preprocess(x, g, cfg)
        if x.shape[-1] != spec.net_size:
            x = F.interpolate(x, size=(spec.net_size, spec.net_size), mode="area")
    with autocast(device, spec.amp):
        feats = model.embed(x.contiguous(memory_format=torch.channels_last)).float()
    feats = feats.view(-1, n, feats.shape[1]).mean(dim=0)  # the views' average (one view: itself)
    f = feats - feats.mean(dim=1, keepdim=True)
    norm = f.norm(dim=1, keepdim=True)
    return torch.where(norm > FEATURE_EPS, f / norm.clamp_min(FEATURE_EPS), torch.zeros_like(f)).cpu()


@dataclass
class FeatureBank:
    """Patch features of all images, padded to the largest patch count (invalid slots masked)."""

    paths: tuple[str, ...]
    feats: np.ndarray  # (N, P, D) float16, possibly a np.memmap
    valid: np.ndarray  # (N, P) bool
    centers: np.ndarray  # (N, P, 2) float32, (x, y) in original image px
    sides: np.ndarray  # (N, P) float32, original image px
    layouts: list[GridLayout]
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it holds no features


def _plan(paths: Sequence[Path], spec: BankSpec) -> tuple[list, dict[str, str]]:
    """Grids of every image from its header; unreadable headers are skipped with the reason."""
    grids, skipped = [], {}
    for p in paths:
        try:
            w, h = image_size(p)
        except DECODE_ERRORS as e:
            skipped[str(p)] = f"{type(e).__name__}: {e}"
            grids.append(None)
            continue
        grids.append((w, h, image_grids(w, h, spec)))
    return grids, skipped


def _alloc(n: int, p: int, d: int, scratch: Path | None) -> np.ndarray:
    if scratch is None:
        return np.zeros((n, p, d), dtype=np.float16)
    return np.lib.format.open_memmap(Path(scratch) / "features.npy", mode="w+", dtype=np.float16, shape=(n, p, d))


def build_bank(model: nn.Module, paths: Sequence[Path], spec: BankSpec, device: str, seed_generator: torch.Generator,
               *, workers: int = 0, scratch: Path | None = None, log: logging.Logger | None = None) -> FeatureBank:
    """Embed every grid patch of every image (section 4.5). Bad files are skipped and listed, not fatal.

    The model is put in eval mode and channels_last memory format, in place.
    """
    plans, skipped = _plan(paths, spec)
    layouts = [layout_of(pl[2]) if pl is not None else GridLayout((), (), ()) for pl in plans]
    p_max = max([lay.count for lay in layouts] + [1])
    n = len(paths)
    bank = FeatureBank(tuple(str(p) for p in paths), _alloc(n, p_max, model.feature_dim, scratch),
                       np.zeros((n, p_max), bool), np.zeros((n, p_max, 2), np.float32),
                       np.zeros((n, p_max), np.float32), layouts, skipped)
    for i, pl in enumerate(plans):
        if pl is not None:
            _, c, s = grid_geometry(pl[0], pl[1], pl[2], spec.patch, spec.stride)
            bank.centers[i, :len(s)], bank.sides[i, :len(s)] = c, s
    todo = [i for i, pl in enumerate(plans) if pl is not None and layouts[i].count]
    for i, pl in enumerate(plans):
        if pl is not None and not layouts[i].count:
            skipped[str(paths[i])] = f"smaller than one {spec.patch}px patch at every scale"
    source = _PatchSource([paths[i] for i in todo], [plans[i][2] for i in todo], spec)
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=workers)
    model.eval().to(memory_format=torch.channels_last)  # in place: see `embed`
    pending: list[tuple[int, Tensor]] = []

    def flush() -> None:
        feats = embed(model, torch.cat([t for _, t in pending]), spec, seed_generator, device)
        start = 0
        for i, t in pending:
            bank.feats[i, :len(t)] = feats[start:start + len(t)].numpy().astype(np.float16)
            bank.valid[i, :len(t)] = True
            start += len(t)
        pending.clear()

    for k, patches, why in track(loader, total=len(todo), desc="mining features", unit="img", log=log):
        i = todo[k]
        if patches is None:
            skipped[str(paths[i])] = why
            continue
        pending.append((i, patches))
        if sum(len(t) for _, t in pending) >= spec.batch_patches:
            flush()
    if pending:
        flush()
    return bank


@dataclass(frozen=True)
class Candidates:
    """Each constellation's top-k images by summed best matches (section 4.5), best first."""

    images: np.ndarray  # (n, k) int64 image indices
    scores: np.ndarray  # (n, k) float32 sums of the four best correlations
    patches: np.ndarray  # (n, k, 4) int64 the matched patch (TL, TR, BL, BR query order) in each image


def _best_per_image(bank: FeatureBank, q: Tensor, block_mb: float, device: str) -> tuple[Tensor, Tensor]:
    """(Q, N) best correlation of each query in each image and (Q, N) its patch index; -inf if none."""
    n, p, d = bank.feats.shape
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    q = q.to(device=device, dtype=dtype)
    # bytes of one image's similarity block: the product, plus its float32 copy when the product is half
    per_image = p * q.shape[0] * (4 + (2 if dtype == torch.float16 else 0))
    block = max(1, int(block_mb * 2 ** 20) // per_image)
    best = torch.full((q.shape[0], n), float("-inf"), device=device)
    arg = torch.zeros((q.shape[0], n), dtype=torch.int64, device=device)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        feats = torch.from_numpy(np.asarray(bank.feats[i0:i1])).to(device=device, dtype=dtype)
        mask = torch.from_numpy(~bank.valid[i0:i1]).to(device)
        sims = (feats.reshape(-1, d) @ q.T).reshape(i1 - i0, p, -1).float()
        sims.masked_fill_(mask[:, :, None], float("-inf"))
        value, index = sims.max(dim=1)  # (block, Q): one matrix product, one reduction per block
        best[:, i0:i1], arg[:, i0:i1] = value.T, index.T
    return best, arg


def search(bank: FeatureBank, constellations: np.ndarray, top_k: int, *, query_batch: int = 256,
           block_mb: float = 256.0, device: str = "cpu", log: logging.Logger | None = None) -> Candidates:
    """Top-k images for every constellation (rows (image, TL, TR, BL, BR)), layout ignored (section 4.5).

    An image's match for a patch is its best correlation over the image's patches; its score is the sum
    of its four matches. The constellation's own image is excluded. k is capped at the number of other
    images holding features. Ties between equal scores keep the lower image index (a stable sort).
    """
    n_img = len(bank.paths)
    usable = int(bank.valid.any(axis=1).sum())
    k = max(0, min(top_k, usable - 1))
    m = len(constellations)
    images = np.zeros((m, k), np.int64)
    scores = np.zeros((m, k), np.float32)
    patches = np.zeros((m, k, 4), np.int64)
    chunks = range(0, m, query_batch)
    for c0 in track(chunks, total=len(chunks), desc="mining search", unit="batch", log=log):
        rows = constellations[c0:c0 + query_batch]
        q = torch.from_numpy(bank.feats[rows[:, 0:1], rows[:, 1:]].astype(np.float32)).reshape(-1, bank.feats.shape[2])
        best, arg = _best_per_image(bank, q, block_mb, device)
        best, arg = best.view(len(rows), 4, n_img), arg.view(len(rows), 4, n_img)
        total = best.sum(dim=1)
        total[torch.arange(len(rows)), torch.from_numpy(rows[:, 0]).to(total.device)] = float("-inf")
        order = torch.sort(total, dim=1, descending=True, stable=True).indices[:, :k]
        images[c0:c0 + len(rows)] = order.cpu().numpy()
        scores[c0:c0 + len(rows)] = total.gather(1, order).cpu().numpy()
        picked = arg.gather(2, order[:, None, :].expand(-1, 4, -1))  # (C, 4, k)
        patches[c0:c0 + len(rows)] = picked.permute(0, 2, 1).cpu().numpy()
    return Candidates(images, scores, patches)
