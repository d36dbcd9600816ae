"""The pretext task's data path: images -> jittered grids -> one batch of patches and pairs (section 3).

Section 3 ("Implementation Details") samples patches on a grid so that each patch takes part in up to 8
pairs; docs/METHOD.md adds the released code's batch rule: several grids per image (4), at most 512 patches
per batch, a pair count that varies. This module turns the resized images (the `resize` stage's
manifest) into such batches:

- A training batch is a pure function of (seed, rank, step): step s draws its images (with
  replacement, from this rank's disjoint shard) and its grids from a torch.Generator seeded by
  `derive_seed(seed, DATA, rank, s)`. Resuming at step k is therefore "start the sampler at k": no
  consumed batch is replayed, and the stream does not depend on the number of DataLoader workers.
- Scale augmentation (section 3: "between 150K and 450K total pixels"): the resize stage stores each
  image once at a canonical size; every visit draws a fresh pixel count uniform in
  [min_pixels, max_pixels] from the step's generator, as the released code's loader does at each
  image load (`visit_size`). Grids are planned on that size from the manifest alone, before any
  decoding; images are decoded once, rescaled to the visit's size (`rescale`: in a DataLoader worker
  on the CPU, on the training device for CUDA) and all their patches are cut in one tensor gather
  (`pretext.sampling.cut_patches`).
- Pairs of all grids are concatenated with their indices OFFSET by the patches before them
  (`pretext.sampling.batch_pairs`): the work is per grid, never per pair.
"""

from __future__ import annotations

import csv
import json
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from ctxrepro.pretext.sampling import MODES, batch_pairs, cut_patches_batch, grid_origin_range, sample_grid
from ctxrepro.seeds import generator

# Purposes of derived seeds: one base seed, a different stream per purpose.
DATA, AUGMENT, HELDOUT, INIT, LOADER = 1, 2, 3, 4, 5
MANIFEST_COLUMNS = ("split", "path", "source", "orig_width", "orig_height", "width", "height")


@dataclass(frozen=True)
class BatchSpec:
    """Geometry and batch rule (docs/METHOD.md "Pretext task"; paper values as defaults)."""

    patch: int = 96  # section 3: 96x96 patches
    gap: int = 48  # section 3: 48 px gap, pitch 144
    jitter: int = 7  # section 3: +-7 px per axis
    grids_per_image: int = 4  # released code: 4 grids per image
    max_patches: int = 512  # released code: at most 512 patches per batch
    yoked: bool = False  # Mundhenk et al. 2018 (off in the paper)
    mode: str = "grid"  # "center8": MMSelfSup's layout, for comparison runs
    # Per-visit pixel count (section 3: 150K..450K, drawn at every load as the released code does);
    # 0, 0: every visit uses the stored size.
    min_pixels: int = 0
    max_pixels: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"BatchSpec.mode={self.mode!r} is not one of {MODES}")
        if (self.min_pixels, self.max_pixels) != (0, 0) and not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"BatchSpec: need 0 < min_pixels <= max_pixels (or both 0), got "
                             f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}")
        if self.grids_per_image < 1 or self.max_patches < 1:
            raise ValueError(f"BatchSpec: grids_per_image={self.grids_per_image} and "
                             f"max_patches={self.max_patches} must be >= 1")

    def fits(self, height: int, width: int) -> bool:
        """Whether the smallest grid (2x2, or 3x3 in center8 mode) fits an image of this size."""
        cells = 3 if self.mode == "center8" else 2
        return min(grid_origin_range(height, self.patch, self.gap, cells),
                   grid_origin_range(width, self.patch, self.gap, cells)) >= 0


@dataclass(frozen=True)
class ImageTable:
    """Images of one split as flat arrays (cheap to share with DataLoader workers).

    `paths` are relative to `root`; `groups[i]` indexes `group_names` (the tiny world's image kinds, or
    a single "all" group).
    """

    root: Path
    paths: np.ndarray  # bytes, relative to root
    heights: np.ndarray  # int64
    widths: np.ndarray  # int64
    groups: np.ndarray  # int64
    group_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray) -> "ImageTable":
        return ImageTable(self.root, self.paths[index], self.heights[index], self.widths[index],
                          self.groups[index], self.group_names)

    def shard(self, rank: int, world: int) -> "ImageTable":
        """Disjoint, covering shards: rank r keeps images r, r + world, ... (sorted order)."""
        return self.subset(np.arange(rank, len(self), world))

    def path(self, i: int) -> Path:
        return self.root / self.paths[i].decode()


