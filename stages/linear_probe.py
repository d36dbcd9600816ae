"""Linear probes on frozen features, per layer: ImageNet top-1 (Zhang et al.) and VOC07 SVM mAP (Goyal et al. 2019).

Networks: each pretraining variant's export, `random` (an export's architecture, untrained) and, when
`imagenet_weights` names a source, `imagenet`: torchvision's ImageNet-supervised AlexNet / VGG-16, the upper
reference of Zhang et al. 2017 Table 2.

ImageNet: every layer's linear head trains online on the frozen trunk, a fresh random crop and flip of each
image at every pass (`ctxrepro.analysis.linear_online`), and is scored on val's centre crops; its checkpoint
lives in models/linear_probe_state/<net>/ (a DVC `persist` path), so a killed run resumes. VOC07: per-class
linear SVMs on one 227 x 227 global resize per image; those features are cached in the same folder.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ctxrepro import viz
from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_online as O
from ctxrepro.analysis import linear_probe as L
from ctxrepro.analysis.retrieval import random_network
from ctxrepro.checkpoint import digest
from ctxrepro.config import param
from ctxrepro.data.voc import VOC_CLASSES, load_split
from ctxrepro.io import atomic_write_json
from ctxrepro.metrics.voc_cls import image_labels
from ctxrepro.pretext.export import load_pretrained
from ctxrepro.stage import StageContext, StageError

MODELS = Path("models/pretrain")  # one export per pretraining variant: models/pretrain/<variant>.pt
MANIFEST = Path("data/resized/manifest.csv")
WORLD_INDEX = Path("data/raw/world_index.json")
DEVKIT = Path("data/raw/imagenet/ILSVRC2012_devkit_t12/data")
VOC07 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
STATE = Path("models/linear_probe_state")  # per network: the heads' checkpoint and the VOC07 feature cache
METRICS = Path("metrics/linear_probe")
PLOTS = Path("plots/linear_probe")
RANDOM = "random"
IMAGENET = "imagenet"


@dataclass(frozen=True)
class Params:
    network: str = param("color_dropping", help="the network to probe (dvc.yaml's foreach sets it)")
    networks: tuple[str, ...] = param(["color_dropping", "projection", "vgg16", "random"],
                                      help="models/pretrain/<name>.pt, 'random': random_like untrained, or "
                                      "'imagenet': the imagenet_weights network")
    random_like: str = param("color_dropping", help="the export whose architecture `random` copies")
    imagenet_weights: str = param("", help="the `imagenet` network: 'torchvision[:alexnet|vgg16]' (published "
                                  "weights, downloaded once), 'random[:alexnet|vgg16]' (torchvision's architecture, "
                                  "seeded init, offline) or a torchvision state dict file; '' = no imagenet network")
    layers: tuple[str, ...] = param(list(L.LAYERS), choices=L.LAYERS, help="layers to probe")
    dims: int = param(9800, min=1, help="at most this many features per layer: the largest g x g pooling grid with "
                      "C*g*g <= dims (9800: Zhang et al.'s 10/6/5/5/6 cells for AlexNet)")
    input_side: int = param(227, min=16, help="network input side (Zhang et al., Goyal et al.: 227)")
    resize: int = param(256, min=16, help="ImageNet: short side before the crop (standard: 256)")
    imagenet_per_class: int = param(0, min=0, help="training images per class; 0 = all")
    batch: int = param(256, min=1, help="images per batch when evaluating and extracting VOC07 features")
    workers: int = param(4, min=0, max=64, help="decoding processes; also the VOC07 SVM classes fitted at once")
    sgd: H.SgdConfig = param(H.SgdConfig(), help="ImageNet linear heads, trained online (batch, iterations, lr, "
                             "lr_step, ...)")
    stats_images: int = param(10000, min=1, help="training images (one random view each) whose features' mean and "
                              "deviation standardise the heads' inputs")
    checkpoint_every: int = param(5000, min=1, help="iterations between resumable checkpoints of the heads")
    amp: str = param("none", choices=("none", "bf16", "fp16"), help="autocast of the frozen trunk's forward (CUDA)")
    voc_classes: tuple[str, ...] = param(list(VOC_CLASSES), choices=VOC_CLASSES, help="VOC07 classes probed")
    svm: H.SvmConfig = param(H.SvmConfig(), help="VOC07 SVMs (costs, folds, positive_weight, max_iter, tol)")
    profile_note: str = param("", help="what this profile scales down from the published protocol")

    def __post_init__(self) -> None:
        if self.network not in self.networks:  # a params error (exit 2), before anything is loaded
            raise ValueError(f"linear_probe.network: {self.network!r} is not in linear_probe.networks: choose one of "
                             f"{', '.join(self.networks)}")
        if IMAGENET in self.networks and not self.imagenet_weights:
            raise ValueError(f"linear_probe.networks lists {IMAGENET!r} but linear_probe.imagenet_weights is empty: "
                             f"name its weights ('torchvision', 'random:alexnet' or a state dict file) or drop "
                             f"{IMAGENET!r} from the networks")


def load_network(p: Params, root: Path, device: str, seed: int, log: logging.Logger) -> L.ProbeNet:
    """The export of `p.network`; for `random` the `random_like` export's architecture with a seeded init; for
    `imagenet` the `imagenet_weights` network."""
    if p.network not in p.networks:
        raise ValueError(f"linear_probe.network={p.network!r} is not in linear_probe.networks {list(p.networks)}")
    if p.network == IMAGENET:
        return L.imagenet_net(p.imagenet_weights, root, device, log)
    name = p.random_like if p.network == RANDOM else p.network
    export = MODELS / f"{name}.pt"
    pre = load_pretrained(root / export, device)
    if p.network == RANDOM:
        pre = random_network(pre, seed)
        return L.ProbeNet(pre.model.tower, pre.net_size, pre.color, pre.model,
                          {"random_init": True, "architecture_of": str(export), "seed": seed})
    return L.ProbeNet(pre.model.tower, pre.net_size, pre.color, pre.model, {"export": str(export), "step": pre.step})


def imagenet_split(root: Path, split: str, per_class: int) -> tuple[list[Path], list[str]]:
    """Resized images of `split` and their WNIDs: train from the folder, val from the tiny world's index or
    the devkit's ground truth. Images without a label are dropped."""
    rows = []
    with (root / MANIFEST).open(newline="") as f:
        rows = sorted((r for r in csv.DictReader(f) if r["split"] == split), key=lambda r: r["path"])
    if split == "train":
        wnids = [Path(r["source"]).parent.name for r in rows]
    else:
        labels = _val_wnids(root)
        wnids = [labels.get(r["source"], "") for r in rows]
    pairs = [(root / MANIFEST.parent / r["path"], w) for r, w in zip(rows, wnids) if w]
    if per_class:  # the first per_class images of each class, in path order
        kept, counts = [], Counter()
        for path, w in pairs:
            if counts[w] < per_class:
                kept.append((path, w))
                counts[w] += 1
        pairs = kept
    return [p for p, _ in pairs], [w for _, w in pairs]


