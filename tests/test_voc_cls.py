"""VOC07 classification AP (ctxrepro.metrics.voc_cls) against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from ctxrepro.data.voc import BndBox, VocAnnotation, VocObject
from ctxrepro.metrics.voc_cls import classification_ap, image_labels, mean_ap


def test_perfect_ranking_is_one():
    assert classification_ap(np.array([3.0, 2.0, 1.0]), np.array([1, 1, -1])) == pytest.approx(1.0)


def test_hand_computed_ranking():
    # ranked labels: +, -, + -> (rec, prec) = (.5, 1), (.5, .5), (1, 2/3)
    # thresholds 0...0.5 -> max prec 1 (6 of them); 0.6...1.0 -> 2/3 (5 of them)
    ap = classification_ap(np.array([0.9, 0.8, 0.7]), np.array([1, -1, 1]))
    assert ap == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def test_ties_keep_image_order():
    # equal scores: a stable sort keeps file order, so the negative listed first ranks first
    neg_first = classification_ap(np.array([1.0, 1.0]), np.array([-1, 1]))
    pos_first = classification_ap(np.array([1.0, 1.0]), np.array([1, -1]))
    assert neg_first == pytest.approx(0.5)  # only point (rec 1, prec 1/2)
    assert pos_first == pytest.approx(1.0)


def test_all_negative_class_scores_zero():
    assert classification_ap(np.array([0.3, 0.2, 0.1]), np.array([-1, -1, -1])) == 0.0


def test_difficult_images_are_ignored_not_negative():
    # the top image only holds difficult objects: ignored, so the AP is as if it were absent (perfect)
    assert classification_ap(np.array([0.9, 0.5, 0.1]), np.array([0, 1, -1])) == pytest.approx(1.0)
    # counted as a negative it would cost precision: (1, 1/2) -> AP 0.5
    assert classification_ap(np.array([0.9, 0.5, 0.1]), np.array([-1, 1, -1])) == pytest.approx(0.5)


def test_nan_score_is_an_error():
    with pytest.raises(ValueError, match="NaN"):
        classification_ap(np.array([np.nan, 1.0]), np.array([1, -1]))


def _obj(name: str, difficult: bool) -> VocObject:
    return VocObject(name, "Unspecified", False, difficult, None, BndBox(1, 1, 10, 10))


def test_image_labels_from_annotations():
    anns = [VocAnnotation("a.jpg", 10, 10, 3, (_obj("car", False), _obj("car", True))),
            VocAnnotation("b.jpg", 10, 10, 3, (_obj("car", True), _obj("bus", False))),
            VocAnnotation("c.jpg", 10, 10, 3, (_obj("person", False),))]
    labels = image_labels(anns, ("bus", "car"))
    assert labels.tolist() == [[-1, 1], [1, 0], [-1, -1]]


def test_mean_ap_averages_classes():
    scores = np.array([[0.9, 0.1], [0.1, 0.9]])
    labels = np.array([[1, -1], [-1, -1]])
    aps, m = mean_ap(scores, labels)
    assert aps == [pytest.approx(1.0), 0.0] and m == pytest.approx(0.5)
