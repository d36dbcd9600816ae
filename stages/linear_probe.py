"""Linear probes on frozen features, per layer: ImageNet top-1 (Zhang et al.) and VOC07 SVM mAP (Goyal et al. 2019).

Networks: each pretraining variant's export, `random` (an export's architecture, untrained) and, when
`imagenet_weights` names a source, `imagenet`: torchvision's ImageNet-supervised AlexNet / VGG-16, the upper
reference of Zhang et al. 2017 Table 2.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ctxrepro import viz
from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_probe as L
from ctxrepro.analysis.retrieval import random_network
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
SCRATCH = Path("data/linear_probe")  # features while the stage runs; removed when it ends
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
    dims: int = param(9000, min=1, help="features per layer after average pooling (Zhang et al.: ~9k)")
    input_side: int = param(227, min=16, help="network input side (Zhang et al., Goyal et al.: 227)")
    resize: int = param(256, min=16, help="ImageNet: short side before the crop (standard: 256)")
    views: int = param(1, min=1, help="augmented views (random crop + flip) extracted per training image")
    imagenet_per_class: int = param(0, min=0, help="training images per class; 0 = all")
    batch: int = param(256, min=1, help="images per extraction batch")
    workers: int = param(4, min=0, max=64, help="decoding processes")
    sgd: H.SgdConfig = param(H.SgdConfig(), help="ImageNet linear heads (batch, iterations, lr, lr_step, ...)")
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


def imagenet_probe(p: Params, ctx: StageContext, net: L.ProbeNet, taps: L.LayerTaps, scratch: Path) -> dict:
    """Top-1 on val per layer, features/s, and the data's counts."""
    seed = ctx.base.seed
    train, train_w = imagenet_split(ctx.root, "train", p.imagenet_per_class)
    val, val_w = imagenet_split(ctx.root, "val", 0)
    classes = sorted(set(train_w))
    val, val_w = zip(*[(v, w) for v, w in zip(val, val_w) if w in classes]) if val else ((), ())
    if not train or not val:
        raise ValueError(f"{ctx.root / MANIFEST}: {len(train)} labelled train and {len(val)} val images")
    crop = L.ViewSpec("random", p.input_side, p.resize, net.color)
    ftrain = L.extract(taps, L.ImageViews(train, crop, p.views, seed), scratch / "imagenet_train", net.color,
                       ctx.device, p.batch, p.workers)
    center = L.ViewSpec("center", p.input_side, p.resize, net.color)
    fval = L.extract(taps, L.ImageViews(list(val), center), scratch / "imagenet_val", net.color, ctx.device,
                     p.batch, p.workers)
    y_train = np.array([classes.index(w) for w in train_w])
    y_val = np.array([classes.index(w) for w in val_w])
    top1 = {}
    for layer in p.layers:
        head = H.train_softmax(ftrain.load(layer), y_train, len(classes), p.sgd, seed, ctx.device)
        top1[layer] = H.top1(head, fval.load(layer), y_val)
        ctx.log.info("imagenet %s: top-1 %.3f", layer, top1[layer])
    return {"top1": top1, "classes": len(classes), "train_images": len(train), "val_images": len(val),
            "features_per_second": (ftrain.per_second, fval.per_second)}


def voc_probe(p: Params, ctx: StageContext, net: L.ProbeNet, taps: L.LayerTaps, scratch: Path) -> dict:
    """VOC07 test mAP per layer of per-class SVMs trained on trainval."""
    spec = L.ViewSpec("squash", p.input_side, p.input_side, net.color)
    feats, labels = {}, {}
    for split in ("trainval", "test"):
        samples = load_split(ctx.root / VOC07, split)
        labels[split] = image_labels([s.annotation for s in samples], p.voc_classes)
        feats[split] = L.extract(taps, L.ImageViews([s.image for s in samples], spec), scratch / f"voc_{split}",
                                 net.color, ctx.device, p.batch, p.workers)
    out = {}
    for layer in p.layers:
        out[layer] = H.voc_svm(np.asarray(feats["trainval"].load(layer)[0]), labels["trainval"],
                               np.asarray(feats["test"].load(layer)[0]), labels["test"], p.voc_classes, p.svm,
                               ctx.base.seed)
        ctx.log.info("voc07 %s: mAP %s", layer, out[layer]["map"])
    return {"layers": out, "features_per_second": (feats["trainval"].per_second, feats["test"].per_second)}


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    scratch = ctx.root / SCRATCH / params.network
    try:
        net = load_network(params, ctx.root, ctx.device, ctx.base.seed, ctx.log)
        before = L.weights_digest(net.frozen)
        taps = L.LayerTaps(net.tower, net.net_size, params.input_side, params.dims, params.layers)
        shutil.rmtree(scratch, ignore_errors=True)
        imagenet = imagenet_probe(params, ctx, net, taps, scratch)
        voc = voc_probe(params, ctx, net, taps, scratch)
        after = L.weights_digest(net.frozen)
    except (OSError, ValueError, KeyError) as e:
        raise StageError(f"linear_probe: {e}") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if before != after:
        raise StageError(f"linear_probe: the {params.network} network's weights changed while probing")
    metrics = _metrics(params, taps, imagenet, voc, before, net.source, time.monotonic() - start)
    atomic_write_json(ctx.root / METRICS / f"{params.network}.json", metrics)
    _plot(ctx.root / PLOTS, params.network, metrics)


def _metrics(p: Params, taps: L.LayerTaps, imagenet: dict, voc: dict, digest: str, source: dict,
             seconds: float) -> dict:
    fps = [*imagenet["features_per_second"], *voc["features_per_second"]]
    out = {"network": p.network, "imagenet_top1": imagenet["top1"],
           "voc07_map": {k: v["map"] for k, v in voc["layers"].items()},
           "voc07_ap": {k: v["ap"] for k, v in voc["layers"].items()},
           "voc07_cost": {k: v["cost"] for k, v in voc["layers"].items()},
           "voc07_skipped": {k: v["skipped"] for k, v in voc["layers"].items() if v["skipped"]},
           "dims": L.layer_dims(taps, p.input_side), "imagenet_classes": imagenet["classes"],
           "imagenet_train_images": imagenet["train_images"], "imagenet_val_images": imagenet["val_images"],
           "features_per_second": round(float(np.mean(fps)), 1), "weights_sha256": digest,
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
