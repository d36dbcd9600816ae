"""NYUv2 data for the surface-normal experiment (paper section 4.4; docs/DATA.md "NYUv2 surface normals").

Ground truth, as `normals.gt_source` chooses (a missing file is an error, never a fall-back to the other):
1. the FAIR benchmark's `surfacenormal_metadata/all_normals.pklz` (normals and valid-depth masks, courtesy
   of Ladicky et al. 2014) with its `vocab40.mat` codebook;
2. normals computed from the sensor's depth (`rawDepths`) by local plane fitting
   (`ctxrepro.normals.depth`), valid where the sensor measured depth and the fit had enough points.

Training targets live on the trunk's coarse output grid, at the cells' receptive-field centres
(`ctxrepro.normals.grid`): each cell averages the valid ground-truth normals within one grid step around
its centre, renormalised; a cell is a target only where at least `min_valid` of that window has ground truth.

Memory: the input-size images of a split (the paper's 795 train frames at 480 x 640 are 733 MB, its 654 test
frames 603 MB) are written one by one to a .npy file in a scratch folder (`scratch_dir`) and read back a batch
at a time (`NpyRows`), so the process holds one frame and one batch, not the split; the coarse targets are
small (cells, not pixels) and stay in memory.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ctxrepro.data.nyu import NyuLabeled, load_normals, read_splits
from ctxrepro.io import atomic_write
from ctxrepro.normals.depth import PlaneFit, normals_from_depth
from ctxrepro.normals.grid import CellGrid, window_means
from ctxrepro.normals.model import TrainSet
from ctxrepro.progress import track

LABELED = "nyu_depth_v2_labeled.mat"
SPLITS = "splits.mat"
NORMALS_PKLZ = "surfacenormal_metadata/all_normals.pklz"
VOCAB = "surfacenormal_metadata/vocab40.mat"
GT_SOURCES = ("fair", "depth")

GroundTruth = Callable[[int], tuple[np.ndarray, np.ndarray]]  # NYU index -> (normals (H, W, 3), valid (H, W))


class FairGroundTruth:
    """The FAIR pickle's normals and valid masks (held in memory: the pickle cannot be read in parts)."""

    def __init__(self, path: Path, expected: int):
        data = load_normals(path)
        self.normals, self.valid = data["all_normals"], np.asarray(data["all_valid_depth_masks"])
        if len(self.normals) != expected or self.valid.shape != self.normals.shape[:3]:
            raise ValueError(f"{path}: all_normals {self.normals.shape} and all_valid_depth_masks "
                             f"{self.valid.shape} do not match the {expected} images of {LABELED}")

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = np.asarray(self.normals[i], dtype=np.float32)
        return n, self.valid[i].astype(bool) & np.any(n != 0, axis=-1)


class DepthGroundTruth:
    """Normals fitted to the sensor's depth of each image (`ctxrepro.normals.depth`), computed on demand."""

    def __init__(self, nyu: NyuLabeled, fit: PlaneFit):
        self.nyu, self.fit = nyu, fit

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return normals_from_depth(self.nyu.raw_depth(i), fit=self.fit)


def open_nyu(nyu_dir: Path) -> tuple[NyuLabeled, np.ndarray, np.ndarray]:
    """The labeled set and its 0-based (train, test) indices; a missing file is named with the fix."""
    for name in (LABELED, SPLITS):
        if not (nyu_dir / name).is_file():
            raise FileNotFoundError(f"{nyu_dir / name} not found: run the fetch stage (fetch.nyuv2_source)")
    nyu = NyuLabeled(nyu_dir / LABELED)
    train, test = read_splits(nyu_dir / SPLITS)
    top = int(max(train.max(initial=-1), test.max(initial=-1)))
    if top >= len(nyu):
        raise ValueError(f"{nyu_dir / SPLITS}: index {top + 1} (1-based) beyond the {len(nyu)} images of {LABELED}")
    return nyu, train, test


def ground_truth(nyu_dir: Path, source: str, nyu: NyuLabeled, fit: PlaneFit) -> tuple[GroundTruth, str]:
    """(provider, "fair" | "depth") for `source` in GT_SOURCES; a missing FAIR pickle is an error, never a
    silent fall-back to depth (that would change Table 2's protocol)."""
    if source not in GT_SOURCES:
        raise ValueError(f"ground truth source {source!r} is not one of {GT_SOURCES}")
    pklz = nyu_dir / NORMALS_PKLZ
    if source == "fair" and not pklz.is_file():
        raise FileNotFoundError(f"{pklz} not found: fetch nyuv2 with nyuv2_surfacenormal_metadata.zip, or use "
                                f"normals.gt_source=depth")
    if source == "fair":
        return FairGroundTruth(pklz, len(nyu)), "fair"
    return DepthGroundTruth(nyu, fit), "depth"


def vocab_path(nyu_dir: Path) -> Path:
    return nyu_dir / VOCAB


