"""Pretext tower -> one Table 1 row's network: Figure 6 (BN folded, fc6 -> conv6) or CaffeNet + rescale (section 4.3)."""

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
from ctxrepro.io import atomic_write_json
from ctxrepro.pretext.data import read_manifest
from ctxrepro.pretext.model import conv_output
from ctxrepro.progress import track
from ctxrepro.seeds import derive_seed
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.caffenet import CaffeNetSpec, convert_alexnet, convert_caffenet, save_caffenet
from ctxrepro.transfer.convert import INITS, CropSet, convert, load_pretext_tower, log_mapping, sample_crops
from ctxrepro.transfer.imagenet import FAMILY, TORCHVISION, TOWER_OF, load_imagenet
from ctxrepro.transfer.rescale import RescaleConfig
from ctxrepro.transfer.trunk import TrunkSpec, body_layers, save_checkpoint

PRETRAIN = Path("models/pretrain")  # <variant>.pt
OUT_DIR = Path("models/convert")  # <row>.pt
METRICS = Path("metrics/convert")  # <row>.json
VOC2007 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
RESIZED = Path("data/resized")
ALEXNET_POOL5 = 6  # AlexNet's pool5 grid: fixed by its fc6, not a choice
CONVERT_SEED = 40  # purpose keys of derive_seed: (seed, 40, 0) crops, (seed, 40, 1, i) the i-th init


@dataclass(frozen=True)
class Row:
    """One Table 1 row we build: the pretrain variant (its weights, or only its tower's shape) and the init."""

    variant: str = param("color_dropping", refers="pretrain.variants", help="models/pretrain/<variant>.pt")
    init: str = param("ours", choices=tuple(INITS), help="the paper's init name (section 4.3)")


@dataclass(frozen=True)
class Params:
    row: str = param("color_dropping-ours", help="the row to convert: a key of `rows` (the dvc.yaml foreach item)")
    rows: dict[str, Row] = param({"color_dropping-ours": Row()},
                                 help="Table 1 rows: '<variant>-<init>' -> {variant, init}; detect runs the same")
    images: str = param("voc2007", choices=("voc2007", "resized"),
                        help="real images for statistics: VOC 2007 trainval, or the resized pretraining images")
    fit_images: int = param(2500, min=1, help="images whose crops estimate BN statistics and new-layer inits")
    heldout_images: int = param(250, min=1, help="other images whose crops only measure the moments reported")
    crops_per_image: int = param(2, min=1, help="random square crops per image, warped to input_side")
    min_crop: float = param(0.3, min=0.01, max=1.0, help="smallest crop side, as a fraction of the shorter side")
    input_side: int = param(227, min=16, help="Figure 6: 227 px inputs give pool5 7x7")
    conv6b: int = param(1024, min=1, help="Figure 6: conv6b 1x1, 1024")
    fc7: int = param(4096, min=1, help="Figure 6 and CaffeNet: fc7 4096")
    fc6: int = param(4096, min=1, help="CaffeNet (rescale rows): fc6 4096")
    roi_pool: dict[str, int] = param({"alexnet": 6, "vgg16": 7},
                                     help="CaffeNet's RoI grid per tower: 6x6 for AlexNet, 7x7 for VGG-16")
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
    calib_iters: int = param(10, min=0, help="rescalings at most (docs/METHOD.md: 10)")
    calib_tol: float = param(0.01, min=0.0, help="stop when all ratios are within this of their geometric mean (1%)")
    batch: int = param(64, min=1, help="crops per forward pass")
    imagenet_weights: str = param("", help="ImageNet-supervised weights for the imagenet and imagenet_rescale inits: "
                                  "'torchvision' (its published weights, downloaded once), 'torchvision:alexnet|vgg16', "
                                  "or a state dict file in torchvision's or our tower's layout; '' = no ImageNet rows")

    def __post_init__(self) -> None:
        for name, row in self.rows.items():
            if name != f"{row.variant}-{row.init}":
                raise ValueError(f"convert.rows.{name}: a row is named '<variant>-<init>', here "
                                 f"'{row.variant}-{row.init}' (metrics/detect/<row>.json pairs it with Table 1)")
        if self.row not in self.rows:
            raise ValueError(f"convert.row {self.row!r} is not one of convert.rows: {', '.join(self.rows)}")


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


