"""R-CNN fc7 extraction throughput at the paper's shapes, against Fast R-CNN's per-RoI cost in the same process.

    .venv/bin/python bench/rcnn_bench.py [--windows 64] [--repeats 2] [--threads 2]

Networks (random weights: speed does not depend on them): the Figure 6 network on the AlexNet-style tower (227 px
windows, conv6 4096, conv6b 1024, fc7 4096: the R-CNN rows of Table 1) and torchvision's AlexNet as CaffeNet
(ImageNet-R-CNN, Scratch-R-CNN). One synthetic 500x375 image (VOC-sized) and `--windows` random proposals.
- rcnn: `features.window_features` (warp with 16 px context + conv1..fc7), windows per second;
- fast_rcnn (baseline): the same network as Fast R-CNN tests it, conv5 once on the 600-px image and the same
  boxes RoI-pooled through the head, RoIs per second.
Rates are medians over `--repeats`, of wall time and of this process's CPU time (all threads). The script
then extrapolates the R-CNN feature passes of VOC 2007 on the paper profile: 5011 trainval images x (2000
proposals + 2.5 boxes) and 4952 test images x 2000 proposals, each window once (detect.rcnn.cache trainval).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ctxrepro.detection.model import FastRCNN
from ctxrepro.detection.rcnn.features import window_features
from ctxrepro.detection.rcnn.net import WindowNet
from ctxrepro.detection.roidb import image_scale, scale_image
from ctxrepro.transfer.caffenet import CaffeNetSpec, build_caffenet
from ctxrepro.transfer.trunk import Converted, TrunkSpec, build_trunk

VOC07_WINDOWS = 5011 * 2002.5 + 4952 * 2000


def networks() -> dict[str, Converted]:
    trunk, head = build_trunk(TrunkSpec(tower="alexnet", width=96, conv6=4096, conv6_kernel=3, conv6b=1024, fc7=4096,
                                        input_side=227), 0)
    alexnet = build_caffenet(CaffeNetSpec(tower="tv_alexnet", width=64, roi_pool=6, fc6=4096, fc7=4096,
                                          input_side=227), 0)
    return {"figure6": Converted(trunk, head, "scratch", [], None, {}),
            "alexnet": Converted(alexnet, None, "scratch_alexnet", [], None, {}, "caffenet")}


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    x1, y1 = rng.integers(0, 400, args.windows), rng.integers(0, 280, args.windows)
    boxes = np.stack([x1, y1, x1 + rng.integers(20, 99, args.windows), y1 + rng.integers(20, 94, args.windows)], 1)
    factor = image_scale(375, 500, 600, 1000)
    image = torch.from_numpy(np.ascontiguousarray(scale_image(rgb, factor))).permute(2, 0, 1).float()
    rois = torch.from_numpy(boxes * factor).float()
    print(f"threads {args.threads}, {args.windows} windows, {args.repeats} repeats")
    for name, conv in networks().items():
        rcnn = WindowNet(conv, 0.5).eval()
        fast = FastRCNN(conv.trunk, conv.head, 0.5, False).eval()
        runs = {"rcnn": [], "fast_rcnn": []}
        with torch.no_grad():
            for _ in range(args.repeats):  # interleaved
                runs["rcnn"].append(timed(lambda: window_features(rcnn, rgb, boxes, 16, 256, "cpu")))
                runs["fast_rcnn"].append(timed(lambda: fast.head(fast.roi_pool(fast.conv5(image), rois))))
        rate = {k: (args.windows / statistics.median(w for w, _ in v), args.windows / statistics.median(c for _, c in v))
                for k, v in runs.items()}
        hours = VOC07_WINDOWS / rate["rcnn"][0] / 3600
        print(f"{name}: R-CNN {rate['rcnn'][0]:.1f} windows/s wall ({rate['rcnn'][1]:.1f} per CPU-s); Fast R-CNN "
              f"{rate['fast_rcnn'][0]:.1f} RoIs/s wall ({rate['fast_rcnn'][1]:.1f} per CPU-s); Fast R-CNN / R-CNN "
              f"{rate['fast_rcnn'][0] / rate['rcnn'][0]:.1f}x; VOC07 fc7 passes at this rate: {hours:,.0f} h")


if __name__ == "__main__":
    main()
