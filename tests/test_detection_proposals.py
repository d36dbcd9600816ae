"""Proposals: Fast R-CNN's .mat convention, OpenCV selective search made reproducible, the per-image cache
(ctxrepro.detection.proposals; paper section 4.3, docs/DATA.md "Selective search .mat")."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from ctxrepro.detection import proposals as P
from ctxrepro.detection.boxes import iou

LOG = logging.getLogger("test")


def _cell(arrays) -> np.ndarray:
    """A 1 x N MATLAB cell, as scipy writes and Fast R-CNN's .mat files hold."""
    cell = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        cell[0, i] = a
    return cell


def test_mat_rows_are_y1_x1_y2_x2_one_based():
    raw = np.array([[10, 20, 30, 40], [1, 1, 5, 8]])  # [y1 x1 y2 x2], 1-based
    np.testing.assert_array_equal(P.from_mat_boxes(raw), [[19, 9, 39, 29], [0, 0, 7, 4]])
    assert P.from_mat_boxes(np.zeros((0, 0))).shape == (0, 4)
    with pytest.raises(ValueError, match="K x 4"):
        P.from_mat_boxes(np.zeros((3, 5)))


def test_read_mat_in_fast_rcnn_layout(tmp_path):
    boxes = [np.array([[10, 20, 30, 40]], dtype=np.uint16), np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.uint16)]
    names = np.empty((2, 1), dtype=object)
    names[0, 0], names[1, 0] = "000005", "000007"
    path = tmp_path / "voc_2007_test.mat"
    savemat(path, {"boxes": _cell(boxes), "images": names})
    got = P.read_mat(path, ["000007", "000005"])
    np.testing.assert_array_equal(got["000005"], [[19, 9, 39, 29]])
    np.testing.assert_array_equal(got["000007"], [[1, 0, 3, 2], [5, 4, 7, 6]])
    with pytest.raises(ValueError, match="no boxes for 1 image"):
        P.read_mat(path, ["000005", "000009"])
    # without `images`, by position (Fast R-CNN's own reader), only when the counts agree
    bare = tmp_path / "bare.mat"
    savemat(bare, {"boxes": _cell(boxes)})
    np.testing.assert_array_equal(P.read_mat(bare, ["a", "b"])["b"], [[1, 0, 3, 2], [5, 4, 7, 6]])
    with pytest.raises(ValueError, match="cannot tell"):
        P.read_mat(bare, ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="nothere.mat"):
        P.read_mat(tmp_path / "nothere.mat", ["a"])


def test_canonical_and_cap():
    boxes = np.array([[5, 5, 9, 9], [0, 0, 9, 9], [5, 5, 9, 9], [0, 0, 0, 30], [0, 3, 9, 9]], dtype=float)
    np.testing.assert_array_equal(P.canonical(boxes), [[0, 0, 0, 30], [0, 0, 9, 9], [0, 3, 9, 9], [5, 5, 9, 9]])
    np.testing.assert_array_equal(P.canonical(boxes, min_side=5), [[0, 0, 9, 9], [0, 3, 9, 9], [5, 5, 9, 9]])
    many = P.canonical(np.array([[i, 0, i + 5, 5] for i in range(50)], dtype=float))
    a = P.cap(many, 10, P.subset_seed(0, "ab" * 32))
    np.testing.assert_array_equal(a, P.cap(many, 10, P.subset_seed(0, "ab" * 32)))
    assert len(a) == 10 and (np.diff(a[:, 0]) > 0).all()  # a subset, still sorted
    assert not np.array_equal(a, P.cap(many, 10, P.subset_seed(1, "ab" * 32)))
    assert P.cap(many, 0, 0) is many and P.cap(many, 50, 0) is many


def _scene(path, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = np.full((60, 80, 3), 120, np.uint8) + rng.integers(0, 20, (60, 80, 3), dtype=np.uint8)
    img[10:30, 15:45] = (20, 30, 200)
    img[35:55, 50:75] = (200, 180, 30)
    cv2.imwrite(str(path), img)


def test_selective_search_is_reproducible_after_sorting(tmp_path):
    path = tmp_path / "000001.jpg"
    _scene(path)
    cfg = P.SearchConfig()
    first, digest = P.search_image(path, cfg)
    second, _ = P.search_image(path, cfg)
    np.testing.assert_array_equal(first, second)
    assert digest == P.file_digest(path)
    assert len(first) > 5 and (first[:, :2] >= 0).all() and (first[:, 2] <= 79).all() and (first[:, 3] <= 59).all()
    assert (np.lexsort(first.T[::-1]) == np.arange(len(first))).all()  # lexicographic order
    raw = P.selective_search(cv2.imread(str(path)))
    np.testing.assert_array_equal(np.unique(raw, axis=0), first)  # the same set OpenCV returned
    # a red box covering the painted rectangle (0-based inclusive [15, 10, 44, 29]) is among them
    assert iou(np.array([[15, 10, 44, 29]]), first).max() > 0.9
    capped, _ = P.search_image(path, P.SearchConfig(max_boxes=5))
    assert len(capped) == 5 and all(row in first.tolist() for row in capped.tolist())


def test_cache_reuses_matching_entries_and_recomputes_changed_settings(tmp_path):
    images = {}
    for i in range(3):
        images[f"00000{i}"] = tmp_path / f"00000{i}.jpg"
        _scene(images[f"00000{i}"], seed=i)
    cache = tmp_path / "cache"
    counts, computed = P.compute_opencv(images, cache, P.SearchConfig(), workers=2, log=LOG)
    assert computed == 3 and sorted(counts) == sorted(images)
    stored = P.load_proposals(cache, sorted(images))
    assert {i: len(b) for i, b in stored.items()} == counts
    again, computed = P.compute_opencv(images, cache, P.SearchConfig(), workers=2, log=LOG)
    assert computed == 0 and again == counts
    _scene(images["000001"], seed=9)  # new image bytes -> only that entry is recomputed
    _, computed = P.compute_opencv(images, cache, P.SearchConfig(), workers=1, log=LOG)
    assert computed == 1
    _, computed = P.compute_opencv(images, cache, P.SearchConfig(min_side=4), workers=1, log=LOG)
    assert computed == 3
    assert P.prune(cache, {"000000"}) == ["000001", "000002"]
    with pytest.raises(FileNotFoundError, match="dvc repro proposals"):
        P.load_proposals(cache, ["000001"])


def test_recall_hand_values():
    props = {"a": np.array([[0, 0, 9, 9]], float), "b": np.zeros((0, 4))}
    gt = {"a": np.array([[0, 0, 9, 9], [0, 0, 19, 9]], float), "b": np.array([[0, 0, 5, 5]], float)}
    # IoUs: 1.0, 0.5 (100 / 200), and 0 for the image without proposals
    assert P.recall(props, gt, (0.5, 0.7)) == {"0.5": pytest.approx(2 / 3), "0.7": pytest.approx(1 / 3)}


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    """OpenCV would decode the first half and warn "Premature end of JPEG file" without naming the file."""
    rng = np.random.default_rng(0)
    path = tmp_path / "000001.jpg"
    cv2.imwrite(str(path), rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert cv2.imread(str(path)) is not None  # what made it slip through: OpenCV returns an image
    with pytest.raises(ValueError, match=r"000001.jpg: truncated JPEG"):
        P.search_image(path, P.SearchConfig())
    with pytest.raises(ValueError, match=r"000001.jpg: truncated JPEG"):
        P.compute_opencv({"000001": path}, tmp_path / "cache", P.SearchConfig(), 1, logging.getLogger("t"))
