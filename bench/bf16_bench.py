"""float32 against bf16 autocast on this CPU (issue 25), side by side in one process, numbers in bench/README.md.

Each case builds one network and one pre-made batch, then runs training steps (forward, backward, optimiser
step) alternately in float32 and under `ctxrepro.pretext.precision.autocast(..., "bf16")`, one step per arm
per round, so both arms see the same background load on a shared machine; the table gives each arm's median
seconds per step and their ratio. Parameters stay float32 in both arms (autocast casts per op).

- `pretrain-tiny`: the tiny profile's small tower on 48 px patches shrunk to 32 px, 256 patches a step,
  Adam, mean loss, 1 thread (base.threads of the tiny profile).
- `pretrain-paper`: Figure 3's `ContextNet("alexnet", 96)`, 512 patches and 2,330 pairs a step (the paper's
  batch: 4.55 pairs per patch), summed loss, SGD, 2 threads.
- `detect`: a Fast R-CNN step of the Figure 6 network (paper shapes: AlexNet tower, conv6 4096, conv6b 1024,
  fc7 4096) on 2 images of 600 x 800 with 64 RoIs each (the paper profile's detect batch), 2 threads.
- `normals`: a normals step of the same Figure 6 trunk with a 512-channel head on 480 x 640 frames, 40
  codewords; batch 2 (the paper profile's 16 would take minutes a step here; the ratio is per image), 2 threads.
- `detect-tiny`, `normals-tiny`: the same steps at the tiny profile's shapes (small-tower Figure 6 network,
  240 x 320 images; 144 x 192 frames, batch 8, 64-channel head), 1 thread.
- `embed-tiny`: the analyses' forward pass (pretext_eval, nn, mine): the tiny tower on 512 patches of 32 px.
- `aberration-tiny`: the aberration stage's regressor step (32 px, width 16, fc 64, batch 128, Adam).
- `rcnn-tiny`, `rcnn-fc7-tiny`: the R-CNN protocol's window fine-tuning step (`detect.rcnn`: 64 warped windows
  of 112 px through the tiny Figure 6 network, SGD with R-CNN's rate groups) and its fc7 extraction (256
  windows a forward pass, `feature_batch`), 1 thread.

    .venv/bin/python bench/bf16_bench.py [--rounds 5] [case ...]
    .venv/bin/python bench/bf16_bench.py --loop ROOT   # ROOT: a copy of the repo after `fetch` and `resize`

`--loop`: the whole tiny pretrain loop instead (`engine.train`: the DataLoader worker decoding and preparing
batches, the model, the collapse monitor, the checkpoint), 200 steps of the tiny profile's colour-dropping
variant on ROOT's resized images, float32 and bf16 (+ channels_last, as the stage resolves it) in the order
A B A B B A in one process; median seconds per run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ctxrepro.analysis.aberration import RegressorConfig, build_regressor
from ctxrepro.detection.model import FastRCNN, multitask_loss
from ctxrepro.detection.rcnn import finetune as rcnn_finetune
from ctxrepro.detection.rcnn.net import WindowNet
from ctxrepro.normals.model import build_net, trunk_output
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.precision import autocast, cpu_has_native_bf16
from ctxrepro.transfer.trunk import Converted, TrunkSpec, build_trunk

Step = Callable[[str], None]
CL = "bf16+channels_last"


def pretrain_case(tower: str, size: int, patches: int, pairs: int, optim: str, threads: int) -> tuple[Step, int]:
    """Arms float32, bf16 and bf16 with channels_last (its own copy of the model and input, NHWC)."""
    torch.manual_seed(0)
    model = build_model(tower, size)
    models = {"plain": model, "cl": copy.deepcopy(model).to(memory_format=torch.channels_last)}
    opts = {k: (torch.optim.Adam(m.parameters(), lr=1e-3) if optim == "adam"
                else torch.optim.SGD(m.parameters(), lr=1e-5)) for k, m in models.items()}
    x = torch.randn(patches, 3, size, size) * 50
    xs = {"plain": x, "cl": x.contiguous(memory_format=torch.channels_last)}
    idx = torch.randint(0, patches, (pairs, 2))
    labels = torch.randint(0, 8, (pairs,))
    reduction = "mean" if optim == "adam" else "sum"

    def step(arm: str) -> None:
        k, amp = ("cl", "bf16") if arm == CL else ("plain", arm)
        opts[k].zero_grad(set_to_none=True)
        with autocast("cpu", amp):
            logits = models[k](xs[k], idx)
        F.cross_entropy(logits.float(), labels, reduction=reduction).backward()
        opts[k].step()
    return step, threads


PAPER = TrunkSpec(tower="alexnet", width=96, conv6=4096, conv6_kernel=3, conv6b=1024, fc7=4096, input_side=227)
# the tiny profile's Figure 6 network: small tower (16), fc6 256, pool5 3x3 at its 32 px input, conv6b 64, fc7 128
TINY = TrunkSpec(tower="small", width=16, conv6=256, conv6_kernel=3, conv6b=64, fc7=128, input_side=112)


def detect_case(threads: int, spec: TrunkSpec = PAPER, size: tuple[int, int] = (600, 800)) -> tuple[Step, int]:
    trunk, head = build_trunk(spec, 0)
    model = FastRCNN(trunk, head, dropout=0.5, box_regression=False, seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *size, generator=g) * 255 for _ in range(2)]
    rois = []
    for _ in images:
        xy = torch.rand(64, 2, generator=g) * torch.tensor([size[1] / 2, size[0] / 2])
        wh = size[0] / 15 + torch.rand(64, 2, generator=g) * size[0] / 4
        rois.append(torch.cat([xy, xy + wh], 1))
    labels = torch.randint(0, 21, (128,), generator=g)
    targets = torch.zeros(128, 4)

    def step(amp: str) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", amp):
            out = model(images, rois)
        cls, box = multitask_loss(type(out)(out.scores.float(), None), labels, targets)
        (cls + box).backward()
        opt.step()
    return step, threads


def normals_case(threads: int, batch: int = 2, spec: TrunkSpec = PAPER, size: tuple[int, int] = (480, 640),
                 hidden: int = 512) -> tuple[Step, int]:
    trunk, _ = build_trunk(spec, 0)
    channels, h, w = trunk_output(trunk, size, "cpu")
    net = build_net(trunk, channels, hidden, 40, seed=0).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, *size, generator=g) * 255
    codes = torch.randint(0, 40, (batch, h, w), generator=g)

    def step(amp: str) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", amp):
            logits = net(x)
        F.cross_entropy(logits.float(), codes).backward()
        opt.step()
    return step, threads


ARMS = {"pretrain-tiny": ("none", "bf16", CL), "pretrain-paper": ("none", "bf16", CL),
        "detect": ("none", "bf16"), "normals": ("none", "bf16"), "detect-tiny": ("none", "bf16"),
        "normals-tiny": ("none", "bf16"), "embed-tiny": ("none", "bf16", CL), "aberration-tiny": ("none", "bf16"),
        "rcnn-tiny": ("none", "bf16"), "rcnn-fc7-tiny": ("none", "bf16")}
def embed_case(threads: int, patches: int = 512) -> tuple[Step, int]:
    """The analyses' forward pass (pretext_eval, nn, mine): the tiny small tower embedding 32 px patches."""
    torch.manual_seed(0)
    model = build_model("small", 32).eval()
    models = {"plain": model, "cl": copy.deepcopy(model).to(memory_format=torch.channels_last)}
    x = torch.randn(patches, 3, 32, 32) * 50
    xs = {"plain": x, "cl": x.contiguous(memory_format=torch.channels_last)}

    @torch.no_grad()
    def step(arm: str) -> None:
        k, amp = ("cl", "bf16") if arm == CL else ("plain", arm)
        with autocast("cpu", amp):
            models[k].embed(xs[k])
    return step, threads


