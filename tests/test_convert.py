"""Tests for ctxrepro.transfer.convert and the convert stage: BN folding, fc6 -> conv6, the Figure 6 trunk, the
checkpoint format (paper section 4.3, docs/METHOD.md "Transfer")."""

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ctxrepro.config import BaseParams
from ctxrepro.pretext.color import GREEN_MAGENTA_AXIS
from ctxrepro.pretext.model import ContextNet
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.convert import (CropSet, convert, fold_batchnorms, fold_bn_, load_pretext_tower, log_mapping,
                                       sample_crops, set_input_norm, transfer_tower)
from ctxrepro.transfer.caffenet import CaffeNetSpec, convert_caffenet, load_converted
from ctxrepro.transfer.rescale import RescaleConfig
from ctxrepro.transfer.trunk import (FORMAT, Trunk, TrunkSpec, build_trunk, fc_to_conv, load_checkpoint, load_trunk,
                                     save_checkpoint)

LOG = logging.getLogger("test_convert")


def random_bn_stats(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.5)


def tiny_net(tower="small", patch=48, width=4, fc_dim=16, seed=0):
    torch.manual_seed(seed)
    net = ContextNet(tower, patch, width=width, fc_dim=fc_dim)
    random_bn_stats(net)
    return net


def spec_for(net, input_side, **changes):
    t = net.tower
    convs = [m for m in t if isinstance(m, nn.Conv2d)]
    side = round((t.fc6.in_features // convs[-1].out_channels) ** 0.5)
    return replace(TrunkSpec(tower=net.tower_name, width=convs[0].out_channels, conv6=t.fc6.out_features,
                             conv6_kernel=side, conv6b=8, fc7=12, input_side=input_side), **changes)


def images(n, seed, h=60, w=80):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, h // 4, w // 4, generator=g) * 255
    return [torch.nn.functional.interpolate(b[None], size=(h, w), mode="bilinear")[0].to(torch.uint8) for b in base]


@pytest.mark.parametrize("tower, patch, width, fc_dim", [("small", 48, 4, 16), ("alexnet", 96, 96, 256)])
def test_running_stat_fold_equals_bn_tower_in_eval_mode(tower, patch, width, fc_dim):
    net = tiny_net(tower, patch, width, fc_dim)
    trunk = Trunk(spec_for(net, input_side=patch))  # identity input layer: mean 0, scale 1
    _, folds = transfer_tower(net.tower, trunk)
    fold_batchnorms(trunk, folds, "running", None, batch=4)
    x = torch.randn(3, 3, patch, patch) * 50
    with torch.no_grad():
        expect = net.tower.eval()(x)  # fc6 -> bn6 -> relu6, BN with running statistics
        got = trunk.top.relu6(trunk.top.conv6(trunk.pool5(trunk.conv5(x))))
    assert got.shape == (3, fc_dim, 1, 1)
    assert torch.allclose(got.flatten(1), expect, rtol=1e-4, atol=1e-4 * expect.abs().max().item())


def test_fold_bn_by_hand():
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(1.0)
    fold_bn_(lin, torch.tensor([3.0]), torch.tensor([3.0]), eps=1.0)  # sigma = sqrt(3 + 1) = 2
    assert lin.weight.item() == 1.0 and lin.bias.item() == -1.0


def test_image_stat_fold_gives_unit_moments():
    net = tiny_net()
    trunk, _ = build_trunk(spec_for(net, input_side=64))
    crops = sample_crops(images(12, 0), 4, 64, 0.5, torch.Generator().manual_seed(0))
    set_input_norm(trunk, crops, 50.0)
    _, folds = transfer_tower(net.tower, trunk)
    fold_batchnorms(trunk, folds, "images", crops, batch=16)
    outputs = {}
    hooks = [getattr(trunk.body, n, None) or getattr(trunk.top, n) for n, _ in folds]
    handles = [m.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o.clone()))
               for k, m in enumerate(hooks)]
    with torch.no_grad():
        trunk(crops)
    for h in handles:
        h.remove()
    assert len(outputs) == len(folds) == 6  # bn1..bn5 and bn6 of the small tower
    for z in outputs.values():
        assert z.mean((0, 2, 3)).abs().max() < 1e-4
        assert torch.allclose(z.var((0, 2, 3), unbiased=False), torch.ones(z.shape[1]), atol=2e-3)


