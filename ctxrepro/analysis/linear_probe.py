"""Frozen per-layer features for linear probes (Zhang et al. 2016/2017; Goyal et al. 2019): the field's standard
benchmark of a self-supervised representation, layer by layer.

- `LayerTaps` runs a pretext tower (`ctxrepro.pretext.model`) on whole images and returns, for each of
  conv1..conv5 (after its ReLU, as Caffe's in-place blobs) and fc6, the map average-pooled to the largest
  g x g grid with C * g * g <= `dims` (`grid_side`). With `dims` 9,800 this gives exactly the published sizes
  for CaffeNet's 96-256-384-384-256 channels: 10/6/5/5/6 cells, 9,600 / 9,216 / 9,600 / 9,600 / 9,216 dims
  (Zhang et al. 2017 resize to these; Goyal et al.'s released alexnet_*_finetune_linear.py average-pool to
  them), and 9,216 / 9,408 / 9,600 / 9,216 / 9,216 for torchvision's 64-192-384-256-256 AlexNet. No square grid
  puts 128 or 512 channels in 9,000..9,800, so VGG-16's conv2 (128) and conv4/conv5 (512) get 8,192. fc6 is
  applied as a convolution over the pool5 map (its kernel is pool5's side at the pretext input, as Figure 6's
  conv6), followed by its batch norm and ReLU. torchvision's
  towers (`tv_alexnet`, `tv_vgg16`: no bn6) read pool5 through torchvision's own `avgpool` (adaptive, to fc6's
  kernel side), so their fc6 is exactly torchvision's `classifier[1]` + ReLU at any input size.
- Whole images, not patches: the probes classify images, as Figure 6's trunk sees them (227 px in the paper).
  Pixels get the pretext preprocessing minus its randomness: per-image mean subtraction, the colour
  projection for networks trained with it (RGB otherwise, as the paper fine-tunes colour-dropping networks on
  RGB), and the RMS-50 scale. The ImageNet-supervised network (`imagenet_net`) gets torchvision's normalisation
  instead: (x / 255 - mean) / std per channel, the input its weights were trained on.
- `extract` streams each layer's features to a .npy memmap (float16), batch by batch: a data set never
  sits in memory (the VOC07 SVMs' features; the ImageNet heads train online, `linear_online`). The network is
  put in eval mode with gradients off; `weights_digest` lets the caller check that no weight (running
  statistics included) changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ctxrepro.data.images import read_rgb
from ctxrepro.pretext.color import PatchAugment, preprocess
from ctxrepro.pretext.model import conv_output
from ctxrepro.progress import track
from ctxrepro.seeds import generator
from ctxrepro.transfer.imagenet import TORCHVISION, TRAIN_SIDE, imagenet_normalize, load_imagenet
from ctxrepro.transfer.trunk import fc_to_conv

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6")
VIEWS = ("center", "random", "squash")
AUGMENT = 11  # seed purpose of the training crops


@dataclass(frozen=True)
class ProbeNet:
    """A network to probe: its tower (conv1..fc6), the side it was trained at (fc6's kernel is pool5's side
    there), its input colour mode (`network_input`), the module whose weights must not change (`weights_digest`),
    and where its weights came from (recorded in the metrics)."""

    tower: nn.Sequential
    net_size: int
    color: str
    frozen: nn.Module
    source: dict


def imagenet_net(source: str, root: Path, device: str, log: logging.Logger) -> ProbeNet:
    """The ImageNet-supervised network of a `ctxrepro.transfer.imagenet` source ("torchvision[:alexnet|vgg16]",
    "random[:alexnet|vgg16]" or a torchvision state dict file; bare "torchvision" / "random" are AlexNet, the
    paper's network) as our tv_alexnet / tv_vgg16 tower, fed torchvision's input normalisation."""
    net = load_imagenet(source, "alexnet", root, log)
    if net is None:
        raise ValueError(f"{source}: a state dict in our tower layout; the ImageNet probe needs torchvision's "
                         f"(features.*, classifier.*) or a 'torchvision[:arch]' source")
    tower = net.tower.to(device).eval()
    return ProbeNet(tower, TRAIN_SIDE, TORCHVISION, tower, {**net.source, "imagenet_weights": source})


def weights_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes): equal digests = unchanged weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tap_names(tower: nn.Sequential) -> dict[str, str]:
    """conv1..conv5 -> the last ReLU of that block (`relu3`, or VGG's `relu3_3`)."""
    names = [n for n, _ in tower.named_children()]
    taps = {}
    for k in range(1, 6):
        block = [n for n in names if n == f"relu{k}" or n.startswith(f"relu{k}_")]
        if not block:
            raise ValueError(f"tap_names: the tower has no relu{k}; layers: {names}")
        taps[f"conv{k}"] = block[-1]
    return taps


def grid_side(channels: int, side: int, dims: int) -> int:
    """The largest g with channels * g * g <= `dims` (at least 1, at most the map's own side)."""
    return max(1, min(side, math.isqrt(max(1, dims // channels))))


class LayerTaps(nn.Module):
    """Whole images (N, 3, S, S) -> {layer: (N, dims_l) pooled features} of a frozen pretext tower."""

    def __init__(self, tower: nn.Sequential, net_size: int, input_side: int, dims: int,
                 layers: Sequence[str] = LAYERS):
        super().__init__()
        unknown = [name for name in layers if name not in LAYERS]
        if unknown:
            raise ValueError(f"LayerTaps: unknown layer(s) {unknown}; choose from {LAYERS}")
        names = [n for n, _ in tower.named_children()]
        self.taps = {v: k for k, v in tap_names(tower).items() if k in layers}
        # run the tower up to pool5 when fc6 is wanted, else up to the deepest tapped ReLU
        stop = names.index("flatten") if "fc6" in layers else 1 + max(names.index(t) for t in self.taps)
        self.body = nn.Sequential(*[m for _, m in list(tower.named_children())[:stop]])
        self.body_names = names[:stop]
        self.fc6 = self.bn6 = None
        if "fc6" in layers:
            channels, side = conv_output(list(tower.named_children())[:names.index("flatten")], net_size)
            self.fc6 = fc_to_conv(tower.fc6, channels, side)
            self.bn6 = tower.bn6 if "bn6" in names else None  # None: a torchvision tower (pool5 -> avgpool -> fc6)
        self.requires_grad_(False)
        self.eval()  # before the dry run below: in train mode it would move batch norm's running statistics
        self.grids = {name: grid_side(c, s, dims) for name, (c, s) in self.shapes(input_side).items()}

    def train(self, mode: bool = True) -> "LayerTaps":
        return super().train(False)  # frozen: batch norm always uses the pretext's running statistics

    def _maps(self, x: Tensor) -> dict[str, Tensor]:
        out = {}
        for name, m in zip(self.body_names, self.body):
            x = m(x)
            if name in self.taps:
                out[self.taps[name]] = x
        if self.fc6 is not None:
            k = self.fc6.kernel_size[0]
            if self.bn6 is None:  # torchvision's AdaptiveAvgPool2d before its classifier (identity at 224-227 px)
                x = F.adaptive_avg_pool2d(x, k)
            elif x.shape[-1] < k:
                raise ValueError(f"LayerTaps: pool5 is {x.shape[-1]} px, smaller than fc6's {k}x{k} kernel: "
                                 f"use a larger input")
            y = self.fc6(x)
            if self.bn6 is not None:
                y = F.batch_norm(y, self.bn6.running_mean, self.bn6.running_var, eps=self.bn6.eps)
            out["fc6"] = F.relu(y)
        return out

    def shapes(self, input_side: int) -> dict[str, tuple[int, int]]:
        """(channels, side) of each tapped map at `input_side` px, before pooling."""
        with torch.no_grad():
            maps = self._maps(torch.zeros(1, 3, input_side, input_side))
        return {k: (v.shape[1], v.shape[-1]) for k, v in maps.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {k: F.adaptive_avg_pool2d(v, self.grids[k]).flatten(1) for k, v in self._maps(x).items()}


def layer_dims(taps: LayerTaps, input_side: int) -> dict[str, int]:
    """Feature size of each layer at `input_side` px."""
    return {k: c * taps.grids[k] ** 2 for k, (c, _) in taps.shapes(input_side).items()}


@dataclass(frozen=True)
class ViewSpec:
    """How an image becomes the network's input: `center`/`random` = short side to `resize`, a crop of `side`
    (random crops are also flipped half the time); `squash` = the whole image resized to side x side (Goyal
    et al.'s VOC07 "global resize")."""

    view: str
    side: int
    resize: int
    color: str  # the pretext colour mode of the network

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"ViewSpec.view={self.view!r}: choose one of {VIEWS}")
        if self.view != "squash" and self.resize < self.side:
            raise ValueError(f"ViewSpec: resize {self.resize} is smaller than the crop {self.side}")


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    return F.interpolate(x[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def view_of(image: np.ndarray, spec: ViewSpec, g: torch.Generator | None) -> Tensor:
    """(H, W, 3) uint8 -> (3, side, side) float 0..255, as `spec` says."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if spec.view == "squash":
        return _resize(x, spec.side, spec.side)
    h, w = x.shape[1:]
    scale = spec.resize / min(h, w)
    x = _resize(x, max(spec.side, round(h * scale)), max(spec.side, round(w * scale)))
    h, w = x.shape[1:]
    if spec.view == "center":
        top, left = (h - spec.side) // 2, (w - spec.side) // 2
    else:
        top = int(torch.randint(h - spec.side + 1, (1,), generator=g))
        left = int(torch.randint(w - spec.side + 1, (1,), generator=g))
    x = x[:, top:top + spec.side, left:left + spec.side]
    if spec.view == "random" and bool(torch.rand(1, generator=g) < 0.5):
        x = x.flip(-1)
    return x


def network_input(x: Tensor, color: str) -> Tensor:
    """Section 3.1 preprocessing with no randomness: mean subtraction, projection (if trained with it), RMS 50;
    for `color` "torchvision" (the ImageNet-supervised network) torchvision's (x / 255 - mean) / std instead."""
    if color == TORCHVISION:
        return imagenet_normalize(x.float() / 255.0)
    mode = "projection" if color == "projection" else "none"
    cfg = PatchAugment.for_patch(x.shape[-1], color=mode, downsample_prob=0.0)
    return preprocess(x, torch.Generator(), cfg)


class ImageViews(Dataset):
    """`views` views of each image as (views, 3, side, side) float; random crops seeded by (seed, image)."""

    def __init__(self, paths: Sequence[Path], spec: ViewSpec, views: int = 1, seed: int = 0):
        self.paths, self.spec, self.views, self.seed = list(paths), spec, views, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        g = generator(self.seed, AUGMENT, i) if self.spec.view == "random" else None
        image = read_rgb(self.paths[i])
        return torch.stack([view_of(image, self.spec, g) for _ in range(self.views)])


@dataclass(frozen=True)
class Features:
    """One data set's features: {layer: .npy file of shape (views, images, dims) float16}, and the speed."""

    files: dict[str, Path]
    images: int
    views: int
    seconds: float

    def load(self, layer: str) -> np.ndarray:
        return np.load(self.files[layer], mmap_mode="r")

    @property
    def per_second(self) -> float:
        return self.images * self.views / max(self.seconds, 1e-9)


def extract(taps: LayerTaps, data: ImageViews, out_dir: Path, color: str, device: str, batch: int = 64,
            workers: int = 0) -> Features:
    """Every layer's features of every view of `data`, streamed to out_dir/<layer>.npy (float16 memmaps)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n, k = len(data), data.views
    dims = layer_dims(taps, data.spec.side)
    mms = {name: np.lib.format.open_memmap(out_dir / f"{name}.npy", mode="w+", dtype=np.float16,
                                           shape=(k, n, d)) for name, d in dims.items()}
    taps = taps.to(device).eval()
    loader = DataLoader(data, batch_size=max(1, batch // k), num_workers=workers)
    start, row = time.perf_counter(), 0
    with torch.inference_mode():
        for images in track(loader, desc=f"features {out_dir.name}", unit="batch"):
            b = images.shape[0]
            x = network_input(images.flatten(0, 1).to(device), color)
            for name, f in taps(x).items():
                f = f.float().view(b, k, -1).transpose(0, 1).cpu().numpy()
                if not np.isfinite(f).all() or np.abs(f).max() > np.finfo(np.float16).max:
                    raise ValueError(f"extract: layer {name} gave non-finite or float16-overflowing features")
                mms[name][:, row:row + b] = f
            row += b
    seconds = time.perf_counter() - start
    for mm in mms.values():
        mm.flush()
    return Features({name: out_dir / f"{name}.npy" for name in dims}, n, k, seconds)
