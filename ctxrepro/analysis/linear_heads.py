"""Linear classifiers on frozen features (`ctxrepro.analysis.linear_probe`): the two probes of the benchmark.

- ImageNet: one multinomial logistic regression per layer (Zhang et al. 2016; Zhang et al. 2017, Table 2),
  trained online on the frozen trunk with SGD (`ctxrepro.analysis.linear_online`); `SgdConfig` is its schedule.
- VOC07 (Goyal et al. 2019, released code tools/svm/train_svm_kfold.py and test_svm.py): features L2-normalised
  per image; per class a scikit-learn LinearSVC (squared hinge, L2, dual, positive class weight 2, tol 1e-4),
  its cost chosen by 3-fold cross-validation (scikit-learn's average precision) over a grid; refit on all
  trainval; test images scored by the decision function and evaluated by the VOC07 classification AP
  (`ctxrepro.metrics.voc_cls`). Classes run in parallel (joblib, `workers` processes).
- Difficult objects as Goyal et al.'s code handles them: extra_scripts/create_voc_data_files.py maps VOC's
  labels (1 present, -1 absent, 0 only difficult) to 1 / 0 / -1, and train_svm_kfold.py then sets every label
  but 1 to -1, so an image whose only objects of a class are difficult is a *negative* of that class's
  training; test_svm.py drops those images from the class's test AP (as VOCevalcls ignores them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ctxrepro.metrics.voc_cls import NEGATIVE, POSITIVE, classification_ap

# Goyal et al.'s released grid: 10^-7..10^2 (GETTING_STARTED.md) and 2^-4..2^-19 (svm_helper.parse_cost_list).
GOYAL_COSTS = tuple([10.0 ** e for e in range(-7, 3)] + [0.5 ** e for e in range(4, 20)])


@dataclass(frozen=True)
class SgdConfig:
    """SGD for the linear heads (paper profile: Goyal et al.'s released ImageNet linear config)."""

    batch: int = 256
    iterations: int = 140_000
    lr: float = 0.01
    lr_step: int = 40_000
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Goyal et al.'s `normalize_features`: each row divided by (its L2 norm + 1e-5), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


@dataclass(frozen=True)
class SvmConfig:
    costs: tuple[float, ...] = GOYAL_COSTS
    folds: int = 3  # Goyal et al.: cross_val_score(cv=3)
    positive_weight: float = 2.0  # Goyal et al.: class_weight {1: 2, -1: 1}
    max_iter: int = 2000
    tol: float = 1e-4


def _svm(cost: float, cfg: SvmConfig, seed: int):
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: cfg.positive_weight, -1: 1.0}, penalty="l2", loss="squared_hinge",
                     dual=True, tol=cfg.tol, max_iter=cfg.max_iter, random_state=seed)


def svm_class(train_x: np.ndarray, labels: np.ndarray, cfg: SvmConfig, seed: int) -> tuple[object, float, int]:
    """One class's SVM: (fitted LinearSVC, chosen cost, folds used). labels in {1, 0, -1}: as Goyal et al.'s
    train_svm_kfold.py, every label but 1 (only-difficult images included) is a negative."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    y = np.where(labels == POSITIVE, 1, -1)
    folds = min(cfg.folds, int((y == 1).sum()), int((y == -1).sum()))
    if folds < 2:
        raise ValueError(f"svm_class: {int((y == 1).sum())} positive and {int((y == -1).sum())} negative "
                         f"training images: too few to cross-validate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is part of the protocol
        cv = [cross_val_score(_svm(c, cfg, seed), train_x, y, cv=folds, scoring="average_precision").mean()
              for c in cfg.costs]
        best = cfg.costs[int(np.argmax(cv))]  # first maximum, as Goyal et al.'s np.argmax
        return _svm(best, cfg, seed).fit(train_x, y), best, folds


def _one_class(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
               cfg: SvmConfig, seed: int) -> tuple[float | None, float | None, str | None]:
    """(test AP, chosen cost, why skipped) of one class; only-difficult test images are ignored by the AP."""
    try:
        clf, cost, _ = svm_class(train_x, train_labels, cfg, seed)
    except ValueError as e:
        return None, None, str(e)
    return classification_ap(clf.decision_function(test_x), test_labels), cost, None


def voc_svm(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
            classes: Sequence[str], cfg: SvmConfig, seed: int, workers: int = 1) -> dict:
    """Per-class SVMs on L2-normalised features, `workers` classes at a time (joblib processes; the result does
    not depend on it): {"ap": {class: AP or None}, "map", "cost": {class: C}, "skipped", ...}."""
    from joblib import Parallel, delayed

    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    jobs = (delayed(_one_class)(train_x, train_labels[:, j], test_x, test_labels[:, j], cfg, seed)
            for j in range(len(classes)))
    results = Parallel(n_jobs=max(1, min(workers, len(classes))))(jobs)
    ap = {c: r[0] for c, r in zip(classes, results)}
    cost = {c: r[1] for c, r in zip(classes, results) if r[1] is not None}
    skipped = {c: r[2] for c, r in zip(classes, results) if r[2] is not None}
    done = [v for v in ap.values() if v is not None]
    return {"ap": ap, "map": float(np.mean(done)) if done else None, "cost": cost, "skipped": skipped,
            "positives": {c: int((test_labels[:, j] == POSITIVE).sum()) for j, c in enumerate(classes)},
            "negatives": {c: int((test_labels[:, j] == NEGATIVE).sum()) for j, c in enumerate(classes)}}
