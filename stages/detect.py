"""Detection fine-tuning and VOC 2007 test AP of one converted network (section 4.3, Table 1); foreach row.

Each row runs the protocol `detect.protocol` names for its init: "rcnn" (R-CNN: warped windows, fc7 SVMs with
hard-negative mining; `ctxrepro.detection.rcnn`) or "fast_rcnn" (Fast R-CNN training and testing)."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ctxrepro import viz
from ctxrepro.checkpoint import atomic_torch_save
from ctxrepro.config import BaseParams, param
from ctxrepro.data.voc import SPLITS, VOC_CLASSES
from ctxrepro.detection import table
from ctxrepro.detection.infer import TestConfig, detect_all, write_results
from ctxrepro.detection.model import FastRCNN
from ctxrepro.detection.rcnn.finetune import FinetuneConfig
from ctxrepro.detection.rcnn.protocol import RcnnConfig, run_rcnn
from ctxrepro.detection.rcnn.svm import SvmConfig
from ctxrepro.detection.rcnn.windows import WindowConfig
from ctxrepro.detection.roidb import load_roidb
from ctxrepro.detection.sampling import SamplingConfig
from ctxrepro.detection.train import SolverConfig, train
from ctxrepro.io import atomic_dir, atomic_write_json, atomic_write_text
from ctxrepro.metrics.voc import VocEvalError, evaluate, summary
from ctxrepro.pretext.precision import AMP_CHOICES, describe
from ctxrepro.seeds import derive_seed
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.caffenet import load_converted
from ctxrepro.transfer.convert import INITS
from ctxrepro.transfer.imagenet import FAMILY
from ctxrepro.transfer.trunk import Converted

VOC07 = Path("data/raw/voc2007/VOCdevkit/VOC2007")
TRUNKS = Path("models/convert")
PROPOSALS = Path("data/proposals/voc2007")
PROPOSALS_INDEX = "index.json"
RESULTS = Path("results/detect")
MODELS = Path("models/detect")
STATE = Path("models/detect_state")  # <row>/<config hash>/last.pt: resume states, a `persist: true` out
METRICS = Path("metrics/detect")
PLOTS = Path("plots/detect")
DETECT_SEED = 70  # derive_seed purpose; the same for every row, so only the initialisation differs
NETWORKS = ("figure6", "caffenet")
PROTOCOLS = ("rcnn", "fast_rcnn")


@dataclass(frozen=True)
class RcnnParams:
    """The R-CNN protocol's own settings (rbgirshick/rcnn; the shared solver keys of `Params` apply too)."""

    pad: int = param(16, min=0, help="context padding in window pixels (rcnn_im_crop: 16 at 227)")
    batch: int = param(128, min=2, help="windows per iteration (pascal_finetune_train.prototxt: 128)")
    fg_fraction: float = param(0.25, min=0.0, max=1.0, help="foreground share of a batch (R-CNN: 25%)")
    fg_thresh: float = param(0.5, min=0.0, max=1.0, help="foreground: IoU >= this (R-CNN: 0.5)")
    bg_hi: float = param(0.5, min=0.0, max=1.0, help="background: IoU < this (R-CNN: 0.5)")
    bg_lo: float = param(0.0, min=0.0, max=1.0, help="background: IoU >= this (R-CNN's window file: no bound)")
    max_proposals: int = param(0, min=0, help="proposals per image used, evenly spaced through the list (0 = all)")
    iterations: int = param(70000, min=1, help="SGD iterations (R-CNN README's VOC 2007 model: 70k)")
    lr: float = param(0.001, min=0.0, help="base learning rate (pascal_finetune_solver: 0.001)")
    lr_step: int = param(20000, min=1, help="iterations between x gamma drops (R-CNN: 20k)")
    fc8_lr_mult: float = param(10.0, min=0.0, help="the new fc8's rate multiplier (fc8_pascal: blobs_lr 10)")
    feature_batch: int = param(256, min=1, help="windows per forward pass when extracting fc7 (R-CNN: 256)")
    cache: str = param("trainval", choices=("none", "trainval", "all"),
                       help="fc7 kept per image in models/detect_state/<row>/fc7 for: no split, the training split "
                            "(read twice: norm and positives, then mining), or both splits (a resumed test pass)")
    svm: SvmConfig = param(SvmConfig(), help="rcnn_train.m: C, pos_weight, bias_mult, tol, max_iter, feat_norm, "
                                             "neg_overlap, hard_thresh, evict_thresh, retrain_limit")


