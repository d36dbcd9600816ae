"""Unsupervised visual data mining with constellations and geometric verification, and purity-coverage (section 4.5)."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxrepro.config import param
from ctxrepro.data.voc import SPLITS, VOC_CLASSES, read_image_set
from ctxrepro.io import atomic_dir, atomic_write_json, atomic_write_text
from ctxrepro.metrics.purity import chance_reference, purity_coverage
from ctxrepro.mining import html as mining_html
from ctxrepro.mining.constellations import (MiningResult, SearchConfig, folder_images, mine, purity_sets,
                                            select_clusters, voc_eval_labels)
from ctxrepro.mining.search import BankSpec
from ctxrepro.pretext.export import Pretrained, load_pretrained
from ctxrepro.seeds import derive_seed
from ctxrepro.pretext.precision import AMP_CHOICES
from ctxrepro.stage import StageContext, StageError
from ctxrepro.viz import write_csv

MODEL = Path("models/pretrain")  # <variant>.pt, one per pretraining variant
VOC2011 = Path("data/raw/voc2011/TrainVal/VOCdevkit/VOC2011")
VOC2007 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
DATA = Path("data/mine")  # ranking.json, sets.json, labels.json, purity_coverage.json
PLOTS = Path("plots/mine")  # clusters_NN.png (Figure 7), purity_coverage.csv and .png (Figure 9)
REPORT = Path("reports/mine.html")  # the whole ranking, one offline page
METRICS = Path("metrics/mine.json")
SEED_KEY = 45  # section 4.5: this stage's seed stream; 1 = the mined collection, 2 = the evaluation set
PAPER_EVAL_CLASSES = ("bus", "diningtable", "horse", "motorbike", "sofa", "train")


@dataclass(frozen=True)
class Params:
    variant: str = param("color_dropping", help="models/pretrain/<variant>.pt to read (the paper: colour dropping)")
    source: str = param("voc2011", choices=("voc2011", "folder"), help="what to mine (section 4.5: VOC 2011)")
    folder: str = param("", help="source=folder: the image folder (any depth, sorted), relative to the repo")
    voc2011_split: str = param("trainval", choices=("train", "val", "trainval"), help="VOC 2011 image set")
    scales: tuple[float, ...] = param((1.0, 0.75, 0.5), min=0.05, max=4.0, help="image scales of the patch grids")
    grid_step: int = param(2, min=1, max=8, help="grid strides per patch side (constellation pitch = patch)")
    max_side: int = param(500, min=0, help="shrink images to this longer side first; 0 = never")
    n_constellations: int = param(16384, min=1, help="constellations = clusters (section 4.5.1: 16,384)")
    top_k: int = param(100, min=1, help="images searched per constellation (section 4.5: top 100)")
    set_size: int = param(10, min=1, help="verified neighbours per cluster (section 4.5.1: 10)")
    n_sets: int = param(1000, min=1, help="clusters selected for purity-coverage (section 4.5.1: 1000)")
    montage_clusters: int = param(40, min=1, help="clusters drawn in the Figure 7 montage")
    montage_per_page: int = param(20, min=1, help="clusters per montage PNG")
    montage_matches: int = param(7, min=1, help="verified matches per montage row (Figure 7: 7)")
    tile: int = param(96, min=16, max=512, help="montage and thumbnail tile side, px")
    html_thumbnails: int = param(500, min=0, help="clusters with a picture on the ranking page")
    evaluate: bool = param(True, help="also mine VOC 2007 and report purity-coverage (section 4.5.1)")
    eval_classes: tuple[str, ...] = param(PAPER_EVAL_CLASSES, choices=VOC_CLASSES, help="section 4.5.1 subset")
    eval_splits: tuple[str, ...] = param(("trainval", "test"), choices=SPLITS, help="VOC 2007 image sets")
    eval_constellations: int = param(16384, min=1, help="clusters initialised on VOC 2007 (16,384)")
    drop_views: bool = param(True, help="colour-dropping nets: average fc6 over the three kept channels")
    query_batch: int = param(256, min=1, help="constellations per pass over the feature bank")
    block_mb: float = param(256.0, min=1.0, help="memory bound of one similarity block, MiB")
    batch_patches: int = param(512, min=1, help="patches per forward pass")
    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast of the network (CUDA, or a CPU with native bf16); "
                                                       "none = float32")
    workers: int = param(4, min=0, max=64, help="image decode processes")

    def __post_init__(self) -> None:
        if self.source == "folder" and not self.folder:
            raise ValueError("source is 'folder' but folder is empty: name the image folder")
        if not self.scales:
            raise ValueError("scales is empty: list at least one image scale")


def bank_spec(p: Params, pre: Pretrained) -> BankSpec:
    """Patch geometry of the pretrained network: its sampled patch side and its input side."""
    return BankSpec(patch=pre.patch, net_size=pre.net_size, scales=p.scales, grid_step=p.grid_step,
                    max_side=p.max_side, color=pre.color, drop_views=p.drop_views, batch_patches=p.batch_patches,
                    amp=p.amp)


def mining_images(p: Params, root: Path) -> tuple[list[Path], list[str]]:
    """(paths, display names) of the collection to mine."""
    if p.source == "folder":
        folder = root / p.folder
        paths = folder_images(folder)
        return paths, [str(q.relative_to(folder)) for q in paths]
    ids = read_image_set(root / VOC2011, p.voc2011_split)
    return [root / VOC2011 / "JPEGImages" / f"{i}.jpg" for i in ids], list(ids)


def _mine(p: Params, ctx: StageContext, model, spec: BankSpec, paths: list[Path], n: int, key: int) -> MiningResult:
    cfg = SearchConfig(n_constellations=n, top_k=p.top_k, query_batch=p.query_batch, block_mb=p.block_mb)
    (ctx.root / "data").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ctx.root / "data", prefix=".mine-scratch-") as scratch:
        return mine(model, paths, spec, cfg, ctx.device, derive_seed(ctx.base.seed, SEED_KEY, key),
                    workers=p.workers, scratch=Path(scratch), log=ctx.log)


def ranking_record(result: MiningResult, names: list[str], set_size: int) -> dict:
    """The whole ranking, machine-readable: constellation, verified count, top verified neighbours."""
    rows = []
    members = result.cluster_members(set_size)
    for rank, j in enumerate(result.ranking, start=1):
        img, pats = int(result.constellations[j, 0]), result.constellations[j, 1:]
        centers, sides = result.bank.centers[img, pats], result.bank.sides[img, pats]
        rows.append({"rank": rank, "image": names[img], "centers": np.round(centers, 1).tolist(),
                     "side": round(float(sides[0]), 1), "verified": int(result.verified[j].sum()),
                     "neighbours": [names[i] for i in members[j]]})
    name_of = dict(zip(result.bank.paths, names))
    skipped = {name_of[path]: why for path, why in sorted(result.bank.skipped.items())}
    return {"top_k": int(result.candidates.images.shape[1]), "skipped": skipped, "ranking": rows}


def mining_summary(result: MiningResult, prefix: str = "") -> dict:
    """Counts for metrics/mine.json: images, patches, constellations and how many of their matches verified."""
    k = int(result.candidates.images.shape[1])
    n = len(result.constellations)
    best = int(result.verified[result.ranking[0]].sum()) if n else 0
    return {f"{prefix}images": len(result.bank.paths) - len(result.bank.skipped),
            f"{prefix}images_skipped": len(result.bank.skipped), f"{prefix}patches": int(result.bank.valid.sum()),
            f"{prefix}n_constellations": n, f"{prefix}n_verified": result.n_verified,
            f"{prefix}verified_fraction": result.n_verified / max(1, n * k), f"{prefix}top_cluster_verified": best}


def write_pictures(p: Params, result: MiningResult, names: list[str], out: Path, summary: dict, root: Path) -> None:
    """Figure 7 montages (de-duplicated by the greedy cover, shown in rank order) and the ranking page."""
    cache = mining_html.ImageCache()
    shown = select_clusters(result.cluster_members(p.montage_matches), [int(j) for j in result.ranking],
                            len(result.bank.paths), p.montage_clusters)
    position = np.argsort(result.ranking)  # constellation -> its place in the ranking
    order = sorted(shown.clusters, key=lambda j: position[j])
    if order:
        mining_html.write_montages(out, result, order, per_page=p.montage_per_page, n_matches=p.montage_matches,
                                   tile=p.tile, title=f"Top clusters mined from {p.source}", cache=cache)
    mining_html.write_ranking_html(root / REPORT, result, names, thumbnails=p.html_thumbnails,
                                   n_matches=p.montage_matches, tile=p.tile,
                                   title=f"Mined clusters ({p.source}), paper section 4.5", summary=summary,
                                   cache=cache)


def evaluate(p: Params, ctx: StageContext, model, spec: BankSpec, data_dir: Path, plots_dir: Path) -> dict:
    """Section 4.5.1 on VOC 2007: mine the class subset, select sets, purity-coverage (issue 9's rule)."""
    devkit = ctx.root / VOC2007
    labels = voc_eval_labels(devkit, p.eval_splits, p.eval_classes)
    if not labels:
        raise StageError(f"{devkit}: no image of {', '.join(p.eval_splits)} holds {', '.join(p.eval_classes)}")
    ids = list(labels)
    result = _mine(p, ctx, model, spec, [devkit / "JPEGImages" / f"{i}.jpg" for i in ids],
                   p.eval_constellations, 2)
    sets, picked = purity_sets(result, p.set_size, p.n_sets)
    named = [[ids[i] for i in s] for s in sets]
    scores = purity_coverage(named, labels)
    # the same number of random sets of the same size: the tiny world's classes are few and frequent, so
    # even random sets are fairly pure; mining must beat this, not zero
    chance = chance_reference(labels, len(sets), p.set_size, derive_seed(ctx.base.seed, SEED_KEY, 3))
    atomic_write_json(data_dir / "sets.json", named)
    atomic_write_json(data_dir / "labels.json", labels)
    atomic_write_json(data_dir / "purity_coverage.json", scores)
    write_csv(plots_dir / "purity_coverage.csv", ("coverage", "purity"), scores["curve"])
    mining_html.plot_purity_coverage(plots_dir / "purity_coverage.png", scores["curve"], scores["auc"],
                                     scores["auc_at_0.5"], "ours")
    ctx.log.info("purity-coverage on %d VOC 2007 images: %d sets, AUC %.3f (%.3f up to coverage 0.5); "
                 "random sets: %.3f (%.3f)", len(ids), len(sets), scores["auc"], scores["auc_at_0.5"],
                 chance["auc"], chance["auc_at_0.5"])
    return {"auc": scores["auc"], "auc_at_0.5": scores["auc_at_0.5"], "n_clusters_selected": len(sets),
            "chance_auc": chance["auc"], "chance_auc_at_0.5": chance["auc_at_0.5"],
            "eval_cover_levels": max(picked.levels, default=0), **mining_summary(result, "eval_")}


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    try:
        pre = load_pretrained(ctx.root / MODEL / f"{params.variant}.pt", ctx.device)
        model, spec = pre.model, bank_spec(params, pre)
    except (FileNotFoundError, ValueError) as e:
        raise StageError(str(e)) from e
    try:
        paths, names = mining_images(params, ctx.root)
    except FileNotFoundError as e:
        raise StageError(f"{e} (VOC 2011: `dvc repro fetch`)" if params.source == "voc2011" else str(e)) from e
    ctx.log.info("mining %d images with patches %d px -> %d px input, colour %s (pretrained %d steps)",
                 len(paths), spec.patch, spec.net_size, spec.color, pre.step)
    result = _mine(params, ctx, model, spec, paths, params.n_constellations, 1)
    metrics = {"source": params.source, **mining_summary(result), "top_k": int(result.candidates.images.shape[1])}
    for path, why in sorted(result.bank.skipped.items()):
        ctx.log.warning("skipped %s: %s", path, why)
    with atomic_dir(ctx.root / DATA) as data_dir, atomic_dir(ctx.root / PLOTS) as plots_dir:
        atomic_write_text(data_dir / "ranking.json", json.dumps(ranking_record(result, names, params.set_size)) + "\n")
        write_pictures(params, result, names, plots_dir, metrics, ctx.root)
        if params.evaluate:
            try:
                metrics.update(evaluate(params, ctx, model, spec, data_dir, plots_dir))
            except FileNotFoundError as e:
                raise StageError(f"{e} (VOC 2007: `dvc repro fetch`)") from e
    metrics["seconds"] = round(time.monotonic() - start, 1)
    atomic_write_json(ctx.root / METRICS, metrics)
    ctx.log.info("mine: %d constellations, %d verified matches, %.0f s", metrics["n_constellations"],
                 metrics["n_verified"], metrics["seconds"])