def _val_wnids(root: Path) -> dict[str, str]:
    """{manifest source of a val image: WNID}."""
    import json

    index = root / WORLD_INDEX  # always written by fetch; ImageNet entries only where the world made ImageNet
    images = json.loads(index.read_text()) if index.is_file() else {}
    if any(s.startswith("imagenet/") for s in images):  # the tiny world: categories, WNIDs from the train folders
        wnid = {e["category"]: Path(s).parent.name for s, e in images.items() if s.startswith("imagenet/train/")}
        return {s: wnid[e["category"]] for s, e in images.items()
                if s.startswith("imagenet/val/") and e.get("category") in wnid}
    from scipy.io import loadmat

    meta, truth = root / DEVKIT / "meta.mat", root / DEVKIT / "ILSVRC2012_validation_ground_truth.txt"
    if not (meta.is_file() and truth.is_file()):
        raise FileNotFoundError(f"{truth} / {meta} not found: fetch ILSVRC2012_devkit_t12.tar.gz (val labels)")
    synsets = loadmat(meta, squeeze_me=True)["synsets"]
    by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    ids = [int(t) for t in truth.read_text().split()]
    return {f"imagenet/val/ILSVRC2012_val_{i:08d}.JPEG": by_id[c] for i, c in enumerate(ids, start=1)}


