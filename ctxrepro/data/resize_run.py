"""Running the resize over a whole data set: streamed file list, worker processes, resume, shards, manifest.

Layout under `out_root` (data/resized):
  train/..., val/...              the images (ctxrepro.data.resize), same relative names, .jpg
  manifest.csv                    split,path,source,orig_width,orig_height,width,height sorted by (split, path)
  skipped.csv                     split,path,source,reason,detail: every skipped file, same order
  resize_params.json              the config that produced the images; a resume with another config is refused
  parts/{manifest,skipped}-I-of-N.csv, parts/counts-I-of-N.json
                                  what shard I of N saw; the files above are assembled from all N parts
  .partial/I-of-N/                temporary files of a running shard (cleared when it starts, gone when
                                  it ends): a killed run leaves nothing half-written anywhere else

Memory stays flat in the data set's size: folders are listed one at a time, at most a few chunks per
worker are in flight, and rows go straight to the part files. Everything under `out_root` is a function
of the inputs, the config and the shard count (no timings), so an unchanged rerun gives identical bytes.

Resume and DVC: `dvc repro` deletes `out_root` before it runs the stage, so a DVC run always starts
empty. Resuming is for runs by hand (`ctxrepro stage resize [--shard i/n]`): a killed run is rerun with
the same command, complete images are kept, and `dvc commit resize` then records the finished folder.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import ctypes
import functools
import heapq
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import IO, Iterable, Iterator

import cv2

from ctxrepro.data.images import REASONS
from ctxrepro.data.resize import ALGORITHM, Outcome, ResizeConfig, Task, process_image, shard_of
from ctxrepro.progress import track

DATASET = "imagenet"  # sources live in raw_root/imagenet/<split>/ (the fetch stage's layout)
# What fetch counts as images (extract.IMAGE_SUFFIXES): .png files are listed, then skipped as not_jpeg_name.
LISTED_SUFFIXES = (".jpeg", ".jpg", ".png")
MANIFEST_HEADER = ("split", "path", "source", "orig_width", "orig_height", "width", "height")
SKIPPED_HEADER = ("split", "path", "source", "reason", "detail")
STAMP = "resize_params.json"
CHUNK = 32  # images per task sent to a worker: large enough to hide the inter-process round trip


class ResizeError(RuntimeError):
    """A run that cannot start: missing input folder, or a resume against outputs of another config."""


def _listing(folder: Path) -> list[tuple[str, str, bool]]:
    """Sorted (sort key, name, is_dir) of one folder. Keys are output names and folders end in '/', so
    walking in key order visits output paths in plain string order (what the manifest is sorted by)."""
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                entries.append((e.name + "/", e.name, True))
            elif e.is_file() and os.path.splitext(e.name)[1].lower() in LISTED_SUFFIXES:
                entries.append((os.path.splitext(e.name)[0] + ".jpg", e.name, False))
    entries.sort()
    return entries


def _walk(top: Path, rel: str) -> Iterator[tuple[str, str, bool]]:
    """(source path, output path, duplicate) under `top`, depth first in key order."""
    previous = None
    for key, name, is_dir in _listing(top / rel):
        if is_dir:
            yield from _walk(top, f"{rel}{name}/")
        else:
            yield f"{rel}{name}", f"{rel}{key}", key == previous
        previous = key


def iter_tasks(raw_root: Path, splits: Iterable[str], shard: tuple[int, int] = (0, 1)) -> Iterator[Task]:
    """The JPEG-named files of the given splits that belong to `shard`, in (split, output path) order.

    Only the listings of the folders on the current path are held. Files without a JPEG suffix are not
    images and are left out; two files mapping onto one output name (a.JPEG, a.jpg) make the second a
    duplicate, which is skipped and listed.
    """
    index, count = shard
    for split in sorted(set(splits)):
        top = raw_root / DATASET / split
        if not top.is_dir():
            raise ResizeError(f"{top} does not exist: run `dvc repro fetch` (or `ctxrepro stage fetch`) first, "
                              f"or remove '{split}' from resize.splits")
        for src, out, duplicate in _walk(top, ""):
            key = f"{split}/{src}"
            if count == 1 or shard_of(key, count) == index:
                yield Task(split=split, key=key, path=f"{split}/{out}", source=f"{DATASET}/{key}",
                           duplicate=duplicate)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameter numbers (malloc.h)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _die_with(parent: int) -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies, so a killed stage leaves no workers."""
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(parent: int | None = None) -> None:
    """Set up a process that resizes images: one OpenCV thread, and malloc keeping freed image buffers."""
    if parent is not None:
        _die_with(parent)
    # Parallelism comes from processes; OpenCV's own threads would only compete for the same cores.
    cv2.setNumThreads(1)
    # glibc hands freed multi-MB buffers back to the OS and page-faults them in again for the next image:
    # 7% of a fresh worker's CPU time (bench/README.md). Fixed thresholds keep them; memory stays bounded
    # by the largest image. Other C libraries (macOS, musl) are left alone.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _process_chunk(tasks: list[Task], cfg: ResizeConfig, raw_root: str, out_root: str,
                   tmp_dir: str) -> list[Outcome]:
    return [process_image(t, cfg, Path(raw_root), Path(out_root), Path(tmp_dir)) for t in tasks]


