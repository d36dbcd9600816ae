"""Linear classifiers on frozen features (`ctxrepro.analysis.linear_probe`): the two probes of the benchmark.

- ImageNet: one multinomial logistic regression per layer (Zhang et al. 2016; Zhang et al. 2017, Table 2),
  trained with SGD on features standardised by the training set's per-dimension mean and deviation (Goyal et
  al.'s released code puts an affine-free batch norm before the linear layer: the same at test time). The
  training set's features hold several augmented views of each image (random crop and flip); epoch e reads
  view e mod views. Rows are read from the memmap one batch at a time; on the GPU when there is one.
- VOC07 (Goyal et al. 2019, released code tools/svm): features L2-normalised per image; per class a
  scikit-learn LinearSVC (squared hinge, L2, dual, positive class weight 2, tol 1e-4), its cost chosen by
  k-fold cross-validation (scikit-learn's average precision) over a grid; refit on all trainval; test images
  scored by the decision function and evaluated by the VOC07 classification AP (`ctxrepro.metrics.voc_cls`).
  Images holding only difficult objects of a class are left out of that class's training and its AP.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ctxrepro.metrics.voc_cls import NEGATIVE, POSITIVE, classification_ap
from ctxrepro.seeds import derive_seed, generator

SHUFFLE = 12  # seed purpose of the SGD sample order
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


def feature_stats(features: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation over all (views, images) rows, read `chunk` rows at a time."""
    k, n, d = features.shape
    total, sq = np.zeros(d), np.zeros(d)
    for v in range(k):
        for i in range(0, n, chunk):
            block = np.asarray(features[v, i:i + chunk], dtype=np.float64)
            total += block.sum(0)
            sq += np.square(block).sum(0)
    mean = total / (k * n)
    std = np.sqrt(np.maximum(sq / (k * n) - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


@dataclass(frozen=True)
class SoftmaxHead:
    weight: Tensor  # (classes, dims), on standardised features
    bias: Tensor
    mean: Tensor
    std: Tensor

    def scores(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std) @ self.weight.T + self.bias


def _rows(features: np.ndarray, view: int, index: np.ndarray, device: str) -> tuple[Tensor, np.ndarray]:
    order = np.sort(index)  # memmaps read sorted rows fastest; the batch's order does not matter to SGD
    return torch.from_numpy(np.asarray(features[view, order], dtype=np.float32)).to(device), order


def train_softmax(features: np.ndarray, labels: np.ndarray, classes: int, cfg: SgdConfig, seed: int,
                  device: str = "cpu") -> SoftmaxHead:
    """Multinomial logistic regression on (views, images, dims) features with SGD (module docstring)."""
    k, n, d = features.shape
    mean, std = (torch.from_numpy(a).to(device) for a in feature_stats(features))
    g = generator(seed, SHUFFLE)
    torch.manual_seed(derive_seed(seed, SHUFFLE, 1))
    linear = torch.nn.Linear(d, classes).to(device)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.SGD(linear.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, cfg.lr_step, cfg.gamma)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    batch, perm, pos, epoch = min(cfg.batch, n), torch.randperm(n, generator=g).numpy(), 0, 0
    for _ in range(cfg.iterations):
        if pos + batch > n:
            perm, pos, epoch = torch.randperm(n, generator=g).numpy(), 0, epoch + 1
        x, order = _rows(features, epoch % k, perm[pos:pos + batch], device)
        pos += batch
        loss = torch.nn.functional.cross_entropy(linear((x - mean) / std), targets[order].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_softmax: loss is {loss.item()} at epoch {epoch}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return SoftmaxHead(linear.weight.detach(), linear.bias.detach(), mean, std)


def top1(head: SoftmaxHead, features: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> float:
    """Top-1 accuracy of `head` on view 0 of (views, images, dims) features."""
    labels = np.asarray(labels)
    correct = 0
    for i in range(0, features.shape[1], chunk):
        x = torch.from_numpy(np.asarray(features[0, i:i + chunk], dtype=np.float32)).to(head.weight.device)
        correct += int((head.scores(x).argmax(1).cpu().numpy() == labels[i:i + chunk]).sum())
    return correct / max(1, len(labels))


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
    """One class's SVM: (fitted LinearSVC, chosen cost, folds used). labels in {1, 0, -1}; 0 rows are left out."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_score

    keep = labels != 0
    x, y = train_x[keep], np.where(labels[keep] == POSITIVE, 1, -1)
    folds = min(cfg.folds, int((y == 1).sum()), int((y == -1).sum()))
    if folds < 2:
        raise ValueError(f"svm_class: {int((y == 1).sum())} positive and {int((y == -1).sum())} negative "
                         f"training images: too few to cross-validate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter is part of the protocol
        cv = [cross_val_score(_svm(c, cfg, seed), x, y, cv=folds, scoring="average_precision").mean()
              for c in cfg.costs]
        best = cfg.costs[int(np.argmax(cv))]  # first maximum, as Goyal et al.'s np.argmax
        return _svm(best, cfg, seed).fit(x, y), best, folds


def voc_svm(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, test_labels: np.ndarray,
            classes: Sequence[str], cfg: SvmConfig, seed: int) -> dict:
    """Per-class SVMs on L2-normalised features: {"ap": {class: AP or None}, "map", "cost": {class: C}, ...}."""
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    ap, cost, skipped = {}, {}, {}
    for j, name in enumerate(classes):
        try:
            clf, cost[name], _ = svm_class(train_x, train_labels[:, j], cfg, seed)
        except ValueError as e:
            ap[name], skipped[name] = None, str(e)
            continue
        ap[name] = classification_ap(clf.decision_function(test_x), test_labels[:, j])
    done = [v for v in ap.values() if v is not None]
    return {"ap": ap, "map": float(np.mean(done)) if done else None, "cost": cost, "skipped": skipped,
            "positives": {c: int((test_labels[:, j] == POSITIVE).sum()) for j, c in enumerate(classes)},
            "negatives": {c: int((test_labels[:, j] == NEGATIVE).sum()) for j, c in enumerate(classes)}}
