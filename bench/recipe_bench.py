"""Pretraining recipes at the paper's geometry: does the step size collapse the network? (issue 17)

The Figure 3 network (AlexNet tower, pair head; narrow: `--width` channels for conv1 instead of 96, the
others scaled alike, and `--fc` units in fc6/fc7/fc8 instead of 4096) trains on synthetic images at the
paper's geometry: 96 px patches, gap 48, jitter 7, 4 grids per image, at most 512 patches per batch
(~2,300 pairs), colour projection, RMS 50, the summed loss. Each recipe starts from the same Xavier
init and sees the same batches. Every `--log-every` steps it prints the loss and the live ReLU share
after fc6, fc7 and fc8 and the fc8/fc9 weight norms (ctxrepro.pretext.monitor), and writes all rows as
JSON. Recipes:

- released: SGD lr 1e-5, momentum 0 (deepcontext's solver), summed loss;
- paper-0.999: SGD lr 1e-5, momentum 0.999, summed loss (the paper profile before issue 17);
- 0.999-lr1e-8: SGD lr 1e-8, momentum 0.999 (the same steady-state step as `released`).

The images are smooth random fields (sums of upsampled noise at four octaves), so neighbouring
patches continue each other and relative position is learnable; no data set is needed.

    nice -n 10 python bench/recipe_bench.py --out /tmp/recipe.json   # 2 recipes x 300 steps: ~7 min on an idle core
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ctxrepro.pretext.color import PatchAugment, preprocess
from ctxrepro.pretext.data import BatchSpec
from ctxrepro.pretext.engine import OptimConfig, TrainConfig, build_optimizer, train_step
from ctxrepro.pretext.model import ContextNet
from ctxrepro.pretext.monitor import Monitor
from ctxrepro.pretext.sampling import batch_pairs, cut_patches_batch, sample_grid
from synthetic import smooth_field  # bench/ (the script's folder)

RECIPES = {
    "released": OptimConfig("sgd", lr=1e-5, momentum=0.0, loss="sum"),
    "paper-0.999": OptimConfig("sgd", lr=1e-5, momentum=0.999, loss="sum"),
    "0.999-lr1e-8": OptimConfig("sgd", lr=1e-8, momentum=0.999, loss="sum"),
}
SIZE = (474, 632)  # 299,568 pixels: the middle of the paper's [150K, 450K]


def smooth_images(n: int, g: torch.Generator) -> list[torch.Tensor]:
    """n (3, H, W) uint8 images: colour noise at 4 octaves, upsampled and summed (`synthetic.smooth_field`)."""
    return [torch.from_numpy(smooth_field(*SIZE, g)).permute(2, 0, 1) for _ in range(n)]


def make_batch(images: list[torch.Tensor], spec: BatchSpec, g: torch.Generator):
    """One batch by the released rule: images, 4 grids each, until 512 patches would be passed."""
    crops, boxes, pairs, labels, counts, total = [], [], [], [], [], 0
    while True:
        image = images[int(torch.randint(len(images), (1,), generator=g))]
        grids = [sample_grid(SIZE[0], SIZE[1], g, spec.patch, spec.gap, spec.jitter) for _ in range(4)]
        kept = []
        for grid in grids:
            if total + len(grid[0]) > spec.max_patches:
                break
            kept.append(grid)
            total += len(grid[0])
        if kept:
            crops.append(image)
            boxes.append(torch.cat([b for b, _, _ in kept]))
            pairs += [p for _, p, _ in kept]
            labels += [lab for _, _, lab in kept]
            counts += [len(b) for b, _, _ in kept]
        if len(kept) < len(grids):
            break
    return cut_patches_batch(crops, boxes, spec.patch), batch_pairs(pairs, counts), torch.cat(labels)


def run(name: str, optim: OptimConfig, args, images) -> list[dict]:
    cfg = TrainConfig(data=BatchSpec(), augment=PatchAugment.for_patch(96, color="projection"), optim=optim)
    torch.manual_seed(0)
    model = ContextNet("alexnet", 96, width=args.width, fc_dim=args.fc)
    optimizer = build_optimizer(model.parameters(), optim)
    monitor = Monitor(model)
    g, aug = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    rows, window, start = [], [], time.monotonic()
    for step in range(1, args.steps + 1):
        patches, pairs, labels = make_batch(images, cfg.data, g)
        x = preprocess(patches, aug, cfg.augment)
        loss, correct = train_step(model, optimizer, None, x, pairs, labels, cfg, "cpu", 1)
        window.append((float(loss) / len(labels), float(correct) / len(labels), len(x), len(labels)))
        if step % args.log_every == 0:
            stats = monitor.read()
            row = {"recipe": name, "step": step, "loss": sum(w[0] for w in window) / len(window),
                   "accuracy": sum(w[1] for w in window) / len(window), "patches": window[-1][2],
                   "pairs": window[-1][3], **{k: v for k, v in stats.items() if k.startswith("live_")},
                   "wnorm_fc8": stats["wnorm_fc8"], "wnorm_fc9": stats["wnorm_fc9"]}
            rows.append(row)
            window = []
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                  f"{time.monotonic() - start:.0f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--width", type=int, default=8, help="conv1 channels (paper 96)")
    parser.add_argument("--fc", type=int, default=256, help="fc6/fc7/fc8 units (paper 4096)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--recipes", nargs="+", default=["released", "paper-0.999"], choices=list(RECIPES))
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; width {args.width}, fc {args.fc}, {args.steps} steps", flush=True)
    images = smooth_images(args.images, torch.Generator().manual_seed(0))
    rows = [row for name in args.recipes for row in run(name, RECIPES[name], args, images)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