def load_weights(params: Params, row: Row, root: Path, log: logging.Logger
                 ) -> tuple[torch.nn.Sequential, torch.nn.Sequential | None, dict, dict]:
    """The network's shape (a tower and its config: the variant's, or ImageNet's for the ImageNet rows), the
    row's pretrained tower (None for scratch / kmeans_rescale) and the provenance of its weights."""
    path = PRETRAIN / f"{row.variant}.pt"
    try:
        tower, config = load_pretext_tower(root / path)
    except (OSError, ValueError) as e:
        raise StageError(f"convert: {e} (run `dvc repro pretrain@{row.variant}`)") from e
    weights = INITS[row.init].weights
    if weights == "ours":
        return tower, tower, config, {"path": str(path), "variant": row.variant, "step": config["step"],
                                      "config": config}
    if weights is None:
        return tower, None, config, {"path": str(path), "variant": row.variant, "shape_only": True, "config": config}
    if not params.imagenet_weights:
        raise StageError(f"convert ({params.row}): init {row.init} needs ImageNet weights: set "
                         f"convert.imagenet_weights, or drop the row from convert.rows")
    shape_tower, imagenet, shape, source = _imagenet(params.imagenet_weights, tower, config, root, log)
    return shape_tower, imagenet, shape, {**source, "variant": row.variant}


def _imagenet(source: str, tower: torch.nn.Sequential, config: dict, root: Path, log: logging.Logger):
    """(shape tower, weights, config, provenance) of convert.imagenet_weights: torchvision's network (its own
    shape, input normalisation and fc7, which VGG-ImageNet-rescale keeps), or a state dict in our tower layout."""
    try:
        net = load_imagenet(source, config["tower"], root, log)
        if net is None:
            path = Path(source) if Path(source).is_absolute() else root / source
            imagenet, _ = load_pretext_tower(path, like=config)
            return tower, imagenet, config, {"path": source, "step": None, "config": None}
    except (OSError, ValueError) as e:
        raise StageError(f"convert.imagenet_weights: {e}") from e
    if "fc7.weight" in net.classifier:
        fc7 = torch.nn.Linear(net.classifier["fc7.weight"].shape[1], net.classifier["fc7.weight"].shape[0])
        fc7.load_state_dict({"weight": net.classifier["fc7.weight"], "bias": net.classifier["fc7.bias"]})
        net.tower.add_module("fc7", fc7)  # read by caffenet's _copy_fc; the tower is never run past pool5
    convs = [m for m in net.tower if isinstance(m, torch.nn.Conv2d)]
    shape = {**config, "tower": TOWER_OF[net.arch], "width": convs[0].out_channels, "color": TORCHVISION}
    return net.tower, net.tower, shape, net.source


def figure6_spec(params: Params, tower: torch.nn.Sequential, config: dict, log: logging.Logger) -> TrunkSpec:
    """Figure 6's sizes on the tower. conv6's kernel is pool5's side at the pretraining input (3 for 96 px
    patches; 6 for torchvision's AlexNet, trained at 224 px), and pool6 needs conv6's output to be at least 3x3:
    for torchvision's networks, whose conv6 is 6x6 (7x7) and so too big at 227 px, `input_side` is raised to the
    smallest that fits, and logged. Our own towers keep `input_side` (a misfit is an error naming it)."""
    kernel = _pool5_side(tower)
    side = params.input_side
    body, pool5 = body_layers(config["tower"], config["width"])
    while config.get("color") == TORCHVISION and conv_output([*body, ("pool5", pool5)], side)[1] < kernel + 2:
        side += 1
    if side != params.input_side:
        log.info("%s tower: conv6 %dx%d needs pool5 >= %d: input_side %d -> %d", config["tower"], kernel, kernel,
                 kernel + 2, params.input_side, side)
    return TrunkSpec(tower=config["tower"], width=config["width"], conv6=tower.fc6.out_features,
                     conv6_kernel=kernel, conv6b=params.conv6b, fc7=params.fc7, classes=params.classes,
                     input_side=side, color=_color(config))


def caffenet_spec(params: Params, config: dict) -> CaffeNetSpec:
    """CaffeNet's sizes on the tower; torchvision's towers (tv_alexnet, tv_vgg16) take their family's RoI grid."""
    grid = params.roi_pool.get(config["tower"], params.roi_pool.get(FAMILY.get(config["tower"], "")))
    if grid is None:
        raise StageError(f"convert.roi_pool has no grid for the {config['tower']} tower: add it")
    return CaffeNetSpec(tower=config["tower"], width=config["width"], roi_pool=grid,
                        fc6=params.fc6, fc7=params.fc7, classes=params.classes, input_side=params.input_side,
                        color=_color(config))


