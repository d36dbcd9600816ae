"""R-CNN's pieces (ctxrepro.detection.rcnn): warping with context padding against crops computed by hand from
rcnn_im_crop.m's rules, the hard-negative epoch against scikit-learn's LinearSVC run directly on the same data,
fine-tuning batches, and torchvision's AlexNet as the ImageNet-R-CNN network."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from ctxrepro.detection.rcnn.svm import SvmConfig, fit_svm, hard_negative_epoch, objective, ClassCache
from ctxrepro.detection.rcnn.warp import Crop, context_crop, warp_windows
from ctxrepro.detection.rcnn.windows import WindowBatches, WindowConfig, image_windows
from ctxrepro.detection.roidb import Entry


def test_context_crop_inside_the_image_by_hand():
    # 1-based box (21, 11, 60, 50): half 20, centre (41, 31), grown by 227/195 = 1.16410: 23.282 each side ->
    # x 17.718..64.282 -> 18..64, y 7.718..54.282 -> 8..54; 47 px unclipped = 47 clipped: the whole window
    assert context_crop((20, 10, 59, 49), 100, 80, 227, 16) == Crop(17, 7, 63, 53, 0, 0, 227, 227)


def test_context_crop_clipped_at_the_corner_by_hand():
    # 1-based (1, 1, 20, 30): half 10 x 15, centre (11, 16); grown: x -0.641..22.641 -> -1..23 (25 px),
    # y -1.462..33.462 -> -1..33 (35 px); 2 px outside each: pads round(2 * 227/25) = 18, round(2 * 227/35) = 13;
    # the clipped 23 x 33 px become round(23 * 9.08) = 209 by round(33 * 6.4857) = 214
    assert context_crop((0, 0, 19, 29), 100, 80, 227, 16) == Crop(0, 0, 22, 32, 18, 13, 209, 214)


def test_context_crop_without_padding_is_the_box():
    assert context_crop((3.0, 4.0, 12.0, 20.0), 50, 50, 8, 0) == Crop(3, 4, 12, 20, 0, 0, 8, 8)


def test_warp_places_the_image_part_and_fills_the_rest():
    image = np.zeros((80, 100, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    w = warp_windows(image, np.array([[0, 0, 19, 29]]), 227, 16, (1.0, 2.0, 3.0))
    assert w.shape == (1, 3, 227, 227)
    fill = np.array([1.0, 2.0, 3.0])[:, None, None]
    assert np.all(w[0, :, :13, :] == fill) and np.all(w[0, :, :, :18] == fill)
    assert np.allclose(w[0, :, 13:, 18:], np.array([10.0, 20.0, 30.0])[:, None, None])


def test_warp_at_scale_one_copies_pixels_and_flips():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 50, 3)).astype(np.uint8)
    w = warp_windows(image, np.array([[5, 3, 20, 18]] * 2), 16, 0, (0, 0, 0), flips=np.array([False, True]))
    want = image[3:19, 5:21].transpose(2, 0, 1).astype(np.float32)
    assert np.array_equal(w[0], want) and np.array_equal(w[1], want[:, :, ::-1])


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    pos = rng.normal(1.0, 1.0, (12, 5)).astype(np.float32)
    images = [rng.normal(-1.0, 1.0, (n, 5)).astype(np.float32) for n in (30, 25, 40)]
    masks = [rng.random((len(x), 1)) < 0.8 for x in images]
    return pos, images, masks


def test_hard_negative_epoch_matches_linearsvc_run_directly():
    cfg = SvmConfig(C=0.1, retrain_limit=10)
    pos, images, masks = _data()
    caches = hard_negative_epoch([pos], zip(images, masks), len(images), cfg, seed=3)

    def svc(neg):  # liblinear -s 3 -c C -w1 2 -B 10, called without our wrapper
        m = LinearSVC(C=cfg.C, loss="hinge", class_weight={1: 2.0, -1: 1.0}, intercept_scaling=10.0, tol=cfg.tol,
                      random_state=3).fit(np.concatenate([pos, neg]).astype(np.float64),
                                          np.r_[np.ones(len(pos)), -np.ones(len(neg))])
        return m.coef_[0], m.intercept_[0]

    neg = images[0][masks[0][:, 0]]  # image 1: every negative, then train and evict below -1.2
    w, b = svc(neg)
    neg = neg[neg @ w + b >= -1.2]
    mined = 0
    for x, m in zip(images[1:], masks[1:]):  # later images: negatives scoring above -1.0001
        hard = x[m[:, 0] & (x @ w + b > -1.0001)]
        mined += len(hard)
        neg = np.concatenate([neg, hard])
        if len(hard) > 10 or x is images[-1]:
            w, b = svc(neg)
            neg = neg[neg @ w + b >= -1.2]
    c = caches[0]
    assert c.mined == mined and c.first == int(masks[0].sum())
    assert np.allclose(c.w, w, atol=1e-6) and c.b == pytest.approx(b, abs=1e-6) and len(c.neg) == len(neg)


def test_fit_svm_objective_is_rcnn_train_formula():
    pos, neg = np.array([[2.0, 0.0]]), np.array([[-2.0, 0.0], [0.0, -1.0]])
    cfg = SvmConfig(C=1.0)
    w, b, ok = fit_svm(pos, neg, cfg, 0)
    cache = ClassCache(pos, neg, w, b)
    zp, zn = pos @ w + b, neg @ w + b
    by_hand = 2 * np.maximum(0, 1 - zp).sum() + np.maximum(0, 1 + zn).sum() + 0.5 * w @ w + 0.5 * (b / 10) ** 2
    assert ok and objective(cache, cfg) == pytest.approx(by_hand) and zp[0] > 0 > zn.max()


def _entry(tmp_path, gt, gt_classes, proposals) -> Entry:
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.full((60, 80, 3), 100, np.uint8)).save(path)
    return Entry("a", path, 60, 80, np.array(gt, float).reshape(-1, 4), np.array(gt_classes, np.int64),
                 np.array(proposals, float).reshape(-1, 4))


def test_windows_are_labelled_by_best_overlap_and_batches_are_seeded(tmp_path):
    e = _entry(tmp_path, [[10, 10, 29, 29]], [7], [[10, 10, 29, 31], [50, 40, 70, 55], [12, 10, 29, 29]])
    boxes, labels, best = image_windows(e, 2)  # gt first, then 2 proposals evenly spaced: the first and last
    assert np.array_equal(boxes, np.array([[10, 10, 29, 29], [10, 10, 29, 31], [12, 10, 29, 29]], float))
    assert labels.tolist() == [7, 7, 7] and best[0] == 1.0 and best[1] == pytest.approx(400 / 440)
    cfg = WindowConfig(pad=2, batch=8, fg_fraction=0.25, max_proposals=0)
    data = WindowBatches([e], cfg, 16, (0.0, 0.0, 0.0), seed=5, iterations=3)
    assert len(data.pool.fg_image) == 3 and len(data.pool.bg_image) == 1
    windows, y = data[1]
    assert windows.shape == (8, 3, 16, 16) and y.tolist() == [7, 7] + [0] * 6
    again = WindowBatches([e], cfg, 16, (0.0, 0.0, 0.0), seed=5, iterations=3)  # a fresh loader, same batch
    assert torch.equal(again[1][0], windows)
    draws = [data.draw(t) for t in range(3)]
    assert any(not np.array_equal(draws[0][3], d[3]) or not np.array_equal(draws[0][1], d[1]) for d in draws[1:])


def test_imagenet_alexnet_row_is_torchvisions_alexnet_on_windows():
    """ImageNet-R-CNN's network: conv1..fc7 equal torchvision's AlexNet (eval), pool5 included, at 227 px."""
    import torchvision

    from ctxrepro.transfer.caffenet import CaffeNetSpec, convert_alexnet
    from ctxrepro.transfer.convert import CropSet
    from ctxrepro.transfer.imagenet import from_torchvision, random_state_dict
    from ctxrepro.transfer.trunk import Converted
    from ctxrepro.detection.rcnn.net import WindowNet

    log = logging.getLogger("test")
    state, source = random_state_dict("alexnet")
    net = from_torchvision(state, source, log)
    fc7 = torch.nn.Linear(4096, 4096)
    fc7.load_state_dict({"weight": net.classifier["fc7.weight"], "bias": net.classifier["fc7.bias"]})
    net.tower.add_module("fc7", fc7)
    crops = torch.zeros(2, 3, 227, 227)
    spec = CaffeNetSpec(tower="tv_alexnet", width=64, roi_pool=6, fc6=4096, fc7=4096, classes=21, input_side=227,
                        color="torchvision")
    caffenet, mapping, _ = convert_alexnet(spec, net.tower, CropSet(crops, crops, crops), 50.0, 2, 0, log)
    assert caffenet.fc.fc8.bias.abs().max() == 0 and 0.008 < caffenet.fc.fc8.weight.std() < 0.012
    assert mapping[-1]["op"] == "new:gaussian(0.01)" and sum(m["op"] == "copy" for m in mapping) == 14
    windows = torch.rand(3, 3, 227, 227) * 255
    ours = WindowNet(Converted(caffenet, None, "imagenet_alexnet", mapping, source, {}, "caffenet"), 0.5).eval()
    tv = torchvision.models.alexnet()
    tv.load_state_dict(state)
    tv.eval()
    x = torchvision.transforms.functional.normalize(windows / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        want = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x)), 1))
        got = ours.fc7_features(windows)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert ours.side == 227 and ours.fill == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])


def test_subsample_is_evenly_spaced():
    from ctxrepro.detection.rcnn.windows import subsample

    p = np.arange(10, dtype=float).repeat(4).reshape(10, 4)  # row i holds i
    assert subsample(p, 4)[:, 0].tolist() == [0.0, 3.0, 6.0, 9.0]  # linspace(0, 9, 4)
    assert subsample(p, 0) is p and subsample(p, 10) is p


def test_feature_cache_is_emptied_for_other_weights(tmp_path):
    from ctxrepro.detection.rcnn.features import FeatureCache

    log = logging.getLogger("test")
    cache = FeatureCache(tmp_path / "fc7", {"weights": "a"}, log)
    cache.put("000001", np.ones((3, 2), np.float16))
    assert FeatureCache(tmp_path / "fc7", {"weights": "a"}, log).get("000001", 3).tolist() == [[1.0, 1.0]] * 3
    assert cache.get("000001", 4) is None  # another proposal count: recomputed
    assert FeatureCache(tmp_path / "fc7", {"weights": "b"}, log).get("000001", 3) is None
    assert not (tmp_path / "fc7" / "000001.npy").exists()
