"""The network of the paper's rescale rows (section 4.3, Table 1): "a caffenet with the groups removed".

The released README converts the pretrained tower with debatchnorm.py into CaffeNet's structure: conv1..conv5
copied with batch norm folded, RoI pooling to 6x6 (AlexNet; 7x7 for VGG-16) in place of pool5, then fc6,
fc7, fc8. Section 4.3: "we discarded all pre-trained fc-layers from our model, re-initializing them with the
K-means procedure of [31]", then [31]'s between-layer rescaling of every layer. Unlike the Figure 6 network
(`ctxrepro.transfer.trunk`) the pretext fc6 is unused: its 3x3 input does not fit the RoI grid, and
debatchnorm.py skips a layer whose shape differs. Pretrained fc layers that do fit (ImageNet-supervised
weights: VGG-ImageNet-rescale kept them) are copied when `keep_fc` asks for it.

For whole crops (the data-dependent init) the RoI is the whole conv5 map, max-pooled adaptively to the RoI
grid; Fast R-CNN (`ctxrepro.detection.model`) RoI-pools proposals from `conv5` instead.
Checkpoint (torch.save, weights_only-loadable): {"format": FORMAT, "init", "spec", "net": state dict,
"mapping", "source", "stats"}; `load_converted` reads it and the Figure 6 format alike.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctxrepro.checkpoint import atomic_torch_save
from ctxrepro.pretext.model import TOWERS, conv_output, xavier_init_
from ctxrepro.transfer.convert import CropSet, _entry, fold_batchnorms, set_input_norm, transfer_tower
from ctxrepro.transfer.rescale import RescaleConfig, calibrate, moment_summary, weight_indices, within_layer_init
from ctxrepro.transfer.trunk import FORMAT as FIGURE6_FORMAT
from ctxrepro.transfer.trunk import Converted, InputNorm, body_layers, load_checkpoint

FORMAT = "ctxrepro.caffenet/1"
FC_LAYERS = ("fc6", "fc7", "fc8")


@dataclass(frozen=True)
class CaffeNetSpec:
    """CaffeNet's shape on a tower's conv layers (defaults: the paper's AlexNet values)."""

    tower: str = "alexnet"
    width: int = 96  # conv1 channels (model.DEFAULT_WIDTH)
    roi_pool: int = 6  # RoI grid: CaffeNet's pool5 is 6x6, VGG-16's 7x7
    fc6: int = 4096
    fc7: int = 4096
    classes: int = 21  # 20 VOC classes + background
    input_side: int = 227  # crops for the data-dependent init
    color: str = "none"  # "projection": the input layer applies section 3.1's projection B

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise ValueError(f"CaffeNetSpec.tower={self.tower!r}: choose one of {sorted(TOWERS)}")
        if self.color not in ("none", "projection", "torchvision"):
            raise ValueError(f"CaffeNetSpec.color={self.color!r}: 'none', 'projection' or 'torchvision'")


class CaffeNet(nn.Module):
    """0..255 RGB images -> conv1..conv5 (no BN) -> RoI grid -> fc6, fc7 (ReLU) -> fc8 class scores."""

    def __init__(self, spec: CaffeNetSpec):
        super().__init__()
        self.spec = spec
        body, _ = body_layers(spec.tower, spec.width)
        self.input = InputNorm()
        self.body = nn.Sequential(OrderedDict(body))
        self.roi = nn.AdaptiveMaxPool2d(spec.roi_pool)
        c5 = [m for _, m in body if isinstance(m, nn.Conv2d)][-1].out_channels
        self.fc = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten(1)), ("fc6", nn.Linear(c5 * spec.roi_pool ** 2, spec.fc6)),
            ("relu6", nn.ReLU(inplace=True)), ("fc7", nn.Linear(spec.fc6, spec.fc7)),
            ("relu7", nn.ReLU(inplace=True)), ("fc8", nn.Linear(spec.fc7, spec.classes))]))
        self.conv5_stride = math.prod(m.stride if isinstance(m.stride, int) else m.stride[0]
                                      for _, m in body if isinstance(m, (nn.Conv2d, nn.MaxPool2d)))
        self.pool5_side = spec.roi_pool  # what Fast R-CNN RoI-pools to
        if conv_output(body, spec.input_side)[1] < 1:
            raise ValueError(f"input_side {spec.input_side} is too small for the {spec.tower} conv layers")

    def conv5(self, x: Tensor) -> Tensor:
        """The conv5 map (after ReLU): what Fast R-CNN RoI-pools."""
        return self.body(self.input(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.roi(self.conv5(x)))

    def layers(self) -> list[tuple[str, nn.Module]]:
        """The whole network as one flat list of (name, module), in forward order."""
        return [("input", self.input), *self.body.named_children(), ("roi_pool", self.roi),
                *self.fc.named_children()]


def build_caffenet(spec: CaffeNetSpec, seed: int = 0) -> CaffeNet:
    """CaffeNet with Caffe-Xavier weights and zero biases, drawn from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CaffeNet(spec)
        xavier_init_(net)
    return net


def _conv_part(tower: nn.Sequential) -> nn.Sequential:
    """The pretext tower up to pool5 (its fc6 and what follows are handled by `_copy_fc`)."""
    names = [n for n, _ in tower.named_children()]
    end = names.index("flatten") if "flatten" in names else len(names)
    return nn.Sequential(OrderedDict(list(tower.named_children())[:end]))


def _copy_fc(tower: nn.Sequential, net: CaffeNet, log: logging.Logger) -> tuple[list[dict], list, list[str]]:
    """Copy the tower's fc6 / fc7 where their shapes equal CaffeNet's (as debatchnorm.py does); returns the
    mapping rows, the BN layers to fold and the names copied."""
    mapping, folds, copied = [], [], []
    for name in FC_LAYERS[:2]:
        src, dst = getattr(tower, name, None), net.fc.get_submodule(name)
        if not isinstance(src, nn.Linear) or src.weight.shape != dst.weight.shape:
            log.info("%s: no pretrained layer of shape %s: re-initialised", name, tuple(dst.weight.shape))
            continue
        dst.load_state_dict(src.state_dict())
        mapping += [_entry(f"tower.{name}.{p}", f"fc.{name}.{p}", dst.get_parameter(p).shape, "copy")
                    for p in ("weight", "bias")]
        bn = getattr(tower, f"bn{name[2:]}", None)
        if isinstance(bn, nn.BatchNorm1d):
            folds.append((name, bn))
            mapping.append(_entry(f"tower.bn{name[2:]}", f"fc.{name}", bn.running_mean.shape, "fold"))
        copied.append(name)
    return mapping, folds, copied


def convert_caffenet(init: str, spec: CaffeNetSpec, tower: nn.Sequential | None, keep_fc: bool, crops: CropSet,
                     bn_stats: str, rms: float, cfg: RescaleConfig, seed: int, log: logging.Logger,
                     device: str | torch.device = "cpu") -> tuple[CaffeNet, list[dict[str, Any]], dict[str, Any]]:
    """One rescale-row initialisation (section 4.3; Kraehenbuehl et al. 2015):

    with a tower (ours_rescale, imagenet_rescale): conv1..conv5 copied, BN folded; fc6/fc7 copied too when
    `keep_fc` and their shapes fit; every other weight layer k-means + within-layer normalisation.
    Without one (kmeans_rescale): every layer k-means + normalisation. Then between-layer calibration of
    every layer. Returns (network, weight mapping, stats) on the CPU.
    """
    gen = torch.Generator().manual_seed(seed)
    net = build_caffenet(spec if tower is not None else replace(spec, color="none"), seed).to(device)
    set_input_norm(net, crops.fit, rms, cfg.batch)
    mapping, stats, copied = [], {}, []
    if tower is not None:
        tower = tower.to(device)
        mapping, folds = transfer_tower(_conv_part(tower), net, prefix="")
        copied = [n for n, m in net.body.named_children() if isinstance(m, nn.Conv2d)]
        if keep_fc:
            fc_map, fc_folds, fc_copied = _copy_fc(tower, net, log)
            mapping, folds, copied = mapping + fc_map, folds + fc_folds, copied + fc_copied
        fold_batchnorms(net, folds, bn_stats, crops.fit, cfg.batch, device)
        stats["fold_heldout"] = moment_summary(net.layers(), [n for n, _ in folds], crops.heldout, cfg.batch,
                                               device)
    layers = net.layers()
    new = [layers[i][0] for i in weight_indices(layers) if layers[i][0] not in copied]
    stats["within"] = within_layer_init(layers, {n: "kmeans" for n in new}, crops.fit, cfg, gen, log, device)
    stats["within_heldout"] = moment_summary(layers, new, crops.heldout, cfg.batch, device)
    stats["calibration"] = asdict(calibrate(layers, crops.calib.to(device), cfg, gen, log))
    where = {n: f"{'fc' if n in FC_LAYERS else 'body'}.{n}" for n in new}
    for n in new:
        mapping.append(_entry("-", f"{where[n]}.weight", dict(layers)[n].weight.shape,
                              f"new:{stats['within'][n]['method']}", []))
    return net.cpu(), mapping, stats


def convert_alexnet(spec: CaffeNetSpec, tower: nn.Sequential | None, crops: CropSet, rms: float, batch: int,
                    seed: int, log: logging.Logger) -> tuple[CaffeNet, list[dict[str, Any]], dict[str, Any]]:
    """R-CNN's own AlexNet rows (Table 1): with ImageNet weights (ImageNet-R-CNN) conv1..conv5, fc6 and fc7 are
    copied and a new 21-way fc8 drawn from N(0, 0.01) with zero bias (R-CNN's fc8_pascal filler); without
    (Scratch-R-CNN) every layer is Caffe-Xavier with zero biases, as our other scratch rows. No k-means, no
    rescaling. Returns (network, weight mapping, stats) on the CPU."""
    net = build_caffenet(spec if tower is not None else replace(spec, color="none"), seed)
    set_input_norm(net, crops.fit, rms, batch)
    layers = net.layers()
    if tower is None:
        return net, [_entry("-", f"{'fc' if n in FC_LAYERS else 'body'}.{n}.weight", dict(layers)[n].weight.shape,
                            "new:xavier", []) for n in (layers[i][0] for i in weight_indices(layers))], {}
    mapping, folds = transfer_tower(_conv_part(tower), net, prefix="")
    fc_map, fc_folds, copied = _copy_fc(tower, net, log)
    if folds or fc_folds or copied != ["fc6", "fc7"]:
        raise ValueError(f"AlexNet rows need torchvision's AlexNet (no batch norm, fc6 and fc7 of {spec.fc6} and "
                         f"{spec.fc7}): got batch norm {[n for n, _ in folds + fc_folds]}, fc layers copied {copied}")
    fc8 = net.fc.fc8
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fc8.weight.normal_(0.0, 0.01)
        fc8.bias.zero_()
    return net, mapping + fc_map + [_entry("-", "fc.fc8.weight", fc8.weight.shape, "new:gaussian(0.01)", [])], {}


def save_caffenet(path: Path, net: CaffeNet, init: str, mapping: list[dict[str, Any]],
                  source: dict[str, Any] | None, stats: dict[str, Any]) -> None:
    atomic_torch_save({"format": FORMAT, "init": init, "spec": asdict(net.spec),
                       "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                       "mapping": mapping, "source": source, "stats": stats}, Path(path))


def load_converted(path: Path | str, device: str | torch.device = "cpu") -> Converted:
    """A convert checkpoint of either network: Figure 6 (trunk + head) or CaffeNet (trunk = the net, head None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no converted checkpoint (run `dvc repro convert`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if found == FIGURE6_FORMAT:
        return load_checkpoint(path, device)
    if found != FORMAT:
        raise ValueError(f"{path}: not a {FIGURE6_FORMAT} or {FORMAT} checkpoint (format {found!r})")
    net = CaffeNet(CaffeNetSpec(**ckpt["spec"]))
    net.load_state_dict(ckpt["net"])
    return Converted(net.to(device), None, ckpt["init"], ckpt["mapping"], ckpt["source"], ckpt["stats"],
                     network="caffenet")
