"""Fast R-CNN on a converted network (paper section 4.3; Girshick 2015): Figure 6's or CaffeNet's.

conv1..conv5 of the converted network run once per image; each RoI is max-pooled (`torchvision.ops.roi_pool`,
Fast R-CNN's RoI pooling) in place of pool5: to pool5's side at Figure 6's input (7x7 at 227 px), then conv6,
conv6b, pool6 (the Figure 6 network, R-CNN-style rows); or to CaffeNet's 6x6 (VGG: 7x7) grid, then fc6 (+ ReLU,
dropout) (`ctxrepro.transfer.caffenet`, the rescale rows). fc7 (+ ReLU, dropout) follows, then fc8 (21-way
class scores) and, when box regression is on, a class-specific box regressor (4 x 21 outputs, Fast R-CNN's
bbox_pred, initialised N(0, 0.001)).

Loss (Fast R-CNN's multi-task loss, lambda = 1): softmax cross-entropy over the RoIs, plus smooth L1
(beta = 1) between the foreground RoIs' predicted deltas of their own class and their targets, summed over
the 4 coordinates and divided by the number of RoIs. The targets are `boxes.encode` divided by BOX_STDS.
The paper's R-CNN rows used no box regression: `box_regression=False` drops the regressor and its loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

from ctxrepro.transfer.caffenet import CaffeNet
from ctxrepro.transfer.trunk import Head, Trunk

# Fast R-CNN's BBOX_NORMALIZE_STDS (py-faster-rcnn's fixed values): targets are divided by these.
BOX_STDS = (0.1, 0.1, 0.2, 0.2)


@dataclass(frozen=True)
class Output:
    scores: Tensor  # (R, C) logits
    deltas: Tensor | None  # (R, 4C) normalised box deltas, or None without box regression


class FastRCNN(nn.Module):
    """The detector: a convert checkpoint's network (Figure 6 trunk + head, or a CaffeNet with head None),
    plus dropout and (optionally) bbox_pred."""

    def __init__(self, trunk: Trunk | CaffeNet, head: Head | None, dropout: float, box_regression: bool,
                 seed: int = 0):
        super().__init__()
        self.trunk = trunk
        caffenet = head is None
        self.pool6 = None if caffenet else head.seq.pool6
        self.fc6 = trunk.fc.fc6 if caffenet else None
        self.drop6 = nn.Dropout(dropout) if caffenet else None
        self.fc7 = trunk.fc.fc7 if caffenet else head.seq.fc7
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = trunk.fc.fc8 if caffenet else head.seq.fc8  # the class scores (Fast R-CNN's cls_score)
        self.num_classes = self.fc8.out_features
        self.bbox_pred = None
        if box_regression:
            self.bbox_pred = nn.Linear(self.fc7.out_features, 4 * self.num_classes)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nn.init.normal_(self.bbox_pred.weight, std=0.001)  # Fast R-CNN's bbox_pred filler
            nn.init.zeros_(self.bbox_pred.bias)
        self.pool_side = trunk.pool5_side
        self.spatial_scale = 1.0 / trunk.conv5_stride

    def conv5(self, image: Tensor) -> Tensor:
        """The (1, C5, h, w) map of one (3, H, W) image."""
        return self.trunk.conv5(image[None])

    def roi_pool(self, fmap: Tensor, rois: Tensor) -> Tensor:
        """(R, C5, s, s) max-pooled RoIs (R, 4) of one image's map; torchvision rounds the scaled box
        corners and counts end pixels inclusively, as Fast R-CNN's Caffe layer. At least float32 and outside
        autocast: torchvision's CPU kernel has no bf16, and bf16 boxes would be rounded (4 px steps past 512);
        a max is exact in any precision."""
        dtype = torch.promote_types(fmap.dtype, torch.float32)
        with torch.autocast(fmap.device.type, enabled=False):
            return roi_pool(fmap.to(dtype), [rois.to(dtype)], output_size=self.pool_side,
                            spatial_scale=self.spatial_scale)

    def pooled(self, images: Sequence[Tensor], rois: Sequence[Tensor]) -> Tensor:
        """RoI-pooled conv5 features (sum R_i, C5, s, s): each image runs alone (no padding between sizes)."""
        return torch.cat([self.roi_pool(self.conv5(image), r) for image, r in zip(images, rois)])

    def head(self, pooled: Tensor) -> Output:
        if self.fc6 is not None:  # CaffeNet: the RoI grid is fc6's input
            x = self.drop6(F.relu(self.fc6(pooled.flatten(1))))
        else:  # Figure 6: conv6, conv6b, pool6 on the RoI's pool5-sized map
            x = self.pool6(self.trunk.from_pool5(pooled)).flatten(1)
        x = self.drop7(F.relu(self.fc7(x)))
        return Output(self.fc8(x), self.bbox_pred(x) if self.bbox_pred is not None else None)

    def forward(self, images: Sequence[Tensor], rois: Sequence[Tensor]) -> Output:
        """images: (3, H_i, W_i) float 0..255 RGB, already scaled; rois: (R_i, 4) boxes in those pixels."""
        return self.head(self.pooled(images, rois))


def box_targets(deltas: Tensor, stds: Sequence[float] = BOX_STDS) -> Tensor:
    """Encoded deltas (R, 4) -> the regressor's normalised targets."""
    return deltas / torch.as_tensor(stds, dtype=deltas.dtype, device=deltas.device)


def unnormalise(deltas: Tensor, stds: Sequence[float] = BOX_STDS) -> Tensor:
    """The regressor's (R, 4C) outputs -> deltas for `boxes.decode`."""
    s = torch.as_tensor(stds, dtype=deltas.dtype, device=deltas.device).repeat(deltas.shape[1] // 4)
    return deltas * s


def multitask_loss(out: Output, labels: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(classification loss, box loss); targets (R, 4) are normalised and matter only where labels > 0."""
    cls = F.cross_entropy(out.scores, labels)
    if out.deltas is None:
        return cls, torch.zeros((), device=cls.device)
    fg = torch.nonzero(labels > 0).flatten()
    pred = out.deltas.view(len(labels), -1, 4)[fg, labels[fg]]
    box = F.smooth_l1_loss(pred, targets[fg], beta=1.0, reduction="sum") / max(len(labels), 1)
    return cls, box
