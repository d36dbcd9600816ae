"""Disk and memory of the analyses: mine, pretext_eval, nn, aberration, linear_probe and report."""

from __future__ import annotations

from ctxrepro.preflight import networks as nets
from ctxrepro.preflight.plan import Counts, variant
from ctxrepro.preflight.sizes import (BASE_MEMORY, CONSTELLATION_ROW, MATCH_ROW, MB, PAIR_ROW, WORKER_MEMORY,
                                      Estimate)

IMAGENET_CLASSES = 1000
PROBE_OUTS = 32 * 1024  # metrics and plots of one probed network: 28 KB in the tiny run
# Bytes per thumbnail pixel: a PNG of about half the raw RGB bytes in plots/mine, and again in base64 inside
# reports/mine.html.
THUMBNAIL_BYTES = 1.5
FIGURE_PANEL = 128 * 1024  # a PNG panel of Figure 5 (aberration): the tiny run's figure5.png holds 3 in 317 KB
REPORT_BYTES = 512 * 1024  # REPORT.md and its PNG plots: 236 KB in the tiny run


def _fc6(p: dict, name: str) -> int:
    v = variant(p, name)
    return nets.tower_fc6(v["tower"], v["input_size"] or v["patch"], v["width"], v["fc_dim"])[0]


def mine(p: dict, c: Counts, key: str | None = None) -> Estimate:
    m = p["mine"]
    tiles = (m["montage_clusters"] * (m["montage_matches"] + 1) + m["html_thumbnails"]) * m["tile"] ** 2
    out = m["n_constellations"] * CONSTELLATION_ROW + int(tiles * THUMBNAIL_BYTES)
    features = m["batch_patches"] * _fc6(p, m["variant"]) * nets.FLOAT
    return Estimate(cached=out, memory=BASE_MEMORY + m["block_mb"] * MB + 2 * features
                    + m["workers"] * WORKER_MEMORY)


def pretext_eval(p: dict, c: Counts, key: str | None = None) -> Estimate:
    e = p["pretext_eval"]
    rows = e["n_images"] * e["pairs_per_image"]
    patches = e["max_patches"] * 3 * variant(p, e["variant"])["patch"] ** 2 * nets.FLOAT
    return Estimate(cached=rows * PAIR_ROW, memory=BASE_MEMORY + 2 * patches + rows * PAIR_ROW)


def nn(p: dict, c: Counts, key: str | None = None) -> Estimate:
    n = p["nn"]
    images = n["images"] or c.voc07_test
    patches = images * n["pool_per_image"]
    pool = patches * _fc6(p, n["variant"]) * nets.FLOAT  # every pool patch's fc6, held
    similarity = n["chunk"] * patches * nets.FLOAT  # one chunk of queries against the pool
    return Estimate(cached=n["n_queries"] * n["k"] * MATCH_ROW, memory=BASE_MEMORY + pool + similarity)


def aberration(p: dict, c: Counts, key: str | None = None) -> Estimate:
    a = p["aberration"]
    patches = (a["train_images"] + a["test_images"]) * a["patches_per_image"] * 3 * a["patch"] ** 2  # uint8
    batch = a["batch"] * 3 * a["patch"] ** 2 * nets.FLOAT
    return Estimate(uncached=a["figure_images"] * FIGURE_PANEL, memory=BASE_MEMORY + patches + 2 * batch)


def linear_probe(p: dict, c: Counts, key: str) -> Estimate:
    """Online linear heads on ImageNet (only their checkpoints on disk) and a VOC07 feature cache for the SVMs."""
    lp = p["linear_probe"]
    layers = len(lp["layers"])
    classes = p["fetch"]["world"]["imagenet_classes"] if p["fetch"]["imagenet_source"] == "builtin" else IMAGENET_CLASSES
    heads = layers * (lp["dims"] + 1) * classes * nets.FLOAT
    checkpoint = heads * (2 if lp["sgd"]["momentum"] else 1)
    voc = (c.voc07_trainval + c.voc07_test) * lp["dims"] * layers * 2  # float16 features, cached per split
    batch = lp["batch"] * 3 * lp["input_side"] ** 2 * nets.FLOAT
    memory = (BASE_MEMORY + 2 * checkpoint + lp["workers"] * (WORKER_MEMORY + 2 * batch)
              + 4 * voc // max(1, layers))  # the SVMs hold one layer's features in float32 (and a copy)
    # the state folder is a persist out holding the heads' checkpoint and the VOC07 feature cache; a running probe
    # keeps its previous state and writes the next beside it
    return Estimate(uncached=PROBE_OUTS + checkpoint + voc, scratch=2 * checkpoint, memory=memory)


def report(p: dict, c: Counts, key: str | None = None) -> Estimate:
    return Estimate(uncached=REPORT_BYTES)
