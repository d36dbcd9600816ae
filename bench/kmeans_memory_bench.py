"""Peak memory of the k-means convert's input gathering (issue 22 "Bounded k-means memory"), numbers in
bench/README.md.

`convert` with a k-means init gathers receptive fields of each new layer's input (`rescale.gather_inputs`).
The case is the largest layer input of the paper profile: VGG-16 conv1_2 (64 channels, 3x3, padding 1) on
227-px crops, one batch of 64, keeping 1,266 rows per batch (kmeans_samples 100,000 over the 79 batches of
2,500 images x 2 crops). Each run is a fresh process; it reports its peak RSS (ru_maxrss) above its RSS once
the crops exist, and the seconds of the call.

- `unfold` (before): unfold the whole batch (B x 576 x 51,529 floats), transpose-copy it, keep the sampled rows;
- `sampled` (after, `gather_inputs` today): draw the positions, gather only their receptive fields.

    .venv/bin/python bench/kmeans_memory_bench.py                          # both, batches 8 16 64 (unfold: 8 16)
    .venv/bin/python bench/kmeans_memory_bench.py --mode unfold --batches 8
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROWS = math.ceil(100_000 / math.ceil(2 * 2500 / 64))  # quota per batch in the paper profile: 1,266
SIDE = 227


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gather_unfold(layers, index, data, max_samples, batch, gen):
    """The gathering before issue 22: the whole batch unfolded and copied, then sampled."""
    from ctxrepro.transfer.rescale import batches, run_layers

    layer = layers[index][1]
    quota = math.ceil(max_samples / max(1, math.ceil(len(data) / batch)))
    rows = []
    for xb in batches(data, batch):
        x = run_layers(layers, xb, index)
        x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])
        rows.append(x[torch.randperm(len(x), generator=gen)[:quota]].float())
    return torch.cat(rows)[:max_samples]


@torch.no_grad()
def one(mode: str, batch: int) -> dict:
    from ctxrepro.transfer.rescale import gather_inputs

    torch.set_num_threads(2)
    torch.manual_seed(0)
    layers = [("conv1_1", nn.Conv2d(3, 64, 3, padding=1)), ("relu1_1", nn.ReLU(inplace=True)),
              ("conv1_2", nn.Conv2d(64, 64, 3, padding=1))]
    data = torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    base = rss_mb()
    start = time.perf_counter()
    fn = gather_unfold if mode == "unfold" else gather_inputs
    rows = fn(layers, 2, data, ROWS, batch, torch.Generator().manual_seed(2))
    seconds = time.perf_counter() - start
    layer_input_mb = batch * 64 * SIDE * SIDE * 4 / 2 ** 20
    return {"mode": mode, "batch": batch, "rows": list(rows.shape), "peak_above_mb": round(rss_mb() - base),
            "layer_input_mb": round(layer_input_mb), "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("unfold", "sampled"))
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--one", action="store_true", help="run one case in this process (internal)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.mode, args.batches[0])))
        return
    cases = [(m, b) for m in ([args.mode] if args.mode else ["unfold", "sampled"])
             for b in (args.batches or ((8, 16) if m == "unfold" else (8, 16, 64)))]
    for mode, batch in cases:
        out = subprocess.run([sys.executable, __file__, "--one", "--mode", mode, "--batches", str(batch)],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip(), flush=True)


if __name__ == "__main__":
    main()
