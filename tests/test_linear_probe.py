"""Linear probes (ctxrepro.analysis.linear_probe / linear_heads): layer taps, pooling sizes, frozen weights,
streamed features, the heads on separable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_online as O
from ctxrepro.analysis import linear_probe as L
from ctxrepro.pretext.model import ContextNet, build_tower


def _net(tower: str = "small", patch: int = 32) -> ContextNet:
    torch.manual_seed(0)
    return ContextNet(tower, patch).eval()


def test_grid_side_keeps_dims_under_the_target():
    assert L.grid_side(96, 55, 9800) == 10  # 96 * 100 = 9600; 11 * 11 would pass 9800
    assert L.grid_side(256, 13, 9800) == 6  # 256 * 36 = 9216
    assert L.grid_side(16, 4, 9000) == 4  # never more than the map's own side
    assert L.grid_side(4096, 6, 9000) == 1


# conv1..conv5 dims at 227 px with dims 9800, by hand: channels x cells^2
PUBLISHED_DIMS = {
    # Zhang et al. 2017's 10/6/5/5/6 cells for CaffeNet's 96-256-384-384-256 channels
    "alexnet": {"conv1": 96 * 10 ** 2, "conv2": 256 * 6 ** 2, "conv3": 384 * 5 ** 2, "conv4": 384 * 5 ** 2,
                "conv5": 256 * 6 ** 2},
    # torchvision's 64-192-384-256-256 channels: 12/7/5/6/6 cells
    "tv_alexnet": {"conv1": 64 * 12 ** 2, "conv2": 192 * 7 ** 2, "conv3": 384 * 5 ** 2, "conv4": 256 * 6 ** 2,
                   "conv5": 256 * 6 ** 2},
    # VGG-16's 64-128-256-512-512: 128 and 512 channels have no square grid in 9000..9800 (8192 below, 10368 /
    # 12800 above)
    "vgg16": {"conv1": 64 * 12 ** 2, "conv2": 128 * 8 ** 2, "conv3": 256 * 6 ** 2, "conv4": 512 * 4 ** 2,
              "conv5": 512 * 4 ** 2},
}


@pytest.mark.parametrize("tower", sorted(PUBLISHED_DIMS))
def test_pooled_dims_of_each_network_type_at_the_published_sizes(tower):
    """Mutation caught (checked by hand): grid_side rounding to the nearest square grid instead of the largest
    under `dims` (VGG-16's conv2: 128 * 9^2 = 10,368)."""
    torch.manual_seed(0)
    taps = L.LayerTaps(build_tower(tower, 96 if tower in ("alexnet", "vgg16") else 224), 96, 227, 9800,
                       layers=("conv1", "conv2", "conv3", "conv4", "conv5"))
    dims = L.layer_dims(taps, 227)
    assert dims == PUBLISHED_DIMS[tower]
    if tower != "vgg16":  # every AlexNet-shaped network lands in the published 9,000..9,800
        assert all(9000 <= d <= 9800 for d in dims.values())


def test_taps_of_each_tower():
    assert L.tap_names(_net().tower) == {f"conv{k}": f"relu{k}" for k in range(1, 6)}
    vgg = ContextNet("vgg16", 32, width=4, fc_dim=8).tower
    assert L.tap_names(vgg)["conv3"] == "relu3_3" and L.tap_names(vgg)["conv1"] == "relu1_2"


def test_pooled_dims_and_tapped_values():
    net = _net()
    taps = L.LayerTaps(net.tower, 32, 112, 1000)
    # small tower at 112 px: conv1 16ch 56px, conv2 32ch 28px, conv3-5 64ch 14px; pool5 7px -> fc6 (2x2) 6px
    assert L.layer_dims(taps, 112) == {"conv1": 16 * 7 * 7, "conv2": 32 * 5 * 5, "conv3": 64 * 3 * 3,
                                       "conv4": 64 * 3 * 3, "conv5": 64 * 3 * 3, "fc6": 256 * 1 * 1}
    x = torch.randn(2, 3, 112, 112)
    out = taps(x)
    with torch.no_grad():  # conv1 by hand: conv, bn, relu, then 56 px averaged into 7 x 7 blocks of 8 px
        t = net.tower
        ref = t.relu1(t.bn1(t.conv1(x))).view(2, 16, 7, 8, 7, 8).mean((3, 5)).flatten(1)
    assert torch.allclose(out["conv1"], ref, atol=1e-5)


def test_fc6_as_a_convolution_matches_the_tower_at_the_pretext_input():
    net = _net()
    taps = L.LayerTaps(net.tower, 32, 32, 10_000, layers=("fc6",))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(taps(x)["fc6"], net.tower(x), atol=1e-4)


def test_features_are_frozen():
    net = _net()
    net.train()  # a caller's train mode must not update batch-norm statistics
    digest = L.weights_digest(net)
    taps = L.LayerTaps(net.tower, 32, 64, 500)
    taps.train()
    assert not any(p.requires_grad for p in taps.parameters())
    feats = taps(torch.randn(4, 3, 64, 64))
    assert all(not f.requires_grad for f in feats.values())  # no graph: no gradient can reach the trunk
    head = torch.nn.Linear(feats["conv5"].shape[1], 2)
    head(feats["conv5"]).sum().backward()  # training a head on them leaves the trunk without gradients
    assert head.weight.grad is not None and all(p.grad is None for p in net.parameters())
    assert L.weights_digest(net) == digest


def test_weights_digest_sees_a_changed_statistic():
    net = _net()
    digest = L.weights_digest(net)
    with torch.no_grad():
        net.tower.bn3.running_mean[0] += 1e-3
    assert L.weights_digest(net) != digest


def test_extract_streams_every_view_to_memmaps(tmp_path):
    paths = []
    rng = np.random.default_rng(0)
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (70 + 10 * i, 90, 3), dtype=np.uint8)).save(paths[-1])
    net = _net()
    digest = L.weights_digest(net)
    taps = L.LayerTaps(net.tower, 32, 64, 500, layers=("conv1", "conv5"))
    spec = L.ViewSpec("random", 64, 72, "drop")
    feats = L.extract(taps, L.ImageViews(paths, spec, views=2, seed=3), tmp_path / "f", "drop", "cpu", batch=4)
    conv1 = feats.load("conv1")
    assert conv1.shape == (2, 5, L.layer_dims(taps, 64)["conv1"]) and conv1.dtype == np.float16
    assert not np.array_equal(conv1[0], conv1[1])  # two different random crops
    again = L.extract(taps, L.ImageViews(paths, spec, views=2, seed=3), tmp_path / "g", "drop", "cpu", batch=3)
    np.testing.assert_array_equal(again.load("conv5"), feats.load("conv5"))  # seeded, batch-size independent
    assert L.weights_digest(net) == digest