def read_manifest(manifest: Path, split: str) -> list[dict[str, str]]:
    """Rows of `split` from the resize stage's manifest.csv, sorted by path."""
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run `dvc repro resize` (or `ctxrepro stage resize`)")
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {missing}; expected {','.join(MANIFEST_COLUMNS)}")
        rows = [r for r in reader if r["split"] == split]
    return sorted(rows, key=lambda r: r["path"])


def load_kinds(world_index: Path) -> dict[str, str]:
    """{source path (relative to data/raw): kind} from the tiny world's world_index.json."""
    images = json.loads(world_index.read_text())
    if not isinstance(images, dict):
        raise ValueError(f"{world_index}: expected a mapping of source path -> {{'kind': ...}}")
    kinds = {}
    for source, entry in images.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise ValueError(f"{world_index}: entry {source!r} has no string 'kind'")
        kinds[source] = entry["kind"]
    return kinds


def _manifest_columns(manifest: Path, header: list[str]) -> list[int]:
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {missing}; expected {','.join(MANIFEST_COLUMNS)}")
    return [header.index(c) for c in ("split", "path", "source", "width", "height")]


def load_table(manifest: Path, split: str, kinds: dict[str, str] | None = None) -> ImageTable:
    """The `split` images of a manifest, sorted by path; with `kinds`, each image's group is its world kind.

    Streamed into flat arrays, never a dict per row: 1.28M ImageNet rows take ~0.2 KB each at the peak
    instead of ~0.9 KB (bench/scale_bench.py).
    """
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run `dvc repro resize` (or `ctxrepro stage resize`)")
    paths, sizes, groups, seen = [], array("q"), array("q"), {}
    with manifest.open(newline="") as f:
        reader = csv.reader(f)
        i_split, i_path, i_source, i_w, i_h = _manifest_columns(manifest, next(reader, []))
        for line, row in enumerate(reader, start=2):
            if row[i_split] != split:
                continue
            try:
                sizes.extend((int(row[i_h]), int(row[i_w])))
            except ValueError as e:
                raise ValueError(f"{manifest}:{line}: a width/height is not an integer ({e})") from e
            paths.append(row[i_path].encode())
            kind = kinds.get(row[i_source], "unknown") if kinds else "all"
            groups.append(seen.setdefault(kind, len(seen)))
    if not paths:
        raise ValueError(f"{manifest}: no images in split {split!r}")
    names = tuple(sorted(seen))
    remap = np.array([names.index(k) for k in seen], dtype=np.int64)
    path_array = np.array(paths)
    del paths
    order = np.argsort(path_array, kind="stable")  # bytewise UTF-8 order = str order, as read_manifest sorts
    hw = np.frombuffer(sizes, dtype=np.int64).reshape(-1, 2)[order]
    return ImageTable(manifest.parent, path_array[order], hw[:, 0].copy(), hw[:, 1].copy(),
                      remap[np.frombuffer(groups, dtype=np.int64)[order]], names)


def scaled_size(height: int, width: int, pixels: float) -> tuple[int, int]:
    """(h, w) with the aspect of height x width and about `pixels` pixels (sides rounded; enlarges too)."""
    s = math.sqrt(pixels / (height * width))
    return max(1, round(height * s)), max(1, round(width * s))


def visit_size(height: int, width: int, spec: BatchSpec, g: torch.Generator) -> tuple[int, int]:
    """The size of a stored image at this visit: a pixel count uniform in [min_pixels, max_pixels] from `g`."""
    if not spec.max_pixels:
        return height, width
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    return scaled_size(height, width, spec.min_pixels + u * (spec.max_pixels - spec.min_pixels))


def usable(table: ImageTable, spec: BatchSpec) -> tuple[ImageTable, int]:
    """Images whose smallest visit size holds the smallest grid, and how many were too small (section 3)."""
    smallest = [scaled_size(int(h), int(w), spec.min_pixels) if spec.max_pixels else (int(h), int(w))
                for h, w in zip(table.heights, table.widths)]
    keep = np.array([spec.fits(h, w) for h, w in smallest], dtype=bool)
    return table.subset(np.flatnonzero(keep)), int((~keep).sum())


Grid = tuple[Tensor, Tensor, Tensor]  # (boxes, pairs, labels) of one grid


class Visit(NamedTuple):
    """One image of a batch: its index, its size at this visit (h, w) and its grids on that size."""

    image: int
    size: tuple[int, int]
    grids: list[Grid]


