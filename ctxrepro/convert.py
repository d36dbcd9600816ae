"""From the pretext network to the detection network of Figure 6 (paper section 4.3; METHOD.md "Transfer").

- `Trunk`: one tower's conv1..pool5 without batch norm, fc6 turned into conv6 (kernel = pool5's side at
  the pretext patch, 3x3 for 96 px), and a new conv6b (1x1, ReLU). At Figure 6's 227 px input pool5 is
  7x7. An `InputNorm` layer in front takes RGB images on the 0..255 scale (the pretext patches' mean
  subtraction, colour projection and RMS-50 scale, with dataset-wide values), so users of the trunk feed
  plain images. `Head`: Figure 6's pool6 (3/2), fc7, fc8 (21-way), for whoever wants the whole net.
- BN removal: each affine-free BN is folded into the conv/fc before it, W / sigma and (b - mu) / sigma,
  sigma = sqrt(var + eps), with (mu, var) estimated over real images ("images", default: every channel
  then has mean 0 and variance 1 on them, as the paper says) or BN's running averages ("running").
- Checkpoint format (`save_checkpoint` / `load_checkpoint` / `load_trunk`), a torch.save dict loadable
  with weights_only=True: {"format": FORMAT, "init": str, "spec": TrunkSpec fields, "trunk": Trunk state
  dict, "head": Head state dict, "mapping": [{"source", "source_shape", "target", "shape", "op"}],
  "source": provenance of the pretrained weights or None, "stats": what the conversion measured}.

Fast R-CNN users: `trunk.conv5(images)` is the map to RoI-pool (stride `trunk.conv5_stride`) to
`trunk.pool5_side` x `trunk.pool5_side`, in place of pool5; `trunk.from_pool5(pooled)` then gives conv6b.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.checkpoint import atomic_torch_save
from ctxrepro.color import projection_matrix
from ctxrepro.model import TOWERS, build_tower, conv_output, xavier_init_
from ctxrepro.rescale import (WEIGHT_TYPES, Layers, RescaleConfig, batches, calibrate, channel_moments,
                              moment_summary, weight_indices, within_layer_init)

FORMAT = "ctxrepro.trunk/1"
TOWER_PREFIX = "tower."


@dataclass(frozen=True)
class TrunkSpec:
    """The shape of the Figure 6 network (defaults: the paper's AlexNet-style values)."""

    tower: str = "alexnet"
    width: int = 96  # conv1 channels (model.DEFAULT_WIDTH)
    conv6: int = 4096  # = the tower's fc6 size (Figure 6: conv6 3x3, 4096)
    conv6_kernel: int = 3  # pool5 side at the pretext patch (96 px -> 3x3)
    conv6b: int = 1024  # Figure 6: conv6b 1x1, 1024
    fc7: int = 4096  # Figure 6
    classes: int = 21  # 20 VOC classes + background
    input_side: int = 227  # Figure 6: 227 px -> pool5 7x7
    color: str = "none"  # "projection": the input layer applies section 3.1's projection B

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise ValueError(f"TrunkSpec.tower={self.tower!r}: choose one of {sorted(TOWERS)}")
        if self.color not in ("none", "projection"):
            raise ValueError(f"TrunkSpec.color={self.color!r}: 'none' or 'projection'")


class InputNorm(nn.Module):
    """0..255 RGB -> network input: (x - mean), times the colour matrix (identity or projection B),
    times `scale` (fixed buffers, not trained)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("color", torch.eye(3))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() - self.mean.view(1, 3, 1, 1)
        return torch.einsum("ij,bjhw->bihw", self.color, x) * self.scale


def _body_layers(spec: TrunkSpec) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """The tower's conv stack without its BN layers, and its pool5."""
    layers = TOWERS[spec.tower](spec.width)
    name, pool5 = layers[-1]
    if name != "pool5":
        raise AssertionError(f"{spec.tower} tower ends with {name}, expected pool5")
    return [(n, m) for n, m in layers[:-1] if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))], pool5


