"""Selective search throughput: the proposals stage's thread pool against one thread, on the same images.

    .venv/bin/python bench/proposals_bench.py [--images 24] [--threads 1,2] [--repeats 2]

Times `ctxrepro.detection.proposals.compute_opencv` ('fast' mode, into a fresh temporary cache each time, so
nothing is reused) on the first `--images` VOC 2007 JPEGs under data/raw (run `dvc repro fetch` first), for
each thread count, interleaved and repeated. Prints per run the median images/s of wall time and of this
process's CPU time (all threads): CPU time / wall time above 1 shows OpenCV running searches in parallel with
the GIL released; on a shared machine the CPU-time rate is the steadier per-core figure. Paste the output
into bench/README.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ctxrepro.detection.proposals import SearchConfig, compute_opencv

JPEGS = Path("data/raw/voc2007/VOCdevkit/VOC2007/JPEGImages")


def one_run(images: dict[str, Path], threads: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one uncached run."""
    cache = Path(tempfile.mkdtemp(prefix="proposals_bench."))
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        compute_opencv(images, cache, SearchConfig(), threads, logging.getLogger("bench"))
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    paths = sorted(JPEGS.glob("*.jpg"))[:args.images]
    if not paths:
        raise SystemExit(f"no images under {JPEGS}: run `dvc repro fetch` first")
    images = {p.stem: p for p in paths}
    counts = [int(t) for t in args.threads.split(",")]
    runs: dict[int, list[tuple[float, float]]] = {t: [] for t in counts}
    for _ in range(args.repeats):
        for t in counts:  # interleaved, so drifting machine load hits every setting alike
            runs[t].append(one_run(images, t))
    base = statistics.median(w for w, _ in runs[counts[0]])
    print(f"{len(images)} images, selective search 'fast', {args.repeats} repeats (median)")
    for t in counts:
        wall = statistics.median(w for w, _ in runs[t])
        cpu = statistics.median(c for _, c in runs[t])
        print(f"threads={t}: {len(images) / wall:6.2f} img/s wall ({base / wall:4.2f}x vs threads={counts[0]}), "
              f"{len(images) / cpu:6.2f} img/s per CPU-second, cpu/wall {cpu / wall:4.2f}")


if __name__ == "__main__":
    main()
