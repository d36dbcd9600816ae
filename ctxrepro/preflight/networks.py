"""Sizes of the networks a profile trains, counted on PyTorch's meta device (no memory, no weights).

Each count builds the library's own model class with the profile's shape, so a change of architecture
changes the estimate with it.
"""

from __future__ import annotations

import torch
from torch import nn

from ctxrepro.pretext.model import DEFAULT_WIDTH, TOWERS, ContextNet, _out_side, conv_output
from ctxrepro.transfer.caffenet import CaffeNet, CaffeNetSpec
from ctxrepro.transfer.trunk import Head, Trunk, TrunkSpec, body_layers

FLOAT = 4  # float32 bytes: every saved state dict and optimizer slot


def _numel(*modules: nn.Module) -> int:
    return sum(t.numel() for m in modules for t in [*m.parameters(), *m.buffers()])


def pretext_params(tower: str, patch: int, width: int, fc_dim: int) -> int:
    """Parameters (and BN buffers) of Figure 3's network; width/fc_dim 0 = the tower's own."""
    with torch.device("meta"):
        return _numel(ContextNet(tower, patch, width or None, fc_dim or None))


def tower_fc6(tower: str, patch: int, width: int, fc_dim: int) -> tuple[int, int]:
    """(fc6 size, pool5 side at the pretext patch): conv6's channels and kernel in Figure 6."""
    with torch.device("meta"):
        net = ContextNet(tower, patch, width or None, fc_dim or None)
    layers = TOWERS[tower](width or DEFAULT_WIDTH[tower])
    return net.feature_dim, conv_output(layers, patch)[1]


def figure6_params(spec: TrunkSpec) -> int:
    """Parameters of Figure 6's network (conv1..conv6b, pool6, fc7, fc8)."""
    with torch.device("meta"):
        trunk = Trunk(spec)
        head = Head(spec, trunk.pool5_side - spec.conv6_kernel + 1)
        return _numel(trunk, head)


def caffenet_params(spec: CaffeNetSpec) -> int:
    """Parameters of CaffeNet's shape on a tower (the rescale rows)."""
    with torch.device("meta"):
        return _numel(CaffeNet(spec))


def widest_unfold(tower: str, width: int, side: int) -> int:
    """Floats of the largest im2col matrix (C_in * k * k rows by H_out * W_out columns) of one image through
    the tower's conv layers: what the k-means init unfolds per image (transfer/rescale.py, gather_inputs)."""
    body, _ = body_layers(tower, width or DEFAULT_WIDTH[tower])
    widest = 0
    for _, m in body:
        if isinstance(m, nn.Conv2d):
            out = _out_side(side, m)
            widest = max(widest, m.in_channels * m.kernel_size[0] * m.kernel_size[1] * out * out)
        side = _out_side(side, m)
    return widest


def fc6_inputs(tower: str, width: int, roi_pool: int) -> int:
    """fc6's input dimension in CaffeNet's shape (conv5 channels x the RoI grid): the whitening's size."""
    body, _ = body_layers(tower, width or DEFAULT_WIDTH[tower])
    c5 = [m for _, m in body if isinstance(m, nn.Conv2d)][-1].out_channels
    return c5 * roi_pool * roi_pool


def alexnet_rcnn_params(classes: int) -> int:
    """Parameters of the R-CNN AlexNet rows (ImageNet-R-CNN, Scratch-R-CNN): torchvision's one-column AlexNet
    with a new `classes`-way fc8 in place of its 1000-way one."""
    from torchvision.models import alexnet

    with torch.device("meta"):
        net = alexnet(weights=None, num_classes=classes)
    return _numel(net)