def coarse_targets(normals: np.ndarray, valid: np.ndarray, grid: CellGrid,
                   min_valid: float) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) float32 unit normals and (h, w) bool targets: each cell's mean valid normal over one grid
    step around its receptive-field centre (`grid`), renormalised; a target where at least `min_valid` of
    that window has ground truth."""
    if normals.shape[:2] != grid.size or valid.shape != grid.size:
        raise ValueError(f"ground truth of shape {normals.shape[:2]}, but the grid is placed in a {grid.size} frame")
    weight = valid.astype(np.float64)[..., None]
    sums, area = window_means(np.concatenate([normals * weight, weight], axis=-1), grid)
    total, count = sums[..., :3], sums[..., 3]
    norm = np.linalg.norm(total, axis=-1)
    # a cell whose valid normals cancel out (a thin edge between opposite faces) has no usable mean
    ok = (area > 0) & (count >= min_valid * area) & (count > 0) & (norm > 1e-3 * count)
    out = np.where(ok[..., None], total / np.maximum(norm, 1e-12)[..., None], 0.0).astype(np.float32)
    return out, ok


MIRROR = np.array([-1.0, 1.0, 1.0], np.float32)  # mirroring an image negates x of every normal


def mirrored_targets(normals: np.ndarray, valid: np.ndarray, grid: CellGrid,
                     min_valid: float) -> tuple[np.ndarray, np.ndarray]:
    """`coarse_targets` of the horizontally mirrored frame (what a flipped training image's cells see)."""
    return coarse_targets(normals[:, ::-1] * MIRROR, valid[:, ::-1], grid, min_valid)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (480, 640, 3) -> (H, W, 3) by area averaging (anti-aliased)."""
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


class NpyRows:
    """The rows of a C-order .npy file, read on demand with plain file reads: `rows[index]` for an int, a slice
    or an integer array gives a new array, and no page of the file is mapped into this process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, self.dtype = read(f)
            self.offset = f.tell()
        if fortran or not shape:
            raise ValueError(f"{self.path}: expected a C-order array of rows, got shape {shape} fortran={fortran}")
        self.shape = tuple(shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(self.shape[0])[index]
        out = np.empty((*np.shape(rows), *self.shape[1:]), self.dtype)
        with open(self.path, "rb") as f:
            for j, i in enumerate(np.atleast_1d(rows)):
                f.seek(self.offset + int(i) * self.row_bytes)
                if f.readinto(out.reshape(-1, *self.shape[1:])[j]) != self.row_bytes:
                    raise ValueError(f"{self.path}: row {i} is truncated")
        return out


def _store_images(rows: Iterator[np.ndarray], n: int, size: tuple[int, int],
                  path: Path | None) -> np.ndarray | NpyRows:
    """n uint8 (H, W, 3) images from `rows`: in memory when `path` is None, else written row by row to the
    .npy file `path` (complete or absent) and returned as `NpyRows`."""
    shape = (n, *size, 3)
    if path is None:
        out = np.zeros(shape, np.uint8)
        for k, image in enumerate(rows):
            out[k] = image
        return out

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                 "fortran_order": False, "shape": shape})
        count = 0
        for image in rows:
            f.write(np.ascontiguousarray(image, np.uint8).reshape(shape[1:]).tobytes())
            count += 1
        if count != n:
            raise ValueError(f"{path}: {count} images written, {n} expected")

    atomic_write(path, write)
    return NpyRows(path)


@contextlib.contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """An empty folder for a run's image files, removed afterwards (and at the start: a killed run's leftovers)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_train(nyu: NyuLabeled, gt: GroundTruth, indices: np.ndarray, input_size: tuple[int, int],
               grid: CellGrid, min_valid: float, samples_per_image: int, seed: int,
               log: logging.Logger, scratch: Path | None = None) -> tuple[TrainSet, np.ndarray]:
    """The training set at the input size with coarse targets (and those of the mirrored images), and a
    sample of valid full-resolution normals (up to `samples_per_image` per image, drawn from `seed`) for
    the k-means codebook. With `scratch`, the images live in `scratch`/train_images.npy (`NpyRows`)."""
    n = len(indices)
    normals, mirrored = np.zeros((2, n, *grid.shape, 3), np.float32)
    valid, mirrored_valid = np.zeros((2, n, *grid.shape), bool)
    rng = np.random.default_rng(seed)
    samples = []

    def rows() -> Iterator[np.ndarray]:
        for k, i in enumerate(track(indices, desc="normals: training images", unit="img", log=log)):
            yield resize_image(nyu.image(int(i)), input_size)
            full, ok = gt(int(i))
            normals[k], valid[k] = coarse_targets(full, ok, grid, min_valid)
            mirrored[k], mirrored_valid[k] = mirrored_targets(full, ok, grid, min_valid)
            pix = full[ok]
            samples.append(pix[rng.choice(len(pix), size=min(len(pix), samples_per_image), replace=False)])

    images = _store_images(rows(), n, input_size, None if scratch is None else scratch / "train_images.npy")
    return TrainSet(images, normals, valid, mirrored, mirrored_valid), np.concatenate(samples).astype(np.float64)


def load_images(nyu: NyuLabeled, indices: np.ndarray, input_size: tuple[int, int],
                log: logging.Logger, scratch: Path | None = None) -> np.ndarray | NpyRows:
    """uint8 (N, H, W, 3) images at the input size (the test split's network inputs); with `scratch`, in
    `scratch`/test_images.npy (`NpyRows`)."""
    rows = (resize_image(nyu.image(int(i)), input_size)
            for i in track(indices, desc="normals: test images", unit="img", log=log))
    return _store_images(rows, len(indices), input_size, None if scratch is None else scratch / "test_images.npy")