@dataclass(frozen=True)
class Params:
    row: str = param("color_dropping-ours", refers="convert.rows",
                     help="models/convert/<row>.pt, a convert.rows key (the foreach item)")
    classes: tuple[str, ...] = param(VOC_CLASSES, choices=VOC_CLASSES, help="classes scored (mAP over these)")
    train_split: str = param("trainval", choices=SPLITS, help="VOC 2007 image set to fine-tune on")
    test_split: str = param("test", choices=SPLITS, help="VOC 2007 image set to score")
    use_difficult: bool = param(False, help="train on difficult boxes too (py-faster-rcnn: no)")
    scale: int = param(600, min=16, help="shorter image side (Fast R-CNN: 600)")
    max_size: int = param(1000, min=16, help="longer side cap (Fast R-CNN: 1000)")
    iterations: int = param(40000, min=1, help="SGD iterations (Fast R-CNN VOC07: 40k)")
    images_per_batch: int = param(2, min=1, help="images per iteration (Fast R-CNN: 2)")
    rois_per_image: int = param(64, min=1, help="RoIs per image (Fast R-CNN: 64)")
    fg_fraction: float = param(0.25, min=0.0, max=1.0, help="foreground share of the RoIs (Fast R-CNN: 25%)")
    fg_thresh: float = param(0.5, min=0.0, max=1.0, help="foreground: IoU >= this (Fast R-CNN: 0.5)")
    bg_hi: float = param(0.5, min=0.0, max=1.0, help="background: IoU < this (Fast R-CNN: 0.5)")
    bg_lo: float = param(0.1, min=0.0, max=1.0, help="background: IoU >= this (Fast R-CNN: 0.1)")
    flip: bool = param(True, help="horizontal flips (Fast R-CNN: yes)")
    box_regression: dict[str, bool] = param({"figure6": False, "caffenet": True},
                                            help="Fast R-CNN's box regression per network: the paper's R-CNN rows "
                                                 "(Figure 6 network) had none, its rescale rows (CaffeNet) had it")
    dropout: float = param(0.5, min=0.0, max=0.99, help="dropout after fc7 (AlexNet / Fast R-CNN: 0.5)")
    optimizer: str = param("sgd", choices=("sgd", "adam"), help="sgd: Fast R-CNN's solver")
    lr: float = param(0.001, min=0.0, help="base learning rate (Fast R-CNN: 0.001)")
    lr_step: int = param(30000, min=1, help="iterations between x gamma drops (Fast R-CNN: 30k)")
    gamma: float = param(0.1, min=0.0, max=1.0, help="learning-rate drop factor (Fast R-CNN: 0.1)")
    momentum: float = param(0.9, min=0.0, max=0.9999, help="SGD momentum (Fast R-CNN: 0.9)")
    weight_decay: float = param(5e-4, min=0.0, help="weight decay on weights, none on biases (Fast R-CNN: 5e-4)")
    bias_lr_mult: float = param(2.0, min=0.0, help="biases' learning-rate multiplier (Caffe's Fast R-CNN: 2)")
    score_thresh: float = param(0.05, min=0.0, max=1.0, help="test: keep class scores above this")
    nms: float = param(0.3, min=0.0, max=1.0, help="test: per-class NMS IoU (Fast R-CNN: 0.3)")
    max_per_class: int = param(100, min=1, help="test: detections per class per image (Fast R-CNN: 100)")
    roi_chunk: int = param(1000, min=1, help="test: RoIs per head pass (memory bound)")
    log_every: int = param(20, min=1, help="iterations per loss log line and loss-plot point")
    checkpoint_every: int = param(1000, min=1, help="iterations between resumable checkpoints")
    workers: int = param(4, min=0, help="DataLoader processes reading, scaling and sampling batches")
    protocol: dict[str, str] = param({i: "fast_rcnn" if INITS[i].network == "caffenet" else "rcnn" for i in INITS},
                                     help="per init: 'rcnn' (the paper's R-CNN rows) or 'fast_rcnn' (its rescale rows)")
    rcnn: RcnnParams = param(RcnnParams(), help="the R-CNN protocol's settings")
    freeze: dict[str, tuple[str, ...]] = param({"alexnet": ("conv1",), "vgg16": ("conv1_1", "conv1_2", "conv2_1", "conv2_2")},
                                               help="per tower family: conv layers the Fast R-CNN rescale rows keep "
                                                    "fixed (fast-rcnn's CaffeNet / VGG16 train.prototxt: lr_mult 0)")

    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast in training and test (CUDA, or a CPU with native "
                                                       "bf16); none = float32")
    profile_note: str = param("", help="what this profile scales down from the paper, copied to the metrics")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.row):
            raise ValueError(f"row={self.row!r}: expected a plain name like 'color_dropping-ours'")
        if sorted(self.protocol) != sorted(INITS) or not set(self.protocol.values()) <= set(PROTOCOLS):
            raise ValueError(f"protocol: give one of {', '.join(PROTOCOLS)} for each init {', '.join(INITS)}, "
                             f"got {dict(self.protocol)}")
        if sorted(self.box_regression) != sorted(NETWORKS):
            raise ValueError(f"box_regression: give true/false for each of {', '.join(NETWORKS)}, "
                             f"got {sorted(self.box_regression)}")

    def solver(self) -> SolverConfig:
        return SolverConfig(self.iterations, self.images_per_batch, self.optimizer, self.lr, self.lr_step,
                            self.gamma, self.momentum, self.weight_decay, self.bias_lr_mult, self.flip, self.scale,
                            self.max_size, self.log_every, self.checkpoint_every, self.workers, self.amp)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.rois_per_image, self.fg_fraction, self.fg_thresh, self.bg_hi, self.bg_lo)

    def rcnn_config(self) -> RcnnConfig:
        r = self.rcnn
        windows = WindowConfig(r.pad, r.batch, r.fg_fraction, r.fg_thresh, r.bg_hi, r.bg_lo, self.flip,
                               r.max_proposals)
        solver = FinetuneConfig(r.iterations, r.lr, r.lr_step, self.gamma, self.momentum, self.weight_decay,
                                self.bias_lr_mult, r.fc8_lr_mult, self.log_every, self.checkpoint_every, self.workers,
                                self.amp)
        return RcnnConfig(windows, solver, r.svm, self.dropout, r.feature_batch, r.cache, self.nms,
                          self.max_per_class, self.amp)

    def test(self) -> TestConfig:
        return TestConfig(self.scale, self.max_size, self.score_thresh, self.nms, self.max_per_class, self.roi_chunk,
                          self.amp)


