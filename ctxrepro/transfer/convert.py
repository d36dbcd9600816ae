"""From the pretext network to the Figure 6 network (paper section 4.3; docs/METHOD.md "Transfer").

- The pretext tower's conv1..conv5 and fc6 are copied into the Figure 6 trunk (`ctxrepro.transfer.trunk`),
  fc6 as conv6; every copied weight is logged as a key map (`log_mapping`).
- BN removal: each affine-free BN is folded into the conv/fc before it, W / sigma and (b - mu) / sigma,
  sigma = sqrt(var + eps), with (mu, var) estimated over real images ("images", default: every channel
  then has mean 0 and variance 1 on them, as the paper says) or BN's running averages ("running").
- `convert` builds one initialisation (scratch, ours, the rescaled variants) and saves it in the trunk's
  checkpoint format.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.pretext.color import projection_matrix
from ctxrepro.pretext.model import build_tower
from ctxrepro.transfer.imagenet import IMAGENET_MEAN, IMAGENET_STD, TORCHVISION
from ctxrepro.transfer.rescale import (WEIGHT_TYPES, Layers, LayerInputs, RescaleConfig, batches, channel_moments,
                                       moment_summary, weight_indices)
from ctxrepro.transfer.trunk import TOWER_PREFIX, Head, Trunk, TrunkSpec, build_trunk, fc_to_conv, figure6_layers


@torch.no_grad()
def fold_bn_(layer: nn.Module, mean: Tensor, var: Tensor, eps: float) -> None:
    """W <- W / sigma, b <- (b - mu) / sigma with sigma = sqrt(var + eps), per output channel."""
    sigma = (var.double() + eps).sqrt().to(layer.weight.device)
    shape = (-1, *([1] * (layer.weight.dim() - 1)))
    layer.weight.copy_((layer.weight.double() / sigma.view(shape)).to(layer.weight.dtype))
    layer.bias.copy_(((layer.bias.double() - mean.double().to(sigma.device)) / sigma).to(layer.bias.dtype))


def _entry(source: str, target: str, shape: Sequence[int], op: str,
           source_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """One mapping row: `shape` is the target's, `source_shape` the source's (same unless reshaped)."""
    return {"source": source, "target": target, "shape": list(shape), "op": op,
            "source_shape": list(shape if source_shape is None else source_shape)}


def transfer_tower(tower: nn.Sequential, trunk: nn.Module, source: str = TOWER_PREFIX, prefix: str = "trunk."
                   ) -> tuple[list[dict[str, Any]], list[tuple[str, nn.Module]]]:
    """Copy a pretext tower's conv weights into `trunk.body` (a Figure 6 trunk or a CaffeNet), fc6 into conv6
    (reshaped; a tower without fc6 copies only its convs). `prefix` starts the mapping's target names.

    Returns the mapping entries and the BN layers to fold, as (trunk layer name, BN module) in order.
    """
    mapping, folds, last = [], [], None
    for name, m in tower.named_children():
        if isinstance(m, nn.Conv2d):
            target = trunk.body.get_submodule(name)
            target.load_state_dict(m.state_dict())
            for p in ("weight", "bias"):
                shape = m.get_parameter(p).shape
                mapping.append(_entry(f"{source}{name}.{p}", f"{prefix}body.{name}.{p}", shape, "copy"))
            last = name
        elif isinstance(m, nn.Linear) and name == "fc6":
            conv = fc_to_conv(m, trunk.top.conv6.in_channels, trunk.spec.conv6_kernel)
            trunk.top.conv6.load_state_dict(conv.state_dict())
            mapping.append(_entry(f"{source}fc6.weight", "trunk.top.conv6.weight", conv.weight.shape, "reshape",
                                  m.weight.shape))
            mapping.append(_entry(f"{source}fc6.bias", "trunk.top.conv6.bias", conv.bias.shape, "copy"))
            last = "conv6"
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if last is None:
                raise ValueError(f"{source}{name}: batch norm with no conv/fc before it")
            folds.append((last, m))
            mapping.append(_entry(f"{source}{name}", f"{prefix}{'top' if last == 'conv6' else 'body'}.{last}",
                                  m.running_mean.shape, "fold"))
    return mapping, folds


def _index(layers: Layers, name: str) -> int:
    return [n for n, _ in layers].index(name)


def fold_batchnorms(trunk: Trunk, folds: list[tuple[str, nn.Module]], stats: str, images: Tensor | None,
                    batch: int, device: str | torch.device = "cpu") -> None:
    """Fold each BN into its layer, bottom to top. "images": (mu, var) measured on `images` at the
    layer's output with every lower BN already folded (what batch norm computes over that data);
    "running": BN's running averages (then the trunk equals the tower in eval mode)."""
    layers = trunk.layers()
    inputs = LayerInputs(layers, images, batch, device) if images is not None else None
    for name, bn in folds:
        layer = layers[_index(layers, name)][1]
        if stats == "running":
            mean, var = bn.running_mean, bn.running_var
        elif stats == "images":
            if inputs is None or len(images) == 0:
                raise ValueError("fold_batchnorms: bn_stats='images' needs images")
            mean, var = channel_moments(*inputs.at(_index(layers, name)), batch, device)
        else:
            raise ValueError(f"fold_batchnorms: bn_stats={stats!r} is not 'images' or 'running'")
        fold_bn_(layer, mean, var, bn.eps)