def imagenet_probe(p: Params, ctx: StageContext, net: L.ProbeNet, taps: L.LayerTaps, trunk: str) -> dict:
    """Heads trained online on fresh random crops and flips (`linear_online`), resumable from the state folder;
    top-1 on val's centre crops per layer, images/s and the data's counts."""
    train, train_w = imagenet_split(ctx.root, "train", p.imagenet_per_class)
    val, val_w = imagenet_split(ctx.root, "val", 0)
    classes = sorted(set(train_w))
    val, val_w = zip(*[(v, w) for v, w in zip(val, val_w) if w in classes]) if val else ((), ())
    if not train or not val:
        raise ValueError(f"{ctx.root / MANIFEST}: {len(train)} labelled train and {len(val)} val images")
    crop = L.ViewSpec("random", p.input_side, p.resize, net.color)
    data = O.TrainSet(train, np.array([classes.index(w) for w in train_w]), len(classes), crop)
    rt = O.Runtime(ctx.device, p.amp, p.batch, p.workers)
    state = ctx.root / STATE / p.network  # <config hash>/last.pt: one state per configuration
    state.mkdir(parents=True, exist_ok=True)
    heads, trained = O.train_heads(taps, data, p.sgd, ctx.base.seed, net.color, rt, ctx.log, trunk, p.stats_images,
                                   state, p.checkpoint_every)
    center = L.ViewSpec("center", p.input_side, p.resize, net.color)
    top1 = O.top1(taps, heads, list(val), np.array([classes.index(w) for w in val_w]), center, net.color, rt)
    for layer, v in top1.items():
        ctx.log.info("imagenet %s: top-1 %.3f", layer, v)
    return {"top1": top1, "classes": len(classes), "train_images": len(train), "val_images": len(val), **trained}


def voc_features(p: Params, ctx: StageContext, net: L.ProbeNet, taps: L.LayerTaps, trunk: str, split: str,
                 images: list[Path]) -> L.Features:
    """The VOC07 `split`'s features, cached in the state folder: reused when the trunk, the view, the pooling
    and the image list are the ones they were extracted with, else extracted afresh (a killed extraction
    leaves no marker, so it is redone)."""
    spec = L.ViewSpec("squash", p.input_side, p.input_side, net.color)
    key = {"trunk": trunk, "view": asdict(spec), "grids": dict(sorted(taps.grids.items())),
           "images": digest([np.frombuffer("\n".join(i.name for i in images).encode(), np.uint8)])}
    folder = ctx.root / STATE / p.network / f"voc_{split}"
    marker = folder / "features.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            ctx.log.info("voc07 %s: cached features in %s", split, folder)
            return L.Features({k: folder / f"{k}.npy" for k in taps.grids}, len(images), 1, saved["seconds"])
    shutil.rmtree(folder, ignore_errors=True)
    feats = L.extract(taps, L.ImageViews(images, spec), folder, net.color, ctx.device, p.batch, p.workers)
    atomic_write_json(marker, {"key": key, "seconds": feats.seconds})
    return feats


