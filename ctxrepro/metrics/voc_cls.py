"""VOC 2007 image classification AP, as the official devkit's VOCevalcls computes it: the classification twin
of the detection AP in `ctxrepro.metrics.voc` (used by the linear SVM probes of Goyal et al. 2019).

Per class, over the images of a split:
- ground truth, as `ImageSets/Main/<class>_<split>.txt` encodes it: 1 when the image holds a non-difficult
  object of the class, 0 when its only objects of the class are difficult (the image is then ignored for
  that class: neither true nor false positive, though it keeps its place in the ranking), -1 otherwise;
- images sorted by descending score with a stable sort (MATLAB's `sort(-out)`), so ties keep image order;
- rec = cumsum(gt > 0) / #positives, prec = cumsum(gt > 0) / (cumsum(gt > 0) + cumsum(gt < 0)); AP = the
  VOC2007 11-point AP (`ctxrepro.metrics.voc.eleven_point_ap`: MATLAB's thresholds, NaN-skipping max). A class
  with no positive image gets AP 0, as in the devkit (every recall is 0/0).

Goyal et al.'s released benchmark (fair_self_supervision_benchmark, tools/svm/svm_helper.py) scores with the
area under the interpolated curve instead of 11 points (dropping ignored images first, which changes no
precision or recall); the 11-point rule here is the VOC2007 devkit's, so the two are close but not equal.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ctxrepro.data.voc import VocAnnotation
from ctxrepro.metrics.voc import eleven_point_ap

POSITIVE, IGNORED, NEGATIVE = 1, 0, -1


def image_labels(annotations: Sequence[VocAnnotation], classes: Sequence[str]) -> np.ndarray:
    """(images, classes) int8 in {1, 0, -1}: present (a non-difficult object), only difficult, absent."""
    labels = np.full((len(annotations), len(classes)), NEGATIVE, dtype=np.int8)
    column = {c: j for j, c in enumerate(classes)}
    for i, ann in enumerate(annotations):
        for obj in ann.objects:
            j = column.get(obj.name)
            if j is None:
                continue
            if not obj.difficult:
                labels[i, j] = POSITIVE
            elif labels[i, j] == NEGATIVE:
                labels[i, j] = IGNORED
    return labels


def classification_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """VOCevalcls's 11-point AP of one class: `scores` (n,) for images with `labels` (n,) in {1, 0, -1}."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"classification_ap: scores {scores.shape} and labels {labels.shape} must be equal (n,)")
    if np.isnan(scores).any():
        raise ValueError("classification_ap: a score is NaN")
    order = np.argsort(-scores, kind="stable")
    gt = labels[order]
    tp, fp = np.cumsum(gt > 0), np.cumsum(gt < 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp / np.sum(labels > 0)
        prec = tp / (fp + tp)
    return eleven_point_ap(rec, prec)


def mean_ap(scores: np.ndarray, labels: np.ndarray) -> tuple[list[float], float]:
    """Per-class APs of (n, classes) scores and labels, and their mean (the VOC07 classification mAP)."""
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"mean_ap: scores {scores.shape} and labels {labels.shape} must be equal (n, classes)")
    aps = [classification_ap(scores[:, j], labels[:, j]) for j in range(scores.shape[1])]
    return aps, float(np.mean(aps)) if aps else float("nan")