def state_records(p: Params, base: BaseParams) -> dict[str, dict]:
    """The params part of every row's resume-state record (`ctxrepro states`; the weights and roidb digests
    are not compared there)."""
    return {"detect": {**asdict(p.solver()), **asdict(p.sampling()), "seed": derive_seed(base.seed, DETECT_SEED, 0),
                       "dropout": p.dropout}}


def _inputs(p: Params, root: Path, device: str) -> tuple[Converted, list, list]:
    proposals = root / PROPOSALS
    if not (proposals / PROPOSALS_INDEX).is_file():
        raise StageError(f"detect: {proposals / PROPOSALS_INDEX} missing: the proposal cache is absent or "
                         f"incomplete (run `dvc repro proposals`)")
    try:
        ckpt = load_converted(root / TRUNKS / f"{p.row}.pt", device)
        train_db = load_roidb(root / VOC07, p.train_split, proposals, p.use_difficult)
        test_db = load_roidb(root / VOC07, p.test_split, proposals)
    except (OSError, ValueError) as e:
        raise StageError(f"detect ({p.row}): {e}") from e
    return ckpt, train_db, test_db


def _paper_row(ckpt: Converted) -> str | None:
    color = ((ckpt.source or {}).get("config") or {}).get("color", "none")
    return table.paper_row(ckpt.init, ckpt.trunk.spec.tower, color)


