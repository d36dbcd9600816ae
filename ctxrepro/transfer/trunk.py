"""The network of Figure 6 that every downstream task starts from, and its checkpoint format (section 4.3).

- `Trunk`: one tower's conv1..pool5 without batch norm, fc6 turned into conv6 (kernel = pool5's side at
  the pretext patch, 3x3 for 96 px), and a new conv6b (1x1, ReLU). At Figure 6's 227 px input pool5 is
  7x7. An `InputNorm` layer in front takes RGB images on the 0..255 scale (the pretext patches' mean
  subtraction, colour projection and RMS-50 scale, with dataset-wide values), so users of the trunk feed
  plain images. `Head`: Figure 6's pool6 (3/2), fc7, fc8 (21-way), for whoever wants the whole net.
- Checkpoint format (`save_checkpoint` / `load_checkpoint` / `load_trunk`), a torch.save dict loadable
  with weights_only=True: {"format": FORMAT, "init": str, "spec": TrunkSpec fields, "trunk": Trunk state
  dict, "head": Head state dict, "mapping": [{"source", "source_shape", "target", "shape", "op"}],
  "source": provenance of the pretrained weights or None, "stats": what the conversion measured}.

Fast R-CNN users: `trunk.conv5(images)` is the map to RoI-pool (stride `trunk.conv5_stride`) to
`trunk.pool5_side` x `trunk.pool5_side`, in place of pool5; `trunk.from_pool5(pooled)` then gives conv6b.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctxrepro.checkpoint import atomic_torch_save
from ctxrepro.pretext.model import TOWERS, conv_output, xavier_init_

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
    color: str = "none"  # "projection": section 3.1's projection B; "torchvision": ImageNet mean/std (imagenet.py)

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise ValueError(f"TrunkSpec.tower={self.tower!r}: choose one of {sorted(TOWERS)}")
        if self.color not in ("none", "projection", "torchvision"):
            raise ValueError(f"TrunkSpec.color={self.color!r}: 'none', 'projection' or 'torchvision'")


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


def body_layers(tower: str, width: int) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """A tower's conv stack without its BN layers, and its pool5."""
    layers = TOWERS[tower](width)
    name, pool5 = layers[-1]
    if name != "pool5":
        raise AssertionError(f"{tower} tower ends with {name}, expected pool5")
    return [(n, m) for n, m in layers[:-1] if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))], pool5


class Trunk(nn.Module):
    """Figure 6 conv1..conv6b on images (B, 3, H, W), 0..255 RGB -> conv6b map after ReLU."""

    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.spec = spec
        body, pool5 = body_layers(spec.tower, spec.width)
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
    network: str = "figure6"  # or "caffenet" (`ctxrepro.transfer.caffenet`: trunk is a CaffeNet, head None)


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
