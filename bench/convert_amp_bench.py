"""Would bf16 autocast speed up convert? float32 against bf16 forward passes at the tiny profile's shapes (issue 25).

convert's statistics become weights: BN folding's channel moments, the k-means inputs (`gather_inputs`), the
within-layer normalisation and the gradient ratios of the between-layer calibration. This bench runs the tiny
rescale rows (`convert_caffenet`: kmeans_rescale, and ours_rescale on a small tower with random BN statistics)
on 48 fit + 16 held-out images (4 crops each at 112 px, 32 calibration crops; smooth random images, as
tests/test_convert.py makes them) in three arms, alternating, one thread:

- `float32`: convert as it is;
- `bf16`: every pass through the network's layers (`rescale.run_layers`) under bf16 autocast, its output cast
  back to float32 before any sum (the moments accumulate in float64, as in float32);
- `bf16-stats`: the same, but the calibration's gradient ratios in float32.

It prints each arm's median seconds, the calibration's iterations and final ratio spread, and the relative
difference ||W_bf16 - W_fp32|| / ||W_fp32|| of every converted weight. Numbers in bench/README.md.

    .venv/bin/python bench/convert_amp_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import time

import torch
import torch.nn.functional as F

import ctxrepro.transfer.caffenet as caffenet
from ctxrepro.pretext.model import ContextNet
from ctxrepro.pretext.precision import cpu_has_native_bf16
from ctxrepro.transfer import rescale
from ctxrepro.transfer.caffenet import CaffeNetSpec, convert_caffenet
from ctxrepro.transfer.convert import CropSet, sample_crops
from ctxrepro.transfer.rescale import RescaleConfig

LOG = logging.getLogger("convert_amp_bench")
PLAIN_RUN, PLAIN_CALIBRATE = rescale.run_layers, rescale.calibrate
# the tiny profile's convert section (params.yaml) and its small tower (pretrain: width 16, fc6 256, 48 px patches)
CFG = RescaleConfig(beta=0.1, batch=64, kmeans_samples=20000, kmeans_iters=10, whiten_eps=1e-3, calib_iters=10,
                    calib_tol=0.01, calib_draws=2)
SPEC = CaffeNetSpec(tower="small", width=16, roi_pool=6, fc6=128, fc7=128, classes=21, input_side=112)


def bf16_run_layers(layers, x, stop):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = PLAIN_RUN(layers, x, stop)
    return y.float()


def float32_calibrate(*args, **kw):
    with use(PLAIN_RUN):
        return PLAIN_CALIBRATE(*args, **kw)


@contextlib.contextmanager
def use(run_layers):
    before = rescale.run_layers
    rescale.run_layers = run_layers
    try:
        yield
    finally:
        rescale.run_layers = before


def crops() -> CropSet:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 3, 48, 64, generator=g) * 255
    imgs = [F.interpolate(b[None], size=(192, 256), mode="bilinear")[0].to(torch.uint8) for b in base]
    fit = sample_crops(imgs[:48], 4, SPEC.input_side, 0.3, g)
    return CropSet(fit, sample_crops(imgs[48:], 4, SPEC.input_side, 0.3, g), fit[:32])


def small_tower() -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = ContextNet("small", 48, width=16, fc_dim=256)
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.5)
    return net.tower


def run(init: str, arm: str, data: CropSet, tower) -> tuple[float, dict, dict]:
    caffenet.calibrate = float32_calibrate if arm == "bf16-stats" else PLAIN_CALIBRATE
    with use(PLAIN_RUN if arm == "float32" else bf16_run_layers):
        t0 = time.perf_counter()
        net, _, stats = convert_caffenet(init, SPEC, tower if init == "ours_rescale" else None, False, data, "images",
                                         50.0, CFG, 7, LOG)
    caffenet.calibrate = PLAIN_CALIBRATE
    return time.perf_counter() - t0, net.state_dict(), stats["calibration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not cpu_has_native_bf16():
        raise SystemExit("convert_amp_bench: this CPU has no native bf16 (amx_bf16 / avx512_bf16)")
    torch.set_num_threads(1)  # the tiny profile's base.threads
    data, tower, arms = crops(), small_tower(), ("float32", "bf16", "bf16-stats")
    for init in ("kmeans_rescale", "ours_rescale"):
        times: dict[str, list[float]] = {a: [] for a in arms}
        last = {}
        for r in range(args.rounds):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                s, state, calib = run(init, arm, data, tower)
                times[arm].append(s)
                last[arm] = (state, calib)
        ref = last["float32"][0]
        out = {}
        for arm in arms:
            state, calib = last[arm]
            diff = {k: round(float((v - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)), 4)
                    for k, v in state.items() if k.endswith("weight")}
            out[arm] = {"seconds": round(statistics.median(times[arm]), 3), "calib_iterations": calib["iterations"],
                        "calib_spread": round(calib["spread"], 4), "weight_rel_diff": diff}
        print(init, json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