def _row_facts(p: Params, ckpt: Converted) -> dict:
    """What the metrics say about the row: its init, network, box regression, `detect.protocol` and the label
    REPORT.md shows for it (`protocol`)."""
    protocol = p.protocol[ckpt.init]
    box = protocol == "fast_rcnn" and p.box_regression[ckpt.network]  # R-CNN rows: none (section 4.3)
    return {"row": p.row, "variant": (ckpt.source or {}).get("variant"), "init": ckpt.init,
            "network": ckpt.network, "paper_row": _paper_row(ckpt), "box_regression": box,
            "detect_protocol": protocol, "protocol": table.protocol(ckpt.network, box, protocol)}


def _score(p: Params, root: Path, out: Path, dets: dict, test_ids: list[str], log: logging.Logger) -> dict:
    """Write the results files into `out` and score them with the devkit's rules."""
    write_results(out, dets, test_ids, p.test_split)
    try:
        per_class = evaluate(root / VOC07, p.test_split, out, p.classes)
    except VocEvalError as e:
        raise StageError(f"detect ({p.row}): {e}") from e
    for c, r in per_class.items():
        log.info("%-12s AP %5.1f  (npos %d, %d detections, %d TP)", c, 100 * r.ap, r.npos, r.detections, r.tp)
    return summary(per_class)


def _freeze(p: Params, ckpt: Converted) -> list[str]:
    """Fix the rescale rows' first conv layers (`freeze`, by tower family); returns their names."""
    if ckpt.network != "caffenet":
        return []
    family = FAMILY.get(ckpt.trunk.spec.tower)
    names = list(p.freeze.get(family, ()))
    body = dict(ckpt.trunk.body.named_children())
    missing = [n for n in names if n not in body]
    if missing:
        raise StageError(f"detect.freeze.{family}: no layer {missing} in the {ckpt.trunk.spec.tower} tower "
                         f"(its layers: {', '.join(body)})")
    for n in names:
        body[n].requires_grad_(False)
    return names


def _fast_rcnn(p: Params, ctx: StageContext, ckpt: Converted, train_db: list, test_db: list, facts: dict):
    """Fast R-CNN: (model, detections, loss rows, metrics extras)."""
    model = FastRCNN(ckpt.trunk, ckpt.head, p.dropout, facts["box_regression"],
                     derive_seed(ctx.base.seed, DETECT_SEED, 1))
    model.to(ctx.device)
    frozen = _freeze(p, ckpt)
    history = train(model, train_db, p.sampling(), p.solver(), derive_seed(ctx.base.seed, DETECT_SEED, 0),
                    ctx.device, ctx.log, ctx.root / STATE / p.row)
    dets = detect_all(model, test_db, p.test(), ctx.device, ctx.log)
    last = history[-1] if history else {}
    rows = [(h["iteration"], h["loss"], h["loss_cls"], h["loss_box"]) for h in history]
    return model, dets, rows, {"iterations": p.iterations, "frozen": frozen, "train_loss": last.get("loss"),
                               "train_loss_cls": last.get("loss_cls"), "train_loss_box": last.get("loss_box")}


