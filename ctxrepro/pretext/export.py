"""The pretrain stage's export (models/pretrain.pt) as every evaluation of it sees it: the network in eval mode,
the geometry it was trained with, and its input preprocessing (section 3.1 minus the random downsampling).

Written by `export_weights` (the pretrain stage, at the end of `engine.train`); read by pretext_eval, nn, mining and aberration.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ctxrepro.checkpoint import atomic_torch_save
from ctxrepro.data import images
from ctxrepro.pretext.color import PatchAugment, preprocess
from ctxrepro.pretext.model import ContextNet, build_model

CHECKPOINT_KEYS = ("tower", "patch", "sample_patch", "gap", "jitter", "color")


@dataclass(frozen=True)
class Pretrained:
    """The exported pretraining network and the geometry it was trained with (models/pretrain.pt)."""

    model: ContextNet
    patch: int  # side of the patches cut from images (the pretrain stage's `patch`)
    net_size: int  # side the network sees (the pretrain stage's `input_size`, or `patch`)
    gap: int
    jitter: int
    color: str
    step: int


def load_pretrained(path: Path, device: str = "cpu") -> Pretrained:
    """Rebuild the network `engine.export_weights` wrote, in eval mode (BN uses its running statistics)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro pretrain` (or `ctxrepro stage pretrain`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: cannot be read as a pretrain export ({e})") from e
    config = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    missing = [k for k in CHECKPOINT_KEYS if k not in config]
    if missing or "model" not in ckpt:
        raise ValueError(f"{path}: not a pretrain export (missing config keys {missing} or 'model'); "
                         f"rerun the pretrain stage")
    try:
        model = build_model(config["tower"], int(config["patch"]), config.get("width"), config.get("fc_dim"))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError) as e:  # weights that do not fit the recorded tower
        raise ValueError(f"{path}: the weights do not fit a {config['tower']!r} network ({e})") from e
    return Pretrained(model.to(device).eval(), int(config["sample_patch"]), int(config["patch"]),
                      int(config["gap"]), int(config["jitter"]), str(config["color"]), int(ckpt.get("step", 0)))


def network_input(patches: Tensor, pre: Pretrained, g: torch.Generator) -> Tensor:
    """uint8 (P, 3, S, S) patches -> the network's input, as in training minus random downsampling."""
    cfg = PatchAugment.for_patch(pre.patch, color=pre.color, downsample_prob=0.0)
    x = preprocess(patches, g, cfg)
    if pre.net_size != x.shape[-1]:
        x = F.interpolate(x, size=(pre.net_size, pre.net_size), mode="area")  # as engine.prepare_inputs
    return x


def read_rgb(path: Path) -> Tensor:
    """A JPEG/PNG file as (3, H, W) uint8 RGB (grayscale and CMYK files are converted); an unreadable
    file is an error that names it."""
    return torch.from_numpy(images.read_rgb(path)).permute(2, 0, 1).contiguous()


def export_weights(path: Path, model: torch.nn.Module, cfg, step: int) -> None:
    """The stage's out: the state dict and what `model.build_model` needs to rebuild the network.
    `cfg` is the run's `engine.TrainConfig`."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = {"tower": cfg.tower, "width": cfg.width, "fc_dim": cfg.fc_dim, "patch": cfg.net_size,
              "sample_patch": cfg.data.patch, "gap": cfg.data.gap, "jitter": cfg.data.jitter,
              "color": cfg.augment.color}
    atomic_torch_save({"model": state, "step": step, "config": config}, path)