def voc_probe(p: Params, ctx: StageContext, net: L.ProbeNet, taps: L.LayerTaps, trunk: str) -> dict:
    """VOC07 test mAP per layer of per-class SVMs trained on trainval."""
    feats, labels = {}, {}
    for split in ("trainval", "test"):
        samples = load_split(ctx.root / VOC07, split)
        labels[split] = image_labels([s.annotation for s in samples], p.voc_classes)
        feats[split] = voc_features(p, ctx, net, taps, trunk, split, [s.image for s in samples])
    out = {}
    for layer in p.layers:
        out[layer] = H.voc_svm(np.asarray(feats["trainval"].load(layer)[0]), labels["trainval"],
                               np.asarray(feats["test"].load(layer)[0]), labels["test"], p.voc_classes, p.svm,
                               ctx.base.seed, p.workers)
        ctx.log.info("voc07 %s: mAP %s", layer, out[layer]["map"])
    return {"layers": out, "features_per_second": (feats["trainval"].per_second, feats["test"].per_second)}


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    try:
        net = load_network(params, ctx.root, ctx.device, ctx.base.seed, ctx.log)
        before = L.weights_digest(net.frozen)
        taps = L.LayerTaps(net.tower, net.net_size, params.input_side, params.dims, params.layers)
        imagenet = imagenet_probe(params, ctx, net, taps, before)
        voc = voc_probe(params, ctx, net, taps, before)
        after = L.weights_digest(net.frozen)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"linear_probe: {e}") from e
    if before != after:
        raise StageError(f"linear_probe: the {params.network} network's weights changed while probing")
    metrics = _metrics(params, taps, imagenet, voc, before, net.source, time.monotonic() - start)
    atomic_write_json(ctx.root / METRICS / f"{params.network}.json", metrics)
    _plot(ctx.root / PLOTS, params.network, metrics)


def _metrics(p: Params, taps: L.LayerTaps, imagenet: dict, voc: dict, weights: str, source: dict,
             seconds: float) -> dict:
    out = {"network": p.network, "imagenet_top1": imagenet["top1"],
           "voc07_map": {k: v["map"] for k, v in voc["layers"].items()},
           "voc07_ap": {k: v["ap"] for k, v in voc["layers"].items()},
           "voc07_cost": {k: v["cost"] for k, v in voc["layers"].items()},
           "voc07_skipped": {k: v["skipped"] for k, v in voc["layers"].items() if v["skipped"]},
           "dims": L.layer_dims(taps, p.input_side), "imagenet_classes": imagenet["classes"],
           "imagenet_train_images": imagenet["train_images"], "imagenet_val_images": imagenet["val_images"],
           "imagenet_iterations": p.sgd.iterations, "imagenet_passes": imagenet["passes"],
           "imagenet_images_per_second": imagenet["images_per_second"],
           "imagenet_train_seconds": imagenet["train_seconds"],
           "imagenet_loss_first": imagenet["loss_first"], "imagenet_loss_last": imagenet["loss_last"],
           "features_per_second": round(float(np.mean(voc["features_per_second"])), 1), "weights_sha256": weights,
           "weights_unchanged": True, "weights_source": source, "seconds": round(seconds, 1)}
    if p.profile_note:
        out["profile_note"] = p.profile_note
    return out


def _plot(folder: Path, name: str, metrics: dict) -> None:
    """plots/linear_probe/<net>.csv (a DVC plot) and .png: both probes against depth."""
    layers = list(metrics["imagenet_top1"])
    rows = [[k, metrics["imagenet_top1"][k], metrics["voc07_map"].get(k)] for k in layers]
    viz.write_csv(folder / f"{name}.csv", ["layer", "imagenet_top1", "voc07_map"], rows)
    fig = viz._figure(480, 320)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(layers, [r[1] for r in rows], marker="o", label="ImageNet linear top-1")
    ax.plot(layers, [np.nan if r[2] is None else r[2] for r in rows], marker="s", label="VOC07 SVM mAP")
    ax.set_ylim(0, 1)
    ax.set_title(f"linear probes: {name}")
    ax.legend()
    fig.tight_layout()
    from ctxrepro.io import atomic_write_bytes

    atomic_write_bytes(folder / f"{name}.png", viz._png(fig))
