"""Memory at real scale without the images (issue 16 "Memory at real scale"), numbers in bench/README.md.

Each case runs in a fresh process at three data-set sizes and reports its peak RSS (ru_maxrss) above the same
process's RSS after imports, and its wall time:

- `manifest`: a resize manifest of N rows (ImageNet train: 1.28M) through pretrain's table loading
  (`load_table`, `usable`) and 20 steps of batch planning (`plan_step`: grids from sizes, no decoding);
- `roidb`: a VOC devkit of N images' annotations (2 objects each) and a proposal cache of 2,000 boxes per image
  through detect's `load_roidb` (VOC07 trainval + test is ~10k images);
- `normals`: an NYUv2-layout labeled .mat of N 640x480 frames (zeros: HDF5 stores them compressed) through the
  normals stage's training-set loading at 480x640 (`load_train`; the paper's train split has 795 images).

Growth is linear when the per-item column (extra MB per 1k items) stays flat across sizes.

    .venv/bin/python bench/scale_bench.py                 # all cases, 3 sizes each
    .venv/bin/python bench/scale_bench.py --case roidb --sizes 1000 5000 10000
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"manifest": (128_000, 640_000, 1_280_000), "roidb": (1_000, 5_000, 10_000), "normals": (80, 400, 795)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_manifest(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    w = rng.integers(400, 700, n)
    h = rng.integers(300, 520, n)
    path = root / "manifest.csv"
    with path.open("w") as f:
        f.write("split,path,source,orig_width,orig_height,width,height\n")
        for k in range(n):
            f.write(f"train,train/n{k // 1300:08d}/n{k // 1300:08d}_{k}.JPEG,imagenet/train/{k}.JPEG,"
                    f"{w[k] + 100},{h[k] + 80},{w[k]},{h[k]}\n")
    return path


def run_manifest(root: Path, n: int) -> dict:
    import torch

    from ctxrepro.pretext.data import BatchSpec, load_table, plan_step, usable

    path = make_manifest(root, n)
    base = rss_mb()
    t0 = time.perf_counter()
    table, small = usable(load_table(path, "train"), BatchSpec())
    g = torch.Generator().manual_seed(0)
    patches = sum(sum(len(grid[0]) for visit in plan_step(table, BatchSpec(), g) for grid in visit.grids)
                  for _ in range(20))
    return {"base": base, "seconds": time.perf_counter() - t0, "items": len(table), "check": patches}


def make_devkit(root: Path, n: int) -> tuple[Path, Path]:
    from ctxrepro.detection.proposals import entry_path, save_entry

    devkit, cache = root / "VOC2007", root / "proposals"
    (devkit / "Annotations").mkdir(parents=True)
    (devkit / "ImageSets" / "Main").mkdir(parents=True)
    cache.mkdir()
    obj = ("<object><name>{c}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
           "<bndbox><xmin>{x}</xmin><ymin>20</ymin><xmax>{x2}</xmax><ymax>200</ymax></bndbox></object>")
    rng = np.random.default_rng(0)
    ids = [f"{k:06d}" for k in range(n)]
    for k, image_id in enumerate(ids):
        objects = obj.format(c="car", x=10, x2=150) + obj.format(c="dog", x=200, x2=400)
        (devkit / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>500</width>"
            f"<height>375</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>")
        xy = rng.integers(0, 370, (2000, 2))
        boxes = np.concatenate([xy, xy + rng.integers(1, 120, (2000, 2))], 1).clip(0, [499, 374, 499, 374])
        save_entry(entry_path(cache, image_id), boxes.astype(np.float64), "bench")
    (devkit / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return devkit, cache


def run_roidb(root: Path, n: int) -> dict:
    from ctxrepro.detection.roidb import load_roidb

    devkit, cache = make_devkit(root, n)
    base = rss_mb()
    t0 = time.perf_counter()
    roidb = load_roidb(devkit, "trainval", cache)
    return {"base": base, "seconds": time.perf_counter() - t0, "items": len(roidb),
            "check": sum(len(e.proposals) for e in roidb)}


def make_nyu(root: Path, n: int) -> Path:
    import h5py

    path = root / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as f:
        kw = {"compression": "gzip", "chunks": True}
        f.create_dataset("images", (n, 3, 640, 480), np.uint8, **kw)
        depth = f.create_dataset("depths", (n, 640, 480), np.float32, fillvalue=2.0, **kw)
        f.create_dataset("rawDepths", depth.shape, np.float32, fillvalue=2.0, **kw)
    return path


def run_normals(root: Path, n: int) -> dict:
    from ctxrepro.data.nyu import NyuLabeled
    from ctxrepro.normals.data import load_train
    from ctxrepro.normals.grid import CellGrid

    path = make_nyu(root, n)
    base = rss_mb()
    t0 = time.perf_counter()

    def gt(i: int):  # a constant frontal plane: what matters here is the memory of the training set
        normals = np.zeros((480, 640, 3), np.float32)
        normals[..., 2] = 1.0
        return normals, np.ones((480, 640), bool)

    # the Figure 6 AlexNet trunk's 13x18 grid at 480x640: cells every 32 px from 60.5 (normals/grid.py)
    grid = CellGrid(60.5 + 32.0 * np.arange(13), 60.5 + 32.0 * np.arange(18), (32.0, 32.0), (480, 640))
    with NyuLabeled(path) as nyu:  # images streamed to a scratch file, as the stage does
        data, sample = load_train(nyu, gt, np.arange(n), (480, 640), grid, 0.5, 100, 0,
                                  logging.getLogger("bench"), root / "scratch")
    return {"base": base, "seconds": time.perf_counter() - t0, "items": n, "check": int(len(sample))}


CASES = {"manifest": run_manifest, "roidb": run_roidb, "normals": run_normals}


def one(case: str, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = CASES[case](Path(tmp), n)
    out["peak"] = rss_mb()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("--sizes", type=int, nargs="+")
    ap.add_argument("--one", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one[0], int(args.one[1]))
    print(f"{'case':9} {'items':>9} {'seconds':>8} {'peak MB':>8} {'+MB':>8} {'MB per 1k items':>16}")
    for case in args.case or list(CASES):
        for n in args.sizes or SIZES[case]:
            proc = subprocess.run([sys.executable, __file__, "--one", case, str(n)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{case} at {n}: {proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            extra = r["peak"] - r["base"]
            print(f"{case:9} {r['items']:>9} {r['seconds']:>8.1f} {r['peak']:>8.0f} {extra:>8.0f} "
                  f"{1000 * extra / max(r['items'], 1):>16.2f}")


if __name__ == "__main__":
    main()
