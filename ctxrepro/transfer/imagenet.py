"""ImageNet-supervised weights for the paper's ImageNet rows (Tables 1 and 2, Figure 4).

The paper's ImageNet baselines start from Caffe's CaffeNet. We use torchvision's published weights instead:
`AlexNet_Weights.IMAGENET1K_V1` and `VGG16_Weights.IMAGENET1K_V1`, fetched by torchvision's weights API
(downloaded once into $TORCH_HOME/hub/checkpoints, hash-checked by torchvision). torchvision's AlexNet is the
one-column variant (64-192-384-256-256 channels, no LRN), not CaffeNet (96-256-384-384-256, LRN, two
groups), so rows built from it compare with the paper's only approximately. Its VGG-16 is the paper's.

A source is "torchvision" (the architecture chosen by the caller's tower family), "torchvision:alexnet",
"torchvision:vgg16", "random[:alexnet|vgg16]" (torchvision's architecture with its own seeded random init,
nothing downloaded: the smoke profile's stand-in, which exercises every shape of the ImageNet rows offline), or
a file: a torchvision state dict (keys `features.<i>.*`, `classifier.<i>.*`) or a
state dict already in our tower layout (`ctxrepro.transfer.convert.load_pretext_tower` reads those).

torchvision keys are renamed into the towers "tv_alexnet" / "tv_vgg16" of `ctxrepro.pretext.model`: the
n-th conv of `features` becomes our n-th conv (conv1..conv5, or conv1_1..conv5_3), the first Linear of
`classifier` fc6, the second and third fc7 and fc8 (kept apart: our towers end at fc6). Every renamed key
is logged, as moco's converter prints its key map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ctxrepro.pretext.model import TOWERS, build_tower, conv_output
from ctxrepro.transfer.trunk import TrunkSpec

TORCHVISION = "torchvision"
RANDOM = "random"  # "random[:arch]": torchvision's network, randomly initialised (seed RANDOM_SEED), no download
RANDOM_SEED = 0
ARCHS = ("alexnet", "vgg16")
TOWER_OF = {"alexnet": "tv_alexnet", "vgg16": "tv_vgg16"}  # architecture -> our tower name
WEIGHTS_OF = {"alexnet": "AlexNet_Weights", "vgg16": "VGG16_Weights"}  # torchvision.models enums
FAMILY = {"alexnet": "alexnet", "small": "alexnet", "tv_alexnet": "alexnet", "vgg16": "vgg16", "tv_vgg16": "vgg16"}
TRAIN_SIDE = 224  # torchvision's ImageNet crops: pool5 is 6x6 (AlexNet) / 7x7 (VGG-16), its avgpool an identity
CLASSIFIER_NAMES = ("fc6", "fc7", "fc8")
# torchvision's input normalisation: (x / 255 - mean) / std per RGB channel (torchvision.transforms presets)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageNetNet:
    """torchvision weights in our layout: the tower (conv layers + fc6, eval mode), fc7/fc8 as a plain state
    dict (`fc7.weight` ...), the key map [(torchvision key, our key, shape)], and where the weights came from."""

    arch: str
    tower: nn.Sequential
    classifier: dict[str, Tensor]
    key_map: list[tuple[str, str, tuple[int, ...]]]
    source: dict[str, Any]


def weights_enum(arch: str):
    """torchvision's IMAGENET1K_V1 weights enum member for "alexnet" / "vgg16"."""
    import torchvision.models as tvm

    if arch not in ARCHS:
        raise ValueError(f"ImageNet weights: architecture {arch!r} is not one of {ARCHS}")
    return getattr(tvm, WEIGHTS_OF[arch]).IMAGENET1K_V1