def _rcnn(p: Params, ctx: StageContext, ckpt: Converted, train_db: list, test_db: list, facts: dict):
    """R-CNN: (model, detections, loss rows, metrics extras: the SVM settings and hard negatives mined)."""
    cfg = p.rcnn_config()
    out = run_rcnn(ckpt, train_db, test_db, p.classes, cfg, derive_seed(ctx.base.seed, DETECT_SEED, 0), ctx.device,
                   ctx.log, ctx.root / STATE / p.row)
    last = out.history[-1] if out.history else {}
    rows = [(h["iteration"], h["loss"], h["loss"], 0.0) for h in out.history]
    rate = out.feature_windows / out.feature_seconds if out.feature_seconds > 0 else None
    return out.net, out.dets, rows, {
        "iterations": p.rcnn.iterations, "train_loss": last.get("loss"), "train_loss_cls": last.get("loss"),
        "train_loss_box": None, "svm": out.svm, "hard_negatives": out.svm["hard_negatives"],
        "windows": {"side": out.net.side, "pad": p.rcnn.pad, "batch": p.rcnn.batch,
                    "max_proposals": p.rcnn.max_proposals, "features_computed": out.feature_windows,
                    "feature_seconds": round(out.feature_seconds, 2),
                    "feature_windows_per_second": None if rate is None else round(rate, 1)}}


def run(params: Params, ctx: StageContext) -> None:
    root, log, p = ctx.root, ctx.log, params
    start = time.monotonic()
    ckpt, train_db, test_db = _inputs(p, root, ctx.device)
    facts = _row_facts(p, ckpt)
    log.info("%s: %s; precision: %s", p.row, facts, describe(ctx.device, p.amp))
    log.info("%s: %d train images (%d boxes), %d test images, %.0f / %.0f proposals per image", p.row,
             len(train_db), sum(len(e.gt_boxes) for e in train_db), len(test_db),
             sum(len(e.proposals) for e in train_db) / max(len(train_db), 1),
             sum(len(e.proposals) for e in test_db) / max(len(test_db), 1))
    protocol = _rcnn if facts["detect_protocol"] == "rcnn" else _fast_rcnn
    try:
        model, dets, loss_rows, extra = protocol(p, ctx, ckpt, train_db, test_db, facts)
    except (OSError, ValueError, FloatingPointError) as e:
        raise StageError(f"detect ({p.row}): {e}") from e
    tested = time.monotonic()
    with atomic_dir(root / RESULTS / p.row) as out:
        scores = _score(p, root, out, dets, [e.image_id for e in test_db], log)
        row = table.OurRow(p.row, scores["ap"], facts["paper_row"], p.profile_note)
        atomic_write_text(out / "table1.md", table.table1_markdown([row], p.classes))
    log.info("%s: mAP %.1f over %d classes", p.row, 100 * (scores["map"] or 0.0), len(p.classes))
    atomic_torch_save({**facts, "spec": asdict(ckpt.trunk.spec),
                       "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                      root / MODELS / f"{p.row}.pt")
    with atomic_dir(root / PLOTS / p.row) as plots:
        viz.write_csv(plots / "ap.csv", ["class", "ap"], [(c, scores["ap"][c]) for c in p.classes])
        viz.write_csv(plots / "loss.csv", ["iteration", "loss", "loss_cls", "loss_box"], loss_rows)
    atomic_write_json(root / METRICS / f"{p.row}.json", {
        **scores, **facts, **extra, "profile_note": p.profile_note, "train_images": len(train_db),
        "test_images": len(test_db), "detections": int(sum(len(d) for per in dets.values() for d in per.values())),
        "threads": torch.get_num_threads(),
        "seconds": {"train_and_test": round(tested - start, 2), "total": round(time.monotonic() - start, 2)}})
