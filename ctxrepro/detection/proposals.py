"""Selective-search object proposals, read from Fast R-CNN's .mat files or computed with OpenCV, cached per image
(paper section 4.3 fine-tunes with Fast R-CNN on selective search boxes; docs/DATA.md "Selective search .mat").

Every function returns boxes as (K, 4) float64 [x1 y1 x2 y2], 0-based inclusive pixels (`ctxrepro.detection.boxes`).

- Fast R-CNN's `selective_search_data/voc_2007_<split>.mat`: `boxes` is a 1 x N cell of K x 4 arrays in
  [y1 x1 y2 x2], 1-based; `images` (when present) names the N images. Columns (1, 0, 3, 2) minus 1 give ours.
- OpenCV (`cv2.ximgproc.segmentation`, 'fast' or 'quality' mode) returns x, y, w, h boxes. Their *set* is a
  function of the image, but their *order* is a random ranking redrawn on every call in one process, so the raw
  order can never choose the boxes reproducibly. We deduplicate and sort the boxes (`canonical`), and when a
  cap `max_boxes` applies, keep a seeded random subset of the sorted list, seeded from the image's bytes.
- The cache holds one `<image_id>.npz` per image with the boxes and a key (sha256 of the image file, the
  settings and OpenCV's version); an entry whose key matches is reused, so a rerun only computes what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from scipy.io import loadmat

from ctxrepro.detection.boxes import iou
from ctxrepro.progress import track

PROPOSAL_SEED = 71  # seed purpose: the seeded subset when max_boxes caps an image's boxes
MODES = ("fast", "quality")
NPZ_SUFFIX = ".npz"


@dataclass(frozen=True)
class SearchConfig:
    """How OpenCV's selective search runs and which of its boxes are kept."""

    mode: str = "fast"  # Fast R-CNN's VOC boxes came from the 'fast' mode of Uijlings et al.
    max_boxes: int = 0  # 0: keep all (Fast R-CNN uses all ~2k per image)
    min_side: int = 0  # drop boxes narrower or shorter than this (0: keep all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SearchConfig.mode={self.mode!r}: choose one of {MODES}")


