"""The late-fusion pair network of Figure 3 (section 3), with its per-patch towers.

One tower (weights shared by both patches of a pair, section 3) maps a patch to fc6; the pair
head fuses two fc6 vectors: concat -> fc7 -> fc8 -> fc9 (8-way). Every patch is embedded ONCE
and the head gathers embeddings by the `pairs` indices, so a grid patch shared by up to 8 pairs
costs one tower forward.

Layer names (the converter maps Caffe/our weights by them; state_dict keys are
`tower.<name>.*` and `head.<name>.*`):
- "alexnet" / "small" tower: conv1 relu1 pool1 norm1 conv2 relu2 pool2 norm2 conv3 bn3 relu3
  conv4 bn4 relu4 conv5 bn5 relu5 pool5 flatten fc6 bn6 relu6 (the released code's names;
  "small" replaces norm1/norm2 by bn1/bn2 placed after conv1/conv2, see `small_layers`).
- "vgg16" tower: conv{b}_{i} bn{b}_{i} relu{b}_{i} for blocks b=1..5, pool1..pool5, flatten,
  fc6 bn6 relu6.
- "tv_alexnet" / "tv_vgg16": torchvision's ImageNet-supervised architectures under the same names, with
  no batch norm and floor-mode pools, so torchvision's published weights load into them exactly
  (`ctxrepro.transfer.imagenet`). torchvision's AlexNet is the one-column variant of "One weird trick"
  (Krizhevsky 2014): 64-192-384-256-256 channels, conv1 padded by 2, no LRN. Not pretext towers of
  the paper; they exist for its ImageNet rows.
- head: fc7 bn7 relu7 fc8 relu8 fc9.
Batch norm is always without affine (section 3: with scale and shift the net can silence its
activations and sit in the uniform-prediction saddle). Pools round up (Caffe's ceil mode), so a
96 px patch gives pool5 3x3x256 in the AlexNet tower.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

ALEXNET_CHANNELS = (96, 256, 384, 384, 256)  # Figure 3 / released code (conv2 256, group 1)
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TV_ALEXNET_CHANNELS = (64, 192, 384, 256, 256)  # torchvision.models.alexnet (one column, no LRN)
DEFAULT_FC = {"alexnet": 4096, "vgg16": 4096, "small": 256, "tv_alexnet": 4096, "tv_vgg16": 4096}
DEFAULT_WIDTH = {"alexnet": 96, "vgg16": 64, "small": 16, "tv_alexnet": 64, "tv_vgg16": 64}


def _conv_block(name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0,
                bn: bool = False) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [(f"conv{name}", nn.Conv2d(cin, cout, k, stride, pad))]
    if bn:
        layers.append((f"bn{name}", nn.BatchNorm2d(cout, affine=False)))
    layers.append((f"relu{name}", nn.ReLU(inplace=True)))
    return layers


def _pool(name: str, k: int = 3, s: int = 2, ceil: bool = True) -> tuple[str, nn.Module]:
    return f"pool{name}", nn.MaxPool2d(k, s, ceil_mode=ceil)


def _lrn(name: str) -> tuple[str, nn.Module]:
    # AlexNet's LRN (Krizhevsky et al. 2012): size 5, alpha 1e-4, beta 0.75, k 1.
    return f"norm{name}", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def alexnet_layers(width: int = 96) -> list[tuple[str, nn.Module]]:
    """Figure 3 tower up to pool5 (docs/METHOD.md "Network"); `width` scales channels (96 = paper)."""
    c1, c2, c3, c4, c5 = (max(1, round(c * width / 96)) for c in ALEXNET_CHANNELS)
    return [
        *_conv_block("1", 3, c1, 11, stride=4, pad=5), _pool("1"), _lrn("1"),
        *_conv_block("2", c1, c2, 5, pad=2), _pool("2"), _lrn("2"),
        *_conv_block("3", c2, c3, 3, pad=1, bn=True),
        *_conv_block("4", c3, c4, 3, pad=1, bn=True),
        *_conv_block("5", c4, c5, 3, pad=1, bn=True), _pool("5"),
    ]


def small_layers(width: int = 16) -> list[tuple[str, nn.Module]]:
    """A narrow AlexNet-shaped tower for the tiny profile (docs/METHOD.md: 16 channels, 32-48 px).

    conv1 is 5x5/2 instead of 11x11/4 so a 48 px patch reaches pool5 at 3x3, as 96 px does in
    the AlexNet tower. LRN is replaced by affine-free batch norm after conv1/conv2: at this
    width and with few steps it trains faster on a CPU (prototype lesson).
    """
    w = width
    return [
        *_conv_block("1", 3, w, 5, stride=2, pad=2, bn=True), _pool("1"),
        *_conv_block("2", w, 2 * w, 3, pad=1, bn=True), _pool("2"),
        *_conv_block("3", 2 * w, 4 * w, 3, pad=1, bn=True),
        *_conv_block("4", 4 * w, 4 * w, 3, pad=1, bn=True),
        *_conv_block("5", 4 * w, 4 * w, 3, pad=1, bn=True), _pool("5"),
    ]


def _vgg_layers(width: int, bn: bool, ceil: bool) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    cin = 3
    for b, block in enumerate(VGG16_BLOCKS, start=1):
        for i, c in enumerate(block, start=1):
            cout = max(1, round(c * width / 64))
            layers += _conv_block(f"{b}_{i}", cin, cout, 3, pad=1, bn=bn)
            cin = cout
        layers.append(_pool(str(b), k=2, s=2, ceil=ceil))
    return layers


def vgg16_layers(width: int = 64) -> list[tuple[str, nn.Module]]:
    """VGG-16 conv stack (the paper's VGG rows, section 4.3) with affine-free BN after each conv."""
    return _vgg_layers(width, bn=True, ceil=True)


def tv_vgg16_layers(width: int = 64) -> list[tuple[str, nn.Module]]:
    """torchvision's VGG-16 `features`: no BN, floor-mode pools (ImageNet-supervised weights)."""
    return _vgg_layers(width, bn=False, ceil=False)


def tv_alexnet_layers(width: int = 64) -> list[tuple[str, nn.Module]]:
    """torchvision's AlexNet `features` (one column, 64-192-384-256-256, no LRN, floor-mode pools):
    the network of torchvision's ImageNet weights, which are not CaffeNet's (96-256-384-384-256, LRN)."""
    c1, c2, c3, c4, c5 = (max(1, round(c * width / 64)) for c in TV_ALEXNET_CHANNELS)
    return [
        *_conv_block("1", 3, c1, 11, stride=4, pad=2), _pool("1", ceil=False),
        *_conv_block("2", c1, c2, 5, pad=2), _pool("2", ceil=False),
        *_conv_block("3", c2, c3, 3, pad=1), *_conv_block("4", c3, c4, 3, pad=1),
        *_conv_block("5", c4, c5, 3, pad=1), _pool("5", ceil=False),
    ]


TOWERS: dict[str, Callable[[int], list[tuple[str, nn.Module]]]] = {
    "alexnet": alexnet_layers, "small": small_layers, "vgg16": vgg16_layers,
    "tv_alexnet": tv_alexnet_layers, "tv_vgg16": tv_vgg16_layers,
}
TORCHVISION_TOWERS = ("tv_alexnet", "tv_vgg16")  # no batch norm anywhere, as torchvision's networks


def _out_side(side: int, m: nn.Module) -> int:
    """Spatial side after a conv or pool (PyTorch's ceil-mode rule included)."""
    if isinstance(m, nn.Conv2d):
        return (side + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
    if isinstance(m, nn.MaxPool2d):
        k, s, p = m.kernel_size, m.stride, m.padding
        if not m.ceil_mode:
            return (side + 2 * p - k) // s + 1
        out = math.ceil((side + 2 * p - k) / s) + 1
        # the last window must start inside the (left-padded) input
        return out - 1 if (out - 1) * s >= side + p else out
    return side


def conv_output(layers: list[tuple[str, nn.Module]], patch: int) -> tuple[int, int]:
    """(channels, side) of the conv stack's output for a patch x patch input."""
    side, channels = patch, 3
    for _, m in layers:
        side = _out_side(side, m)
        if side < 1:  # PyTorch refuses an empty map mid-stack; report it as such
            return channels, 0
        if isinstance(m, nn.Conv2d):
            channels = m.out_channels
    return channels, side


def build_tower(name: str, patch: int = 96, width: int | None = None,
                fc_dim: int | None = None) -> nn.Sequential:
    """Per-patch tower conv1..pool5 -> fc6 -> BN (no affine) -> ReLU (Figure 3); torchvision's towers
    have no BN there either.

    width: channel scale (None = the variant's default: alexnet 96, vgg16 64, small 16);
    fc_dim: fc6 size (None = 4096 for alexnet/vgg16, 256 for small).
    """
    if name not in TOWERS:
        raise ValueError(f"build_tower: unknown tower {name!r}; choose one of {sorted(TOWERS)}")
    layers = TOWERS[name](DEFAULT_WIDTH[name] if width is None else width)
    channels, side = conv_output(layers, patch)
    if side < 1:
        raise ValueError(f"build_tower: a {patch}px patch is too small for the {name} tower")
    dim = DEFAULT_FC[name] if fc_dim is None else fc_dim
    layers += [("flatten", nn.Flatten(1)), ("fc6", nn.Linear(channels * side * side, dim))]
    if name not in TORCHVISION_TOWERS:
        layers.append(("bn6", nn.BatchNorm1d(dim, affine=False)))
    layers.append(("relu6", nn.ReLU(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


def build_head(fc_dim: int, head_dim: int) -> nn.Sequential:
    """Pair head: concat(fc6_a, fc6_b) -> fc7 + BN (no affine) + ReLU -> fc8 + ReLU -> fc9 (8)."""
    return nn.Sequential(OrderedDict([
        ("fc7", nn.Linear(2 * fc_dim, head_dim)),
        ("bn7", nn.BatchNorm1d(head_dim, affine=False)), ("relu7", nn.ReLU(inplace=True)),
        ("fc8", nn.Linear(head_dim, head_dim)), ("relu8", nn.ReLU(inplace=True)),
        ("fc9", nn.Linear(head_dim, 8)),
    ]))


def xavier_init_(module: nn.Module) -> None:
    """Caffe's "xavier" filler (the released code): U(-a, a), a = sqrt(3 / fan_in); zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = math.sqrt(3.0 / m.weight[0].numel())
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


class ContextNet(nn.Module):
    """Figure 3: shared tower -> fc6 per patch; pair head fc7 -> fc8 -> fc9 on [first, second].

    forward(patches (P, 3, S, S), pairs (Q, 2)) -> logits (Q, 8): each patch is embedded once,
    then the head reads rows (pairs[:, 0], pairs[:, 1]) of the embeddings.
    """

    def __init__(self, tower: str = "alexnet", patch: int = 96, width: int | None = None,
                 fc_dim: int | None = None):
        super().__init__()
        self.tower_name, self.patch, self.width, self.fc_dim = tower, patch, width, fc_dim
        self.tower = build_tower(tower, patch, width, fc_dim)
        self.feature_dim: int = self.tower.fc6.out_features
        self.head = build_head(self.feature_dim, self.feature_dim)
        xavier_init_(self)

    def embed(self, patches: Tensor) -> Tensor:
        """fc6 features (after BN and ReLU) of each patch: (P, feature_dim)."""
        return self.tower(patches)

    def forward(self, patches: Tensor, pairs: Tensor) -> Tensor:
        emb = self.tower(patches)
        # (Q, 2, D) -> (Q, 2D): [fc6 of first | fc6 of second], as the released Concat layer. index_select, not
        # emb[pairs]: the latter's backward (index_put with accumulate) is not bit-reproducible on several CPU threads.
        rows = pairs.to(device=emb.device, dtype=torch.long).flatten()
        fused = torch.index_select(emb, 0, rows).view(len(pairs), -1)
        return self.head(fused)


def alexnet(patch: int = 96) -> ContextNet:
    return ContextNet("alexnet", patch)


def small(patch: int = 48) -> ContextNet:
    return ContextNet("small", patch)


def vgg16(patch: int = 96) -> ContextNet:
    return ContextNet("vgg16", patch)


BUILDERS: dict[str, Callable[[int], ContextNet]] = {"alexnet": alexnet, "small": small,
                                                    "vgg16": vgg16}


def build_model(name: str, patch: int, width: int | None = None, fc_dim: int | None = None) -> ContextNet:
    """ContextNet for a named tower at its default width and fc size, or at the given ones (a narrow VGG)."""
    if name not in BUILDERS:
        raise ValueError(f"build_model: unknown model {name!r}; choose one of {sorted(BUILDERS)}")
    if width is None and fc_dim is None:
        return BUILDERS[name](patch)
    return ContextNet(name, patch, width, fc_dim)
