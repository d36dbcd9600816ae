"""Visual data mining (paper section 4.5): constellations, geometric verification, ranking, cluster selection.

The geometry and the ranking, on NumPy arrays:

- `geometric_verify` / `verify_batch`: section 4.5 "Implementation Details": fit the best axis-aligned
  square to the four matched patch centres by least squares, its side constrained to [2/3, 4/3] of the
  patches' mean side; the match verifies when the sum of squared centre-to-corner distances, divided by
  the square's side squared, is below 1 (issue 9 fixes the exact rule).
- `sample_constellations`: four adjacent patches in a 2x2 arrangement, at several scales, spread evenly
  over the images (section 4.5: "we first sample a constellation of four adjacent patches").
- `rank_constellations`: by how many of the top matches verify (Figure 7's caption).
- `select_clusters`: section 4.5.1's greedy cover: the highest-ranked cluster that adds an uncovered
  image, then every image covered twice, three times, and so on.

`mine` runs the whole of section 4.5 on a list of images; the feature bank and the memory-bounded
search that produce the matches live in `ctxrepro.mining.search`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ctxrepro.data.voc import parse_annotation, read_image_set
from ctxrepro.mining.search import BankSpec, Candidates, FeatureBank, GridLayout, build_bank, search

SIDE_RANGE = (2.0 / 3.0, 4.0 / 3.0)  # section 4.5: side of S between 2/3 and 4/3 of the patches' mean side
# (x, y) signs of the corners (cx -+ s/2, cy -+ s/2) in the order TL, TR, BL, BR; image y points down.
CORNER_SIGNS = np.array([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])


def verify_batch(centers: np.ndarray, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`geometric_verify` over leading axes: centers (..., 4, 2), sides (..., 4) -> (verified, error).

    Least squares for a square with corners c + s/2 * sign_i: the centre c is the mean of the points and
    s* = sum_i <sign_i, p_i> / 4 (the corner signs have squared norm 2, four corners: 8 / 2), i.e.
    s* = (-x_TL + x_TR - x_BL + x_BR - y_TL - y_TR + y_BL + y_BR) / 4. The residual is quadratic in s,
    so clamping s* to the allowed range gives the constrained optimum.
    """
    p = np.asarray(centers, dtype=np.float64)
    m = np.asarray(sides, dtype=np.float64)
    if p.shape[-2:] != (4, 2) or m.shape != p.shape[:-1]:
        raise ValueError(f"verify: need centers (..., 4, 2) and sides (..., 4), got {p.shape} and {m.shape}")
    if not (np.isfinite(p).all() and np.isfinite(m).all()) or (m <= 0).any():
        raise ValueError("verify: centres must be finite and sides finite and positive")
    c = p.mean(axis=-2, keepdims=True)  # (..., 1, 2)
    s_free = (p * CORNER_SIGNS).sum(axis=(-2, -1)) / 4.0
    mean_side = m.mean(axis=-1)
    s = np.clip(s_free, SIDE_RANGE[0] * mean_side, SIDE_RANGE[1] * mean_side)
    corners = c + 0.5 * s[..., None, None] * CORNER_SIGNS
    error = np.square(p - corners).sum(axis=(-2, -1)) / np.square(s)
    return error < 1.0, error


def geometric_verify(centers, sides) -> tuple[bool, float]:
    """Section 4.5's geometric verification of four matched patches (issue 9's exact rule).

    centers: (4, 2) patch centres (x, y) in the order top-left, top-right, bottom-left, bottom-right
    (image y points down); sides: (4,) the matched patches' side lengths. Returns (error < 1, error),
    error = sum of squared distances from each centre to its corner of the fitted square, over s^2.
    """
    ok, err = verify_batch(np.asarray(centers, dtype=np.float64)[None], np.asarray(sides, dtype=np.float64)[None])
    return bool(ok[0]), float(err[0])


