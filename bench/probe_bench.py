"""Cost of the linear probes at the paper's scale, measured on a slice and extrapolated (bench/README.md, "linear
probes").

`svm`: the VOC07 SVM grid of one layer is 20 classes x 26 costs x (3 cross-validation fits on 2/3 of the 5,011
trainval images + 1 refit of the chosen cost on all of them), each a LinearSVC on 9,600 L2-normalised dims. The
slice measured here is one class: one cross-validation fit (3,341 x 9,600) per cost, every cost of the grid.
Extrapolation: a class = 3 x (the sum over costs) + 1.5 x (the slowest fit, an upper bound on the refit of 1.5x the
rows); a layer = 20 classes, divided by `--workers` when classes run in parallel. Features are synthetic (ReLU of
Gaussians; `--positives` of the images carry a class signal on 50 dims): the fit time depends on how separable
the real features are, so the number is an order of magnitude, not a prediction.

`online`: images/s of the ImageNet heads trained online (our AlexNet at 227 px, 6 heads of 1,000 classes at the
published sizes, one SGD step per batch) against the trunk's forward alone (what a feature dump costs per image),
the same process, random pixels (decoding not included).

    python bench/probe_bench.py svm --dims 9600 --rows 3341
    python bench/probe_bench.py online --batch 16 --iterations 4
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def svm(args: argparse.Namespace) -> None:
    from sklearn.exceptions import ConvergenceWarning

    from ctxrepro.analysis import linear_heads as H

    rng = np.random.default_rng(0)
    y = np.where(rng.random(args.rows) < args.positives, 1, -1)
    x = rng.normal(size=(args.rows, args.dims)).astype(np.float32)
    x[y == 1, :50] += 1.5
    x = H.l2_normalize(np.maximum(x, 0.0))
    cfg = H.SvmConfig()
    times = []
    for cost in cfg.costs:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = H._svm(cost, cfg, 0).fit(x, y)
        times.append(time.perf_counter() - start)
        print(f"C={cost:.3g}: {times[-1]:.2f} s, {int(np.max(clf.n_iter_))} iterations")
    per_class = 3 * sum(times) + 1.5 * max(times)
    print(f"measured: {sum(times):.1f} s for {len(times)} fits of {args.rows} x {args.dims}")
    print(f"one class, full grid (3 folds + refit): {per_class:.0f} s; one layer, 20 classes: {20 * per_class:.0f} s "
          f"serial, {20 * per_class / args.workers:.0f} s on {args.workers} workers")


def online(args: argparse.Namespace) -> None:
    from ctxrepro.analysis import linear_online as O
    from ctxrepro.analysis import linear_probe as L
    from ctxrepro.analysis.linear_heads import SgdConfig
    from ctxrepro.pretext.model import build_tower

    torch.manual_seed(0)
    taps = L.LayerTaps(build_tower("alexnet", 96), 96, 227, 9800)
    heads = O.LinearHeads(L.layer_dims(taps, 227), 1000)
    opt = O.head_optimizer(heads, SgdConfig())
    x = torch.rand(args.batch, 3, 227, 227) * 255
    y = torch.randint(1000, (args.batch,))
    rt = O.Runtime()
    O._features(taps, x, "drop", rt)  # warm-up
    start = time.perf_counter()
    for _ in range(args.iterations):
        O._features(taps, x, "drop", rt)
    forward = args.batch * args.iterations / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(args.iterations):
        O.sgd_step(heads, opt, O._features(taps, x, "drop", rt), y, 0.01, i + 1)
    trained = args.batch * args.iterations / (time.perf_counter() - start)
    print(f"trunk forward only: {forward:.1f} images/s; forward + 6 heads' SGD step: {trained:.1f} images/s "
          f"({trained / forward:.2f}x); threads {torch.get_num_threads()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("svm")
    s.add_argument("--rows", type=int, default=3341, help="2/3 of VOC07's 5,011 trainval images: one CV fold")
    s.add_argument("--dims", type=int, default=9600)
    s.add_argument("--positives", type=float, default=0.06, help="fraction of positive images (VOC07: ~6%%)")
    s.add_argument("--workers", type=int, default=8, help="classes in parallel, for the extrapolation")
    o = sub.add_parser("online")
    o.add_argument("--batch", type=int, default=16)
    o.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    svm(args) if args.what == "svm" else online(args)


if __name__ == "__main__":
    main()
