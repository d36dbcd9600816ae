"""Pretext tower -> Figure 6 detection network: BN folding, fc6 -> conv6, rescale inits (section 4.3)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctxrepro.config import param
from ctxrepro.data.images import JunkImage, decode_rgb, open_jpeg
from ctxrepro.data.voc import read_image_set
from ctxrepro.io import atomic_dir, atomic_write_json
from ctxrepro.pretext.data import read_manifest
from ctxrepro.progress import track
from ctxrepro.seeds import derive_seed
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.convert import INITS, CropSet, convert, load_pretext_tower, log_mapping, sample_crops
from ctxrepro.transfer.imagenet import imagenet_spec, load_imagenet
from ctxrepro.transfer.rescale import RescaleConfig
from ctxrepro.transfer.trunk import TrunkSpec, save_checkpoint

PRETRAIN = Path("models/pretrain.pt")
OUT_DIR = Path("models/convert")
METRICS = Path("metrics/convert.json")
VOC2007 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
RESIZED = Path("data/resized")
CONVERT_SEED = 40  # purpose keys of derive_seed: (seed, 40, 0) crops, (seed, 40, 1, i) the i-th init
DEFAULT_INITS = ("scratch", "ours", "ours_rescale", "kmeans_rescale")


@dataclass(frozen=True)
class Params:
    images: str = param("voc2007", choices=("voc2007", "resized"),
                        help="real images for statistics: VOC 2007 trainval, or the resized pretraining images")
    fit_images: int = param(2500, min=1, help="images whose crops estimate BN statistics and new-layer inits")
    heldout_images: int = param(250, min=1, help="other images whose crops only measure the moments reported")
    crops_per_image: int = param(2, min=1, help="random square crops per image, warped to input_side")
    min_crop: float = param(0.3, min=0.01, max=1.0, help="smallest crop side, as a fraction of the shorter side")
    input_side: int = param(227, min=16, help="Figure 6: 227 px inputs give pool5 7x7")
    conv6b: int = param(1024, min=1, help="Figure 6: conv6b 1x1, 1024")
    fc7: int = param(4096, min=1, help="Figure 6: fc7 4096")
    classes: int = param(21, min=2, help="fc8 outputs: 20 VOC classes + background")
    bn_stats: str = param("images", choices=("images", "running"),
                          help="fold BN with statistics re-estimated on the images, or with its running averages")
    rms: float = param(50.0, min=1e-6, help="input RMS (released code: patches scaled to RMS 50)")
    beta: float = param(0.1, help="bias after within-layer normalisation (magic_init: 0.1)")
    kmeans_samples: int = param(100_000, min=1, help="input vectors per layer for whitening + k-means")
    kmeans_iters: int = param(20, min=1, help="Lloyd iterations per layer")
    whiten_eps: float = param(1e-3, min=0.0, help="whitening regulariser, relative to the mean eigenvalue")
    calib_crops: int = param(64, min=1, help="crops in the gradient-ratio calibration batch")
    calib_draws: int = param(4, min=1, help="Gaussian top gradients averaged per ratio measurement")
    calib_iters: int = param(10, min=0, help="rescalings at most (METHOD.md: 10)")
    calib_tol: float = param(0.01, min=0.0, help="stop when all ratios are within this of their geometric mean (1%)")
    batch: int = param(64, min=1, help="crops per forward pass")
    inits: tuple[str, ...] = param(DEFAULT_INITS, choices=DEFAULT_INITS, help="initialisations to write")
    imagenet_weights: str = param("", help="ImageNet-supervised weights -> imagenet.pt: 'torchvision' (its published "
                                  "weights, downloaded once), 'torchvision:alexnet|vgg16', or a state dict file in "
                                  "torchvision's or our tower's layout; '' skips")


def list_images(root: Path, source: str) -> list[Path]:
    """Sorted image files of the chosen source (VOC 2007 trainval only: never the test images)."""
    if source == "voc2007":
        devkit = root / VOC2007
        return [devkit / "JPEGImages" / f"{i}.jpg" for i in sorted(read_image_set(devkit, "trainval"))]
    rows = read_manifest(root / RESIZED / "manifest.csv", "train")
    return [root / RESIZED / r["path"] for r in rows]


def split_images(paths: list[Path], fit: int, heldout: int, seed: int, log: logging.Logger) -> tuple[list, list]:
    """A seeded draw of `fit` + `heldout` distinct images (shrunk in proportion when fewer exist)."""
    if len(paths) < 2:
        raise StageError(f"convert needs at least 2 images, found {len(paths)}")
    if fit + heldout > len(paths):
        heldout = max(1, round(len(paths) * heldout / (fit + heldout)))
        fit = len(paths) - heldout
        log.warning("only %d images: using %d to fit and %d held out", len(paths), fit, heldout)
    order = np.random.default_rng(derive_seed(seed, CONVERT_SEED, 0)).permutation(len(paths))
    return [paths[i] for i in order[:fit]], [paths[i] for i in order[fit:fit + heldout]]


def decode_all(paths: list[Path], log: logging.Logger) -> tuple[list[torch.Tensor], list[str]]:
    """RGB uint8 images (3, H, W); unreadable or junk files are listed, not silently skipped."""
    images, bad = [], []
    for p in track(paths, desc="decode", unit="img", log=log):
        try:
            with open(p, "rb") as f:
                rgb = decode_rgb(open_jpeg(f), None).rgb
            images.append(torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous())
        except JunkImage as e:
            bad.append(f"{p}: {e}")
        except OSError as e:
            bad.append(f"{p}: unreadable ({e})")
    for b in bad:
        log.warning("unreadable image %s", b)
    return images, bad


def make_crops(root: Path, p: Params, seed: int, log: logging.Logger) -> tuple[CropSet, list[str]]:
    try:
        paths = list_images(root, p.images)
    except (OSError, ValueError) as e:
        raise StageError(f"convert: cannot list the {p.images} images: {e}") from e
    fit_paths, held_paths = split_images(paths, p.fit_images, p.heldout_images, seed, log)
    gen = torch.Generator().manual_seed(derive_seed(seed, CONVERT_SEED, 0))
    fit_imgs, bad = decode_all(fit_paths, log)
    held_imgs, bad2 = decode_all(held_paths, log)
    if not fit_imgs or not held_imgs:
        which = "fit" if not fit_imgs else "held-out"
        raise StageError(f"convert: no readable {which} image ({len(bad + bad2)} bad)")
    fit = sample_crops(fit_imgs, p.crops_per_image, p.input_side, p.min_crop, gen)
    held = sample_crops(held_imgs, p.crops_per_image, p.input_side, p.min_crop, gen)
    log.info("%d fit crops, %d held-out crops at %d px", len(fit), len(held), p.input_side)
    return CropSet(fit, held, fit[:p.calib_crops]), bad + bad2


def rescale_config(p: Params) -> RescaleConfig:
    return RescaleConfig(beta=p.beta, batch=p.batch, kmeans_samples=p.kmeans_samples, kmeans_iters=p.kmeans_iters,
                         whiten_eps=p.whiten_eps, calib_iters=p.calib_iters, calib_tol=p.calib_tol,
                         calib_draws=p.calib_draws)


def _metrics(stats: dict) -> dict:
    """The stats without per-iteration history (kept in the checkpoints)."""
    out = dict(stats)
    if "calibration" in out:
        out["calibration"] = {k: v for k, v in out["calibration"].items() if k != "history"}
    return out


def plan(params: Params, root: Path, log: logging.Logger) -> tuple[dict, dict, dict]:
    """{init: network spec}, {init: tower or None} and {init: provenance}; the spec comes from the pretrain
    export, or from torchvision's network for the ImageNet init."""
    try:
        tower, config = load_pretext_tower(root / PRETRAIN)
    except (OSError, ValueError) as e:
        raise StageError(f"convert: {e} (run `dvc repro pretrain`)") from e
    spec = TrunkSpec(tower=config["tower"], width=config["width"], conv6=tower.fc6.out_features,
                     conv6_kernel=_pool5_side(tower), conv6b=params.conv6b, fc7=params.fc7, classes=params.classes,
                     input_side=params.input_side,
                     color="projection" if config.get("color") == "projection" else "none")
    jobs = {init: tower if INITS[init][0] else None for init in params.inits}
    if not jobs and not params.imagenet_weights:
        raise StageError("convert: convert.inits is empty and no imagenet_weights given: nothing to write")
    sources = {init: {"path": str(PRETRAIN), "step": config["step"], "config": config} for init in jobs if jobs[init]}
    specs = {init: spec for init in jobs}
    if params.imagenet_weights:
        jobs["imagenet"], specs["imagenet"], sources["imagenet"] = _imagenet(params.imagenet_weights, spec, config,
                                                                            root, log)
    else:
        log.info("imagenet.pt skipped: convert.imagenet_weights is empty (weights are never downloaded)")
    return specs, jobs, sources


