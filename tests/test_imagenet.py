"""Tests for ctxrepro.transfer.imagenet: torchvision's ImageNet weights in our tower and trunk, offline (random
weights in torchvision's own networks stand in for the published ones; nothing is downloaded)."""

import logging

import pytest
import torch
import torchvision
from torch import nn

from ctxrepro.pretext.model import TOWERS, conv_output
from ctxrepro.transfer import imagenet as I
from ctxrepro.transfer.convert import set_input_norm, transfer_tower
from ctxrepro.transfer.trunk import Trunk, TrunkSpec

LOG = logging.getLogger("test_imagenet")


@pytest.fixture(scope="module")
def tv_alexnet():
    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).eval()


def torchvision_input(x255: torch.Tensor) -> torch.Tensor:
    """torchvision's preprocessing of 0..255 RGB, written out independently of our InputNorm."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x255 / 255.0 - mean) / std


def our_trunk(net: I.ImageNetNet) -> Trunk:
    trunk = Trunk(I.imagenet_spec(net, TrunkSpec(input_side=I.TRAIN_SIDE, conv6b=8, fc7=8)))
    mapping, folds = transfer_tower(net.tower, trunk)
    assert folds == []  # torchvision's networks have no batch norm to fold
    set_input_norm(trunk, torch.zeros(1, 3, 8, 8), rms=50.0)  # torchvision's normalisation, not the RMS rule
    return trunk.eval()


def test_tv_towers_have_torchvisions_pool5_by_hand():
    # AlexNet: 224 -> conv1 (224 + 4 - 11) // 4 + 1 = 55 -> pool 27 -> 27 -> pool 13 -> 13 -> pool 6
    # 227 -> 56 -> 27 -> 27 -> 13 -> 13 -> 6; VGG-16 halves five times: 224 -> 7, 64 -> 2
    assert conv_output(TOWERS["tv_alexnet"](64), 224) == (256, 6)
    assert conv_output(TOWERS["tv_alexnet"](64), 227) == (256, 6)
    assert conv_output(TOWERS["tv_vgg16"](64), 224) == (512, 7)
    assert conv_output(TOWERS["tv_vgg16"](64), 64) == (512, 2)
    widths = [m.out_channels for _, m in TOWERS["tv_alexnet"](64) if isinstance(m, nn.Conv2d)]
    assert widths == [64, 192, 384, 256, 256]  # one column; CaffeNet's are 96-256-384-384-256
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LocalResponseNorm)) for _, m in TOWERS["tv_alexnet"](64))


@pytest.mark.slow
def test_alexnet_file_loads_into_a_trunk_whose_pool5_is_torchvisions_features(tv_alexnet, tmp_path, caplog):
    torch.save(tv_alexnet.state_dict(), tmp_path / "alexnet.pth")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        net = I.load_imagenet("alexnet.pth", "alexnet", tmp_path, LOG)
    assert net.arch == "alexnet" and len(net.key_map) == 16  # 5 convs + 3 linear layers, weight and bias
    assert "features.0.weight -> tower.conv1.weight (64, 3, 11, 11)" in caplog.text
    assert "classifier.1.weight -> tower.fc6.weight (4096, 9216)" in caplog.text
    assert "classifier.6.bias -> fc8.bias (1000,)" in caplog.text
    assert torch.equal(net.classifier["fc7.weight"], tv_alexnet.classifier[4].weight)
    trunk = our_trunk(net)
    assert trunk.spec.tower == "tv_alexnet" and trunk.spec.conv6_kernel == 6 and trunk.pool5_side == 6
    x = torch.randint(0, 256, (2, 3, 224, 224)).float()
    with torch.no_grad():
        ours = trunk.pool5(trunk.conv5(x))
        ref = tv_alexnet.features(torchvision_input(x))
        fc6 = trunk.top.conv6(ours).flatten(1)
        ref_fc6 = tv_alexnet.classifier[1](torch.flatten(tv_alexnet.avgpool(ref), 1))
    LOG.info("alexnet pool5 max abs difference %.3g", (ours - ref).abs().max().item())
    assert ours.shape == ref.shape == (2, 256, 6, 6) and ref.abs().max().item() > 0.1  # not a map of zeros
    assert (ours - ref).abs().max().item() <= 1e-5
    assert torch.allclose(fc6, ref_fc6, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vgg16_state_dict_gives_torchvisions_features_on_a_small_input():
    torch.manual_seed(1)
    tv = torchvision.models.vgg16(weights=None).eval()
    net = I.from_torchvision(tv.state_dict(), {"path": "test"}, LOG)
    assert net.arch == "vgg16" and net.key_map[-1] == ("classifier.6.bias", "fc8.bias", (1000,))
    assert [k for k, _, _ in net.key_map[:2]] == ["features.0.weight", "features.0.bias"]
    trunk = our_trunk(net)
    assert trunk.spec.tower == "tv_vgg16" and trunk.spec.conv6_kernel == 7
    x = torch.randint(0, 256, (1, 3, 64, 64)).float()
    with torch.no_grad():
        ours, ref = trunk.pool5(trunk.conv5(x)), tv.features(torchvision_input(x))
    LOG.info("vgg16 pool5 max abs difference %.3g", (ours - ref).abs().max().item())
    assert ours.shape == ref.shape == (1, 512, 2, 2) and ref.abs().max().item() > 0.1
    assert (ours - ref).abs().max().item() <= 1e-5


class Fetched(Exception):
    """Raised by the fake weights API after recording the call: nothing is downloaded."""


def test_torchvision_sources_call_the_weights_api_with_the_right_enum(tv_alexnet, monkeypatch):
    calls = []

    def fake(self, *args, **kwargs):
        calls.append((self, kwargs))
        if self is torchvision.models.AlexNet_Weights.IMAGENET1K_V1:
            return tv_alexnet.state_dict()
        raise Fetched()

    for enum in (torchvision.models.AlexNet_Weights, torchvision.models.VGG16_Weights):
        monkeypatch.setattr(enum, "get_state_dict", fake)
    net = I.load_imagenet("torchvision", "small", None, LOG)  # the tiny tower's family is AlexNet's
    assert calls[-1] == (torchvision.models.AlexNet_Weights.IMAGENET1K_V1, {"progress": False, "check_hash": True})
    assert net.source["weights"] == "AlexNet_Weights.IMAGENET1K_V1" and net.source["url"].endswith(".pth")
    for source, tower in (("torchvision", "vgg16"), ("torchvision:vgg16", "alexnet")):
        with pytest.raises(Fetched):
            I.load_imagenet(source, tower, None, LOG)
        assert calls[-1][0] is torchvision.models.VGG16_Weights.IMAGENET1K_V1
    from ctxrepro.analysis.retrieval import load_imagenet_alexnet  # the nn stage's ImageNet column

    model = load_imagenet_alexnet("torchvision", "cpu")
    assert torch.equal(model.features[0].weight, tv_alexnet.features[0].weight)
    assert calls[-1][0] is torchvision.models.AlexNet_Weights.IMAGENET1K_V1


def test_a_failed_download_names_the_url_and_the_way_out(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.AlexNet_Weights, "get_state_dict", offline)
    with pytest.raises(OSError, match=r"alexnet-owt-7be5be79\.pth into \$TORCH_HOME .*local state dict"):
        I.load_imagenet("torchvision:alexnet", "alexnet", None, LOG)


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="torchvision:alexnet or torchvision:vgg16"):
        I.load_imagenet("torchvision:resnet", "alexnet", tmp_path, LOG)
    with pytest.raises(FileNotFoundError, match="none.pth: no ImageNet weights file"):
        I.load_imagenet("none.pth", "alexnet", tmp_path, LOG)
    convs = {f"features.{i}.weight": torch.zeros(1) for i in range(7)}
    torch.save({**convs, "classifier.1.weight": torch.zeros(1)}, tmp_path / "seven.pth")
    with pytest.raises(ValueError, match="7 convs in `features`: neither AlexNet"):
        I.load_imagenet("seven.pth", "alexnet", tmp_path, LOG)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "ours.pth")
    assert I.load_imagenet(str(tmp_path / "ours.pth"), "alexnet", tmp_path, LOG) is None  # our own layout


@pytest.mark.slow
def test_convert_load_weights_gives_the_imagenet_row_torchvisions_spec(tv_alexnet, tmp_path):
    from ctxrepro.pretext.model import ContextNet
    from stages.convert import Params, Row, caffenet_spec, figure6_spec, load_weights

    (tmp_path / "models" / "pretrain").mkdir(parents=True)
    net = ContextNet("small", 48, width=4, fc_dim=16)
    torch.save({"model": net.state_dict(), "step": 3, "config": {"tower": "small", "patch": 48, "color": "none"}},
               tmp_path / "models" / "pretrain" / "color_dropping.pt")
    torch.save(tv_alexnet.state_dict(), tmp_path / "models" / "alexnet.pth")
    rows = {"color_dropping-ours": Row("color_dropping", "ours"),
            "color_dropping-imagenet": Row("color_dropping", "imagenet")}
    ours = Params(row="color_dropping-ours", rows=rows, imagenet_weights="models/alexnet.pth")
    tower, weights, config, _ = load_weights(ours, rows["color_dropping-ours"], tmp_path, LOG)
    spec = figure6_spec(ours, tower, config, LOG)
    assert weights is tower and spec.tower == "small" and spec.conv6_kernel == 3 and spec.input_side == 227
    p = Params(row="color_dropping-imagenet", rows=rows, imagenet_weights="models/alexnet.pth")
    tower, weights, config, source = load_weights(p, rows["color_dropping-imagenet"], tmp_path, LOG)
    s = figure6_spec(p, tower, config, LOG)
    assert (s.tower, s.width, s.conv6, s.conv6_kernel, s.color) == ("tv_alexnet", 64, 4096, 6, "torchvision")
    # pool5 must be >= 8x8 for a 6x6 conv6 and a 3x3 pool6: by hand, (side - 11 + 4) // 4 + 1 -> pool 3/2 ... = 8
    assert s.input_side == 287
    rescale = caffenet_spec(Params(roi_pool={"alexnet": 6, "vgg16": 7}), config)  # tv_alexnet: AlexNet's 6x6
    assert (rescale.tower, rescale.roi_pool, rescale.width) == ("tv_alexnet", 6, 64)
    assert source == {"path": "models/alexnet.pth", "arch": "alexnet", "variant": "color_dropping"}
    assert torch.equal(weights.conv5.weight, tv_alexnet.features[10].weight)


def test_random_source_is_torchvisions_network_seeded_and_offline(tmp_path):
    assert I.parse_source("random", "vgg16") == "vgg16" and I.parse_source("random:alexnet", "small") == "alexnet"
    with pytest.raises(ValueError, match="random:alexnet or random:vgg16"):
        I.parse_source("random:resnet", "alexnet")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    I.random_state_dict("vgg16")
    assert torch.equal(torch.rand(1), before)  # the global RNG is untouched
    a = I.load_imagenet("random:alexnet", "small", tmp_path, LOG)
    b = I.load_imagenet("random", "alexnet", tmp_path, LOG)
    torch.manual_seed(I.RANDOM_SEED)
    reference = torchvision.models.alexnet(weights=None)  # torchvision's own init under the same seed
    assert a.source == {"random": "alexnet", "seed": 0, "arch": "alexnet"} and a.arch == "alexnet"
    assert torch.equal(a.tower.conv1.weight, reference.features[0].weight)
    assert torch.equal(b.tower.fc6.weight, reference.classifier[1].weight)
    assert torch.equal(a.classifier["fc8.bias"], reference.classifier[6].bias)


def test_nn_takes_the_random_alexnet():
    from ctxrepro.analysis.retrieval import load_imagenet_alexnet

    torch.manual_seed(I.RANDOM_SEED)
    reference = torchvision.models.alexnet(weights=None)
    net = load_imagenet_alexnet("random:alexnet", "cpu")
    assert torch.equal(net.features[3].weight, reference.features[3].weight)
    with pytest.raises(ValueError, match="Figure 4's ImageNet column is AlexNet"):
        load_imagenet_alexnet("random:vgg16", "cpu")