Plan = list[Visit]  # decided from the manifest's sizes and the generator alone, before any decoding


def image_grids(height: int, width: int, spec: BatchSpec, g: torch.Generator) -> list[Grid]:
    """`grids_per_image` independent grids of one image (empty grids dropped)."""
    grids = [sample_grid(height, width, g, spec.patch, spec.gap, spec.jitter, yoked=spec.yoked, mode=spec.mode)
             for _ in range(spec.grids_per_image)]
    return [grid for grid in grids if len(grid[0])]


def plan_step(table: ImageTable, spec: BatchSpec, g: torch.Generator) -> Plan:
    """Draw images and grids until the next grid would pass `max_patches` (the batch is then full)."""
    plan: Plan = []
    total = 0
    while True:
        i = int(torch.randint(len(table), (1,), generator=g))
        size = visit_size(int(table.heights[i]), int(table.widths[i]), spec, g)
        grids = image_grids(*size, spec, g)
        if not grids:
            raise ValueError(f"{table.path(i)} ({table.widths[i]}x{table.heights[i]}, {size[1]}x{size[0]} at this "
                             f"visit) is too small for a grid of {spec.patch} px patches; filter the table with "
                             f"`usable` first")
        taken = []
        for grid in grids:
            if total + len(grid[0]) > spec.max_patches:
                break
            taken.append(grid)
            total += len(grid[0])
        if taken:
            plan.append(Visit(i, size, taken))
        if len(taken) < len(grids):
            break
    if not plan:
        raise ValueError(f"one grid of {table.path(i)} has {len(grids[0][0])} patches, more than "
                         f"max_patches={spec.max_patches}: raise max_patches or the patch size")
    return plan


def heldout_plans(table: ImageTable, spec: BatchSpec, seed: int, n_images: int) -> list[Plan]:
    """A fixed evaluation set: `n_images` images (seeded choice), a fixed scale and grids each, packed."""
    order = torch.randperm(len(table), generator=generator(seed, HELDOUT))[:n_images].tolist()
    plans: list[Plan] = [[]]
    total = 0
    for i in order:
        g = generator(seed, HELDOUT, i)
        size = visit_size(int(table.heights[i]), int(table.widths[i]), spec, g)
        for grid in image_grids(*size, spec, g):
            n = len(grid[0])
            if n > spec.max_patches:
                raise ValueError(f"one grid of {table.path(i)} has {n} patches > max_patches={spec.max_patches}")
            if total + n > spec.max_patches:
                plans.append([])
                total = 0
            if not plans[-1] or plans[-1][-1].image != i:
                plans[-1].append(Visit(i, size, []))
            plans[-1][-1].grids.append(grid)
            total += n
    return [p for p in plans if p]


def read_jpeg(table: ImageTable, i: int) -> Tensor:
    """The file's bytes as a uint8 tensor (for decode_jpeg on any device)."""
    path = table.path(i)
    try:
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    except OSError as e:
        raise OSError(f"cannot read {path}: {e}") from e


def decode_images(table: ImageTable, ids: list[int], data: list[Tensor], device: str | torch.device) -> list[Tensor]:
    """Decode JPEG bytes to (3, H, W) uint8 RGB on `device`; sizes must match the manifest."""
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        names = ", ".join(str(table.path(i)) for i in ids)
        raise ValueError(f"cannot decode one of {names}: {e}") from e
    for i, im in zip(ids, images):
        if tuple(im.shape[1:]) != (int(table.heights[i]), int(table.widths[i])):
            raise ValueError(f"{table.path(i)} is {im.shape[2]}x{im.shape[1]} but the manifest says "
                             f"{table.widths[i]}x{table.heights[i]}: rerun the resize stage")
    return images


