"""Nearest-neighbour patches by normalised correlation of fc6: pretrained vs random vs ImageNet (section 4.1, Figure 4)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctxrepro import viz
from ctxrepro.analysis import retrieval as R
from ctxrepro.config import param
from ctxrepro.data.voc import VOC_CLASSES, load_split
from ctxrepro.io import atomic_write_json
from ctxrepro.pretext.export import Pretrained, load_pretrained, read_rgb
from ctxrepro.pretext.sampling import cut_patches
from ctxrepro.seeds import generator
from ctxrepro.pretext.precision import AMP_CHOICES
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.imagenet import parse_source

VOC07 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
MODEL = Path("models/pretrain")  # <variant>.pt, one per pretraining variant
METRICS = Path("metrics/nn.json")
PLOTS = Path("plots/nn")
RESULTS = Path("results/nn")
LABELS = (R.BACKGROUND, *VOC_CLASSES)  # label 0 = background, 1.. = the devkit's class order
PICK, POOL, QUERY, SHOW = 0, 1, 2, 3  # seed purposes under retrieval.NN_SEED
TITLES = {"pretrained": "ours: pretrained fc6", "random": "random weights fc6", "imagenet": "ImageNet AlexNet fc7"}
TILE = 64


@dataclass(frozen=True)
class Params:
    variant: str = param("color_dropping", help="models/pretrain/<variant>.pt to read (the paper: colour dropping)")
    voc_split: str = param("test", choices=("train", "val", "trainval", "test"), help="VOC 2007 image set")
    images: int = param(0, min=0, help="images to draw patches from; 0 = the whole image set")
    n_queries: int = param(1000, min=1, help="random query patches (section 4.1: 1000)")
    pool_per_image: int = param(20, min=1, help="random candidate patches per image (paper: not stated)")
    k: int = param(10, min=1, help="neighbours per query for precision@k")
    min_overlap: float = param(0.5, min=0.0, max=1.0,
                               help="a patch takes a box's class when the box covers at least this part of it")
    chunk: int = param(2048, min=1, help="patches embedded and scored at once (bounds memory)")
    imagenet_weights: str = param("", help="'torchvision' (its AlexNet_Weights.IMAGENET1K_V1, downloaded once), "
                                  "'random:alexnet' (untrained, the smoke profile) or a torchvision AlexNet state "
                                  "dict file; empty = skip")
    imagenet_input: int = param(224, min=64, help="side the patches are upsampled to for that net")
    show_queries: int = param(8, min=1, help="montage rows")
    show_k: int = param(5, min=1, help="matches shown per feature source")
    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast of the network (CUDA, or a CPU with native bf16); "
                                                       "none = float32")
    profile_note: str = param("", help="what this profile scales down from the paper, copied to the metrics")


def _objects(sample) -> list[tuple[int, int, int, int, int]]:
    """(y0, x0, height, width, label) of every annotated object, 0-based."""
    out = []
    for o in sample.annotation.objects:
        if o.name not in VOC_CLASSES:
            raise ValueError(f"{sample.image}: object class {o.name!r} is not a VOC class")
        b = o.bndbox
        out.append((b.ymin - 1, b.xmin - 1, b.ymax - b.ymin + 1, b.xmax - b.xmin + 1, 1 + VOC_CLASSES.index(o.name)))
    return out


def _tables(p: Params, samples: list, patch: int, seed: int) -> tuple[R.PatchTable, R.PatchTable]:
    """Pool (pool_per_image per image) and queries (images drawn uniformly), each ordered by image."""
    pool, queries = [], []
    q_images = torch.randint(len(samples), (p.n_queries,), generator=generator(seed, R.NN_SEED, QUERY))
    q_counts = torch.bincount(q_images, minlength=len(samples)).tolist()
    for i, s in enumerate(samples):
        h, w = s.annotation.height, s.annotation.width
        objects = _objects(s)
        for table, n, purpose in ((pool, p.pool_per_image, POOL), (queries, q_counts[i], QUERY)):
            boxes = R.random_boxes(h, w, n, patch, generator(seed, R.NN_SEED, purpose, i))
            if len(boxes):
                table.append(R.PatchTable(torch.full((len(boxes),), i), boxes,
                                          R.label_patches(boxes, patch, objects, p.min_overlap)))
    return R.concat_tables(pool), R.concat_tables(queries)


def _sources(p: Params, pre: Pretrained, ctx: StageContext) -> tuple[dict, dict]:
    """Feature functions by name, and notes (the ImageNet net is skipped without a weights file)."""
    seed = ctx.base.seed
    sources = {"pretrained": R.context_features(pre, ctx.device, seed, p.amp),
               "random": R.context_features(R.random_network(pre, seed), ctx.device, seed, p.amp)}
    notes = {}
    if p.imagenet_weights:
        named = parse_source(p.imagenet_weights, "alexnet") is not None  # torchvision[:arch] / random[:arch]
        source = p.imagenet_weights if named else ctx.root / p.imagenet_weights
        net = R.load_imagenet_alexnet(source, ctx.device)
        sources["imagenet"] = R.imagenet_features(net, p.imagenet_input, p.amp)
    else:
        notes["imagenet"] = "skipped: nn.imagenet_weights is empty (nothing is downloaded)"
    return sources, notes


def _loader(samples: list):
    def load(i: int) -> torch.Tensor:
        image = read_rgb(samples[i].image)
        a = samples[i].annotation
        if tuple(image.shape[1:]) != (a.height, a.width):
            raise ValueError(f"{samples[i].image} is {image.shape[2]}x{image.shape[1]}, its annotation says "
                             f"{a.width}x{a.height}")
        return image

    return load


def run(params: Params, ctx: StageContext) -> None:
    start, seed = time.monotonic(), ctx.base.seed
    try:
        pre = load_pretrained(ctx.root / MODEL / f"{params.variant}.pt", ctx.device)
        samples = list(load_split(ctx.root / VOC07, params.voc_split))
        if params.images and params.images < len(samples):
            keep = torch.randperm(len(samples), generator=generator(seed, R.NN_SEED, PICK))[:params.images]
            samples = [samples[i] for i in sorted(keep.tolist())]
        if len(samples) < 2:
            raise ValueError(f"{ctx.root / VOC07}: need at least 2 images in {params.voc_split!r} (queries match "
                             f"patches of other images)")
        pool, queries = _tables(params, samples, pre.patch, seed)
        sources, notes = _sources(params, pre, ctx)
        load = _loader(samples)
        tops = R.nearest_neighbours(queries, pool, load, pre.patch, sources, params.k, params.chunk, ctx.device,
                                    ctx.log)
    except (OSError, ValueError) as e:
        raise StageError(f"nn: {e}") from e
    metrics = _metrics(params, queries, pool, tops, len(samples), notes)
    _write_matches(ctx.root / RESULTS / "matches.csv", samples, ctx.root, queries, pool, tops)
    shown = _shown_queries(queries, params.show_queries, seed)
    _montage(ctx.root / PLOTS / "montage.png", shown, queries, pool, tops, load, pre.patch, params.show_k, metrics)
    metrics["seconds"] = round(time.monotonic() - start, 1)
    atomic_write_json(ctx.root / METRICS, metrics)
    ctx.log.info("precision@%d: %s (label base rate %.3f)", params.k,
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics["precision_at_k"].items()), metrics["precision_chance"])


def _metrics(p: Params, queries: R.PatchTable, pool: R.PatchTable, tops: dict, n_images: int, notes: dict) -> dict:
    base = R.label_base_rate(queries.labels, queries.image, pool.labels, pool.image)
    obj = queries.labels > 0
    out = {"k": p.k, "n_queries": len(queries), "n_object_queries": int(obj.sum()), "n_pool": len(pool),
           "n_images": n_images, "min_overlap": p.min_overlap,
           "precision_chance": float(base.mean()),
           "precision_chance_objects": float(base[obj].mean()) if obj.any() else None,
           "precision_at_k": {}, "precision_at_k_objects": {}, "notes": notes}
    for name, top in tops.items():
        prec = R.precision_at_k(queries.labels, pool.labels[top.ids])
        out["precision_at_k"][name] = float(prec.mean())
        out["precision_at_k_objects"][name] = float(prec[obj].mean()) if obj.any() else None
    counts = torch.bincount(pool.labels, minlength=len(LABELS)).tolist()
    out["pool_labels"] = {LABELS[i]: c for i, c in enumerate(counts) if c}
    if p.profile_note:
        out["profile_note"] = p.profile_note
    return out


def _shown_queries(queries: R.PatchTable, n: int, seed: int) -> list[int]:
    """Montage rows: n queries drawn at random among those on objects (all queries if none is)."""
    candidates = torch.nonzero(queries.labels > 0).flatten()
    if len(candidates) == 0:
        candidates = torch.arange(len(queries))
    order = torch.randperm(len(candidates), generator=generator(seed, R.NN_SEED, SHOW))[:n]
    return candidates[order].tolist()


def _write_matches(path: Path, samples: list, root: Path, queries, pool, tops: dict) -> None:
    def rel(i: int) -> str:
        p = Path(samples[i].image)
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    rows = []
    for name, top in tops.items():
        for q in range(len(queries)):
            qy, qx = queries.boxes[q].tolist()
            for r, (c, score) in enumerate(zip(top.ids[q].tolist(), top.scores[q].tolist())):
                cy, cx = pool.boxes[c].tolist()
                rows.append([name, q, rel(int(queries.image[q])), qy, qx, LABELS[int(queries.labels[q])], r + 1,
                             rel(int(pool.image[c])), cy, cx, LABELS[int(pool.labels[c])], round(score, 5)])
    viz.write_csv(path, ["source", "query", "query_image", "query_y", "query_x", "query_label", "rank", "image",
                         "y", "x", "label", "score"], rows)


def _title(name: str, metrics: dict) -> str:
    obj = metrics["precision_at_k_objects"][name]
    return (f"{TITLES[name]}\nP@{metrics['k']} {metrics['precision_at_k'][name]:.2f}"
            + (f", object queries {obj:.2f}" if obj is not None else ""))


def _montage(path: Path, shown: list[int], queries, pool, tops: dict, load, patch: int, show_k: int,
             metrics: dict) -> None:
    """Figure 4: the query, then its top matches per feature source; green frame = same label, red = not."""
    cache: dict[int, torch.Tensor] = {}

    def tile(table: R.PatchTable, i: int) -> np.ndarray:
        img = int(table.image[i])
        if img not in cache:
            cache[img] = load(img)
        return viz.letterbox(cut_patches(cache[img], table.boxes[i:i + 1], patch)[0], TILE)

    rows = []
    for q in shown:
        row = [viz.frame(tile(queries, q), viz.GREY)]
        for top in tops.values():
            for c in top.ids[q, :show_k].tolist():
                same = int(pool.labels[c]) == int(queries.labels[q])
                row.append(viz.frame(tile(pool, c), viz.GREEN if same else viz.RED))
        rows.append(row)
    show_k = min(show_k, metrics["k"])
    gaps = [1 + j * show_k for j in range(len(tops))]
    image = viz.grid(rows, TILE, group_gaps=gaps)
    centres = viz.column_centres(len(rows[0]), TILE, group_gaps=gaps)
    labels = [(centres[0], "query")] + [
        ((centres[g] + centres[g + show_k - 1]) / 2, _title(name, metrics))
        for g, name in zip(gaps, tops)]
    footer = (f"green: same label as the query (the VOC box class covering >= {metrics['min_overlap']:g} of the "
              f"patch, or background); red: different. Base rate {metrics['precision_chance']:.2f}, object queries "
              f"{metrics['precision_chance_objects'] or 0:.2f}")
    viz.save_annotated(path, image, "Nearest neighbours by normalised correlation (section 4.1, Figure 4)", labels,
                       header_px=56, footer=footer)
