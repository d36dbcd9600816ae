"""Pretraining benchmarks (issue 5 "Performance"), numbers recorded in bench/README.md.

1. `loop`: the full training step on the CPU (DataLoader workers decode, cut and preprocess, as
   engine._loop does on the CPU; then forward/backward/update) against the same model fed pre-made,
   already preprocessed tensors, in one run, alternating blocks so both see the same machine load. Goal: data handling costs <= 10% of the
   model-only throughput. Reported as wall-clock throughput (noisy on a shared machine: the load average
   is printed) and as CPU seconds per 1000 pairs of the model step and of making a batch (what a worker
   does: read, decode, plan, cut, preprocess), single-threaded, which other processes' load does not
   inflate.
2. `pairs`: pairs per tower forward (pairs / patches embedded) on a ~300K-pixel image with the paper's
   geometry (96/48/7). Goal: >= 4; MMSelfSup's centre-versus-8 recipe gets 0.5 (the centre embedded 8x).

    .venv/bin/python bench/pretrain_bench.py pairs
    .venv/bin/python bench/pretrain_bench.py loop --profile tiny [--manifest data/resized/manifest.csv]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

from ctxrepro.pretext.color import PatchAugment
from ctxrepro.pretext.data import BatchSpec, StepBatches, finish_batch, load_table, make_loader, usable
from ctxrepro.pretext.engine import OptimConfig, Prepare, TrainConfig, build_optimizer, train_step
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.sampling import sample_grid

PROFILES = {  # the params of the two profiles that matter for speed
    "tiny": TrainConfig(data=BatchSpec(patch=48, gap=24, jitter=5, grids_per_image=4, max_patches=256),
                        augment=PatchAugment.for_patch(48, color="drop"), optim=OptimConfig("adam", 1e-3),
                        tower="small", input_size=32, workers=1),
    "paper": TrainConfig(data=BatchSpec(), augment=PatchAugment.for_patch(96, color="projection"),
                         optim=OptimConfig("sgd", 1e-5, 0.0), tower="alexnet", workers=1),
}
SIZES = {"tiny": (256, 256), "paper": (474, 632)}  # paper: 299,568 pixels, inside [150K, 450K]


def synthetic_manifest(root: Path, n: int, size: tuple[int, int]) -> Path:
    """Smooth-plus-texture RGB JPEGs (a stand-in when no resized data set is given) and their manifest."""
    rng = np.random.default_rng(0)
    h, w = size
    lines = ["split,path,source,orig_width,orig_height,width,height"]
    (root / "train").mkdir(parents=True)
    for k in range(n):
        low = torch.from_numpy(rng.uniform(0, 255, (1, 3, h // 32, w // 32)).astype(np.float32))
        smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0]
        img = (smooth + torch.from_numpy(rng.normal(0, 12, (3, h, w)).astype(np.float32))).clamp(0, 255)
        (root / f"train/{k:04d}.jpg").write_bytes(encode_jpeg(img.to(torch.uint8), quality=90).numpy().tobytes())
        lines.append(f"train,train/{k:04d}.jpg,synthetic/{k}.JPEG,{w},{h},{w},{h}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def data_cpu(ds: StepBatches, steps: range) -> tuple[float, int]:
    """CPU seconds and pairs of making batches in this process (what each DataLoader worker does)."""
    t0, pairs = time.process_time(), 0
    for s in steps:
        pairs += len(ds[s]["labels"])
    return time.process_time() - t0, pairs


def full_steps(cfg: TrainConfig, model, optimizer, table, batches, n: int, device: str) -> tuple[float, int]:
    """n steps of the real data path, as engine._loop on the CPU without checkpoints: (seconds, pairs)."""
    pairs = 0
    t0 = time.perf_counter()
    for _ in range(n):
        b = finish_batch(next(batches), table, cfg.data.patch, device)
        train_step(model, optimizer, None, b["patches"], b["pairs"], b["labels"], cfg, device, 1)
        pairs += len(b["labels"])
    return time.perf_counter() - t0, pairs


def model_steps(cfg: TrainConfig, model, optimizer, premade: list, n: int, device: str) -> tuple[float, int]:
    """n steps on pre-made, preprocessed tensors (cycled): the model-only ceiling."""
    pairs = 0
    t0 = time.perf_counter()
    for k in range(n):
        x, p, lab = premade[k % len(premade)]
        train_step(model, optimizer, None, x, p, lab, cfg, device, 1)
        pairs += len(lab)
    return time.perf_counter() - t0, pairs


def bench_loop(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cfg = replace(PROFILES[args.profile], workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(args.manifest) if args.manifest else synthetic_manifest(Path(tmp), 64, SIZES[args.profile])
        table = usable(load_table(manifest, "train"), cfg.data)[0]
        torch.manual_seed(0)
        model = build_model(cfg.tower, cfg.net_size)
        optimizer = build_optimizer(model.parameters(), cfg.optim)
        # the engine's CPU data path: workers decode, cut and preprocess (engine.Prepare)
        ds = StepBatches(table, cfg.data, cfg.seed, 0, 100_000, transform=Prepare(cfg, 0, "cpu", False))
        premade = [(b["patches"], b["pairs"], b["labels"]) for b in (ds[100_000 - 1 - s] for s in range(8))]
        batches = make_loader(ds, 0, cfg.workers, pin_memory=False)  # one loader, as in a training run
        model_steps(cfg, model, optimizer, premade, 3, "cpu")  # warm-up (and worker start-up)
        full_steps(cfg, model, optimizer, table, batches, 3, "cpu")
        totals = {"full": [0.0, 0], "model": [0.0, 0]}  # wall seconds, pairs
        model_cpu = 0.0
        for _ in range(args.blocks):  # alternate, so both arms see the same background load
            cpu = time.process_time()
            sec, pairs = model_steps(cfg, model, optimizer, premade, args.steps, "cpu")
            model_cpu += time.process_time() - cpu
            totals["model"][0] += sec
            totals["model"][1] += pairs
            sec, pairs = full_steps(cfg, model, optimizer, table, batches, args.steps, "cpu")
            totals["full"][0] += sec
            totals["full"][1] += pairs
        del batches
        batch_cpu, batch_pairs = data_cpu(ds, range(50_000, 50_000 + args.steps))
    rate = {arm: pairs / sec for arm, (sec, pairs) in totals.items()}
    model_kpair, data_kpair = 1000 * model_cpu / totals["model"][1], 1000 * batch_cpu / batch_pairs
    return {"profile": args.profile, "workers": cfg.workers, "threads": torch.get_num_threads(),
            "data": args.manifest or f"synthetic {SIZES[args.profile][1]}x{SIZES[args.profile][0]} JPEGs",
            "model_only_pairs_per_s": round(rate["model"], 1), "full_loop_pairs_per_s": round(rate["full"], 1),
            "data_overhead": round(1 - rate["full"] / rate["model"], 3),
            "model_cpu_s_per_1000_pairs": round(model_kpair, 4),
            "data_cpu_s_per_1000_pairs": round(data_kpair, 4),
            "data_cpu_share": round(data_kpair / model_kpair, 3),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def bench_pairs(args: argparse.Namespace) -> dict:
    """Pairs per patch embedded, averaged over many sampled grids (no images needed: geometry only)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (h, w), spec in (("paper 632x474 (299,568 px)", (474, 632), BatchSpec()),
                               ("tiny 256x256", (256, 256), PROFILES["tiny"].data)):
        for mode in ("grid", "center8"):
            patches = pairs = 0
            for _ in range(args.samples):
                boxes, p, _ = sample_grid(h, w, g, spec.patch, spec.gap, spec.jitter, mode=mode)
                patches, pairs = patches + len(boxes), pairs + len(p)
            out[f"{name}, {mode}"] = {"patches_per_grid": patches / args.samples,
                                      "pairs_per_grid": pairs / args.samples,
                                      "pairs_per_forward": round(pairs / max(patches, 1), 3)}
    out["MMSelfSup (centre embedded 8 times)"] = {"pairs_per_forward": 8 / 16}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    loop = sub.add_parser("loop", help="full loop vs model-only throughput")
    loop.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    loop.add_argument("--manifest", help="a resize-stage manifest.csv (default: synthetic JPEGs)")
    loop.add_argument("--steps", type=int, default=20, help="steps per block")
    loop.add_argument("--blocks", type=int, default=3, help="alternating blocks per arm")
    loop.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    loop.add_argument("--threads", type=int, default=1,
                      help="torch threads of the training process (1: no OpenMP spin-waiting in the CPU times)")
    pairs = sub.add_parser("pairs", help="pairs per tower forward")
    pairs.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    result = bench_loop(args) if args.what == "loop" else bench_pairs(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