def _positions(layout: GridLayout, step: int) -> np.ndarray:
    """(n, 4) patch indices TL, TR, BL, BR of every 2x2 constellation with neighbours `step` cells apart."""
    out = []
    for off, rows, cols in zip(layout.offsets, layout.rows, layout.cols):
        if rows <= step or cols <= step:
            continue
        r, c = np.meshgrid(np.arange(rows - step), np.arange(cols - step), indexing="ij")
        tl = (off + r * cols + c).reshape(-1)
        out.append(np.stack([tl, tl + step, tl + step * cols, tl + step * cols + step], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 4), dtype=np.int64)


def sample_constellations(layouts: Sequence[GridLayout], n: int, step: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Sample up to n constellations, as evenly over the images as their valid positions allow.

    Returns (m, 5) int64 rows (image, TL, TR, BL, BR), m = min(n, all valid positions). Images are visited
    in a random order, round-robin, each giving one random unused position per round, so every image
    contributes before any gives a second (section 4.5 samples constellations "from an image").
    """
    pools = []
    for i, layout in enumerate(layouts):
        pos = _positions(layout, step)
        if len(pos):
            pools.append((i, pos[rng.permutation(len(pos))]))
    order = rng.permutation(len(pools))
    rows, depth = [], 0
    while len(rows) < n and any(depth < len(pools[k][1]) for k in order):
        for k in order:
            image, pos = pools[k]
            if depth < len(pos):
                rows.append((image, *pos[depth]))
                if len(rows) == n:
                    break
        depth += 1
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def rank_constellations(verified: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Constellation indices best first: most verified top matches (section 4.5, Figure 7's caption).

    verified, scores: (n, k). Ties go to the larger summed match score of the verified images, then to
    the lower constellation index, so the ranking is a pure function of the inputs.
    """
    count = verified.sum(axis=1)
    strength = np.where(verified, scores, 0.0).sum(axis=1)
    return np.lexsort((np.arange(len(count)), -strength, -count))


def top_verified(neighbours: np.ndarray, verified: np.ndarray, k: int) -> list[np.ndarray]:
    """Each cluster's first k verified neighbours, in match-score order (section 4.5.1: "top 10")."""
    return [row[ok][:k] for row, ok in zip(neighbours, verified)]


@dataclass(frozen=True)
class Selection:
    """The clusters picked by `select_clusters`, in pick order, and the cover level each was picked at."""

    clusters: tuple[int, ...]
    levels: tuple[int, ...]
    coverage: np.ndarray  # (n_images,) how many picked clusters hold each image


def select_clusters(members: Sequence[np.ndarray], ranking: Sequence[int], n_images: int,
                    max_clusters: int) -> Selection:
    """Section 4.5.1's cluster selection: greedy cover by rank, then cover twice, three times, ...

    members[j]: image indices of cluster j (its top verified neighbours); ranking: cluster indices best
    first (only these are eligible). At cover level L, walk down the ranking and pick every unpicked
    cluster holding an image covered fewer than L times: this is exactly "iteratively select the
    highest-ranked cluster that contributes at least one image", since coverage only grows, so a cluster
    passed over at level L cannot contribute later at L. When a pass picks nothing, L goes up. Stops at
    max_clusters picks or when every eligible non-empty cluster is picked.
    """
    coverage = np.zeros(n_images, dtype=np.int64)
    eligible = [j for j in ranking if len(members[j])]
    picked: list[int] = []
    levels: list[int] = []
    taken = np.zeros(len(members), dtype=bool)
    level = 1
    while len(picked) < max_clusters and len(picked) < len(eligible):
        for j in eligible:
            if len(picked) == max_clusters:
                break
            if not taken[j] and (coverage[members[j]] < level).any():
                taken[j] = True
                picked.append(int(j))
                levels.append(level)
                np.add.at(coverage, members[j], 1)
        level += 1
    return Selection(tuple(picked), tuple(levels), coverage)


@dataclass(frozen=True)
class SearchConfig:
    """Constellation count and search sizes (section 4.5 / 4.5.1 values as defaults)."""

    n_constellations: int = 16384  # section 4.5.1: "We initialize 16,384 clusters"
    top_k: int = 100  # section 4.5: "the top 100 images which have the strongest matches"
    query_batch: int = 256  # constellations per pass over the feature bank
    block_mb: float = 256.0  # bound on one similarity block (images x patches x queries)


@dataclass(frozen=True)
class MiningResult:
    """Everything section 4.5 computes on one image collection."""

    bank: FeatureBank
    constellations: np.ndarray  # (n, 5): image, TL, TR, BL, BR patch indices
    candidates: Candidates  # top-k images per constellation and their four matched patches
    verified: np.ndarray  # (n, k) bool
    errors: np.ndarray  # (n, k) normalised squared error of the fitted square
    ranking: np.ndarray  # (n,) constellation indices, best first

    @property
    def n_verified(self) -> int:
        return int(self.verified.sum())

    def cluster_members(self, k: int) -> list[np.ndarray]:
        """Each constellation's top-k verified neighbour images (section 4.5.1), indexed by constellation."""
        return top_verified(self.candidates.images, self.verified, k)


def mine(model: nn.Module, paths: Sequence[Path], spec: BankSpec, cfg: SearchConfig, device: str,
         seed: int, *, workers: int = 0, scratch: Path | None = None,
         log: logging.Logger | None = None) -> MiningResult:
    """Section 4.5 on `paths`: embed grid patches, sample constellations, search, verify, rank.

    `seed` fixes the constellation sample and the colour-dropping noise (two independent streams).
    """
    log = log or logging.getLogger(__name__)
    seeds = np.random.SeedSequence(seed).spawn(2)
    noise = torch.Generator().manual_seed(int(seeds[0].generate_state(1, dtype=np.uint64)[0] >> 1))
    bank = build_bank(model, paths, spec, device, noise, workers=workers, scratch=scratch, log=log)
    has_features = bank.valid.any(axis=1)
    layouts = [lay if ok else GridLayout((), (), ()) for lay, ok in zip(bank.layouts, has_features)]
    cons = sample_constellations(layouts, cfg.n_constellations, spec.grid_step, np.random.default_rng(seeds[1]))
    log.info("mining %d images (%d skipped), %d patches, %d constellations of 2x2 patches",
             int(has_features.sum()), len(bank.skipped), int(bank.valid.sum()), len(cons))
    cand = search(bank, cons, cfg.top_k, query_batch=cfg.query_batch, block_mb=cfg.block_mb, device=device,
                  log=log)
    centers = bank.centers[cand.images[..., None], cand.patches]
    sides = bank.sides[cand.images[..., None], cand.patches]
    verified, errors = verify_batch(centers, sides)
    return MiningResult(bank, cons, cand, verified, errors, rank_constellations(verified, cand.scores))


def purity_sets(result: MiningResult, set_size: int, n_sets: int) -> tuple[list[np.ndarray], Selection]:
    """Section 4.5.1: clusters = top `set_size` verified neighbours; only full sets are eligible (the paper
    evaluates "1000 sets of 10 images"); the greedy cover picks up to `n_sets` of them in rank order."""
    members = result.cluster_members(set_size)
    ranking = [int(j) for j in result.ranking if len(members[j]) == set_size]
    picked = select_clusters(members, ranking, len(result.bank.paths), n_sets)
    return [members[j] for j in picked.clusters], picked


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def folder_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (any depth, by suffix), sorted: the "any folder" mining source."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return paths


def voc_eval_labels(devkit: Path, splits: Sequence[str], classes: Sequence[str]) -> dict[str, list[str]]:
    """Section 4.5.1's evaluation set: VOC images holding at least one object of `classes` (the paper:
    bus, dining table, motorbike, horse, sofa, train, after [50]) -> the sorted classes among them.

    Every object counts, difficult and truncated ones too: the image holds an instance either way.
    """
    wanted, labels = set(classes), {}
    for split in splits:
        for image_id in read_image_set(devkit, split):
            xml = Path(devkit) / "Annotations" / f"{image_id}.xml"
            if not xml.is_file():
                raise FileNotFoundError(f"{xml}: listed in ImageSets/Main/{split}.txt but missing")
            present = sorted({o.name for o in parse_annotation(xml).objects} & wanted)
            if present:
                labels[image_id] = present
    return dict(sorted(labels.items()))
