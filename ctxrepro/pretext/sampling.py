"""Grid patch sampling and pair construction for the context-prediction pretext task (section 3).

Section 3 ("Implementation Details") samples patches "from a grid like pattern, such that each
sampled patch can participate in as many as 8 separate pairings", with a gap between patches
and an independent jitter of every patch; section 3.1 explains why (gap and jitter block
low-level shortcuts). Each patch is embedded once by the tower and shared by all its pairs, so
this module returns unique patch boxes plus index pairs into them, never duplicated patches.

Label layout (position of the SECOND patch of a pair relative to the FIRST, Figure 2):

    0 1 2
    3 . 4
    5 6 7

so the opposite direction of label l is 7 - l.

Grid origin rule (a deliberate departure from the released code, documented here once): the
released code draws the origin uniformly in [0, pitch - 1] per axis, which on a small image can
leave a single row or column (no diagonal pairs at all). We draw it uniformly in
[0, min(pitch - 1, L - patch - (m - 1) * pitch)] per axis, L the image side and m the minimum
grid side (2 in "grid" mode, 3 in "center8" mode), so at least an m x m grid always fits. On an
image large enough for the full [0, pitch - 1] range this is exactly the paper's distribution.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# (dy, dx) of the second patch relative to the first, indexed by label (0 1 2 / 3 . 4 / 5 6 7).
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1),
    (0, -1), (0, 1),
    (1, -1), (1, 0), (1, 1),
)
MODES = ("grid", "center8")


def _empty() -> tuple[Tensor, Tensor, Tensor]:
    z2 = torch.zeros((0, 2), dtype=torch.int64)
    return z2, z2.clone(), torch.zeros((0,), dtype=torch.int64)


def _randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Integers in [low, high] inclusive, drawn on the generator's device, returned on the CPU."""
    out = torch.randint(low, high + 1, shape, generator=generator, device=generator.device)
    return out.cpu()


def grid_origin_range(length: int, patch: int, gap: int, min_cells: int = 2) -> int:
    """Largest allowed grid origin on an axis of `length` pixels, or -1 if `min_cells` don't fit."""
    pitch = patch + gap
    room = length - patch - (min_cells - 1) * pitch
    return min(pitch - 1, room) if room >= 0 else -1


def _grid_cells(height: int, width: int, generator: torch.Generator, patch: int, gap: int,
                min_cells: int) -> tuple[Tensor, int, int] | None:
    """Un-jittered top-left corners (rows, cols, 2) of a random-origin grid, or None if too small."""
    pitch = patch + gap
    max_oy = grid_origin_range(height, patch, gap, min_cells)
    max_ox = grid_origin_range(width, patch, gap, min_cells)
    if max_oy < 0 or max_ox < 0:
        return None
    oy = int(_randint(0, max_oy, (1,), generator))
    ox = int(_randint(0, max_ox, (1,), generator))
    rows = (height - patch - oy) // pitch + 1
    cols = (width - patch - ox) // pitch + 1
    ys = oy + pitch * torch.arange(rows, dtype=torch.int64)
    xs = ox + pitch * torch.arange(cols, dtype=torch.int64)
    corners = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    return corners, rows, cols


def _jitter(corners: Tensor, height: int, width: int, patch: int, jitter: int, yoked: bool,
            generator: torch.Generator) -> Tensor:
    """Add integer jitter in [-jitter, jitter] per axis (one shared offset if yoked), clamp inside."""
    n = corners.shape[0]
    if jitter > 0:
        offsets = _randint(-jitter, jitter, (1 if yoked else n, 2), generator)
        corners = corners + offsets
    limit = torch.tensor([height - patch, width - patch], dtype=torch.int64)
    return torch.minimum(corners.clamp(min=0), limit)