@torch.no_grad()
def set_input_norm(trunk: Trunk, images: Tensor, rms: float, batch: int = 64) -> None:
    """Dataset-wide mean, the spec's colour matrix, and the scale that gives `rms` over `images`
    (the pretext patches were scaled to RMS 50 each, section 3 / docs/METHOD.md). torchvision's networks get
    the normalisation they were trained with instead: (x / 255 - mean) / std."""
    norm = trunk.input
    if trunk.spec.color == TORCHVISION:
        norm.mean.copy_(torch.tensor(IMAGENET_MEAN) * 255.0)
        norm.color.copy_(torch.diag(1.0 / (torch.tensor(IMAGENET_STD) * 255.0)))
        norm.scale.fill_(1.0)
        return
    dev = norm.mean.device
    total = sum(xb.to(dev).double().sum(dim=(0, 2, 3)) for xb in batches(images, batch))
    norm.mean.copy_((total / (images.numel() / 3)).float())
    norm.color.copy_(projection_matrix() if trunk.spec.color == "projection" else torch.eye(3))
    norm.scale.fill_(1.0)
    sq = sum(float(norm(xb.to(dev)).double().square().sum()) for xb in batches(images, batch))
    norm.scale.fill_(rms / max(math.sqrt(sq / images.numel()), 1e-6))


def sample_crops(images: Sequence[Tensor], per_image: int, side: int, min_frac: float,
                 gen: torch.Generator) -> Tensor:
    """Random square crops (side U[min_frac, 1] of the shorter image side, anywhere), resized to side x side:
    R-CNN-like warped regions of real images. images: uint8 (3, H, W) each; returns uint8 (N, 3, s, s)."""
    crops = []
    for img in images:
        _, h, w = img.shape
        short = min(h, w)
        u = torch.rand((per_image, 3), generator=gen, dtype=torch.float64)
        for a, b, c in u.tolist():
            size = max(1, round(short * (min_frac + (1 - min_frac) * a)))
            y, x = int(b * (h - size + 1)), int(c * (w - size + 1))
            crop = img[None, :, y:y + size, x:x + size].float()
            crops.append(F.interpolate(crop, size=(side, side), mode="bilinear", antialias=True,
                                       align_corners=False))
    return torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8)