def test_conv6_on_a_pool5_sized_input_equals_fc6():
    torch.manual_seed(0)
    fc = nn.Linear(8 * 3 * 3, 5)
    conv = fc_to_conv(fc, 8, 3)
    x = torch.randn(4, 8, 3, 3)
    with torch.no_grad():
        assert torch.allclose(conv(x).flatten(1), fc(x.flatten(1)), atol=1e-5)
        big = torch.randn(2, 8, 5, 5)  # every 3x3 window of a larger map is fc6 of that window
        out = conv(big)
        for i in range(3):
            for j in range(3):
                assert torch.allclose(out[:, :, i, j], fc(big[:, :, i:i + 3, j:j + 3].flatten(1)), atol=1e-5)
    with pytest.raises(ValueError, match="72 inputs, not 8x2x2"):
        fc_to_conv(fc, 8, 2)


@pytest.mark.parametrize("tower, side, stride", [("alexnet", 227, 16), ("small", 112, 8)])
def test_figure6_shapes(tower, side, stride):
    spec = TrunkSpec(tower=tower, width=8, conv6=32, conv6_kernel=3, conv6b=16, fc7=24, input_side=side)
    trunk, head = build_trunk(spec)
    assert trunk.pool5_side == 7 and trunk.conv5_stride == stride
    with torch.no_grad():
        feat = trunk(torch.rand(2, 3, side, side) * 255)
        assert feat.shape == (2, 16, 5, 5)  # conv6 3x3 on 7x7 -> 5x5
        assert head(feat).shape == (2, 21)
    assert head.seq.fc7.in_features == 16 * 2 * 2  # pool6 3/2 (ceil) of 5x5 -> 2x2


def test_input_norm_scale_and_projection():
    crops = sample_crops(images(6, 1), 2, 32, 0.5, torch.Generator().manual_seed(1))
    trunk = Trunk(TrunkSpec(tower="small", width=4, conv6=8, conv6_kernel=1, input_side=32, color="projection"))
    set_input_norm(trunk, crops, 50.0)
    with torch.no_grad():
        x = trunk.input(crops).double()
    assert x.square().mean().sqrt().item() == pytest.approx(50.0, rel=1e-5)
    a = torch.tensor(GREEN_MAGENTA_AXIS, dtype=torch.float64)
    assert torch.einsum("c,bchw->bhw", a, x).abs().max() < 1e-3  # no green-magenta component left


def test_transfer_maps_and_logs_every_tower_weight(caplog):
    net = tiny_net()
    trunk = Trunk(spec_for(net, input_side=48))
    mapping, folds = transfer_tower(net.tower, trunk)
    params = {f"tower.{k}" for k, _ in net.tower.named_parameters()}
    assert {e["source"] for e in mapping if e["op"] != "fold"} == params
    assert [e["source"] for e in mapping if e["op"] == "fold"] == [f"tower.bn{i}" for i in range(1, 7)]
    conv6 = [e for e in mapping if e["target"] == "trunk.top.conv6.weight"][0]
    assert conv6["op"] == "reshape" and conv6["shape"] == [16, 16, 3, 3]
    with caplog.at_level(logging.INFO, logger="test_convert"):
        log_mapping(mapping, LOG, "ours")
    assert len([r for r in caplog.records if "->" in r.message]) == len(mapping)