def grid_pairs(rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """All ordered 8-neighbour pairs of a rows x cols grid (row-major indices) and their labels.

    Sorted by (first, label). Every unordered neighbour pair appears twice, as (i, j) with label l
    and (j, i) with label 7 - l (section 3: each patch takes part in up to 8 pairings).
    """
    r = torch.arange(rows).view(rows, 1, 1)
    c = torch.arange(cols).view(1, cols, 1)
    d = torch.tensor(NEIGHBOUR_OFFSETS, dtype=torch.int64)
    r2, c2 = r + d[:, 0], c + d[:, 1]
    valid = (r2 >= 0) & (r2 < rows) & (c2 >= 0) & (c2 < cols)
    first = (r * cols + c).expand(rows, cols, 8)
    second = r2 * cols + c2
    labels = torch.arange(8, dtype=torch.int64).expand(rows, cols, 8)
    pairs = torch.stack([first[valid], second[valid]], dim=1)
    return pairs, labels[valid]


def center8_pairs(rows: int, cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """Centre-versus-8 pairs on disjoint 3x3 blocks of a grid (MMSelfSup's RelativeLoc layout).

    Returns (keep, pairs, labels): `keep` are the row-major grid indices used (complete 3x3 blocks;
    leftover rows/columns dropped), `pairs` index into `keep`, the centre always FIRST. Unlike
    MMSelfSup, which embeds the centre 8 times, the centre is one box shared by its 8 pairs.
    """
    br, bc = rows // 3, cols // 3
    rr = torch.arange(br * 3).view(-1, 1)
    cc = torch.arange(bc * 3).view(1, -1)
    keep = (rr * cols + cc).reshape(-1)
    kc = bc * 3  # columns of the kept sub-grid; indices into `keep` are row-major over it
    centre_r = 3 * torch.arange(br).view(br, 1, 1) + 1
    centre_c = 3 * torch.arange(bc).view(1, bc, 1) + 1
    d = torch.tensor(NEIGHBOUR_OFFSETS, dtype=torch.int64)
    first = (centre_r * kc + centre_c).expand(br, bc, 8)
    second = (centre_r + d[:, 0]) * kc + (centre_c + d[:, 1])
    pairs = torch.stack([first.reshape(-1), second.reshape(-1)], dim=1)
    labels = torch.arange(8, dtype=torch.int64).repeat(br * bc)
    return keep, pairs, labels


def sample_grid(height: int, width: int, generator: torch.Generator, patch: int = 96,
                gap: int = 48, jitter: int = 7, *, yoked: bool = False,
                mode: str = "grid") -> tuple[Tensor, Tensor, Tensor]:
    """Sample one jittered patch grid from an image and its labelled pairs (section 3).

    Returns int64 CPU tensors: boxes (P, 2) (y, x) top-left corners, pairs (Q, 2) indices
    (first, second) into boxes, labels (Q,) in 0..7 (module docstring). Pitch = patch + gap; the
    grid origin is uniform per axis (module docstring for the range); each patch is jittered
    independently (or, if `yoked`, by one offset shared by the grid: Mundhenk et al. 2018) by an
    integer in [-jitter, jitter] per axis and clamped into the image. mode "grid": every ordered
    8-neighbour pair; mode "center8": centre versus its 8 neighbours on disjoint 3x3 blocks.
    An image too small for the minimum grid (2x2, or 3x3 in center8) gives empty tensors.
    Random draws, in order: origin y, origin x, jitter (P x 2, or 1 x 2 if yoked).
    """
    if mode not in MODES:
        raise ValueError(f"sample_grid: mode={mode!r} is not one of {MODES}")
    if patch < 1 or gap < 0 or jitter < 0:
        raise ValueError(f"sample_grid: need patch >= 1, gap >= 0, jitter >= 0; "
                         f"got patch={patch}, gap={gap}, jitter={jitter}")
    grid = _grid_cells(height, width, generator, patch, gap, 3 if mode == "center8" else 2)
    if grid is None:
        return _empty()
    corners, rows, cols = grid
    corners = corners.reshape(-1, 2)
    if mode == "grid":
        pairs, labels = grid_pairs(rows, cols)
    else:
        keep, pairs, labels = center8_pairs(rows, cols)
        corners = corners[keep]
    boxes = _jitter(corners, height, width, patch, jitter, yoked, generator)
    return boxes, pairs, labels


def cut_patches(image: Tensor, boxes: Tensor, patch: int) -> Tensor:
    """Cut square patches at (y, x) top-left `boxes` from a (C, H, W) image: (P, C, patch, patch).

    One gather, no per-patch loop: `unfold` makes a zero-copy (H', W', C, patch, patch) view of
    every window, indexed by the P corners (measured 4x faster on the CPU than gathering single
    pixels through a (P, patch, patch) index grid). Keeps the image's dtype and device.
    """
    if image.dim() != 3:
        raise ValueError(f"cut_patches: image must be (C, H, W), got shape {tuple(image.shape)}")
    _, h, w = image.shape
    boxes = boxes.to(device=image.device, dtype=torch.int64)
    if boxes.numel() == 0:
        return image.new_zeros((0, image.shape[0], patch, patch))
    if boxes.min() < 0 or boxes[:, 0].max() > h - patch or boxes[:, 1].max() > w - patch:
        raise ValueError(f"cut_patches: a {patch}px box falls outside the {h}x{w} image "
                         f"(y in [{int(boxes[:, 0].min())}, {int(boxes[:, 0].max())}], "
                         f"x in [{int(boxes[:, 1].min())}, {int(boxes[:, 1].max())}])")
    windows = image.permute(1, 2, 0).unfold(0, patch, 1).unfold(1, patch, 1)
    return windows[boxes[:, 0], boxes[:, 1]]


def cut_patches_batch(images: Sequence[Tensor], boxes_list: Sequence[Tensor],
                      patch: int = 96) -> Tensor:
    """cut_patches over several images, concatenated in order: (sum P_i, C, patch, patch).

    The loop is over images (a few per batch), never over patches.
    """
    if len(images) != len(boxes_list):
        raise ValueError(f"cut_patches_batch: {len(images)} images but {len(boxes_list)} box sets")
    if not images:
        raise ValueError("cut_patches_batch: no images given")
    return torch.cat([cut_patches(im, b, patch) for im, b in zip(images, boxes_list)], dim=0)


def batch_pairs(pairs_list: Sequence[Tensor], counts: Sequence[int]) -> Tensor:
    """Concatenate per-image pairs, shifting image i's indices by the patches of images before it.

    `counts[i]` is the number of boxes of image i, in the order cut_patches_batch concatenates.
    """
    if len(pairs_list) != len(counts):
        raise ValueError(f"batch_pairs: {len(pairs_list)} pair sets but {len(counts)} counts")
    if not pairs_list:
        return torch.zeros((0, 2), dtype=torch.int64)
    sizes = torch.tensor([p.shape[0] for p in pairs_list], dtype=torch.int64)
    starts = torch.cumsum(torch.tensor([0, *counts[:-1]], dtype=torch.int64), dim=0)
    shift = torch.repeat_interleave(starts, sizes)
    return torch.cat([p.to(torch.int64) for p in pairs_list], dim=0) + shift[:, None]
