"""Linear probes (ctxrepro.analysis.linear_probe / linear_heads): layer taps, pooling sizes, frozen weights,
streamed features, the heads on separable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_probe as L
from ctxrepro.pretext.model import ContextNet


def _net(tower: str = "small", patch: int = 32) -> ContextNet:
    torch.manual_seed(0)
    return ContextNet(tower, patch).eval()


def test_grid_side_keeps_dims_under_the_target():
    assert L.grid_side(96, 55, 9000) == 9  # 96 * 81 = 7776; 10 * 10 would pass 9000
    assert L.grid_side(256, 13, 9000) == 5  # 256 * 25 = 6400
    assert L.grid_side(16, 4, 9000) == 4  # never more than the map's own side
    assert L.grid_side(4096, 6, 9000) == 1


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


def test_softmax_head_separates_separable_data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    centres = rng.normal(size=(3, 20)) * 3
    feats = (centres[labels] + rng.normal(size=(120, 20)))[None].astype(np.float16)
    head = H.train_softmax(feats, labels, 3, H.SgdConfig(batch=32, iterations=100, lr=0.1, lr_step=80), 0)
    assert H.top1(head, feats, labels) > 0.95


def test_voc_svm_on_separable_data():
    rng = np.random.default_rng(1)
    n = 60
    y = np.where(np.arange(n) % 3 == 0, 1, -1)
    x = rng.normal(size=(n, 10)) + (y[:, None] == 1) * 8.0 * np.eye(10)[0]
    labels = y[:, None].astype(np.int8)
    labels[1, 0] = 0  # an only-difficult image: left out of training and of the AP
    out = H.voc_svm(x, labels, x, labels, ("car",), H.SvmConfig(costs=(0.01, 1.0)), 0)
    assert out["ap"]["car"] == pytest.approx(1.0) and out["cost"]["car"] in (0.01, 1.0)
    few = labels.copy()
    few[:, 0] = -1
    few[0, 0] = 1  # one positive: cannot be cross-validated
    skipped = H.voc_svm(x, few, x, labels, ("car",), H.SvmConfig(costs=(1.0,)), 0)
    assert skipped["ap"]["car"] is None and "too few" in skipped["skipped"]["car"]