def aberration_case(threads: int) -> tuple[Step, int]:
    """The aberration stage's regressor step at the tiny profile's shapes (32 px, width 16, fc 64, batch 128)."""
    torch.manual_seed(0)
    model = build_regressor(RegressorConfig(patch=32, width=16, fc_dim=64)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 3, 32, 32) * 50, torch.rand(128, 2)

    def step(amp: str) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", amp):
            pred = model(x)
        F.mse_loss(pred.float(), y).backward()
        opt.step()
    return step, threads


def rcnn_case(threads: int, train: bool) -> tuple[Step, int]:
    """R-CNN's window fine-tuning step (`rcnn_finetune._step`, 64 windows) or fc7 extraction (256 windows) on
    the tiny Figure 6 network at its 112 px input."""
    trunk, head = build_trunk(TINY, 0)
    net = WindowNet(Converted(trunk, head, "scratch", [], None, {}), 0.5).train(train)
    opt = rcnn_finetune.build_optimizer(net, rcnn_finetune.FinetuneConfig())
    g = torch.Generator().manual_seed(0)
    windows = torch.rand(64 if train else 256, 3, 112, 112, generator=g) * 255
    labels = torch.randint(0, 21, (len(windows),), generator=g)

    def step(amp: str) -> None:
        if train:
            rcnn_finetune._step(net, opt, windows, labels, 1e-3, 0, amp)
            return
        with torch.no_grad(), autocast("cpu", amp):
            net.fc7_features(windows)
    return step, threads