def download_state_dict(arch: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The published state dict through torchvision's weights API (its cache, its hash check)."""
    weights = weights_enum(arch)
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad hash is a RuntimeError
        raise OSError(f"torchvision {weights}: cannot fetch {weights.url} into $TORCH_HOME ({e}); download it "
                      f"there once, or give a local state dict path instead of {TORCHVISION!r}") from e
    return state, {"weights": str(weights), "url": weights.url}


def parse_source(source: str, tower: str) -> str | None:
    """The torchvision architecture named by `source` ("torchvision[:arch]" or "random[:arch]"), or None for a
    file path. A bare "torchvision" / "random" takes the architecture of the pretext tower family `tower`."""
    for kind in (TORCHVISION, RANDOM):
        if source == kind:
            if tower not in FAMILY:
                raise ValueError(f"imagenet weights {source!r}: no torchvision architecture for tower {tower!r}")
            return FAMILY[tower]
        if source.startswith(kind + ":"):
            arch = source.split(":", 1)[1]
            if arch not in ARCHS:
                raise ValueError(f"imagenet weights {source!r}: choose {kind}:alexnet or {kind}:vgg16")
            return arch
    return None


def random_state_dict(arch: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torchvision's `arch` with its own initialisation under a fixed seed (the global RNG left untouched)."""
    import torchvision.models as tvm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        state = getattr(tvm, arch)(weights=None).state_dict()
    return state, {"random": arch, "seed": RANDOM_SEED}


def source_state_dict(source: str, arch: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict of a parsed "torchvision[:arch]" (downloaded) or "random[:arch]" (built) source."""
    return random_state_dict(arch) if source.split(":", 1)[0] == RANDOM else download_state_dict(arch)


def is_torchvision_layout(state: dict[str, Any]) -> bool:
    return any(k.startswith("features.") for k in state) and any(k.startswith("classifier.") for k in state)


def _indexed(state: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted layer indices i of `<prefix>.<i>.weight` keys."""
    return sorted(int(k.split(".")[1]) for k in state if k.startswith(prefix + ".") and k.endswith(".weight"))


def torchvision_arch(state: dict[str, Tensor]) -> str:
    """"alexnet" (5 convs) or "vgg16" (13 convs), read off a torchvision state dict's `features`."""
    convs = len(_indexed(state, "features"))
    arch = {5: "alexnet", 13: "vgg16"}.get(convs)
    if arch is None:
        raise ValueError(f"a torchvision state dict with {convs} convs in `features`: neither AlexNet (5) nor "
                         f"VGG-16 (13)")
    return arch


def rename_keys(state: dict[str, Tensor], arch: str) -> tuple[dict[str, Tensor], dict[str, Tensor], list]:
    """torchvision keys -> (tower state dict, fc7/fc8 state dict, key map)."""
    conv_names = [n for n, m in TOWERS[TOWER_OF[arch]](64) if isinstance(m, nn.Conv2d)]
    feats, fcs = _indexed(state, "features"), _indexed(state, "classifier")
    if len(feats) != len(conv_names) or len(fcs) != len(CLASSIFIER_NAMES):
        raise ValueError(f"torchvision {arch}: {len(feats)} convs and {len(fcs)} linear layers, expected "
                         f"{len(conv_names)} and {len(CLASSIFIER_NAMES)}")
    renames = [(f"features.{i}", n) for i, n in zip(feats, conv_names)]
    renames += [(f"classifier.{i}", n) for i, n in zip(fcs, CLASSIFIER_NAMES)]
    tower, classifier, key_map = {}, {}, []
    for old, new in renames:
        for p in ("weight", "bias"):
            key = f"{old}.{p}"
            if key not in state:
                raise ValueError(f"torchvision {arch}: no {key}")
            (classifier if new in ("fc7", "fc8") else tower)[f"{new}.{p}"] = state[key]
            key_map.append((key, f"{new}.{p}", tuple(state[key].shape)))
    left = sorted(set(state) - {k for k, _, _ in key_map})
    if left:
        raise ValueError(f"torchvision {arch}: keys with no place in our tower: {left[:5]}")
    return tower, classifier, key_map


def from_torchvision(state: dict[str, Tensor], source: dict[str, Any], log: logging.Logger) -> ImageNetNet:
    """A torchvision AlexNet / VGG-16 state dict as our tower (+ fc7/fc8), every renamed key logged."""
    arch = torchvision_arch(state)
    tower_state, classifier, key_map = rename_keys(state, arch)
    width = tower_state["conv1.weight" if arch == "alexnet" else "conv1_1.weight"].shape[0]
    tower = build_tower(TOWER_OF[arch], TRAIN_SIDE, width, tower_state["fc6.weight"].shape[0])
    fc6 = [m for n, m in tower.named_children() if n == "fc6"][0]
    if fc6.in_features != tower_state["fc6.weight"].shape[1]:
        raise ValueError(f"torchvision {arch}: fc6 takes {tower_state['fc6.weight'].shape[1]} inputs; a "
                         f"{TRAIN_SIDE} px tower of width {width} gives {fc6.in_features}")
    try:
        tower.load_state_dict(tower_state)
    except RuntimeError as e:
        raise ValueError(f"torchvision {arch}: weights do not fit the {TOWER_OF[arch]} tower: {e}") from e
    for old, new, shape in key_map:
        log.info("imagenet %s: %s -> %s %s", arch, old, new if new[:3] in ("fc7", "fc8") else f"tower.{new}",
                 shape)
    return ImageNetNet(arch, tower.eval(), classifier, key_map, {**source, "arch": arch})


def load_imagenet(source: str, tower: str, root: Path, log: logging.Logger) -> ImageNetNet | None:
    """ImageNet-supervised weights from "torchvision[:arch]" (weights API) or a torchvision state dict file
    (relative to `root` unless absolute). `tower`: the pretext tower whose family a bare "torchvision" takes.
    None: the file is a state dict in our own tower layout (`convert.load_pretext_tower` reads those)."""
    arch = parse_source(source, tower)
    if arch is not None:
        state, provenance = source_state_dict(source, arch)
        return from_torchvision(state, provenance, log)
    path = Path(source) if Path(source).is_absolute() else root / source
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ImageNet weights file (or use {TORCHVISION!r} for torchvision's)")
    state = read_state_dict(path)
    return from_torchvision(state, {"path": str(source)}, log) if is_torchvision_layout(state) else None


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict file (weights only); an unreadable file or another object is a ValueError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as a state dict ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def imagenet_normalize(x: Tensor) -> Tensor:
    """torchvision's input normalisation of RGB in 0..1: (x - mean) / std per channel."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def imagenet_spec(net: ImageNetNet, spec: TrunkSpec) -> TrunkSpec:
    """`spec` (the Figure 6 sizes) with the tower, width, fc6 and pool5 side of torchvision's network, and
    torchvision's input normalisation."""
    convs = [m for m in net.tower if isinstance(m, nn.Conv2d)]
    side = conv_output(TOWERS[TOWER_OF[net.arch]](convs[0].out_channels), TRAIN_SIDE)[1]
    return replace(spec, tower=TOWER_OF[net.arch], width=convs[0].out_channels, conv6=net.tower.fc6.out_features,
                   conv6_kernel=side, color=TORCHVISION)
