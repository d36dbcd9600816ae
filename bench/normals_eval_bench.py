"""`ctxrepro eval normals` memory bound (issue 8): peak memory of the streamed evaluation against the naive
one (every error in one array, then np.median), for growing numbers of 480 x 640 images, in one run.

The inputs are .npy files on disk (memory-mapped by the streamed evaluation, as the command does); peak
memory is measured with tracemalloc (NumPy reports its allocations to it), so other processes on the
machine do not disturb it. Goal: the streamed peak stays flat as N grows; the naive one grows with N.

    .venv/bin/python bench/normals_eval_bench.py [--images 4 16 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ctxrepro.metrics.normals import angular_errors, evaluate_files

H, W = 480, 640


def _write_inputs(folder: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Random unit normals (gt) and gt perturbed by Gaussian noise (pred), written image by image."""
    rng = np.random.default_rng(seed)
    pred = np.lib.format.open_memmap(folder / "pred.npy", "w+", np.float32, (n, H, W, 3))
    gt = np.lib.format.open_memmap(folder / "gt.npy", "w+", np.float32, (n, H, W, 3))
    for i in range(n):
        g = rng.normal(size=(H, W, 3)).astype(np.float32)
        g /= np.linalg.norm(g, axis=-1, keepdims=True)
        gt[i] = g
        pred[i] = g + rng.normal(scale=0.3, size=(H, W, 3)).astype(np.float32)
    pred.flush()
    gt.flush()
    del pred, gt
    return folder / "pred.npy", folder / "gt.npy"


def _naive(pred_path: Path, gt_path: Path) -> float:
    """Every pixel's error (computed as the metric does) in one float64 array, then np.median: what the
    bound avoids."""
    p, g = np.load(pred_path), np.load(gt_path)
    return float(np.median(np.concatenate([angular_errors(p[i], g[i]) for i in range(len(p))])))


def _measure(fn) -> tuple[object, float, float]:
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[4, 16, 32])
    args = ap.parse_args()
    print(f"{'N':>4} {'streamed MiB':>13} {'s':>6} {'naive MiB':>10} {'s':>6} {'median equal':>13}")
    for n in args.images:
        with tempfile.TemporaryDirectory(prefix="normals-bench.") as tmp:
            pred, gt = _write_inputs(Path(tmp), n, seed=n)
            streamed, s1, m1 = _measure(lambda: evaluate_files(pred, gt))
            naive, s2, m2 = _measure(lambda: _naive(pred, gt))
            print(f"{n:>4} {m1:>13.1f} {s1:>6.1f} {m2:>10.1f} {s2:>6.1f} {streamed['median'] == naive!s:>13}")


if __name__ == "__main__":
    main()
