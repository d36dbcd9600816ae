"""One linear SVM per class on fc7, trained as R-CNN's rcnn_train.m trains them (section 4.3 via [21]).

- Features are scaled so that their average L2 norm over the training windows is `feat_norm` (20,
  rcnn_scale_features.m). The average is over every training window; rcnn_feature_stats.m estimates the same
  mean from 200 random windows of 200 random images.
- liblinear's L2-regularised L1-loss (hinge) SVM (`-s 3`), C = 1e-3, positive loss weight 2 (`-w1 2`), bias
  term from a constant feature of 10 (`-B 10`; the intercept is regularised like any weight), through
  scikit-learn's LinearSVC (liblinear). Tolerance 0.1: liblinear's default for `-s 3`, which R-CNN kept.
- Positives: the ground-truth boxes of the class. Negatives: windows whose IoU with every ground-truth box of
  the class is below `neg_overlap` (0.3), ground-truth boxes of other classes included.
- One epoch of hard-negative mining over the training images in order: the first image adds all its
  negatives; later images add those scoring above `hard_thresh` (-1.0001) under the current SVM. The SVM is
  retrained after the first image, whenever more than `retrain_limit` (2000) negatives were added since the
  last training, and after the last image; each retraining evicts cached negatives scoring below
  `evict_thresh` (-1.2). One epoch visits each window once, so no negative is added twice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class SvmConfig:
    C: float = 1e-3
    pos_weight: float = 2.0
    bias_mult: float = 10.0
    tol: float = 0.1
    max_iter: int = 1000  # liblinear's default
    feat_norm: float = 20.0
    neg_overlap: float = 0.3
    hard_thresh: float = -1.0001
    evict_thresh: float = -1.2
    retrain_limit: int = 2000


def fit_svm(pos: np.ndarray, neg: np.ndarray, cfg: SvmConfig, seed: int) -> tuple[np.ndarray, float, bool]:
    """(w, b, converged) of one liblinear training on positives then negatives."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([pos, neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    svc = LinearSVC(C=cfg.C, loss="hinge", dual=True, class_weight={1: cfg.pos_weight, -1: 1.0},
                    intercept_scaling=cfg.bias_mult, tol=cfg.tol, max_iter=cfg.max_iter,
                    random_state=seed % 2**32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svc.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return svc.coef_[0].astype(np.float64), float(svc.intercept_[0]), converged


@dataclass
class ClassCache:
    """One class's training cache (rcnn_train.m's `caches{j}`) and what the epoch did."""

    pos: np.ndarray
    neg: np.ndarray
    w: np.ndarray
    b: float = 0.0
    added_since: int = 0
    mined: int = 0  # hard negatives added after the first image
    first: int = 0  # negatives the first image added
    retrains: int = 0
    evicted: int = 0
    unconverged: int = 0
    objective: list[float] = field(default_factory=list)


def objective(cache: ClassCache, cfg: SvmConfig) -> float:
    """rcnn_train.m's printed objective: weighted hinge losses plus 0.5|w|^2 + 0.5 (b / bias_mult)^2."""
    zp, zn = cache.pos @ cache.w + cache.b, cache.neg @ cache.w + cache.b
    return float(cfg.C * cfg.pos_weight * np.maximum(0, 1 - zp).sum() + cfg.C * np.maximum(0, 1 + zn).sum()
                 + 0.5 * cache.w @ cache.w + 0.5 * (cache.b / cfg.bias_mult) ** 2)


def _retrain(cache: ClassCache, cfg: SvmConfig, seed: int) -> None:
    cache.w, cache.b, ok = fit_svm(cache.pos, cache.neg, cfg, seed)
    cache.retrains, cache.added_since, cache.unconverged = cache.retrains + 1, 0, cache.unconverged + (not ok)
    cache.objective.append(objective(cache, cfg))
    keep = cache.neg @ cache.w + cache.b >= cfg.evict_thresh
    cache.evicted += int((~keep).sum())
    cache.neg = cache.neg[keep]


def hard_negative_epoch(positives: list[np.ndarray], images: Iterable[tuple[np.ndarray, np.ndarray]], n_images: int,
                        cfg: SvmConfig, seed: int) -> list[ClassCache]:
    """Train one SVM per class (module docstring). `positives[k]`: (P_k, D) scaled features of class k's
    ground-truth boxes; `images` yields, per training image in order, (scaled features (N, D), negative mask
    (N, K): IoU with class k's ground truth below `neg_overlap`)."""
    dim = positives[0].shape[1]
    caches = [ClassCache(p, np.zeros((0, dim), dtype=np.float32), np.zeros(dim)) for p in positives]
    for i, (feats, negative) in enumerate(images):
        first, last = i == 0, i == n_images - 1
        scores = feats @ np.stack([c.w for c in caches], axis=1) + np.array([c.b for c in caches])
        for k, c in enumerate(caches):
            add = negative[:, k] if first else negative[:, k] & (scores[:, k] > cfg.hard_thresh)
            if add.any():
                c.neg = np.concatenate([c.neg, feats[add]])
                c.added_since += int(add.sum())
                if first:
                    c.first += int(add.sum())
                else:
                    c.mined += int(add.sum())
            if (first or last or c.added_since > cfg.retrain_limit) and len(c.neg) and len(c.pos):
                _retrain(c, cfg, seed)
    return caches


def summary(caches: list[ClassCache], classes: list[str], cfg: SvmConfig, norm: float) -> dict:
    """What the metrics record about the SVMs."""
    per = {name: {"positives": len(c.pos), "first_image_negatives": c.first, "hard_negatives": c.mined,
                  "evicted": c.evicted, "final_negatives": len(c.neg), "retrains": c.retrains,
                  "unconverged": c.unconverged, "objective": c.objective[-1] if c.objective else None}
           for name, c in zip(classes, caches)}
    return {"settings": {"C": cfg.C, "pos_weight": cfg.pos_weight, "bias_mult": cfg.bias_mult, "tol": cfg.tol,
                         "feat_norm": cfg.feat_norm, "neg_overlap": cfg.neg_overlap, "hard_thresh": cfg.hard_thresh,
                         "evict_thresh": cfg.evict_thresh, "retrain_limit": cfg.retrain_limit, "epochs": 1,
                         "solver": "liblinear L2-regularised L1-loss (sklearn LinearSVC, loss='hinge')"},
            "mean_fc7_norm": norm, "hard_negatives": sum(c.mined for c in caches), "per_class": per}