def load_pretext_tower(path: Path, like: dict[str, Any] | None = None) -> tuple[nn.Sequential, dict[str, Any]]:
    """The tower of a pretrain export (`engine.export_weights`: {"model", "step", "config"}), its width
    and fc6 size read off the weights, and the export's config (+ "step", "width").

    A plain state dict (keys `tower.<layer>.*` or `<layer>.*`, e.g. ImageNet-supervised weights in our
    tower's layout) is read with the tower name and patch of `like`; missing BN buffers are allowed
    (they are re-estimated when bn_stats is "images")."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
        state, config = ckpt["model"], dict(ckpt["config"])
    elif isinstance(ckpt, dict) and like is not None and all(isinstance(v, Tensor) for v in ckpt.values()):
        state, config = ckpt, {"tower": like["tower"], "patch": like["patch"], "color": like.get("color", "none")}
    else:
        raise ValueError(f"{path}: expected a pretrain export with keys 'model' and 'config'")
    has_prefix = any(k.startswith(TOWER_PREFIX) for k in state)
    tower_state = {k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)} \
        if has_prefix else dict(state)
    first = [k for k in tower_state if k.startswith("conv") and k.endswith(".weight")]
    if not first or "fc6.weight" not in tower_state:
        raise ValueError(f"{path}: no tower conv*/fc6 weights")
    width = tower_state[sorted(first, key=_conv_order)[0]].shape[0]
    tower = build_tower(config["tower"], config["patch"], width, tower_state["fc6.weight"].shape[0])
    shapes = {k: v.shape for k, v in tower.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} != {tuple(shapes[k])}" for k, v in tower_state.items()
             if k in shapes and v.shape != shapes[k]]
    if wrong:
        raise ValueError(f"{path}: weights do not fit a {config['tower']} tower of width {width}: {wrong[:3]}")
    missing, unexpected = tower.load_state_dict(tower_state, strict=False)
    bad = [k for k in missing if "running_" not in k and "num_batches" not in k] + list(unexpected)
    if bad:
        raise ValueError(f"{path}: weights do not fit a {config['tower']} tower of width {width}: {bad[:5]}")
    config["step"], config["width"] = ckpt.get("step") if "model" in ckpt else None, width
    return tower, config


def _conv_order(key: str) -> tuple[int, ...]:
    """conv1 < conv2 < ... and conv1_1 < conv1_2 < conv2_1 (VGG)."""
    return tuple(int(p) for p in key.split(".")[0][4:].split("_"))


def log_mapping(mapping: list[dict[str, Any]], log: logging.Logger, init: str) -> None:
    for e in mapping:
        log.info("%s: %s %s -> %s %s (%s)", init, e["source"], tuple(e["source_shape"]), e["target"],
                 tuple(e["shape"]), e["op"])


@dataclass(frozen=True)
class CropSet:
    """Real-image crops (uint8, N x 3 x side x side) for one conversion."""

    fit: Tensor  # BN statistics, input normalisation, k-means, within-layer normalisation
    heldout: Tensor  # only the reported moments
    calib: Tensor  # the fixed batch of the gradient-ratio calibration


NEW_LAYERS = ("conv6b", "fc7", "fc8")  # Figure 6: these start random in every pretrained init


@dataclass(frozen=True)
class Init:
    """One Table 1 initialisation: where its weights come from and which network it builds."""

    weights: str | None  # "ours" (the pretrain variant's export), "imagenet" (convert.imagenet_weights), None
    network: str  # "figure6" (R-CNN rows, `trunk`), "caffenet" (rescale rows, `caffenet`) or "alexnet" (R-CNN's own
    #               AlexNet rows: torchvision's AlexNet as a CaffeNet-format network, `caffenet.convert_alexnet`)


# The paper's lower-case init names (section 4.3, Table 1). Figure 6 inits: BN folded, conv6b/fc7/fc8 Xavier,
# no rescaling. CaffeNet inits: k-means for every layer not copied, then Kraehenbuehl et al.'s rescaling.
INITS: dict[str, Init] = {
    "scratch": Init(None, "figure6"),  # Scratch-Ours
    "ours": Init("ours", "figure6"),  # Ours-projection, Ours-color-dropping
    "imagenet": Init("imagenet", "figure6"),  # torchvision's conv layers under Figure 6's head (Table 2's ImageNet)
    "imagenet_alexnet": Init("imagenet", "alexnet"),  # ImageNet-R-CNN: AlexNet's own fc6 and fc7, a new fc8
    "scratch_alexnet": Init(None, "alexnet"),  # Scratch-R-CNN (Agrawal et al.): AlexNet from random init
    "kmeans_rescale": Init(None, "caffenet"),  # K-means-rescale, VGG-K-means-rescale
    "ours_rescale": Init("ours", "caffenet"),  # Ours-rescale, VGG-Ours-rescale
    "imagenet_rescale": Init("imagenet", "caffenet"),  # ImageNet-rescale, VGG-ImageNet-rescale (fc kept)
}


def _qualified(trunk: Trunk, head: Head) -> dict[str, str]:
    names = {n.rsplit(".", 1)[-1]: f"trunk.{n}" for n, m in trunk.named_modules() if isinstance(m, WEIGHT_TYPES)}
    names.update({n.rsplit(".", 1)[-1]: f"head.{n}" for n, m in head.named_modules() if isinstance(m, WEIGHT_TYPES)})
    return names


def convert(init: str, spec: TrunkSpec, tower: nn.Sequential | None, crops: CropSet, bn_stats: str, rms: float,
            cfg: RescaleConfig, seed: int, log: logging.Logger, device: str | torch.device = "cpu"
            ) -> tuple[Trunk, Head, list[dict[str, Any]], dict[str, Any]]:
    """One initialisation of the Figure 6 network, the paper's R-CNN rows (docs/METHOD.md "Transfer"):

    scratch: Xavier everywhere. ours / imagenet: the tower's weights with BN folded, conv6b/fc7/fc8 Xavier.
    No rescaling (the rescale rows are `ctxrepro.transfer.caffenet`). Returns (trunk, head, weight mapping,
    stats) on the CPU.
    """
    if INITS[init].network != "figure6":
        raise ValueError(f"convert: init {init!r} builds the {INITS[init].network} network, not Figure 6's")
    if (INITS[init].weights is not None) != (tower is not None):
        raise ValueError(f"convert: init {init!r} {'takes no' if tower is not None else 'needs'} pretrained weights")
    trunk, head = build_trunk(spec if tower is not None else replace(spec, color="none"), seed)
    trunk, head = trunk.to(device), head.to(device)
    set_input_norm(trunk, crops.fit, rms, cfg.batch)
    mapping, stats = [], {}
    if tower is not None:
        mapping, folds = transfer_tower(tower.to(device), trunk)
        fold_batchnorms(trunk, folds, bn_stats, crops.fit, cfg.batch, device)
        stats["fold_heldout"] = moment_summary(trunk.layers(), [n for n, _ in folds], crops.heldout, cfg.batch, device)
    layers = figure6_layers(trunk, head)
    new = list(NEW_LAYERS) if tower is not None else [layers[i][0] for i in weight_indices(layers)]
    where = _qualified(trunk, head)
    for n in new:
        mapping.append(_entry("-", f"{where[n]}.weight", dict(layers)[n].weight.shape, "new:xavier", []))
    return trunk.cpu(), head.cpu(), mapping, stats
