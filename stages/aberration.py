"""Regress a patch's absolute (x, y) from its pixels: raw vs colour projection vs no-aberration control (section 4.2, Figure 5)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctxrepro import viz
from ctxrepro.analysis import aberration as A
from ctxrepro.config import param
from ctxrepro.io import atomic_write_json
from ctxrepro.pretext.color import project_colors
from ctxrepro.pretext.data import load_table
from ctxrepro.pretext.export import read_rgb
from ctxrepro.pretext.precision import AMP_CHOICES
from ctxrepro.seeds import generator
from ctxrepro.stage import StageContext, StageError

MANIFEST = Path("data/resized/manifest.csv")
METRICS = Path("metrics/aberration.json")
PLOTS = Path("plots/aberration")
TRAIN_KEY, TEST_KEY, PICK = 420, 421, 422  # world streams / seed purposes of this stage
SPLIT_KEYS = {"train": 0, "val": 1}
FIGURE_SCALE = 0.6  # Figure 5's patches drawn at 60% so that neighbours on the grid do not hide each other


@dataclass(frozen=True)
class Params:
    source: str = param("world", choices=("world", "images"),
                        help="world: render tiny-world scenes with and without aberration (control); "
                             "images: data/resized train/val (no control)")
    train_images: int = param(240, min=1, help="images the regressor trains on")
    test_images: int = param(100, min=1, help="images it is evaluated on (the top 10% are ranked among these)")
    patches_per_image: int = param(64, min=1, help="random training patches per training image")
    grid: int = param(5, min=1, help="evaluation patches per test image: grid x grid, one grid for all images")
    margin: float = param(0.0, min=0.0, max=0.49, help="grid margin as a fraction; 0 = smallest that fits")
    top_fraction: float = param(0.1, min=0.001, max=1.0, help="best images reported (section 4.2: 10%)")
    image_size: int = param(256, min=64, help="world source: scene size (as fetch.world.image_size)")
    aberration_scale: float = param(0.98, min=0.9, max=1.0,
                                    help="world source: green scale (as fetch.world.aberration_scale)")
    tower: str = param("small", choices=("small", "alexnet"), help="regressor tower (model.TOWERS)")
    patch: int = param(32, min=8, help="patch side in px")
    width: int = param(16, min=0, help="tower channel scale; 0 = the tower's default")
    fc_dim: int = param(64, min=1, help="fc6 size before the (x, y) output")
    steps: int = param(600, min=1, help="Adam steps per regressor")
    batch: int = param(128, min=1, help="patches per step")
    lr: float = param(1e-3, min=0.0, help="Adam learning rate")
    threads: int = param(1, min=0, help="torch CPU threads; 0 = torch's default")
    figure_images: int = param(3, min=1, help="rows of the Figure 5 PNG (best images by raw RMSE)")
    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast of the regressors (a CPU with native bf16); "
                                                       "none = float32")
    profile_note: str = param("", help="what this profile scales down from the paper, copied to the metrics")


class _Files(Sequence):
    """Images decoded on access: training images are cut into patches one at a time, never all held."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_rgb(self.paths[i])


def _manifest_images(root: Path, split: str, n: int, patch: int, seed: int) -> _Files:
    """A seeded choice of n images of a data/resized split that hold a patch (sorted by path)."""
    table = load_table(root / MANIFEST, split)
    fits = np.flatnonzero((table.heights >= patch) & (table.widths >= patch))
    order = torch.randperm(len(fits), generator=generator(seed, PICK, SPLIT_KEYS[split]))[:n]
    return _Files([table.path(int(fits[i])) for i in sorted(order.tolist())])


def _images(p: Params, ctx: StageContext) -> dict[str, Sequence[torch.Tensor]]:
    seed = ctx.base.seed
    if p.source == "world":
        scale = p.aberration_scale
        return {"train": A.render_world_images(p.train_images, seed, TRAIN_KEY, p.image_size, scale),
                "test": A.render_world_images(p.test_images, seed, TEST_KEY, p.image_size, scale),
                "train_control": A.render_world_images(p.train_images, seed, TRAIN_KEY, p.image_size, None),
                "test_control": A.render_world_images(p.test_images, seed, TEST_KEY, p.image_size, None)}
    try:
        test = _manifest_images(ctx.root, "val", p.test_images, p.patch, seed)
        return {"train": _manifest_images(ctx.root, "train", p.train_images, p.patch, seed),
                "test": [test[i] for i in range(len(test))]}  # held: the figure draws some of them
    except (OSError, ValueError) as e:
        raise StageError(str(e)) from e


def _config(p: Params, seed: int, color: str) -> A.RegressorConfig:
    return A.RegressorConfig(tower=p.tower, patch=p.patch, width=p.width or None, fc_dim=p.fc_dim, color=color,
                             steps=p.steps, batch=p.batch, lr=p.lr, seed=seed, amp=p.amp)


def _variant(name: str, train: A.PatchSet, test: A.PatchSet, n_test: int, p: Params, color: str,
             ctx: StageContext):
    """Train one regressor and evaluate it: (model, predictions, summary)."""
    model = A.train_regressor(train, _config(p, ctx.base.seed, color), ctx.log, name)
    pred, summary = A.evaluate(model, test, n_test, color, p.top_fraction, p.amp)
    ctx.log.info("%s: RMSE all %.3f, best %g%% %.3f (chance %.3f)", name, summary["rmse_all"],
                 100 * p.top_fraction, summary["rmse_top"], summary["rmse_chance"])
    return model, pred, summary


