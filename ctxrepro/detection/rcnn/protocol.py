"""The R-CNN protocol of one Table 1 row (section 4.3 via R-CNN [21]; module docstrings of `ctxrepro.detection.rcnn`).

1. Fine-tune the converted network on warped windows (`finetune`).
2. fc7 of every training window (ground truth + proposals), streamed and cached per image (`features`): pass 1
   measures the average feature norm and collects the positives (rcnn_feature_stats.m, rcnn_train.m).
3. One SVM per evaluated class with one epoch of hard-negative mining (pass 2, `svm`).
4. Test: SVM scores of every test proposal, per-class NMS at `nms` (0.3), at most `max_per_class` per image,
   then the devkit's AP (the caller). No bounding-box regression (the paper's R-CNN rows had none).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ctxrepro.checkpoint import digest
from ctxrepro.data.voc import VOC_CLASSES
from ctxrepro.detection.boxes import iou
from ctxrepro.detection.infer import Detections, nms_per_class
from ctxrepro.detection.rcnn.features import FeatureCache, stream_features
from ctxrepro.detection.rcnn.finetune import FinetuneConfig, finetune
from ctxrepro.detection.rcnn.net import WindowNet
from ctxrepro.detection.rcnn.svm import SvmConfig, hard_negative_epoch, summary
from ctxrepro.detection.rcnn.windows import WindowConfig, image_windows, subsample
from ctxrepro.detection.roidb import Entry
from ctxrepro.pretext.precision import check_amp
from ctxrepro.transfer.trunk import Converted


@dataclass(frozen=True)
class RcnnConfig:
    windows: WindowConfig
    finetune: FinetuneConfig
    svm: SvmConfig
    dropout: float = 0.5
    feature_batch: int = 256  # windows per forward pass when extracting fc7 (R-CNN: 256)
    cache: str = "trainval"  # fc7 cached per image for: none, trainval (read twice), all (test too)
    nms: float = 0.3
    max_per_class: int = 100
    amp: str = "none"  # autocast of the fc7 extraction (ctxrepro.pretext.precision); fine-tuning has its own

    def __post_init__(self) -> None:
        check_amp(self.amp)


@dataclass
class RcnnRun:
    net: WindowNet
    dets: dict[str, Detections]
    history: list[dict]
    svm: dict
    feature_seconds: float
    feature_windows: int


class _Features:
    """The fc7 streams of one run, counting the windows computed (not read back from the cache) and their seconds."""

    def __init__(self, net: WindowNet, cfg: RcnnConfig, state: Path | None, device, log: logging.Logger):
        self.net, self.cfg, self.device, self.log, self.seconds, self.windows = net, cfg, device, log, 0.0, 0
        self.key = {"weights": digest(net.state_dict().values()), "side": net.side, "pad": cfg.windows.pad,
                    "max_proposals": cfg.windows.max_proposals, "amp": cfg.amp}
        self.state = state

    def stream(self, entries: Sequence[Entry], split: str, with_gt: bool):
        cached = self.state is not None and (self.cfg.cache == "all" or (self.cfg.cache == "trainval" and with_gt))
        cache = FeatureCache(self.state / "fc7" / split, {**self.key, "split": split}, self.log) if cached else None
        mp = self.cfg.windows.max_proposals
        boxes_of = (lambda e: image_windows(e, mp)[0]) if with_gt else (lambda e: subsample(e.proposals, mp))
        start = time.monotonic()
        for e, boxes, feats, computed in stream_features(self.net, entries, boxes_of, self.cfg.windows.pad,
                                                         self.cfg.feature_batch, self.device, cache, self.log,
                                                         f"fc7 {split}", self.cfg.amp):
            if computed:  # the rate counts extraction only, not cache reads
                self.seconds += time.monotonic() - start
                self.windows += len(boxes)
            yield e, boxes, feats
            start = time.monotonic()


def _positives(stream, class_ids: list[int]) -> tuple[list[np.ndarray], float]:
    """Pass 1: the ground-truth boxes' features per class, and the mean fc7 norm over all training windows."""
    pos: list[list[np.ndarray]] = [[] for _ in class_ids]
    total, count = 0.0, 0
    for e, _, feats in stream:
        total, count = total + float(np.linalg.norm(feats, axis=1).sum()), count + len(feats)
        gt = feats[:len(e.gt_boxes)]
        for k, c in enumerate(class_ids):
            pos[k].append(gt[e.gt_classes == c])
    dim = pos[0][0].shape[1] if pos and pos[0] else 0
    return [np.concatenate(p) if p else np.zeros((0, dim), np.float32) for p in pos], total / max(count, 1)


