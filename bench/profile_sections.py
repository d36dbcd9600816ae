"""profiles/<name>.yaml's sections as the stages read them, for benchmarks that run where stages/ cannot be imported.

The stage modules import the CLI's packages (typer, python-on-whales via ctxrepro.stage), which the GPU machine's
image lacks; these functions map the plain sections onto the library's configs the way `stages.pretrain` and
`stages.detect` do (tests/test_gpu_check.py checks that both give equal configs for the paper profile).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ctxrepro.config import load_yaml
from ctxrepro.detection.sampling import SamplingConfig
from ctxrepro.detection.train import SolverConfig
from ctxrepro.pretext.color import PatchAugment
from ctxrepro.pretext.data import BatchSpec
from ctxrepro.pretext.engine import OptimConfig, TrainConfig


def sections(profile: Path, overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """The profile's base, pretrain (its variant applied), convert and detect sections, with `overrides` per section."""
    data = load_yaml(profile)
    pre = data["pretrain"]
    out = {"base": data["base"], "pretrain": {**pre, **pre["variants"][pre["variant"]]},
           "convert": data["convert"], "detect": data["detect"]}
    for name, changes in (overrides or {}).items():
        out[name] = {**out[name], **changes}
    return out


def train_config(p: dict, seed: int) -> TrainConfig:
    """stages.pretrain.train_config on the plain section."""
    return TrainConfig(
        data=BatchSpec(p["patch"], p["gap"], p["jitter"], p["grids_per_image"], p["max_patches"], p["yoked"],
                       p["grid_mode"], p["min_pixels"], p["max_pixels"]),
        augment=PatchAugment.for_patch(p["patch"], color=p["color"], downsample_prob=p["downsample_prob"]),
        optim=OptimConfig(p["optimizer"], p["lr"], p["momentum"], p["weight_decay"], p["loss"], p["clip_grad"]),
        tower=p["tower"], width=p["width"] or None, fc_dim=p["fc_dim"] or None, input_size=p["input_size"], seed=seed,
        steps=p["steps"], max_seconds=p["max_seconds"], checkpoint_every=p["checkpoint_every"],
        log_every=p["log_every"], amp=p["amp"], channels_last=p["channels_last"],
        min_live_fraction=p["min_live_fraction"], compile=p["compile"], heldout_images=p["heldout_images"],
        workers=p["workers"], decode=p["decode"])


def detect_configs(d: dict) -> tuple[SolverConfig, SamplingConfig]:
    """stages.detect.Params.solver() and .sampling() on the plain section (the fields are named as the keys)."""
    return (SolverConfig(**{f.name: d[f.name] for f in fields(SolverConfig)}),
            SamplingConfig(**{f.name: d[f.name] for f in fields(SamplingConfig)}))