def _figure(path: Path, images: list, test: A.PatchSet, preds: dict, rows: list[int], footer: str) -> None:
    """Figure 5: image | its patches at their true positions | predicted (raw) | predicted (projected,
    patches shown after projection)."""
    tile, cells = 200, []
    for i in rows:
        im = images[i]
        h, w = int(im.shape[1]), int(im.shape[2])
        sel = (test.image == i).nonzero().flatten()
        raw = test.patches[sel]
        shown = project_colors(raw.float()).clamp(0, 255).round().to(torch.uint8)
        truth = viz.paste_patches(h, w, raw, test.targets[sel].numpy(), FIGURE_SCALE)
        pr = viz.paste_patches(h, w, raw, preds["raw"][sel].numpy(), FIGURE_SCALE)
        pp = viz.paste_patches(h, w, shown, preds["projected"][sel].numpy(), FIGURE_SCALE)
        # a grey frame marks each canvas's image bounds (the canvases are white)
        cells.append([viz.letterbox(viz.frame(viz.to_hwc(x), viz.GREY, 2), tile) for x in (im, truth, pr, pp)])
    image = viz.grid(cells, tile)
    labels = ("input image", "patches (true position)", "predicted: raw", "predicted: after projection")
    viz.save_annotated(path, image, "Figure 5: absolute (x, y) regressed from each patch (section 4.2)",
                       list(zip(viz.column_centres(4, tile), labels)), footer=footer)


def _sorted_rmse_rows(summaries: dict) -> list:
    """Per-image RMSE of each variant, each sorted ascending, by rank (a DVC line plot)."""
    cols = {name: np.sort(s["per_image_rmse"].numpy()) for name, s in summaries.items()}
    n = len(next(iter(cols.values())))
    chance = summaries["raw"]["rmse_chance"]
    return [[r + 1, *(round(float(cols[name][r]), 5) for name in cols), round(chance, 5)] for r in range(n)]


def _study(p: Params, images: dict, fractions: torch.Tensor, ctx: StageContext) -> tuple[A.PatchSet, dict, dict]:
    """Raw and projected regressors on the aberrated images; on the world source, the control regressor
    on the same scenes without aberration, and the raw regressor evaluated there too."""
    seed, n_test = ctx.base.seed, len(images["test"])
    train = A.random_patches(images["train"], p.patches_per_image, p.patch, seed)
    test = A.grid_patches(images["test"], p.patch, fractions)
    models, preds, summaries = {}, {}, {}
    for name, color in (("raw", "none"), ("projected", "projection")):
        models[name], preds[name], summaries[name] = _variant(name, train, test, n_test, p, color, ctx)
    if "train_control" in images:
        train_c = A.random_patches(images["train_control"], p.patches_per_image, p.patch, seed)
        test_c = A.grid_patches(images["test_control"], p.patch, fractions)
        _, preds["control"], summaries["control"] = _variant("control", train_c, test_c, n_test, p, "none", ctx)
        _, summaries["raw_on_control"] = A.evaluate(models["raw"], test_c, n_test, "none", p.top_fraction, p.amp)
    return test, preds, summaries


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    if params.threads:
        torch.set_num_threads(params.threads)  # tiny nets: one uncontended thread beats two contended ones
    images = _images(params, ctx)
    sizes = [tuple(int(s) for s in im.shape[1:]) for im in images["test"]]
    try:
        margin = params.margin or A.min_margin(sizes, params.patch)
        test, preds, summaries = _study(params, images, A.grid_fractions(params.grid, margin), ctx)
    except ValueError as e:
        raise StageError(f"aberration: {e}") from e
    n_test = len(images["test"])
    metrics = _metrics(params, summaries, margin, n_test, len(images["train"]), time.monotonic() - start)
    plots = ctx.root / PLOTS
    curves = {k: v for k, v in summaries.items() if k in ("raw", "projected", "control")}
    viz.write_csv(plots / "sorted_rmse.csv", ["rank", *curves, "chance"], _sorted_rmse_rows(curves))
    rows = summaries["raw"]["best"][: params.figure_images].tolist()
    footer = (f"best {len(rows)} of {n_test} test images by raw RMSE; RMSE best {100 * params.top_fraction:g}%: "
              f"raw {metrics['rmse_top10']:.3f}, projected {metrics['rmse_top10_projected']:.3f}, "
              f"chance {metrics['rmse_chance']:.3f}")
    _figure(plots / "figure5.png", images["test"], test, preds, rows, footer)
    atomic_write_json(ctx.root / METRICS, metrics)
    ctx.log.info("aberration: done in %.0f s", time.monotonic() - start)


def _metrics(p: Params, summaries: dict, margin: float, n_test: int, n_train: int, seconds: float) -> dict:
    raw, proj = summaries["raw"], summaries["projected"]
    out = {"rmse_top10": raw["rmse_top"], "rmse_all": raw["rmse_all"],
           "rmse_top10_projected": proj["rmse_top"], "rmse_all_projected": proj["rmse_all"],
           "rmse_chance": raw["rmse_chance"], "top_fraction": p.top_fraction, "top_images": len(raw["best"]),
           "n_train_images": n_train, "n_test_images": n_test, "n_train_patches": n_train * p.patches_per_image,
           "n_test_patches": n_test * p.grid * p.grid, "grid": p.grid, "margin": margin, "source": p.source,
           "steps": p.steps, "seconds": round(seconds, 1)}
    if "control" in summaries:
        out.update(rmse_top10_control=summaries["control"]["rmse_top"],
                   rmse_all_control=summaries["control"]["rmse_all"],
                   rmse_top10_raw_on_control=summaries["raw_on_control"]["rmse_top"])
    else:
        out["control_note"] = "no control: source=images has no aberration-free rendering of the same scenes"
    if p.source == "world":
        out["aberration_scale"] = p.aberration_scale
    if p.profile_note:
        out["profile_note"] = p.profile_note
    return out
