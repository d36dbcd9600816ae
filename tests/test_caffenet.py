"""Tests for ctxrepro.transfer.caffenet: the rescale rows' CaffeNet-shaped network (section 4.3, released README)."""

import logging

import pytest
import torch
from torch import nn

from ctxrepro.detection.model import FastRCNN
from ctxrepro.pretext.model import ContextNet
from ctxrepro.transfer.caffenet import (CaffeNetSpec, build_caffenet, convert_caffenet, load_converted,
                                        save_caffenet)
from ctxrepro.transfer.convert import CropSet, sample_crops
from ctxrepro.transfer.rescale import RescaleConfig

LOG = logging.getLogger("test_caffenet")
CFG = RescaleConfig(kmeans_samples=3000, kmeans_iters=5, batch=32, calib_draws=2)


def tower(seed=0, fc_dim=10):
    """A small pretext tower (width 4) with random BN statistics; a 48 px patch gives pool5 3x3."""
    torch.manual_seed(seed)
    net = ContextNet("small", 48, width=4, fc_dim=fc_dim)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.5)
    return net.tower.eval()


def crops(side=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [(torch.rand(3, 60, 80, generator=g) * 255).to(torch.uint8) for _ in range(24)]
    fit = sample_crops(images[:16], 4, side, 0.4, g)
    held = sample_crops(images[16:], 4, side, 0.4, g)
    return CropSet(fit, held, fit[:16])


SPEC = CaffeNetSpec(tower="small", width=4, roi_pool=3, fc6=10, fc7=12, classes=5, input_side=64)


def test_running_stat_fold_keeps_the_towers_conv_layers():
    t = tower()
    net, mapping, _ = convert_caffenet("ours_rescale", SPEC, t, False, crops(), "running", 50.0, CFG, 0, LOG)
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        normed = net.input(x)
        convs = nn.Sequential(*[m for n, m in t.named_children() if n not in ("pool5", "flatten", "fc6", "bn6",
                                                                               "relu6")])
        # BN folded with its running averages, then every layer scaled by a positive alpha (biases with the
        # alphas below): conv5 is the tower's conv stack times one positive factor
        ours, ref = net.conv5(x).flatten(2), convs(normed).flatten(2)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=2)
    alive = ref.abs().sum(2) > 0
    assert torch.allclose(cos[alive], torch.ones_like(cos[alive]), atol=1e-4)
    ops = {e["target"]: e["op"] for e in mapping}
    assert ops["body.conv1.weight"] == "copy" and ops["body.conv5"] == "fold"
    assert {ops[f"fc.{n}.weight"] for n in ("fc6", "fc7", "fc8")} == {"new:kmeans"}  # pretext fc6 discarded


@pytest.mark.slow
@pytest.mark.parametrize("init", ["ours_rescale", "kmeans_rescale"])
def test_rescale_rows_converge_and_round_trip(tmp_path, init):
    t = tower() if init == "ours_rescale" else None
    net, mapping, stats = convert_caffenet(init, SPEC, t, False, crops(), "images", 50.0, CFG, 3, LOG)
    assert stats["calibration"]["converged"] and stats["calibration"]["spread"] < 0.01
    new = sorted(n for n, s in stats["within"].items())
    assert new == (["fc6", "fc7", "fc8"] if t is not None else
                   ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"])
    assert all(s["method"] == "kmeans" for s in stats["within"].values())
    save_caffenet(tmp_path / "x.pt", net, init, mapping, {"variant": "v"}, stats)
    loaded = load_converted(tmp_path / "x.pt")
    assert (loaded.network, loaded.init, loaded.head, loaded.source) == ("caffenet", init, None, {"variant": "v"})
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(loaded.trunk(x), net(x))
    assert net(x).shape == (2, 5)


@pytest.mark.slow
def test_fitting_pretrained_fc6_is_kept_only_when_asked():
    t = tower(fc_dim=SPEC.fc6)  # 48 px: pool5 3x3 = the RoI grid, so fc6 fits CaffeNet's
    kept, mapping, stats = convert_caffenet("imagenet_rescale", SPEC, t, True, crops(), "images", 50.0, CFG, 0, LOG)
    assert "fc6" not in stats["within"] and {"fc7", "fc8"} <= set(stats["within"])
    assert {e["target"]: e["op"] for e in mapping}["fc.fc6.weight"] == "copy"
    w0, w1 = t.fc6.weight.flatten(), kept.fc.fc6.weight.flatten()  # BN folding and rescaling only scale rows
    assert torch.nn.functional.cosine_similarity(t.fc6.weight, kept.fc.fc6.weight, dim=1).min() > 1 - 1e-5
    assert not torch.equal(w0, w1)
    _, _, stats = convert_caffenet("ours_rescale", SPEC, t, False, crops(), "images", 50.0, CFG, 0, LOG)
    assert "fc6" in stats["within"]


def test_fast_rcnn_on_caffenet_runs_fc6_on_the_roi_grid():
    net = build_caffenet(SPEC, seed=0)
    model = FastRCNN(net, None, dropout=0.5, box_regression=True, seed=0).eval()
    assert (model.pool_side, model.spatial_scale) == (3, 1 / 8)
    image, rois = torch.rand(3, 48, 64) * 255, torch.tensor([[0.0, 0.0, 63.0, 47.0], [8.0, 8.0, 23.0, 23.0]])
    with torch.no_grad():
        out = model([image], [rois])
        pooled = model.pooled([image], [rois])
        assert pooled.shape == (2, 16, 3, 3)
        torch.testing.assert_close(out.scores, net.fc(pooled))  # eval: dropout off, fc6 -> fc7 -> fc8
    assert out.deltas.shape == (2, 20)


def test_load_converted_names_the_formats(tmp_path):
    torch.save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"not a ctxrepro.trunk/1 or ctxrepro.caffenet/1 checkpoint"):
        load_converted(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match=r"dvc repro convert"):
        load_converted(tmp_path / "missing.pt")