def _imagenet(source: str, spec: TrunkSpec, config: dict, root: Path, log: logging.Logger):
    """(tower, spec, provenance) of convert.imagenet_weights: torchvision's weights, or a state dict file in
    torchvision's or in our tower's layout."""
    try:
        net = load_imagenet(source, config["tower"], root, log)
        if net is not None:
            return net.tower, imagenet_spec(net, spec), net.source
        path = Path(source) if Path(source).is_absolute() else root / source
        tower, _ = load_pretext_tower(path, like=config)
    except (OSError, ValueError) as e:
        raise StageError(f"convert.imagenet_weights: {e}") from e
    return tower, spec, {"path": source, "step": None, "config": None}


def run(params: Params, ctx: StageContext) -> None:
    root, log, seed = ctx.root, ctx.log, ctx.base.seed
    specs, jobs, sources = plan(params, root, log)
    crops, bad = make_crops(root, params, seed, log)
    metrics = {"inits": {}, "seconds": {}, "bad_images": len(bad), "fit_crops": len(crops.fit),
               "heldout_crops": len(crops.heldout), "calib_crops": len(crops.calib), "bn_stats": params.bn_stats,
               "imagenet": "converted" if params.imagenet_weights else "skipped: no imagenet_weights given"}
    with atomic_dir(root / OUT_DIR) as out:
        for init, weights in jobs.items():
            start = time.monotonic()
            index = list(INITS).index(init)
            try:
                trunk, head, mapping, stats = convert(init, specs[init], weights, crops, params.bn_stats, params.rms,
                                                      rescale_config(params), derive_seed(seed, CONVERT_SEED, 1, index),
                                                      log, ctx.device)
            except ValueError as e:  # e.g. an input_side too small for conv6 / pool6
                raise StageError(f"convert ({init}): {e}") from e
            log_mapping(mapping, log, init)
            save_checkpoint(out / f"{init}.pt", trunk, head, init, mapping, sources.get(init), stats)
            metrics["inits"][init] = _metrics(stats)
            metrics["seconds"][init] = round(time.monotonic() - start, 2)
            metrics.update(pool5_side=trunk.pool5_side, conv5_stride=trunk.conv5_stride)
            log.info("%s: written in %.1f s", init, metrics["seconds"][init])
    atomic_write_json(root / METRICS, metrics)


def _pool5_side(tower: torch.nn.Sequential) -> int:
    """pool5's side at the pretext patch = conv6's kernel (fc6's inputs are channels x side x side)."""
    convs = [m for m in tower if isinstance(m, torch.nn.Conv2d)]
    side2 = tower.fc6.in_features // convs[-1].out_channels
    side = round(side2 ** 0.5)
    if side * side * convs[-1].out_channels != tower.fc6.in_features:
        raise StageError(f"{PRETRAIN}: fc6 has {tower.fc6.in_features} inputs, not channels x side^2")
    return side
