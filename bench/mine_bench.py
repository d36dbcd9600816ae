"""Mining benchmarks (issue 9), numbers recorded in bench/README.md.

1. `embed`: fc6 features of colour-dropping patches with the tiny profile's network (small tower, 48 px
   patches shrunk to 32 px), three ways in one run, alternating blocks so all see the same machine load:
   `training-order` (drop, RMS at 48 px, area-resize, per view: what pretraining does, three times),
   `shortcut` (`mining.search.drop_views`: resize once, expected RMS) and `shortcut+channels_last` (what
   `mining.search.embed` runs). Reported as CPU seconds per 1000 patches (load from other processes does
   not inflate them) and the ratio to the training order.
2. `search`: constellations searched per CPU second on a synthetic bank of the tiny profile's size
   (214 images x 160 patches x 256 dims, top 30), at two similarity-block bounds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mine_bench.py embed
    OMP_NUM_THREADS=1 .venv/bin/python bench/mine_bench.py search
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ctxrepro.mining.search import FeatureBank, GridLayout, drop_views, search
from ctxrepro.pretext.color import PatchAugment, normalize_rms
from ctxrepro.pretext.model import build_model


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def training_order(x: torch.Tensor, cfg: PatchAugment, g: torch.Generator) -> torch.Tensor:
    """Per view: keep channel k, Gaussian noise in the others, RMS at 48 px, then area-resize to 32 px."""
    views = []
    for k in range(3):
        out = torch.zeros_like(x)
        out[:, k] = x[:, k]
        std = x[:, k].square().mean(dim=(1, 2)).sqrt()
        out[:, [c for c in range(3) if c != k]] = torch.randn((len(x), 2, 48, 48), generator=g) * (
            cfg.drop_noise * std)[:, None, None, None]
        views.append(F.interpolate(normalize_rms(out, cfg.rms), size=(32, 32), mode="area"))
    return torch.cat(views)


@torch.no_grad()
def bench_embed(rounds: int, batch: int) -> None:
    torch.manual_seed(0)
    plain = build_model("small", 32).eval()
    fast = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    cfg = PatchAugment.for_patch(48, color="drop", downsample_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 48, 48), generator=g).float()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    ways = {
        "training-order": lambda: plain.embed(training_order(x, cfg, g)),
        "shortcut": lambda: plain.embed(drop_views(x, cfg, 32, g)),
        "shortcut+channels_last": lambda: fast.embed(drop_views(x, cfg, 32, g).contiguous(
            memory_format=torch.channels_last)),
    }
    spent = {k: 0.0 for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            t = cpu_seconds()
            fn()
            spent[name] += cpu_seconds() - t
    base = spent["training-order"]
    print(f"embed: {rounds} x {batch} patches, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    for name, s in spent.items():
        print(f"  {name:24s} {1000 * s / (rounds * batch):.3f} CPU s / 1000 patches  ratio {base / s:.2f}x")


def bench_search(constellations: int) -> None:
    rng = np.random.default_rng(0)
    n, p, d = 214, 160, 256
    feats = rng.normal(size=(n, p, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=2, keepdims=True)
    bank = FeatureBank(tuple(map(str, range(n))), feats.astype(np.float16), np.ones((n, p), bool),
                       np.zeros((n, p, 2), np.float32), np.ones((n, p), np.float32), [GridLayout((0,), (1,), (p,))] * n)
    cons = np.column_stack([rng.integers(0, n, constellations), rng.integers(0, p, (constellations, 4))])
    print(f"search: {constellations} constellations, bank {n} x {p} x {d}, load {os.getloadavg()[0]:.1f}")
    for block_mb in (256.0, 16.0):
        t, w = cpu_seconds(), time.monotonic()
        search(bank, cons, 30, query_batch=256, block_mb=block_mb)
        s = cpu_seconds() - t
        print(f"  block_mb {block_mb:6.0f}: {constellations / s:8.1f} constellations / CPU s "
              f"({time.monotonic() - w:.1f} s wall)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("embed", "search"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--constellations", type=int, default=1024)
    args = ap.parse_args()
    if args.what == "embed":
        bench_embed(args.rounds, args.batch)
    else:
        bench_search(args.constellations)


if __name__ == "__main__":
    main()