class Trunk(nn.Module):
    """Figure 6 conv1..conv6b on images (B, 3, H, W), 0..255 RGB -> conv6b map after ReLU."""

    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.spec = spec
        body, pool5 = _body_layers(spec)
        self.input = InputNorm()
        self.body = nn.Sequential(OrderedDict(body))
        self.pool5 = pool5
        c5 = [m for _, m in body if isinstance(m, nn.Conv2d)][-1].out_channels
        self.top = nn.Sequential(OrderedDict([
            ("conv6", nn.Conv2d(c5, spec.conv6, spec.conv6_kernel)), ("relu6", nn.ReLU(inplace=True)),
            ("conv6b", nn.Conv2d(spec.conv6, spec.conv6b, 1)), ("relu6b", nn.ReLU(inplace=True))]))
        self.conv5_stride = math.prod(m.stride if isinstance(m.stride, int) else m.stride[0]
                                      for _, m in body if isinstance(m, (nn.Conv2d, nn.MaxPool2d)))
        self.pool5_side = conv_output([*body, ("pool5", pool5)], spec.input_side)[1]
        if self.pool5_side < spec.conv6_kernel:
            raise ValueError(f"input_side {spec.input_side} gives pool5 {self.pool5_side}x{self.pool5_side}, "
                             f"smaller than conv6's {spec.conv6_kernel}x{spec.conv6_kernel} kernel")

    def conv5(self, x: Tensor) -> Tensor:
        """The conv5 map (after ReLU, before pool5): what Fast R-CNN RoI-pools."""
        return self.body(self.input(x))

    def from_pool5(self, p: Tensor) -> Tensor:
        return self.top(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.top(self.pool5(self.conv5(x)))

    def layers(self) -> list[tuple[str, nn.Module]]:
        """The trunk as one flat list of (name, module), in forward order."""
        return [("input", self.input), *self.body.named_children(), ("pool5", self.pool5),
                *self.top.named_children()]


class Head(nn.Module):
    """Figure 6 after conv6b: pool6 (3, stride 2), fc7 + ReLU, fc8 (classes)."""

    def __init__(self, spec: TrunkSpec, conv6b_side: int):
        super().__init__()
        pool6 = nn.MaxPool2d(3, 2, ceil_mode=True)
        side = conv_output([("pool6", pool6)], conv6b_side)[1]
        if side < 1:
            raise ValueError(f"input_side {spec.input_side} gives conv6b {conv6b_side}x{conv6b_side}, "
                             f"too small for pool6 (3x3): Figure 6's head needs a larger input")
        self.seq = nn.Sequential(OrderedDict([
            ("pool6", pool6), ("flatten", nn.Flatten(1)), ("fc7", nn.Linear(spec.conv6b * side * side, spec.fc7)),
            ("relu7", nn.ReLU(inplace=True)), ("fc8", nn.Linear(spec.fc7, spec.classes))]))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


def build_trunk(spec: TrunkSpec, seed: int = 0) -> tuple[Trunk, Head]:
    """Trunk and head of Figure 6 with Caffe-Xavier weights and zero biases (the "scratch" init), drawn
    from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = Trunk(spec)
        head = Head(spec, trunk.pool5_side - spec.conv6_kernel + 1)
        xavier_init_(trunk)
        xavier_init_(head)
    return trunk, head


def figure6_layers(trunk: Trunk, head: Head) -> list[tuple[str, nn.Module]]:
    """The whole Figure 6 network as one flat (name, module) list (modules shared with trunk/head)."""
    return [*trunk.layers(), *head.seq.named_children()]


def fc_to_conv(fc: nn.Linear, channels: int, side: int) -> nn.Conv2d:
    """fc6 -> conv6: a (out, C*s*s) matrix on flattened (C, s, s) maps is a s x s convolution."""
    if fc.in_features != channels * side * side:
        raise ValueError(f"fc_to_conv: fc has {fc.in_features} inputs, not {channels}x{side}x{side}")
    conv = nn.Conv2d(channels, fc.out_features, side)
    with torch.no_grad():  # nn.Flatten of NCHW is channel-major, exactly view(out, C, s, s)
        conv.weight.copy_(fc.weight.view(fc.out_features, channels, side, side))
        conv.bias.copy_(fc.bias)
    return conv


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


def transfer_tower(tower: nn.Sequential, trunk: Trunk, source: str = TOWER_PREFIX
                   ) -> tuple[list[dict[str, Any]], list[tuple[str, nn.Module]]]:
    """Copy a pretext tower's conv weights into the trunk, fc6 into conv6 (reshaped).

    Returns the mapping entries and the BN layers to fold, as (trunk layer name, BN module) in order.
    """
    mapping, folds, last = [], [], None
    for name, m in tower.named_children():
        if isinstance(m, nn.Conv2d):
            target = trunk.body.get_submodule(name)
            target.load_state_dict(m.state_dict())
            for p in ("weight", "bias"):
                shape = m.get_parameter(p).shape
                mapping.append(_entry(f"{source}{name}.{p}", f"trunk.body.{name}.{p}", shape, "copy"))
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
            mapping.append(_entry(f"{source}{name}", f"trunk.{'top' if last == 'conv6' else 'body'}.{last}",
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
    for name, bn in folds:
        layer = layers[_index(layers, name)][1]
        if stats == "running":
            mean, var = bn.running_mean, bn.running_var
        elif stats == "images":
            if images is None or len(images) == 0:
                raise ValueError("fold_batchnorms: bn_stats='images' needs images")
            mean, var = channel_moments(layers, _index(layers, name), images, batch, device)
        else:
            raise ValueError(f"fold_batchnorms: bn_stats={stats!r} is not 'images' or 'running'")
        fold_bn_(layer, mean, var, bn.eps)


@torch.no_grad()
def set_input_norm(trunk: Trunk, images: Tensor, rms: float, batch: int = 64) -> None:
    """Dataset-wide mean, the spec's colour matrix, and the scale that gives `rms` over `images`
    (the pretext patches were scaled to RMS 50 each, section 3 / METHOD.md)."""
    norm = trunk.input
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


def save_checkpoint(path: Path, trunk: Trunk, head: Head, init: str, mapping: list[dict[str, Any]],
                    source: dict[str, Any] | None, stats: dict[str, Any]) -> None:
    state = {"format": FORMAT, "init": init, "spec": asdict(trunk.spec),
             "trunk": {k: v.detach().cpu() for k, v in trunk.state_dict().items()},
             "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
             "mapping": mapping, "source": source, "stats": stats}
    atomic_torch_save(state, Path(path))


@dataclass
class Converted:
    """A loaded convert checkpoint."""

    trunk: Trunk
    head: Head
    init: str
    mapping: list[dict[str, Any]]
    source: dict[str, Any] | None
    stats: dict[str, Any]


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> Converted:
    """A convert checkpoint (module docstring) as modules on `device`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no converted checkpoint (run `dvc repro convert`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format {found!r})")
    spec = TrunkSpec(**ckpt["spec"])
    trunk = Trunk(spec)
    head = Head(spec, trunk.pool5_side - spec.conv6_kernel + 1)
    trunk.load_state_dict(ckpt["trunk"])
    head.load_state_dict(ckpt["head"])
    return Converted(trunk.to(device), head.to(device), ckpt["init"], ckpt["mapping"], ckpt["source"], ckpt["stats"])


def load_trunk(path: Path | str, device: str | torch.device = "cpu") -> Trunk:
    """conv1..conv6b of a convert checkpoint: images (B, 3, H, W) 0..255 RGB -> conv6b feature map."""
    return load_checkpoint(path, device).trunk


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
# init -> (uses pretrained weights, within-layer method or None = no rescale)
INITS: dict[str, tuple[bool, str | None]] = {
    "scratch": (False, None), "ours": (True, None), "ours_rescale": (True, "gaussian"),
    "kmeans_rescale": (False, "kmeans"), "imagenet": (True, "gaussian")}


def _qualified(trunk: Trunk, head: Head) -> dict[str, str]:
    names = {n.rsplit(".", 1)[-1]: f"trunk.{n}" for n, m in trunk.named_modules() if isinstance(m, WEIGHT_TYPES)}
    names.update({n.rsplit(".", 1)[-1]: f"head.{n}" for n, m in head.named_modules() if isinstance(m, WEIGHT_TYPES)})
    return names


def convert(init: str, spec: TrunkSpec, tower: nn.Sequential | None, crops: CropSet, bn_stats: str, rms: float,
            cfg: RescaleConfig, seed: int, log: logging.Logger, device: str | torch.device = "cpu"
            ) -> tuple[Trunk, Head, list[dict[str, Any]], dict[str, Any]]:
    """One initialisation of the Figure 6 network (METHOD.md "Transfer"):

    scratch: Xavier everywhere. ours: the tower's weights with BN folded, conv6b/fc7/fc8 Xavier.
    ours_rescale / imagenet: ours, then conv6b/fc7/fc8 Gaussian + within-layer normalisation, then
    between-layer calibration of every layer. kmeans_rescale: every layer k-means + normalisation,
    then calibration. Returns (trunk, head, weight mapping, stats) on the CPU.
    """
    pretrained, method = INITS[init]
    if pretrained != (tower is not None):
        raise ValueError(f"convert: init {init!r} {'needs' if pretrained else 'takes no'} pretrained weights")
    gen = torch.Generator().manual_seed(seed)
    trunk, head = build_trunk(spec if pretrained else replace(spec, color="none"), seed)
    trunk, head = trunk.to(device), head.to(device)
    set_input_norm(trunk, crops.fit, rms, cfg.batch)
    mapping, stats = [], {}
    if tower is not None:
        mapping, folds = transfer_tower(tower.to(device), trunk)
        fold_batchnorms(trunk, folds, bn_stats, crops.fit, cfg.batch, device)
        stats["fold_heldout"] = moment_summary(trunk.layers(), [n for n, _ in folds], crops.heldout, cfg.batch, device)
    layers = figure6_layers(trunk, head)
    names = [layers[i][0] for i in weight_indices(layers)]
    new = list(NEW_LAYERS) if pretrained else names
    if method is not None:
        stats["within"] = within_layer_init(layers, {n: method for n in new}, crops.fit, cfg, gen, log, device)
        stats["within_heldout"] = moment_summary(layers, new, crops.heldout, cfg.batch, device)
        stats["calibration"] = asdict(calibrate(layers, crops.calib.to(device), cfg, gen, log))
    where = _qualified(trunk, head)
    for n in new:
        kind = stats["within"][n]["method"] if method is not None else "xavier"
        mapping.append(_entry("-", f"{where[n]}.weight", dict(layers)[n].weight.shape, f"new:{kind}", []))
    return trunk.cpu(), head.cpu(), mapping, stats