def rescale(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A (3, H, W) uint8 image resized to `size` (h, w): antialiased bilinear, on the image's device."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def assemble(images: list[Tensor], plan: Plan, patch: int) -> dict[str, Tensor]:
    """Rescale each image to its visit's size, cut every planned patch, concatenate pairs with offsets."""
    images = [rescale(im, visit.size) for im, visit in zip(images, plan)]
    grids = [grid for visit in plan for grid in visit.grids]
    boxes = [torch.cat([b for b, _, _ in visit.grids]) for visit in plan]
    counts = [len(b) for b, _, _ in grids]
    pair_counts = torch.tensor([sum(len(p) for _, p, _ in visit.grids) for visit in plan])
    return {
        "patches": cut_patches_batch(images, boxes, patch),
        "pairs": batch_pairs([p for _, p, _ in grids], counts),
        "labels": torch.cat([lab for _, _, lab in grids]),
        "pair_image": torch.repeat_interleave(torch.arange(len(plan)), pair_counts),
    }


def load_plan(table: ImageTable, plan: Plan, patch: int, decode_device: str | None = "cpu",
              cut: bool = True) -> dict:
    """Read (and with a `decode_device`, decode, and with `cut`, rescale and cut) a plan's images.

    With decode_device=None the batch carries the JPEG bytes and the plan, for `finish_batch` to decode
    on the training device (torchvision's GPU decoder); with cut=False it carries the decoded images,
    for `finish_batch` to rescale and cut there.
    """
    ids = [visit.image for visit in plan]
    data = [read_jpeg(table, i) for i in ids]
    batch: dict = {"images": torch.tensor(ids, dtype=torch.int64)}
    if decode_device is None:
        batch.update(jpegs=data, plan=plan)
    elif not cut:
        batch.update(decoded=decode_images(table, ids, data, decode_device), plan=plan)
    else:
        batch.update(assemble(decode_images(table, ids, data, decode_device), plan, patch))
    return batch


def finish_batch(batch: dict, table: ImageTable, patch: int, device: str | torch.device) -> dict:
    """Move a batch to `device`; decode (JPEG bytes), rescale and cut there first if not done yet."""
    if "jpegs" in batch or "decoded" in batch:
        ids = batch["images"].tolist()
        images = (decode_images(table, ids, batch["jpegs"], device) if "jpegs" in batch
                  else [im.to(device, non_blocking=True) for im in batch["decoded"]])
        out = assemble(images, batch["plan"], patch)
        out["images"] = batch["images"]
    else:
        out = {k: batch[k] for k in ("patches", "pairs", "labels", "pair_image", "images")}
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


class StepBatches(Dataset):
    """Map-style dataset whose item `s` is the whole batch of training step `s` for one rank.

    `transform(patches, step)`, if given, replaces the uint8 patches by the network input where the batch
    is made: training on the CPU uses it to preprocess in the workers, off the training process's
    critical path (the same generator and ops as on the device, so the same numbers). With
    cut_in_worker=False the workers only decode: the device rescales and cuts (`finish_batch`).
    """

    def __init__(self, table: ImageTable, spec: BatchSpec, seed: int, rank: int, steps: int,
                 decode_in_worker: bool = True, transform: Callable[[Tensor, int], Tensor] | None = None,
                 cut_in_worker: bool = True):
        if len(table) == 0:
            raise ValueError("StepBatches: no usable training images")
        if transform is not None and not (decode_in_worker and cut_in_worker):
            raise ValueError("StepBatches: a transform needs cut patches (decode_in_worker and cut_in_worker)")
        self.table, self.spec, self.seed, self.rank, self.steps = table, spec, seed, rank, steps
        self.decode_in_worker, self.transform, self.cut_in_worker = decode_in_worker, transform, cut_in_worker

    def __len__(self) -> int:
        return self.steps

    def plan(self, step: int) -> Plan:
        return plan_step(self.table, self.spec, generator(self.seed, DATA, self.rank, step))

    def __getitem__(self, step: int) -> dict:
        batch = load_plan(self.table, self.plan(step), self.spec.patch, "cpu" if self.decode_in_worker else None,
                          self.cut_in_worker)
        if self.transform is not None:
            batch["patches"] = self.transform(batch["patches"], step)
        batch["step"] = step
        return batch


def _worker_init(worker_id: int) -> None:
    # Batches never read the global RNGs (every draw is step-seeded); one thread per worker keeps
    # decode workers from oversubscribing the cores the training process needs.
    torch.set_num_threads(1)


def make_loader(dataset: StepBatches, start_step: int, workers: int, pin_memory: bool) -> Iterator[dict]:
    """Batches for steps start_step.. in order; workers decode ahead (DataLoader, batch_size=None)."""
    # Own generator: the DataLoader's per-worker base seed must not consume the global torch RNG.
    return iter(DataLoader(dataset, batch_size=None, sampler=range(start_step, len(dataset)),
                           num_workers=workers, pin_memory=pin_memory, worker_init_fn=_worker_init,
                           generator=generator(dataset.seed, LOADER, dataset.rank, start_step),
                           prefetch_factor=4 if workers else None, persistent_workers=False))