def make_cropset(side, n_fit=64, n_held=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    fit = sample_crops(images(n_fit // 4, seed), 4, side, 0.4, g)
    held = sample_crops(images(n_held // 4, seed + 100), 4, side, 0.4, g)
    return CropSet(fit, held, fit[:16])


@pytest.mark.parametrize("init", ["ours", "scratch"])
def test_figure6_inits_round_trip_without_rescaling(tmp_path, init):
    net = tiny_net()
    spec = spec_for(net, input_side=64)
    cfg = RescaleConfig(batch=32)
    tower = net.tower if init == "ours" else None
    trunk, head, mapping, stats = convert(init, spec, tower, make_cropset(64), "images", 50.0, cfg, 3, LOG)
    assert "calibration" not in stats and "within" not in stats  # the R-CNN-style rows are not rescaled
    news = {e["target"]: e["op"] for e in mapping if e["source"] == "-"}
    assert set(news.values()) == {"new:xavier"} and "head.seq.fc8.weight" in news
    assert ("trunk.body.conv1.weight" in news) == (init == "scratch")
    path = tmp_path / f"{init}.pt"
    save_checkpoint(path, trunk, head, init, mapping, None, stats)
    loaded = load_checkpoint(path)
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(load_trunk(path)(x), trunk(x))
        assert torch.equal(loaded.head(loaded.trunk(x)), head(trunk(x)))
    assert loaded.init == init and loaded.network == "figure6"
    assert loaded.trunk.spec == (spec if init == "ours" else replace(spec, color="none"))
    with pytest.raises(ValueError, match=r"init 'ours_rescale' builds the caffenet network"):
        convert("ours_rescale", spec, tower, make_cropset(64), "images", 50.0, cfg, 3, LOG)


def test_convert_is_deterministic_for_a_seed():
    net = tiny_net()
    spec = CaffeNetSpec(tower="small", width=4, roi_pool=3, fc6=10, fc7=12, input_side=64)
    cfg = RescaleConfig(kmeans_samples=2000, kmeans_iters=3, batch=32, calib_draws=1)
    crops = make_cropset(64)
    a = convert_caffenet("ours_rescale", spec, net.tower, False, crops, "images", 50.0, cfg, 5, LOG)[0].state_dict()
    b = convert_caffenet("ours_rescale", spec, net.tower, False, crops, "images", 50.0, cfg, 5, LOG)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_format_is_checked(tmp_path):
    torch.save({"format": "something/else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=f"not a {FORMAT} checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no converted checkpoint"):
        load_trunk(tmp_path / "missing.pt")


def test_plain_state_dict_with_wrong_shapes_names_the_key(tmp_path):
    net = tiny_net()
    state = {k: v for k, v in net.tower.state_dict().items()}
    state["conv2.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "imagenet.pt")
    with pytest.raises(ValueError, match=r"conv2.weight \(8, 3, 3, 3\) != \(8, 4, 3, 3\)"):
        load_pretext_tower(tmp_path / "imagenet.pt", like={"tower": "small", "patch": 48})


def write_world(root, n_images=11):
    """A pretrain export (variant color_dropping) and a VOC2007 trainval folder of JPEGs, in the stage's fixed
    locations."""
    net = tiny_net()
    (root / "models" / "pretrain").mkdir(parents=True)
    torch.save({"model": net.state_dict(), "step": 7,
                "config": {"tower": "small", "patch": 48, "sample_patch": 48, "gap": 24, "jitter": 5,
                           "color": "projection"}}, root / "models" / "pretrain" / "color_dropping.pt")
    devkit = root / "data" / "raw" / "voc2007" / "VOCdevkit" / "VOC2007"
    (devkit / "JPEGImages").mkdir(parents=True)
    (devkit / "ImageSets" / "Main").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(1, n_images + 1)]
    for k, img in zip(ids, images(n_images, 9, 90, 120)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(devkit / "JPEGImages" / f"{k}.jpg", quality=90)
    Image.new("RGB", (20, 20)).save(devkit / "JPEGImages" / f"{ids[-1]}.jpg", format="PNG")  # junk
    (devkit / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    torch.save(tiny_net(seed=1).tower.state_dict(), root / "models" / "imagenet_tower.pt")  # plain state dict
    return net


def stage_params(init, **changes):
    from stages.convert import Params, Row

    rows = {f"color_dropping-{i}": Row("color_dropping", i) for i in
            ("scratch", "ours", "imagenet", "kmeans_rescale", "ours_rescale", "imagenet_rescale")}
    base = dict(row=f"color_dropping-{init}", rows=rows, fit_images=9, heldout_images=2, crops_per_image=4,
                input_side=64, conv6b=8, fc7=12, fc6=10, roi_pool={"small": 3}, kmeans_samples=3000, kmeans_iters=5,
                calib_crops=16, calib_draws=2, batch=32, imagenet_weights="models/imagenet_tower.pt")
    return Params(**{**base, **changes})


@pytest.mark.slow
@pytest.mark.parametrize("init,network", [("ours", "figure6"), ("scratch", "figure6"), ("imagenet", "figure6"),
                                          ("ours_rescale", "caffenet"), ("kmeans_rescale", "caffenet"),
                                          ("imagenet_rescale", "caffenet")])
def test_convert_stage_writes_one_row(tmp_path, init, network):
    from stages.convert import run

    net = write_world(tmp_path)
    run(stage_params(init), StageContext(base=BaseParams(seed=1), device="cpu", log=LOG, root=tmp_path))
    row = f"color_dropping-{init}"
    metrics = json.loads((tmp_path / "metrics" / "convert" / f"{row}.json").read_text())
    assert sorted(p.name for p in (tmp_path / "models" / "convert").iterdir()) == [f"{row}.pt"]
    assert (metrics["row"], metrics["variant"], metrics["init"], metrics["network"]) == \
        (row, "color_dropping", init, network)
    # 11 images, all drawn; the PNG named .jpg is counted, not decoded: 10 images x 4 crops remain
    assert metrics["bad_images"] == 1 and metrics["fit_crops"] + metrics["heldout_crops"] == 40
    assert metrics["pool5_side"] == (4 if network == "figure6" else 3)
    loaded = load_converted(tmp_path / "models" / "convert" / f"{row}.pt")
    assert loaded.network == network and loaded.init == init and loaded.source["variant"] == "color_dropping"
    if init.endswith("rescale"):
        assert metrics["stats"]["calibration"]["converged"]
    if init == "ours":
        assert loaded.source["step"] == 7 and loaded.trunk.spec.color == "projection"
        # folding only rescales: conv1's filters stay parallel to the pretrained ones
        w0, w1 = net.tower.conv1.weight.flatten(1), loaded.trunk.body.conv1.weight.flatten(1)
        cos = torch.nn.functional.cosine_similarity(w0, w1, dim=1)
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
        assert np.isfinite(metrics["stats"]["fold_heldout"]["conv6"]["std_mean"])


@pytest.mark.slow
def test_convert_stage_alexnet_rows(tmp_path):
    """ImageNet-R-CNN: torchvision's AlexNet with its fc6 and fc7 and a new fc8; Scratch-R-CNN: its shape only."""
    from stages.convert import Row, run

    write_world(tmp_path)
    rows = {f"color_dropping-{i}": Row("color_dropping", i) for i in ("imagenet_alexnet", "scratch_alexnet")}
    ctx = StageContext(base=BaseParams(seed=1), device="cpu", log=LOG, root=tmp_path)
    for init in ("imagenet_alexnet", "scratch_alexnet"):
        run(stage_params(init, rows=rows, imagenet_weights="random:alexnet"), ctx)
    imagenet = load_converted(tmp_path / "models/convert/color_dropping-imagenet_alexnet.pt")
    scratch = load_converted(tmp_path / "models/convert/color_dropping-scratch_alexnet.pt")
    from ctxrepro.transfer.imagenet import random_state_dict

    state, _ = random_state_dict("alexnet")
    net = imagenet.trunk
    assert torch.equal(net.fc.fc6.weight, state["classifier.1.weight"])
    assert torch.equal(net.fc.fc7.weight, state["classifier.4.weight"])
    assert torch.equal(net.body.conv1.weight, state["features.0.weight"])
    assert net.fc.fc8.weight.shape == (21, 4096) and net.spec.color == "torchvision" and net.spec.roi_pool == 6
    assert imagenet.source["random"] == "alexnet" and imagenet.source["variant"] == "color_dropping"
    spec = scratch.trunk.spec
    assert (spec.tower, spec.width, spec.fc6, spec.fc7, spec.color) == ("tv_alexnet", 64, 10, 12, "none")
    assert scratch.init == "scratch_alexnet" and scratch.network == "caffenet"


def test_stage_errors_name_the_problem(tmp_path):
    from stages.convert import run

    ctx = StageContext(base=BaseParams(seed=1), device="cpu", log=LOG, root=tmp_path)
    with pytest.raises(StageError, match=r"pretrain/color_dropping\.pt: no such weights file.*pretrain@color_dropping"):
        run(stage_params("ours"), ctx)
    write_world(tmp_path)
    small = stage_params("scratch", fit_images=2, heldout_images=1, crops_per_image=1, input_side=48)
    with pytest.raises(StageError, match=r"convert \(color_dropping-scratch\): input_side 48 gives conv6b 1x1"):
        run(small, ctx)
    with pytest.raises(StageError, match=r"init imagenet needs ImageNet weights: set convert.imagenet_weights"):
        run(stage_params("imagenet", imagenet_weights=""), ctx)
    assert not (tmp_path / "models" / "convert").exists()  # outputs complete or absent


def test_rows_are_named_variant_dash_init():
    from ctxrepro.config import ParamsError, parse_dataclass
    from stages.convert import Params

    good = {"row": "vgg16-ours", "rows": {"vgg16-ours": {"variant": "vgg16", "init": "ours"}}}
    assert parse_dataclass(Params, good, "convert").rows["vgg16-ours"].variant == "vgg16"
    with pytest.raises(ParamsError, match=r"convert.rows.vgg-ours: a row is named '<variant>-<init>'"):
        parse_dataclass(Params, {"row": "vgg-ours", "rows": {"vgg-ours": {"variant": "vgg16", "init": "ours"}}},
                        "convert")
    with pytest.raises(ParamsError, match=r"convert.row 'x-ours' is not one of convert.rows: vgg16-ours"):
        parse_dataclass(Params, {**good, "row": "x-ours"}, "convert")
    with pytest.raises(ParamsError, match=r"'rescale' is not allowed"):
        parse_dataclass(Params, {"row": "a-rescale", "rows": {"a-rescale": {"variant": "a", "init": "rescale"}}},
                        "convert")
