"""Disk and peak host memory of each stage instance, computed from the params and the data counts.

The data stages and pretraining are here; the transfer stages (convert, proposals, detect, normals) are in
estimate_transfer, the analyses in estimate_eval. Sizes per item and the tolerance the tests hold them to
are in sizes.
"""

from __future__ import annotations

from ctxrepro.data.registry import archives_for
from ctxrepro.preflight import estimate_eval, estimate_transfer
from ctxrepro.preflight import networks as nets
from ctxrepro.preflight.plan import WORLD_JPEG_BPP, Counts, Instance, variant
from ctxrepro.preflight.sizes import (BASE_MEMORY, MANIFEST_ROW, MB, NYU_FRAME, Q95_444, UNSIZED, WORKER_MEMORY,
                                      Estimate, slots)


def _archive_bytes(dataset: str, p: dict) -> int:
    """Bytes the real archives of `dataset` place (an extracted tar is about its own size)."""
    probes = bool(p["linear_probe"]["networks"])
    return sum(a.size or UNSIZED.get(a.name, 0) for a in archives_for(dataset)
               if a.required or probes or a.dataset != "imagenet")


def fetch(p: dict, c: Counts) -> Estimate:
    generated = {"imagenet": (c.imagenet_train + c.imagenet_val) * c.imagenet_jpeg,
             "voc2007": (c.voc07_trainval + c.voc07_test) * c.voc_px * WORLD_JPEG_BPP,
             "voc2011": c.voc11 * c.voc_px * WORLD_JPEG_BPP, "nyuv2": c.nyu * NYU_FRAME}
    raw = scratch = kept = 0
    for dataset, size in generated.items():
        source = p["fetch"][f"{dataset}_source"]
        if source == "builtin":
            raw += int(size)
            scratch += int(size)  # the world's archives in data/downloads while fetch places them
            continue
        raw += _archive_bytes(dataset, p)
        if source == "official" or source.lower().startswith(("http://", "https://")):
            kept += _archive_bytes(dataset, p)  # downloads stay in data/downloads (fetch.keep_downloads)
    return Estimate(cached=raw, kept=kept if p["fetch"]["keep_downloads"] else 0,
                    scratch=scratch + (0 if p["fetch"]["keep_downloads"] else kept), memory=BASE_MEMORY + 256 * MB)


def resize(p: dict, c: Counts) -> Estimate:
    r = p["resize"]
    images = c.imagenet_train + (c.imagenet_val if "val" in r["splits"] else 0)
    shrink = min(1.0, r["max_pixels"] / c.imagenet_px)
    out = int(images * c.imagenet_jpeg * Q95_444 * shrink)
    return Estimate(cached=out, memory=BASE_MEMORY + images * MANIFEST_ROW + r["workers"] * WORKER_MEMORY)


def pretrain(p: dict, c: Counts, key: str) -> Estimate:
    v = variant(p, key)
    weights = nets.FLOAT * nets.pretext_params(v["tower"], v["input_size"] or v["patch"], v["width"], v["fc_dim"])
    state = weights * (1 + slots(v))
    batch = v["max_patches"] * 3 * (v["input_size"] or v["patch"]) ** 2 * nets.FLOAT
    workers = v["workers"] * (WORKER_MEMORY + 2 * batch)
    return Estimate(cached=weights, uncached=state, scratch=state,
                    memory=BASE_MEMORY + c.imagenet_train * MANIFEST_ROW + 2 * state + workers)


def instance(p: dict, c: Counts, inst: Instance) -> Estimate:
    """The estimate of one instance (see module docstring)."""
    if inst.stage == "fetch":
        return fetch(p, c)
    if inst.stage == "resize":
        return resize(p, c)
    if inst.stage == "pretrain":
        return pretrain(p, c, inst.key)
    if inst.stage in ("convert", "detect", "normals", "proposals"):
        return getattr(estimate_transfer, inst.stage)(p, c, inst.key)
    return getattr(estimate_eval, inst.stage)(p, c, inst.key)