CASES = {
    "pretrain-tiny": lambda: pretrain_case("small", 32, 256, 1165, "adam", 1),
    "pretrain-paper": lambda: pretrain_case("alexnet", 96, 512, 2330, "sgd", 2),
    "detect": lambda: detect_case(2),
    "normals": lambda: normals_case(2),
    "detect-tiny": lambda: detect_case(1, TINY, (240, 320)),
    "normals-tiny": lambda: normals_case(1, 8, TINY, (144, 192), 64),
    "embed-tiny": lambda: embed_case(1),
    "aberration-tiny": lambda: aberration_case(1),
    "rcnn-tiny": lambda: rcnn_case(1, True),
    "rcnn-fc7-tiny": lambda: rcnn_case(1, False),
}


def interleaved(step: Step, arms: tuple[str, ...], rounds: int) -> dict[str, float]:
    """Median seconds per step of each arm; the arms alternate (order reversed every other round)."""
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for arm in arms:  # warm-up: oneDNN primitive creation, allocator
        step(arm)
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            t0 = time.perf_counter()
            step(arm)
            times[arm].append(time.perf_counter() - t0)
    med = {arm: statistics.median(t) for arm, t in times.items()}
    out = {"float32_s": round(med["none"], 4), "bf16_s": round(med["bf16"], 4),
           "speedup": round(med["none"] / med["bf16"], 2), "rounds": rounds}
    if CL in med:
        out.update({"bf16_channels_last_s": round(med[CL], 4), "speedup_channels_last": round(med["none"] / med[CL], 2)})
    return out


def loop_runs(root: Path, steps: int = 200) -> dict:
    from ctxrepro.config import load_params
    from ctxrepro.pretext.distributed import DistInfo
    from ctxrepro.pretext.engine import TrainPaths, train
    from ctxrepro.pretext.precision import use_channels_last
    from stages.pretrain import Params, load_tables, resolve_variant, train_config

    torch.set_num_threads(1)  # the tiny profile's base.threads
    log = logging.getLogger("bf16_bench")
    _, p = load_params(root / "params.yaml", "pretrain", Params)
    base = replace(train_config(resolve_variant(p, p.variant), 0), steps=steps, checkpoint_every=steps,
                   log_every=50, heldout_images=8)
    tables = load_tables(root, base.data, log)
    times: dict[str, list[float]] = {"none": [], "bf16": []}
    for amp in ("none", "bf16", "none", "bf16", "bf16", "none"):
        cfg = replace(base, amp=amp, channels_last=use_channels_last("cpu", amp, True))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train(cfg, *tables, TrainPaths(Path(d) / "state.pt", Path(d) / "export.pt"), "cpu", DistInfo(), log)
            times[amp].append(time.perf_counter() - t0)
    fp32, bf16 = statistics.median(times["none"]), statistics.median(times["bf16"])
    return {"steps": steps, "float32_s": round(fp32, 1), "bf16_s": round(bf16, 1), "speedup": round(fp32 / bf16, 2),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"of {', '.join(CASES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", type=Path, help="time the whole tiny pretrain loop on this tree's resized images")
    args = parser.parse_args()
    if not cpu_has_native_bf16():
        raise SystemExit("bf16_bench: this CPU has no native bf16 (amx_bf16 / avx512_bf16): nothing to compare")
    if args.loop:
        print(json.dumps(loop_runs(args.loop)))
        return
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        raise SystemExit(f"bf16_bench: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    out = {}
    for name in args.cases or list(CASES):
        step, threads = CASES[name]()
        torch.set_num_threads(threads)
        out[name] = {"threads": threads, **interleaved(step, ARMS[name], args.rounds),
                     "load_average": [round(x, 2) for x in os.getloadavg()]}
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
