"""The linear_probe stage's `imagenet` network: torchvision's ImageNet-supervised AlexNet as our tv_alexnet tower,
checked against torchvision's own AlexNet run independently (offline: random or seeded weights stand in for the
published ones; nothing is downloaded)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torchvision
from test_linear_probe_stage import CLASSES, _imagenet, _voc

from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_probe as L
from ctxrepro.config import BaseParams, ParamsError, parse_dataclass
from ctxrepro.stage import StageContext
from ctxrepro.transfer.imagenet import RANDOM_SEED
from stages import linear_probe as S

LOG = logging.getLogger("test_linear_probe_imagenet")
NETWORKS = ("color_dropping", "random", "imagenet")
# torchvision's AlexNet `features`: the module index just after each conv's ReLU (conv1 = features[:2], ...)
TV_RELU_END = {"conv1": 2, "conv2": 5, "conv3": 8, "conv4": 10, "conv5": 12}


def torchvision_input(x255: torch.Tensor) -> torch.Tensor:
    """torchvision's preprocessing of 0..255 RGB, written out by hand."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x255 / 255.0 - mean) / std


def reference_alexnet(source: str, tmp_path) -> torchvision.models.AlexNet:
    """torchvision's AlexNet holding the weights `source` names: for "random:alexnet" its own init under the
    source's seed; for "file" a seeded init, also saved to tmp_path/alexnet.pth (the file the stage reads)."""
    torch.manual_seed(RANDOM_SEED if source == "random:alexnet" else 7)
    net = torchvision.models.alexnet(weights=None).eval()
    if source == "file":
        torch.save(net.state_dict(), tmp_path / "alexnet.pth")
    return net


def probe_params(source: str, **kw) -> S.Params:
    weights = "alexnet.pth" if source == "file" else source
    return S.Params(network="imagenet", networks=NETWORKS, imagenet_weights=weights, **kw)


@pytest.mark.parametrize("source", ["random:alexnet", "file"])
@pytest.mark.parametrize("side", [227, 128])  # 128: pool5 is 3x3, torchvision's avgpool upsamples it to fc6's 6x6
def test_imagenet_features_per_layer_equal_torchvisions(tmp_path, source, side):
    tv = reference_alexnet(source, tmp_path)
    net = S.load_network(probe_params(source), tmp_path, "cpu", 0, LOG)
    assert net.color == "torchvision" and net.net_size == 224
    # dims large enough that no layer is pooled: the raw maps are compared
    taps = L.LayerTaps(net.tower, net.net_size, side, 10**7)
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)) * 255.0
    with torch.no_grad():
        ours = taps(L.network_input(x, net.color))
        xn = torchvision_input(x)
        expect = {k: tv.features[:end](xn).flatten(1) for k, end in TV_RELU_END.items()}
        expect["fc6"] = tv.classifier[:3](torch.flatten(tv.avgpool(tv.features(xn)), 1))  # dropout, fc6, ReLU
    assert set(ours) == set(expect)
    for layer, want in expect.items():
        torch.testing.assert_close(ours[layer], want, rtol=1e-4, atol=1e-5, msg=layer)
    assert all(v.abs().sum() > 0 for v in ours.values())


def test_imagenet_in_networks_without_weights_is_an_error_naming_both_keys():
    with pytest.raises(ParamsError) as e:
        parse_dataclass(S.Params, {"networks": list(NETWORKS)}, "linear_probe")
    assert "linear_probe.networks" in str(e.value) and "linear_probe.imagenet_weights" in str(e.value)
    parse_dataclass(S.Params, {"networks": ["color_dropping", "random"]}, "linear_probe")  # no imagenet: fine
    parse_dataclass(S.Params, {"networks": list(NETWORKS), "imagenet_weights": "random:alexnet"}, "linear_probe")


def test_a_state_dict_in_our_tower_layout_is_refused_with_the_reason(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 11, 11)}, tmp_path / "ours.pt")
    params = S.Params(network="imagenet", networks=NETWORKS, imagenet_weights="ours.pt")
    with pytest.raises(ValueError, match="torchvision's"):
        S.load_network(params, tmp_path, "cpu", 0, LOG)


def test_extraction_leaves_the_imagenet_weights_unchanged(tmp_path):
    tv = reference_alexnet("file", tmp_path)
    net = S.load_network(probe_params("file"), tmp_path, "cpu", 0, LOG)
    before = {k: v.clone() for k, v in net.frozen.state_dict().items()}
    _voc(tmp_path)
    images = sorted((tmp_path / S.VOC07 / "JPEGImages").glob("*.jpg"))[:4]
    taps = L.LayerTaps(net.tower, net.net_size, 96, 512)
    taps.train()  # stays in eval mode: nothing may move
    feats = L.extract(taps, L.ImageViews(images, L.ViewSpec("squash", 96, 96, net.color)), tmp_path / "f",
                      net.color, "cpu", batch=2)
    assert feats.load("conv5").shape[:2] == (1, 4)
    after = net.frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not taps.training and all(not p.requires_grad for p in taps.parameters())
    # and they are torchvision's, key for key: features.0 -> conv1, classifier.1 -> fc6
    torch.testing.assert_close(after["conv1.weight"], tv.features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(after["fc6.weight"], tv.classifier[1].weight, rtol=0, atol=0)


@pytest.mark.slow
def test_stage_probes_the_imagenet_network_and_records_its_source(tmp_path):
    _imagenet(tmp_path)
    _voc(tmp_path)
    reference_alexnet("file", tmp_path)
    params = probe_params("file", dims=256, input_side=96, resize=110, batch=8, workers=0, voc_classes=CLASSES,
                          layers=("conv1", "conv5", "fc6"), sgd=H.SgdConfig(batch=8, iterations=20, lr=0.01),
                          svm=H.SvmConfig(costs=(0.1, 1.0)))
    ctx = StageContext(BaseParams(), "cpu", logging.getLogger("test"), root=tmp_path)
    S.run(params, ctx)
    m = json.loads((tmp_path / "metrics/linear_probe/imagenet.json").read_text())
    assert m["network"] == "imagenet" and list(m["imagenet_top1"]) == ["conv1", "conv5", "fc6"]
    assert m["weights_source"] == {"path": "alexnet.pth", "arch": "alexnet", "imagenet_weights": "alexnet.pth"}
    fresh = S.load_network(params, tmp_path, "cpu", 0, LOG)
    assert m["weights_unchanged"] and m["weights_sha256"] == L.weights_digest(fresh.frozen)
    assert m["dims"]["fc6"] == 4096  # torchvision's fc6, one position after its avgpool
    assert (tmp_path / "plots/linear_probe/imagenet.csv").is_file()
    assert len(list((tmp_path / S.STATE / "imagenet").glob("*/last.pt"))) == 1  # the resumable state, kept
