"""A converted network on warped windows: R-CNN's fine-tuning net and feature extractor (section 4.3).

Figure 6's network is built for this input (227 px -> pool5 7x7 -> conv6 3x3 -> conv6b -> pool6 -> fc7 ->
fc8): windows run through the trunk and head as they are. A CaffeNet-shaped network (ImageNet-R-CNN and
Scratch-R-CNN: torchvision's AlexNet with its own fc6 and fc7) runs conv1..conv5, pool5 (its adaptive 6x6
max-pool equals AlexNet's 3/2 pool5 on the 13x13 conv5 of a 227 px window), fc6, fc7, fc8.
Dropout (0.5) follows fc6 (CaffeNet only) and fc7, as R-CNN's pascal_finetune_train.prototxt.
`features` is fc7 after its ReLU in eval mode: what rcnn_train.m's SVMs read (layer 7).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.transfer.trunk import Converted


class WindowNet(nn.Module):
    def __init__(self, converted: Converted, dropout: float):
        super().__init__()
        self.trunk = converted.trunk
        self.caffenet = converted.head is None
        seq = converted.trunk.fc if self.caffenet else converted.head.seq
        self.pool6 = None if self.caffenet else seq.pool6
        self.fc6 = seq.fc6 if self.caffenet else None
        self.fc7, self.fc8 = seq.fc7, seq.fc8
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        self.side = converted.trunk.spec.input_side
        self.num_classes = self.fc8.out_features
        self.fill = [float(v) for v in converted.trunk.input.mean.cpu()]  # 0 after the network's mean subtraction

    def _fc6(self, windows: Tensor) -> Tensor:
        if self.caffenet:
            return self.drop6(F.relu(self.fc6(self.trunk.roi(self.trunk.conv5(windows)).flatten(1))))
        return self.pool6(self.trunk(windows)).flatten(1)

    def fc7_features(self, windows: Tensor) -> Tensor:
        """(N, fc7) after ReLU (and dropout in train mode) of (N, 3, side, side) 0..255 RGB windows."""
        return self.drop7(F.relu(self.fc7(self._fc6(windows))))

    def forward(self, windows: Tensor) -> Tensor:
        """(N, classes) logits."""
        return self.fc8(self.fc7_features(windows))