def alexnet_spec(params: Params, weights: torch.nn.Sequential | None) -> CaffeNetSpec:
    """torchvision's AlexNet as CaffeNet (R-CNN's own rows): its conv widths, fc6 and fc7 (ImageNet-R-CNN) or
    convert's fc6 / fc7 sizes (Scratch-R-CNN), AlexNet's 6x6 pool5 (its fc6 takes 256 x 6 x 6) and the Figure 6
    input side (227 px: conv5 13x13, where CaffeNet's adaptive 6x6 pool equals AlexNet's 3/2 pool5)."""
    grid = ALEXNET_POOL5
    if weights is None:
        return CaffeNetSpec(tower=TOWER_OF["alexnet"], width=64, roi_pool=grid, fc6=params.fc6, fc7=params.fc7,
                            classes=params.classes, input_side=params.input_side)
    convs = [m for m in weights if isinstance(m, torch.nn.Conv2d)]
    fc7 = getattr(weights, "fc7", None)
    if len(convs) != 5 or fc7 is None:
        raise StageError("convert.imagenet_weights: the AlexNet rows need torchvision's AlexNet with its fc7 "
                         "('torchvision:alexnet', 'random:alexnet' or a torchvision AlexNet state dict)")
    return CaffeNetSpec(tower=TOWER_OF["alexnet"], width=convs[0].out_channels, roi_pool=grid,
                        fc6=weights.fc6.out_features, fc7=fc7.out_features, classes=params.classes,
                        input_side=params.input_side, color=TORCHVISION)


def _color(config: dict) -> str:
    return config["color"] if config.get("color") in ("projection", TORCHVISION) else "none"


def run(params: Params, ctx: StageContext) -> None:
    root, log, seed = ctx.root, ctx.log, ctx.base.seed
    row = params.rows[params.row]
    init = INITS[row.init]
    shape_tower, weights, config, source = load_weights(params, row, root, log)
    crops, bad = make_crops(root, params, seed, log)
    start = time.monotonic()
    row_seed = derive_seed(seed, CONVERT_SEED, 1, list(INITS).index(row.init))
    out = root / OUT_DIR / f"{params.row}.pt"
    try:
        if init.network == "figure6":
            spec = figure6_spec(params, shape_tower, config, log)
            trunk, head, mapping, stats = convert(row.init, spec, weights, crops, params.bn_stats, params.rms,
                                                  rescale_config(params), row_seed, log, ctx.device)
            log_mapping(mapping, log, params.row)
            save_checkpoint(out, trunk, head, row.init, mapping, source, stats)
            shape = {"pool5_side": trunk.pool5_side, "conv5_stride": trunk.conv5_stride}
        elif init.network == "alexnet":
            net, mapping, stats = convert_alexnet(alexnet_spec(params, weights), weights, crops, params.rms,
                                                  params.batch, row_seed, log)
            log_mapping(mapping, log, params.row)
            save_caffenet(out, net, row.init, mapping, source, stats)
            shape = {"pool5_side": net.pool5_side, "conv5_stride": net.conv5_stride}
        else:
            net, mapping, stats = convert_caffenet(row.init, caffenet_spec(params, config), weights,
                                                   row.init == "imagenet_rescale", crops, params.bn_stats,
                                                   params.rms, rescale_config(params), row_seed, log, ctx.device)
            log_mapping(mapping, log, params.row)
            save_caffenet(out, net, row.init, mapping, source, stats)
            shape = {"pool5_side": net.pool5_side, "conv5_stride": net.conv5_stride}
    except ValueError as e:  # e.g. an input_side too small for conv6 / pool6
        raise StageError(f"convert ({params.row}): {e}") from e
    seconds = round(time.monotonic() - start, 2)
    log.info("%s: %s network written in %.1f s", params.row, init.network, seconds)
    atomic_write_json(root / METRICS / f"{params.row}.json", {
        "row": params.row, "variant": row.variant, "init": row.init, "network": init.network, **shape,
        "stats": _metrics(stats), "seconds": seconds, "bad_images": len(bad), "fit_crops": len(crops.fit),
        "heldout_crops": len(crops.heldout), "calib_crops": len(crops.calib), "bn_stats": params.bn_stats})


def _pool5_side(tower: torch.nn.Sequential) -> int:
    """pool5's side at the pretext patch = conv6's kernel (fc6's inputs are channels x side x side)."""
    convs = [m for m in tower if isinstance(m, torch.nn.Conv2d)]
    side2 = tower.fc6.in_features // convs[-1].out_channels
    side = round(side2 ** 0.5)
    if side * side * convs[-1].out_channels != tower.fc6.in_features:
        raise StageError(f"the pretrain export's fc6 has {tower.fc6.in_features} inputs, not channels x side^2")
    return side
