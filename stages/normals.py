"""Fine-tune a converted trunk for NYUv2 surface normals and score it (section 4.4, Table 2); foreach init."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ctxrepro.config import BaseParams, param
from ctxrepro.data.nyu import SHAPE_HW
from ctxrepro.io import atomic_dir, atomic_write_json, atomic_write_text
from ctxrepro.metrics.normals import NormalsEvalError
from ctxrepro.normals.data import GT_SOURCES, ground_truth, load_images, load_train, open_nyu, scratch_dir, vocab_path
from ctxrepro.normals.depth import PlaneFit
from ctxrepro.normals.grid import cell_grid
from ctxrepro.normals.model import (KMEANS_SEED, TrainSettings, build_net, kmeans_codebook, load_vocab, predict_coarse,
                                    train_normals, trunk_output)
from ctxrepro.normals.report import evaluate_and_store, examples_png, table2_markdown
from ctxrepro.pretext.precision import AMP_CHOICES, describe
from ctxrepro.seeds import derive_seed
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.trunk import load_trunk

NYU_DIR = Path("data/raw/nyuv2")
TRUNKS = Path("models/convert")
PREDICTIONS = Path("data/normals")
SCRATCH = Path("data/normals/.inputs")  # <init>/: the run's input-size images, removed when it ends
STATE = Path("models/normals_state")  # <init>/<config hash>/last.pt: resume states, a `persist: true` out
METRICS = Path("metrics/normals")
PLOTS = Path("plots/normals")


@dataclass(frozen=True)
class Params:
    init: str = param("color_dropping-ours", refers="convert.rows",
                      help="models/convert/<init>.pt, a convert row (the foreach item)")
    rows: tuple[str, ...] = param(("color_dropping-scratch", "color_dropping-ours"), refers="convert.rows",
                                  help="dvc.yaml's foreach list: the convert rows Table 2 fine-tunes")
    gt_source: str = param("fair", choices=GT_SOURCES,
                           help="fair: the FAIR benchmark's normals (Table 2's protocol); depth: fitted to depth")
    codebook: str = param("vocab", choices=("vocab", "kmeans"),
                          help="vocab: the FAIR benchmark's vocab40.mat (Table 2's); kmeans: on training normals")
    clusters: int = param(40, min=2, max=1000, help="k-means codewords (FAIR benchmark: 40)")
    kmeans_iters: int = param(20, min=1, help="spherical k-means iterations")
    kmeans_samples: int = param(2000, min=1, help="valid training normals sampled per image for k-means")
    input_height: int = param(480, min=16, help="network input height (NYUv2 frames are 480)")
    input_width: int = param(640, min=16, help="network input width (NYUv2 frames are 640)")
    min_valid: float = param(0.5, min=0.0, max=1.0, help="fraction of a grid cell with ground truth to train on it")
    head_channels: int = param(512, min=1, help="channels of the head's 3x3 conv")
    steps: int = param(20000, min=1, help="fine-tuning steps")
    batch: int = param(16, min=1, help="images per step")
    optimizer: str = param("sgd", choices=("sgd", "adam"), help="sgd: Caffe-era fine-tuning")
    lr: float = param(1e-3, min=0.0, help="learning rate of the head")
    trunk_lr_mult: float = param(1.0, min=0.0, help="the trunk's learning rate relative to the head's")
    momentum: float = param(0.9, min=0.0, max=0.9999, help="SGD momentum")
    weight_decay: float = param(5e-4, min=0.0, help="weight decay")
    flip: bool = param(True, help="random horizontal flips (x of the target normals changes sign)")
    log_every: int = param(100, min=1, help="steps between loss log lines")
    checkpoint_every: int = param(1000, min=1, help="steps between resumable checkpoints")
    eval_batch: int = param(8, min=1, help="test images per forward pass")
    examples: int = param(4, min=1, max=32, help="test images in the PNG")
    depth_fit: PlaneFit = param(PlaneFit(), help="plane fit for normals from depth (ctxrepro.normals.depth)")
    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast in training and test (CUDA, or a CPU with native "
                                                       "bf16); none = float32")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.init):
            raise ValueError(f"init={self.init!r}: expected a plain name like 'color_dropping-ours'")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_height, self.input_width

    def settings(self, seed: int) -> TrainSettings:
        return TrainSettings(self.steps, self.batch, self.optimizer, self.lr, self.trunk_lr_mult, self.momentum,
                             self.weight_decay, self.flip, seed, self.log_every, self.checkpoint_every, self.amp)


def state_records(p: Params, base: BaseParams) -> dict[str, dict]:
    """The params part of every init's resume-state record (`ctxrepro states`; the weights and data digests
    are not compared there)."""
    return {"normals": asdict(p.settings(base.seed))}


def _codebook(p: Params, nyu_dir: Path, sample: np.ndarray, seed: int, log) -> tuple[np.ndarray, str]:
    """vocab40.mat (FAIR benchmark) or spherical k-means of the sampled training normals; (codebook, name)."""
    vocab = vocab_path(nyu_dir)
    if p.codebook == "vocab":
        if not vocab.is_file():
            raise FileNotFoundError(f"{vocab} not found: fetch nyuv2 with its normals zip, or normals.codebook=kmeans")
        book = load_vocab(vocab)
        log.info("codebook: %s (%d codewords)", vocab, len(book))
        return book, "vocab"
    log.info("codebook: spherical k-means, %d clusters on %d training normals", p.clusters, len(sample))
    return kmeans_codebook(sample, p.clusters, p.kmeans_iters, derive_seed(seed, KMEANS_SEED, 1)), "kmeans"


def _fine_tune(p: Params, ctx: StageContext, nyu, train_idx, gt, nyu_dir: Path, scratch: Path):
    """Load the trunk, build the training set and codebook, fine-tune; (net, codebook, stats)."""
    trunk_path = ctx.root / TRUNKS / f"{p.init}.pt"
    trunk = load_trunk(trunk_path, ctx.device)
    channels, h, w = trunk_output(trunk, p.input_size, ctx.device)
    ctx.log.info("trunk %s: %dx%d input -> %d channels on a %dx%d grid; precision: %s", trunk_path, *p.input_size,
                 channels, h, w, describe(ctx.device, p.amp))
    grid = cell_grid(trunk.layers(), p.input_size, SHAPE_HW)
    if grid.shape != (h, w):
        raise ValueError(f"the trunk's layer geometry gives a {grid.shape} grid, its forward pass {(h, w)}")
    ctx.log.info("cells centred at y = %.1f + %.1f i, x = %.1f + %.1f j frame px (receptive-field centres)",
                 grid.ys[0], grid.step[0], grid.xs[0], grid.step[1])
    data, sample = load_train(nyu, gt, train_idx, p.input_size, grid, p.min_valid, p.kmeans_samples,
                              derive_seed(ctx.base.seed, KMEANS_SEED, 0), ctx.log, scratch)
    book, book_name = _codebook(p, nyu_dir, sample, ctx.base.seed, ctx.log)
    ctx.log.info("targets: %.1f%% of training grid cells have ground truth", 100.0 * data.valid.mean())
    net = build_net(trunk, channels, p.head_channels, len(book), ctx.base.seed)
    stats = train_normals(net, data, book, p.settings(ctx.base.seed), ctx.device, ctx.log,
                          ctx.root / STATE / p.init)
    return net, book, grid, {**stats, "codebook": book_name, "grid": (h, w)}


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    nyu_dir = ctx.root / NYU_DIR
    try:
        nyu, train_idx, test_idx = open_nyu(nyu_dir)
        with nyu, scratch_dir(ctx.root / SCRATCH / params.init) as scratch:
            gt, gt_name = ground_truth(nyu_dir, params.gt_source, nyu, params.depth_fit)
            ctx.log.info("NYUv2: %d train / %d test images, ground truth from %s", len(train_idx), len(test_idx),
                         gt_name)
            net, book, grid, stats = _fine_tune(params, ctx, nyu, train_idx, gt, nyu_dir, scratch)
            coarse = predict_coarse(net, load_images(nyu, test_idx, params.input_size, ctx.log, scratch), book,
                                    params.eval_batch, ctx.device, params.amp)
            pred_path = ctx.root / PREDICTIONS / params.init / "predictions.npz"
            result = evaluate_and_store(coarse, test_idx, gt, nyu.image, grid, pred_path, params.examples)
    except (FileNotFoundError, KeyError, ValueError, NormalsEvalError, FloatingPointError) as e:
        raise StageError(f"normals ({params.init}): {e}") from e
    m = result.metrics
    ctx.log.info("%s: mean %.2f median %.2f rmse %.2f within 11.25/22.5/30: %.1f/%.1f/%.1f", params.init,
                 m["mean"], m["median"], m["rmse"], m["within_11.25"], m["within_22.5"], m["within_30"])
    note = (f"This run: init `{params.init}`, {len(train_idx)} train / {len(test_idx)} test images, ground truth "
            f"`{gt_name}`, codebook `{stats['codebook']}` ({len(book)}), input {params.input_height}x"
            f"{params.input_width}, grid {stats['grid'][0]}x{stats['grid'][1]} (cells centred at y = "
            f"{grid.ys[0]:.1f} + {grid.step[0]:.1f} i, x = {grid.xs[0]:.1f} + {grid.step[1]:.1f} j px of the "
            f"480x640 frame), {params.steps} steps.")
    with atomic_dir(ctx.root / PLOTS / params.init) as out:
        atomic_write_text(out / "table2.md", table2_markdown([(f"{params.init} (this run)", m)], note))
        examples_png(out / "examples.png", result.examples, f"NYUv2 normals, init {params.init}")
    atomic_write_json(ctx.root / METRICS / f"{params.init}.json", {
        **m, "test_images": len(test_idx), "train_images": len(train_idx), "steps": stats["steps"],
        "train_loss": stats["train_loss"], "train_seconds": stats["train_seconds"],
        "gt_source": gt_name, "codebook": stats["codebook"], "codebook_size": len(book),
        "seconds": round(time.monotonic() - start, 2)})