def _chunks(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    chunk: list[Task] = []
    for t in tasks:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_outcomes(tasks: Iterable[Task], cfg: ResizeConfig, raw_root: Path, out_root: Path, tmp_dir: Path,
                     workers: int) -> Iterator[Outcome]:
    """Process tasks on `workers` processes (in this process if 1), yielding outcomes in task order.

    At most 3 chunks per worker are in flight, so memory does not grow with the data set. Processes are
    spawned, not forked: the stage process may hold torch's threads, which do not survive a fork.
    """
    work = functools.partial(_process_chunk, cfg=cfg, raw_root=str(raw_root), out_root=str(out_root),
                             tmp_dir=str(tmp_dir))
    if workers == 1:
        _init_worker()
        for chunk in _chunks(tasks, CHUNK):
            yield from work(chunk)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        pending: collections.deque = collections.deque()
        try:
            for chunk in _chunks(tasks, CHUNK):
                pending.append(pool.submit(work, chunk))
                if len(pending) >= 3 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _write_json(path: Path, obj: dict, tmp_dir: Path) -> None:
    with atomic_open(path, tmp_dir) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_stamp(out_root: Path, cfg: ResizeConfig, splits: Iterable[str], tmp_dir: Path) -> None:
    """Record the config beside the outputs, or refuse to resume over outputs made with another one."""
    stamp = {"algorithm": ALGORITHM, "config": asdict(cfg), "splits": sorted(set(splits))}
    path = out_root / STAMP
    if path.is_file():
        old = json.loads(path.read_text())
        if old != stamp:
            diff = sorted(k for k in set(old.get("config", {})) | set(stamp["config"])
                          if old.get("config", {}).get(k) != stamp["config"].get(k))
            diff += [k for k in ("algorithm", "splits") if old.get(k) != stamp[k]]
            raise ResizeError(f"{out_root} holds images made with another resize config (differs in: "
                              f"{', '.join(diff)}; see {path}). Delete {out_root} to start over, or run "
                              f"with the old values to resume")
        return
    _write_json(path, stamp, tmp_dir)


@contextlib.contextmanager
def atomic_open(path: Path, tmp_dir: Path) -> Iterator[IO[str]]:
    """A text file written under a temporary name in `tmp_dir` (same file system), renamed onto `path`
    only on success; a killed run's leftovers are all in `tmp_dir`, which the next run clears."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _part(out_root: Path, kind: str, shard: tuple[int, int], ext: str) -> Path:
    return out_root / "parts" / f"{kind}-{shard[0]}-of-{shard[1]}.{ext}"


def empty_counts() -> dict:
    return {"images_in": 0, "images_written": 0, "images_converted": 0, "converted_by_mode": {},
            "images_skipped": 0, "skipped_by_reason": {r: 0 for r in REASONS}}


def _tally(counts: dict, o: Outcome) -> None:
    counts["images_in"] += 1
    if o.status == "skipped":
        counts["images_skipped"] += 1
        counts["skipped_by_reason"][o.reason] += 1
        return
    counts["images_written"] += 1
    if o.converted_from:
        counts["images_converted"] += 1
        modes = counts["converted_by_mode"]
        modes[o.converted_from] = modes.get(o.converted_from, 0) + 1


def _write_parts(outcomes: Iterable[Outcome], out_root: Path, shard: tuple[int, int],
                 tmp_dir: Path) -> tuple[dict, int]:
    """Stream outcomes into this shard's manifest and skipped parts; returns (counts, images reused)."""
    counts, reused, last = empty_counts(), 0, None
    with atomic_open(_part(out_root, "manifest", shard, "csv"), tmp_dir) as mf, \
            atomic_open(_part(out_root, "skipped", shard, "csv"), tmp_dir) as sf:
        manifest, skipped = csv.writer(mf, lineterminator="\n"), csv.writer(sf, lineterminator="\n")
        manifest.writerow(MANIFEST_HEADER)
        skipped.writerow(SKIPPED_HEADER)
        for o in outcomes:
            t = o.task
            if last is not None and (t.split, t.path, t.source) <= last:
                raise RuntimeError(f"images out of order: {t.source} after {last[2]} (a bug in iter_tasks)")
            last = (t.split, t.path, t.source)
            _tally(counts, o)
            reused += o.status == "reused"
            if o.status == "skipped":
                skipped.writerow((t.split, t.path, t.source, o.reason, o.detail))
            else:
                manifest.writerow((t.split, t.path, t.source, *o.orig_size, *o.size))
    _write_json(_part(out_root, "counts", shard, "json"), counts, tmp_dir)
    return counts, reused


def _rows(path: Path) -> Iterator[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        yield from reader


def _merge_csv(paths: list[Path], header: tuple[str, ...], dest: Path, tmp_dir: Path) -> None:
    """k-way merge of sorted part files by (split, path, source): streamed, any number of rows."""
    with atomic_open(dest, tmp_dir) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(heapq.merge(*(_rows(p) for p in paths), key=lambda r: (r[0], r[1], r[2])))


def _add_counts(total: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            for k, v in value.items():
                total[key][k] = total[key].get(k, 0) + v
        else:
            total[key] += value


def missing_shards(out_root: Path, shards: int) -> list[int]:
    """The shards of an n-way run whose parts are not written yet."""
    return [i for i in range(shards) if not _part(out_root, "counts", (i, shards), "json").is_file()]


def assemble(out_root: Path, shards: int, tmp_dir: Path) -> dict | None:
    """Build manifest.csv and skipped.csv from the parts of all `shards` shards and return the summed
    counts; None (and nothing written) while some shard's parts are missing.

    Parts of another shard count are deleted once the assembly succeeds, so the folder holds one run's.
    """
    if missing_shards(out_root, shards):
        return None
    parts = [(i, shards) for i in range(shards)]
    _merge_csv([_part(out_root, "manifest", s, "csv") for s in parts], MANIFEST_HEADER,
               out_root / "manifest.csv", tmp_dir)
    _merge_csv([_part(out_root, "skipped", s, "csv") for s in parts], SKIPPED_HEADER,
               out_root / "skipped.csv", tmp_dir)
    total = empty_counts()
    for s in parts:
        _add_counts(total, json.loads(_part(out_root, "counts", s, "json").read_text()))
    keep = {_part(out_root, kind, s, ext).name for s in parts
            for kind, ext in (("manifest", "csv"), ("skipped", "csv"), ("counts", "json"))}
    for stale in sorted((out_root / "parts").iterdir()):
        if stale.name not in keep:
            stale.unlink()
    return total


def run_shard(raw_root: Path, out_root: Path, splits: Iterable[str], cfg: ResizeConfig, workers: int,
              shard: tuple[int, int] = (0, 1), log: logging.Logger | None = None) -> tuple[dict, dict | None]:
    """Resize shard `shard` = (i, n) of the splits' images into `out_root`, resuming an earlier run.

    Complete images are kept, the rest (re)written; the shard's parts are written at the end, and if all
    n shards' parts are then present, manifest.csv and skipped.csv too. Returns (this shard's counts plus
    `images_reused` and `seconds`, the summed counts of all shards or None while some are missing).
    """
    log = log or logging.getLogger(__name__)
    start = time.monotonic()
    splits = sorted(set(splits))
    total = sum(1 for _ in iter_tasks(raw_root, splits, shard))  # a cheap first walk, for the ETA
    tmp_dir = out_root / ".partial" / f"{shard[0]}-of-{shard[1]}"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed run of this shard
    tmp_dir.mkdir(parents=True)
    check_stamp(out_root, cfg, splits, tmp_dir)
    outcomes = ordered_outcomes(iter_tasks(raw_root, splits, shard), cfg, raw_root, out_root, tmp_dir, workers)
    counts, reused = _write_parts(track(outcomes, total=total, desc="resize", unit="img", log=log),
                                  out_root, shard, tmp_dir)
    merged = assemble(out_root, shard[1], tmp_dir)
    if merged is None:
        log.info("shard %d/%d done; manifest.csv waits for shards %s", *shard, missing_shards(out_root, shard[1]))
    shutil.rmtree(tmp_dir)
    with contextlib.suppress(OSError):
        tmp_dir.parent.rmdir()  # only if no other shard is running
    return {**counts, "images_reused": reused, "seconds": time.monotonic() - start}, merged