def from_mat_boxes(raw: np.ndarray, where: str = "boxes") -> np.ndarray:
    """Fast R-CNN's [y1 x1 y2 x2] 1-based rows -> [x1 y1 x2 y2] 0-based (columns 1, 0, 3, 2, minus 1)."""
    arr = np.asarray(raw, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{where}: expected a K x 4 array of [y1 x1 y2 x2], got shape {arr.shape}")
    return arr[:, (1, 0, 3, 2)] - 1.0


def _mat_string(value: object) -> str:
    """One entry of a MATLAB cell of strings as scipy reads it (a nested object/char array)."""
    arr = np.asarray(value)
    while arr.dtype == object and arr.size == 1:
        arr = np.asarray(arr.reshape(-1)[0])
    if arr.dtype.kind in "US":
        return "".join(str(s) for s in arr.reshape(-1))
    if arr.size == 1 and arr.dtype.kind in "iuf":  # numeric ids: 5 -> "000005" is the caller's business
        return str(int(arr.reshape(-1)[0]))
    raise ValueError(f"cannot read an image id from {value!r}")


def read_mat(path: Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Proposals of `image_ids` from one of Fast R-CNN's selective search .mat files.

    With an `images` variable the boxes are matched by id; without one, by position, as Fast R-CNN does
    (then the file must hold exactly one cell per image of the set)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no selective search .mat file; fetch places Fast R-CNN's "
                                f"selective_search_data.tgz there (from fetch.voc2007_source, or official)")
    data = loadmat(path)
    if "boxes" not in data:
        raise ValueError(f"{path}: no variable 'boxes' (found {sorted(k for k in data if not k.startswith('__'))})")
    cells = np.asarray(data["boxes"]).reshape(-1)
    if "images" in data:
        names = [_mat_string(v) for v in np.asarray(data["images"]).reshape(-1)]
        if len(names) != len(cells):
            raise ValueError(f"{path}: {len(names)} image names but {len(cells)} box cells")
    elif len(cells) == len(image_ids):
        names = list(image_ids)
    else:
        raise ValueError(f"{path}: {len(cells)} box cells, no 'images' variable, and {len(image_ids)} images "
                         f"in the set: cannot tell which boxes belong to which image")
    by_name = {n: c for n, c in zip(names, cells)}
    missing = [i for i in image_ids if i not in by_name]
    if missing:
        raise ValueError(f"{path}: no boxes for {len(missing)} image(s) of the set, e.g. {missing[:3]}")
    return {i: from_mat_boxes(by_name[i], f"{path} image {i}") for i in image_ids}


def canonical(boxes: np.ndarray, min_side: int = 0) -> np.ndarray:
    """Unique boxes in lexicographic (x1, y1, x2, y2) order, without those thinner than `min_side`."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if min_side > 0:
        b = b[(b[:, 2] - b[:, 0] + 1 >= min_side) & (b[:, 3] - b[:, 1] + 1 >= min_side)]
    return np.unique(b, axis=0) if len(b) else np.zeros((0, 4))


def subset_seed(seed: int, image_sha256: str) -> np.random.SeedSequence:
    """The seed of one image's capped subset: the base seed and the image's bytes (never Python's hash());
    a SeedSequence of the same keys derive_seed would take."""
    return np.random.SeedSequence([seed, PROPOSAL_SEED, int(image_sha256[:14], 16)])


def cap(boxes: np.ndarray, max_boxes: int, seed: np.random.SeedSequence | int) -> np.ndarray:
    """At most `max_boxes` of canonically sorted boxes: a seeded random subset, kept in sorted order."""
    if max_boxes <= 0 or len(boxes) <= max_boxes:
        return boxes
    keep = np.sort(np.random.default_rng(seed).choice(len(boxes), size=max_boxes, replace=False))
    return boxes[keep]


def selective_search(bgr: np.ndarray, mode: str = "fast") -> np.ndarray:
    """OpenCV's selective search on a BGR uint8 image: all its boxes, 0-based inclusive, in OpenCV's order."""
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(bgr))
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)
    x, y, w, h = rects.T
    return np.stack([x, y, x + w - 1, y + h - 1], axis=1)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_key(image_sha256: str, settings: dict) -> str:
    """What an entry depends on: the image's bytes and every setting that changes its boxes."""
    text = json.dumps({"image": image_sha256, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_whole_jpeg(path: Path) -> None:
    """Refuse a JPEG without its end-of-image marker: OpenCV decodes it half-way, warning without a name."""
    if Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        if b"\xff\xd9" not in f.read():
            raise ValueError(f"{path}: truncated JPEG (no end-of-image marker); fetch the data set again")


def search_image(path: Path, cfg: SearchConfig) -> tuple[np.ndarray, str]:
    """Selective search boxes of one image file (canonical, capped) and the image's sha256."""
    digest = file_digest(path)
    check_whole_jpeg(path)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: OpenCV cannot decode this image")
    boxes = canonical(selective_search(bgr, cfg.mode), cfg.min_side)
    return cap(boxes, cfg.max_boxes, subset_seed(cfg.seed, digest)), digest


def save_entry(path: Path, boxes: np.ndarray, key: str) -> None:
    """One cache entry, written to a temporary name and renamed (complete or absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=NPZ_SUFFIX)
    os.close(fd)
    try:
        np.savez(tmp, boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4), key=np.array(key))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_entry(path: Path) -> tuple[np.ndarray, str]:
    """(boxes, key) of one cache entry; a broken file is an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["boxes"], dtype=np.float64).reshape(-1, 4), str(z["key"])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a proposal cache entry ({e})") from e


def cached_key(path: Path) -> str | None:
    """The key of an existing, readable entry, else None (a broken entry is simply recomputed)."""
    if not path.is_file():
        return None
    try:
        return load_entry(path)[1]
    except ValueError:
        return None


def entry_path(cache_dir: Path, image_id: str) -> Path:
    return Path(cache_dir) / f"{image_id}{NPZ_SUFFIX}"


def opencv_key(image_path: Path, cfg: SearchConfig) -> str:
    # OpenCV's version is part of the key: another release may segment differently
    return cache_key(file_digest(image_path), {"source": "opencv", "opencv": cv2.__version__, **asdict(cfg)})


def search_job(job: tuple[str, Path, Path, str, SearchConfig]) -> tuple[str, int]:
    """Compute and cache one image's boxes: (image id, box count)."""
    image_id, image_path, out_path, key, cfg = job
    boxes, _ = search_image(image_path, cfg)
    save_entry(out_path, boxes, key)
    return image_id, len(boxes)


def load_proposals(cache_dir: Path, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Cached boxes of every id; a missing entry is an error that says how to make it."""
    out = {}
    for image_id in image_ids:
        path = entry_path(cache_dir, image_id)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no proposals for image {image_id} (run `dvc repro proposals`)")
        out[image_id] = load_entry(path)[0]
    return out


def compute_opencv(images: dict[str, Path], cache_dir: Path, cfg: SearchConfig, workers: int,
                   log: logging.Logger) -> tuple[dict[str, int], int]:
    """Cache OpenCV selective search boxes for every image, reusing entries whose key matches; images are
    spread over `workers` threads. Returns ({id: box count}, number computed)."""
    counts, jobs = {}, []
    for image_id, path in sorted(images.items()):
        out = entry_path(cache_dir, image_id)
        key = opencv_key(path, cfg)
        if cached_key(out) == key:
            counts[image_id] = len(load_entry(out)[0])
        else:
            jobs.append((image_id, Path(path), out, key, cfg))
    log.info("selective search (%s): %d cached, %d to compute in %d thread(s)", cfg.mode, len(counts), len(jobs),
             workers)
    # OpenCV's Python bindings release the GIL inside ss.process(), so threads run searches in parallel
    # without the start-up and main-module pitfalls of process pools; one OpenCV thread each avoids
    # oversubscribing the cores.
    cv2.setNumThreads(1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        counts.update(track(pool.map(search_job, jobs), total=len(jobs), desc="selective search", unit="img",
                            log=log))
    return dict(sorted(counts.items())), len(jobs)


def convert_mat(mat: Path, images: dict[str, Path], cache_dir: Path, cfg: SearchConfig) -> dict[str, int]:
    """Cache the boxes of Fast R-CNN's .mat file for `images` (canonical order, `min_side`, `max_boxes` as for
    OpenCV's boxes, so both sources give the detector the same kind of input)."""
    boxes = read_mat(mat, sorted(images))
    mat_digest = file_digest(mat)
    counts = {}
    for image_id, path in sorted(images.items()):
        digest = file_digest(path)
        kept = cap(canonical(boxes[image_id], cfg.min_side), cfg.max_boxes, subset_seed(cfg.seed, digest))
        key = cache_key(digest, {"source": "mat", "mat": mat_digest, **asdict(cfg)})
        save_entry(entry_path(cache_dir, image_id), kept, key)
        counts[image_id] = len(kept)
    return counts


def prune(cache_dir: Path, keep: set[str]) -> list[str]:
    """Remove the entries (and stray temporary files) of images no longer asked for; returns their ids."""
    removed = []
    for path in sorted(Path(cache_dir).glob(f"*{NPZ_SUFFIX}")):
        image_id = path.name[:-len(NPZ_SUFFIX)]
        if path.name.startswith(".") or image_id not in keep:
            path.unlink()
            removed.append(image_id)
    return removed


def recall(proposals: dict[str, np.ndarray], gt: dict[str, np.ndarray], thresholds: Sequence[float]) -> dict:
    """Fraction of ground-truth boxes that some proposal overlaps by IoU >= t (+1 convention), per t."""
    best = np.concatenate([iou(gt[i], proposals[i]).max(axis=1) if len(proposals[i]) else np.zeros(len(gt[i]))
                           for i in gt if len(gt[i])] or [np.zeros(0)])
    return {f"{t:g}": float((best >= t).mean()) if len(best) else None for t in thresholds}