def _negatives(stream, class_ids: list[int], scale: float, neg_overlap: float):
    """Pass 2's images: (scaled features, (N, K) mask of IoU < neg_overlap with each class's ground truth)."""
    for e, boxes, feats in stream:
        mask = np.ones((len(boxes), len(class_ids)), dtype=bool)
        for k, c in enumerate(class_ids):
            gt = e.gt_boxes[e.gt_classes == c]
            if len(gt) and len(boxes):
                mask[:, k] = iou(boxes, gt).max(axis=1) < neg_overlap
        yield feats * scale, mask


def train_svms(feats: _Features, train_db: Sequence[Entry], classes: Sequence[str], cfg: SvmConfig, seed: int,
               log: logging.Logger) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """(W (D, K), b (K,), feature scale, summary) of the classes' SVMs."""
    class_ids = [VOC_CLASSES.index(c) + 1 for c in classes]
    pos, norm = _positives(feats.stream(train_db, "trainval", True), class_ids)
    scale = cfg.feat_norm / max(norm, 1e-12)
    log.info("R-CNN SVMs: mean fc7 norm %.3f -> scale %.4f; positives %s", norm, scale,
             dict(zip(classes, map(len, pos))))
    caches = hard_negative_epoch([p * scale for p in pos], _negatives(feats.stream(train_db, "trainval", True),
                                 class_ids, scale, cfg.neg_overlap), len(train_db), cfg, seed)
    info = summary(caches, list(classes), cfg, norm)
    log.info("R-CNN SVMs: %d hard negatives mined over %d classes", info["hard_negatives"], len(classes))
    return np.stack([c.w for c in caches], axis=1), np.array([c.b for c in caches]), scale, info


def test_detections(feats: _Features, test_db: Sequence[Entry], classes: Sequence[str], w: np.ndarray, b: np.ndarray,
                    scale: float, cfg: RcnnConfig) -> dict[str, Detections]:
    """SVM scores of every test proposal, NMS per class (module docstring)."""
    cols = [VOC_CLASSES.index(c) + 1 for c in classes]
    out = {}
    for e, boxes, f in feats.stream(test_db, "test", False):
        scores = torch.full((len(boxes), len(VOC_CLASSES) + 1), -np.inf, dtype=torch.float64)
        scores[:, cols] = torch.from_numpy((f * scale).astype(np.float64) @ w + b)
        tiled = torch.from_numpy(np.asarray(boxes, dtype=np.float64)).repeat(1, len(VOC_CLASSES) + 1)
        out[e.image_id] = nms_per_class(scores, tiled, -np.inf, cfg.nms, cfg.max_per_class) if len(boxes) else {}
    return out


def run_rcnn(converted: Converted, train_db: Sequence[Entry], test_db: Sequence[Entry], classes: Sequence[str],
             cfg: RcnnConfig, seed: int, device: str | torch.device, log: logging.Logger,
             state: Path | None) -> RcnnRun:
    """The whole protocol (module docstring); `state` holds the fine-tuning checkpoint and the fc7 cache."""
    net = WindowNet(converted, cfg.dropout).to(device)
    history = finetune(net, train_db, cfg.windows, cfg.finetune, seed, device, log, state)
    feats = _Features(net, cfg, state, device, log)
    w, b, scale, info = train_svms(feats, train_db, classes, cfg.svm, seed, log)
    dets = test_detections(feats, test_db, classes, w, b, scale, cfg)
    return RcnnRun(net, dets, history, {**info, "scale": scale}, feats.seconds, feats.windows)