def _clusters(rng, n, centres):
    labels = rng.integers(0, len(centres), n)
    return torch.from_numpy((centres[labels] + rng.normal(size=(n, centres.shape[1]))).astype(np.float32)), \
        torch.from_numpy(labels)


def _train_online(labels_of, iterations=60, seed=0):
    """Heads trained by sgd_step on fresh samples each iteration (online, as the stage's crops)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 20)) * 3
    heads = O.LinearHeads({"conv5": 20}, 10)
    opt = O.head_optimizer(heads, H.SgdConfig())
    for i in range(iterations):
        x, y = _clusters(rng, 32, centres)
        O.sgd_step(heads, opt, {"conv5": x}, labels_of(y), 0.1, i + 1)
    return heads, centres, rng


def test_softmax_head_separates_separable_data():
    """Scored on held-out samples, against a negative control trained on permuted labels.
    Mutations caught (checked by hand): sgd_step without opt.step() (held-out top-1 ~1/10), sgd_step taking the
    cross-entropy against labels misaligned with their rows (y.roll(1): chance)."""
    heads, centres, rng = _train_online(lambda y: y)
    x, y = _clusters(rng, 600, centres)  # held out: drawn after training
    with torch.no_grad():
        acc = float((heads({"conv5": x})["conv5"].argmax(1) == y).float().mean())
    assert acc > 0.95
    g = torch.Generator().manual_seed(1)
    control, centres, rng = _train_online(lambda y: y[torch.randperm(len(y), generator=g)])
    x, y = _clusters(rng, 600, centres)
    with torch.no_grad():
        chance = float((control({"conv5": x})["conv5"].argmax(1) == y).float().mean())
    assert chance < 0.4  # 10 classes: ~0.1; labels shuffled within each batch carry no signal


def test_one_sgd_step_by_hand():
    """From zero weights the first step is -lr * grad (momentum buffer empty, weight decay on 0), with grad of the
    mean cross-entropy = (softmax - onehot)^T x / B, softmax uniform. Mutations caught: sgd_step not setting
    the group's lr (the optimizer's 0.01 would be used), or standardising with std * std (both checked by hand)."""
    heads = O.LinearHeads({"fc6": 4}, 2)
    heads.mean_fc6.fill_(1.0)
    heads.std_fc6.fill_(2.0)
    opt = O.head_optimizer(heads, H.SgdConfig(lr=0.01))
    x = torch.tensor([[3.0, 1.0, 5.0, 1.0], [1.0, 5.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    O.sgd_step(heads, opt, {"fc6": x}, y, 0.5, 1)
    z = (x - 1.0) / 2.0
    grad = (torch.full((2, 2), 0.5) - torch.eye(2)).T @ z / 2
    assert torch.allclose(heads.heads["fc6"].weight, -0.5 * grad)
    assert torch.allclose(heads.heads["fc6"].bias, -0.5 * (torch.full((2, 2), 0.5) - torch.eye(2)).mean(0))


def test_lr_schedule_and_passes_by_hand():
    """Caffe's step policy at the published schedule: 0.01, x0.1 at 40k, 80k and 120k (0-based iterations).
    Mutation caught (checked by hand): a step one iteration early ((i + 1) // lr_step)."""
    cfg = H.SgdConfig()
    assert [O.lr_at(i, cfg) for i in (0, 39_999)] == [0.01, 0.01]
    assert O.lr_at(40_000, cfg) == pytest.approx(1e-3) and O.lr_at(79_999, cfg) == pytest.approx(1e-3)
    assert O.lr_at(80_000, cfg) == pytest.approx(1e-4) and O.lr_at(120_000, cfg) == pytest.approx(1e-5)
    assert O.lr_at(139_999, cfg) == pytest.approx(1e-5)
    assert O.passes(140_000, 256, 1_281_167) == pytest.approx(27.97, abs=0.01)  # ImageNet's train set
    assert O.passes(45, 64, 240) == 12.0


def _blobs(rng, n, positive_every=3):
    y = np.where(np.arange(n) % positive_every == 0, 1, -1)
    return rng.normal(size=(n, 10)) + (y[:, None] == 1) * 8.0 * np.eye(10)[0], y[:, None].astype(np.int8)


def test_voc_svm_on_separable_data():
    """Trained on one draw, scored on another (held out), against a negative control trained on permuted labels.
    Mutations caught (checked by hand): decision scores negated in _one_class, the training labels flipped
    (positives as -1) in svm_class."""
    rng = np.random.default_rng(1)
    x, labels = _blobs(rng, 60)
    test_x, test_labels = _blobs(rng, 90)
    test_labels[4, 0] = 0  # an only-difficult test image: ignored by the AP
    out = H.voc_svm(x, labels, test_x, test_labels, ("car",), H.SvmConfig(costs=(0.01, 1.0)), 0)
    assert out["ap"]["car"] > 0.99 and out["cost"]["car"] in (0.01, 1.0)  # one held-out blob overlaps: 0.997
    shuffled = H.voc_svm(x, rng.permutation(labels), test_x, test_labels, ("car",), H.SvmConfig(costs=(1.0,)), 0)
    assert shuffled["ap"]["car"] < 0.7  # negative control: permuted training labels
    few = labels.copy()
    few[:, 0] = -1
    few[0, 0] = 1  # one positive: cannot be cross-validated
    skipped = H.voc_svm(x, few, x, labels, ("car",), H.SvmConfig(costs=(1.0,)), 0)
    assert skipped["ap"]["car"] is None and "too few" in skipped["skipped"]["car"]


def test_only_difficult_training_images_are_negatives_as_goyal_et_al():
    """Goyal et al.'s train_svm_kfold.py turns every label but 1 into -1: an only-difficult image is a negative.
    Here they look like positives plus an axis of their own, so only a negative weight on that axis tells them
    apart. Mutation caught (checked by hand): leaving them out of training (a `labels != 0` filter, the code
    before): the weight is then +0.08 (-1.85 here)."""
    rng = np.random.default_rng(2)
    x, labels = _blobs(rng, 90)
    difficult = np.arange(90) % 3 == 1
    x[difficult] += 8.0 * np.eye(10)[0] + 8.0 * np.eye(10)[1]
    labels[difficult, 0] = 0
    clf, _, _ = H.svm_class(H.l2_normalize(x), labels[:, 0], H.SvmConfig(costs=(1.0,)), 0)
    assert clf.coef_[0, 1] < -1.0 and clf.coef_[0, 0] > 1.0


def test_voc_svm_classes_in_parallel_give_the_serial_result():
    rng = np.random.default_rng(3)
    x, a = _blobs(rng, 60)
    _, b = _blobs(rng, 60, positive_every=4)
    labels = np.concatenate([a, np.roll(b, 1, axis=0)], axis=1)
    cfg = H.SvmConfig(costs=(0.1, 1.0))
    assert H.voc_svm(x, labels, x, labels, ("car", "bus"), cfg, 0, workers=2) == \
        H.voc_svm(x, labels, x, labels, ("car", "bus"), cfg, 0, workers=1)
