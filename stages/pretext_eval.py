"""Pretext-task accuracy on unseen images, inside object boxes, per class, and train vs held-out (section 4.6)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ctxrepro import viz
from ctxrepro.analysis import pretext_eval as E
from ctxrepro.config import param
from ctxrepro.data.voc import load_split
from ctxrepro.io import atomic_write_json
from ctxrepro.pretext.data import load_kinds, load_table
from ctxrepro.pretext.precision import AMP_CHOICES
from ctxrepro.seeds import generator
from ctxrepro.stage import StageContext, StageError

VOC07 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
MANIFEST = Path("data/resized/manifest.csv")
WORLD_INDEX = Path("data/raw/world_index.json")
MODEL = Path("models/pretrain")  # <variant>.pt, one per pretraining variant
METRICS = Path("metrics/pretext_eval.json")
PLOTS = Path("plots/pretext_eval")
RESULTS = Path("results/pretext_eval")
# seed purposes of the selections (one stream per set)
PICK, VOC_PAIRS, BOX_PAIRS, TRAIN_PAIRS, HELDOUT_PAIRS = 0, 1, 2, 3, 4
# Figure 2's labels 0..7, named by where the second patch lies (confusion-matrix axes)
POSITIONS = ("0 UL", "1 U", "2 UR", "3 L", "4 R", "5 DL", "6 D", "7 DR")


@dataclass(frozen=True)
class Params:
    variant: str = param("color_dropping", help="models/pretrain/<variant>.pt to read (the paper: colour dropping)")
    voc_split: str = param("test", choices=("train", "val", "trainval", "test"), help="VOC 2007 image set")
    n_images: int = param(500, min=1, help="random VOC images (section 4.6: 500)")
    pairs_per_image: int = param(256, min=1, help="pairs per image (section 4.6: 256)")
    min_box_side: int = param(0, min=0, help="smallest box side; 0 = 2 * patch + gap (section 4.6: 240 at 96/48)")
    pairs_per_box: int = param(256, min=1, help="pairs per eligible box (paper: not stated)")
    manifest_images: int = param(500, min=1, help="pretraining (train) and held-out (val) images each")
    max_patches: int = param(512, min=4, help="patches per forward pass")
    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast of the network (CUDA, or a CPU with native bf16); "
                                                       "none = float32")
    profile_note: str = param("", help="what this profile scales down from the paper, copied to the metrics")


def _choose(n_total: int, n: int, seed: int, purpose: int) -> list[int]:
    """A seeded choice of min(n, n_total) indices, sorted."""
    return sorted(torch.randperm(n_total, generator=generator(seed, E.EVAL_PAIRS, PICK, purpose))[:n].tolist())


def _loader(paths: list[Path], sizes: list[tuple[int, int]]) -> Callable[[int], torch.Tensor]:
    def load(i: int) -> torch.Tensor:
        image = E.read_rgb(paths[i])
        if tuple(image.shape[1:]) != sizes[i]:
            raise ValueError(f"{paths[i]} is {image.shape[2]}x{image.shape[1]}, but its annotation/manifest "
                             f"says {sizes[i][1]}x{sizes[i][0]}")
        return image

    return load


def _voc_sets(p: Params, pre: E.Pretrained, root: Path, seed: int, min_box: int):
    """(paths, sizes, whole-image selections, in-box selections) on VOC 2007."""
    samples = load_split(root / VOC07, p.voc_split)
    if not samples:
        raise ValueError(f"{root / VOC07}: image set {p.voc_split!r} is empty")
    paths = [s.image for s in samples]
    sizes = [(s.annotation.height, s.annotation.width) for s in samples]
    chosen = _choose(len(samples), p.n_images, seed, VOC_PAIRS)
    whole = E.select_images([sizes[i] for i in chosen], p.pairs_per_image, seed, VOC_PAIRS, pre.patch, pre.gap,
                            pre.jitter)
    whole = [dataclasses.replace(s, image=chosen[s.image]) for s in whole]
    regions = []
    for i, s in enumerate(samples):  # boxes of every image of the split: per-class counts need them
        h, w = sizes[i]
        for y0, x0, bh, bw, name in E.eligible_boxes(s.annotation.objects, min_box):
            regions.append((i, y0, x0, min(bh, h - y0), min(bw, w - x0), name))
    boxes = E.select_regions(regions, p.pairs_per_box, seed, BOX_PAIRS, pre.patch, pre.gap, pre.jitter)
    return paths, sizes, whole, boxes, len(chosen) - len(whole), len(regions)


def _manifest_set(p: Params, pre: E.Pretrained, root: Path, split: str, purpose: int, seed: int):
    """(paths, sizes, selections grouped by world kind) on a data/resized split."""
    kinds = load_kinds(root / WORLD_INDEX) if (root / WORLD_INDEX).is_file() else None
    table = load_table(root / MANIFEST, split, kinds)
    chosen = _choose(len(table), p.manifest_images, seed, purpose)
    paths = [table.path(i) for i in chosen]
    sizes = [(int(table.heights[i]), int(table.widths[i])) for i in chosen]
    sel = E.select_images(sizes, p.pairs_per_image, seed, purpose, pre.patch, pre.gap, pre.jitter)
    names = table.group_names
    return paths, sizes, [dataclasses.replace(s, group=names[table.groups[chosen[s.image]]]) for s in sel]


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _rows(name: str, paths: list[Path], root: Path, sel: list[E.Selection], preds: list[torch.Tensor]) -> list:
    """The recorded selection: one row per pair with its image (relative to the repo root) and prediction."""
    rows = []
    for s, pr in zip(sel, preds):
        rel = _rel(Path(paths[s.image]), root)
        rows += [[name, rel, *r[1:], q, s.group] for r, q in zip(s.rows(), pr.tolist())]
    return rows


def _evaluate(p: Params, ctx: StageContext, pre: E.Pretrained, min_box: int):
    """Select and classify every set: results {set: (selections, predictions)}, paths {set: image paths}."""
    seed = ctx.base.seed

    def predict(sel: list[E.Selection], load: Callable, desc: str) -> list[torch.Tensor]:
        return E.predict_selections(pre, sel, load, ctx.device, seed, p.max_patches, desc, ctx.log, p.amp)

    paths, sizes, whole, boxes, n_small, n_boxes = _voc_sets(p, pre, ctx.root, seed, min_box)
    if n_small:
        ctx.log.warning("%d chosen VOC images are too small for a grid of %d px patches: skipped", n_small,
                        pre.patch)
    load = _loader(paths, sizes)
    results = {"voc": (whole, predict(whole, load, "VOC pairs")), "boxes": (boxes, predict(boxes, load, "box pairs"))}
    all_paths = {"voc": paths, "boxes": paths}
    for name, split, purpose in (("train", "train", TRAIN_PAIRS), ("heldout", "val", HELDOUT_PAIRS)):
        m_paths, m_sizes, sel = _manifest_set(p, pre, ctx.root, split, purpose, seed)
        results[name] = (sel, predict(sel, _loader(m_paths, m_sizes), f"{name} pairs"))
        all_paths[name] = m_paths
    return results, all_paths, n_small, n_boxes


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    try:
        pre = E.load_pretrained(ctx.root / MODEL / f"{params.variant}.pt", ctx.device)
        min_box = params.min_box_side or 2 * pre.patch + pre.gap
        results, paths, n_small, n_boxes = _evaluate(params, ctx, pre, min_box)
    except (OSError, ValueError) as e:  # missing inputs, unreadable images, malformed annotations: say which
        raise StageError(f"pretext_eval: {e}") from e
    _write_outputs(params, ctx, pre, results, paths, min_box, n_small, n_boxes, time.monotonic() - start)


def _write_outputs(p: Params, ctx: StageContext, pre: E.Pretrained, results: dict, paths: dict, min_box: int,
                   n_small: int, n_boxes: int, seconds: float) -> None:
    sel, preds = results["voc"]
    actual = torch.cat([s.labels for s in sel]).numpy() if sel else np.zeros(0, np.int64)
    predicted = torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)
    counts = E.confusion_counts(actual, predicted)
    plots = ctx.root / PLOTS
    viz.write_csv(plots / "confusion.csv", ["actual", "predicted"], list(zip(actual.tolist(), predicted.tolist())))
    acc, n_pairs = E.accuracy(sel, preds)
    viz.plot_confusion(plots / "confusion.png", counts, POSITIONS,
                       f"pretext positions on VOC07 {p.voc_split}: accuracy {acc:.3f} (chance 0.125)")
    rows = [r for name, (s, pr) in results.items() for r in _rows(name, paths[name], ctx.root, s, pr)]
    viz.write_csv(ctx.root / RESULTS / "pairs.csv",
                  ["set", "image", "y1", "x1", "y2", "x2", "label", "predicted", "group"], rows)
    metrics = _metrics(p, pre, results, acc, n_pairs, min_box, n_small, n_boxes, counts)
    metrics["seconds"] = round(seconds, 1)
    atomic_write_json(ctx.root / METRICS, metrics)
    ctx.log.info("pretext accuracy %s on %d VOC pairs, %s in boxes, train %s / held-out %s (chance 0.125)",
                 *(metrics[k] for k in ("accuracy", "n_pairs", "accuracy_in_boxes", "accuracy_train_images",
                                        "accuracy_heldout_images")))


def _finite(x: float) -> float | None:
    return None if x != x else round(x, 6)  # NaN (no pairs) -> null: JSON has no NaN


def _metrics(p: Params, pre: E.Pretrained, results: dict, acc: float, n_pairs: int, min_box: int, n_small: int,
             n_boxes: int, counts: np.ndarray) -> dict:
    box_acc, box_pairs = E.accuracy(*results["boxes"])
    per_class = E.accuracy_by_group(*results["boxes"])
    train_acc, train_pairs = E.accuracy(*results["train"])
    held_acc, held_pairs = E.accuracy(*results["heldout"])
    out = {
        "accuracy": _finite(acc), "n_images": len(results["voc"][0]), "n_images_too_small": n_small,
        "n_pairs": n_pairs, "chance": E.CHANCE,
        "accuracy_in_boxes": _finite(box_acc), "n_pairs_in_boxes": box_pairs, "n_boxes": n_boxes,
        "min_box_side": min_box,
        "accuracy_per_class": {k: _finite(a) for k, (a, _) in per_class.items()},
        "n_pairs_per_class": {k: n for k, (_, n) in per_class.items()},
        "accuracy_train_images": _finite(train_acc), "n_pairs_train_images": train_pairs,
        "accuracy_heldout_images": _finite(held_acc), "n_pairs_heldout_images": held_pairs,
        "accuracy_per_position": {str(i): _finite(counts[i, i] / counts[i].sum()) if counts[i].sum() else None
                                  for i in range(8)},
        "model": {"step": pre.step, "patch": pre.patch, "gap": pre.gap, "jitter": pre.jitter, "color": pre.color},
    }
    for name in ("train", "heldout"):
        groups = E.accuracy_by_group(*results[name])
        if len(groups) > 1:  # the tiny world's image kinds: photos probe transfer, procedural scenes overfitting
            out[f"accuracy_{name}_images_by_kind"] = {k: _finite(a) for k, (a, _) in groups.items()}
    if p.profile_note:
        out["profile_note"] = p.profile_note
    return out
