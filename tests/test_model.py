"""Tests for ctxrepro.pretext.model: the Figure 3 network (section 3, docs/METHOD.md "Network")."""

import math

import pytest
import torch
from torch import nn

from ctxrepro.pretext.model import ContextNet, build_model, build_tower

ALEXNET_NAMES = ["conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2",
                 "conv3", "bn3", "relu3", "conv4", "bn4", "relu4", "conv5", "bn5", "relu5",
                 "pool5", "flatten", "fc6", "bn6", "relu6"]
# variant, patch size used in the fast tests
VARIANTS = [("alexnet", 96), ("small", 48), ("small", 32), ("vgg16", 32)]


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return build_model("alexnet", 96)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_alexnet_layer_names_and_pool5_shape(alexnet):
    tower = alexnet.tower
    assert [name for name, _ in tower.named_children()] == ALEXNET_NAMES
    conv = tower[: ALEXNET_NAMES.index("pool5") + 1]
    with torch.no_grad():
        out = conv.eval()(torch.zeros(2, 3, 96, 96))
    # 96 -> conv1 24 -> pool1 (ceil) 12 -> pool2 6 -> pool5 3
    assert out.shape == (2, 256, 3, 3)
    assert all(m.ceil_mode for m in tower.modules() if isinstance(m, nn.MaxPool2d))
    lrn = tower.norm1
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)


def test_alexnet_parameter_counts_by_hand(alexnet):
    t, h = alexnet.tower, alexnet.head
    expect = {
        t.conv1: 96 * 3 * 11 * 11 + 96,        # 34,944
        t.conv2: 256 * 96 * 5 * 5 + 256,       # 614,656
        t.conv3: 384 * 256 * 3 * 3 + 384,      # 885,120
        t.conv4: 384 * 384 * 3 * 3 + 384,      # 1,327,488
        t.conv5: 256 * 384 * 3 * 3 + 256,      # 884,992
        t.fc6: 256 * 3 * 3 * 4096 + 4096,      # 9,441,280
        h.fc7: 2 * 4096 * 4096 + 4096,         # 33,558,528
        h.fc8: 4096 * 4096 + 4096,             # 16,781,312
        h.fc9: 4096 * 8 + 8,                   # 32,776
    }
    for layer, count in expect.items():
        assert n_params(layer) == count
    assert n_params(alexnet) == 63_561_096  # the sum above: BN adds no parameters
    assert t.conv1.stride == (4, 4) and t.conv1.padding == (5, 5)
    assert t.conv2.padding == (2, 2) and t.conv3.padding == (1, 1)


def test_batchnorm_without_affine_where_the_paper_puts_it(alexnet):
    bns = {n: m for n, m in alexnet.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert sorted(bns) == ["head.bn7", "tower.bn3", "tower.bn4", "tower.bn5", "tower.bn6"]
    for m in bns.values():
        assert not m.affine and m.weight is None and m.bias is None
    for name in ("small", "vgg16"):
        for m in build_model(name, 32).modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert not m.affine


def test_xavier_init_bounds(alexnet):
    for layer in (alexnet.tower.conv1, alexnet.tower.conv3, alexnet.head.fc7):
        fan_in = layer.weight[0].numel()
        bound = math.sqrt(3.0 / fan_in)  # Caffe "xavier": variance 1 / fan_in
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("name,patch", VARIANTS)
def test_forward_shapes_and_finite(name, patch):
    torch.manual_seed(1)
    model = build_model(name, patch)
    x = torch.randn(5, 3, patch, patch) * 50
    pairs = torch.tensor([[0, 1], [1, 0], [2, 4], [4, 3], [3, 2], [0, 4]])
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            logits = model(x, pairs)
            emb = model.embed(x)
        assert logits.shape == (6, 8) and emb.shape == (5, model.feature_dim)
        assert torch.isfinite(logits).all() and torch.isfinite(emb).all()


def test_pair_gather_matches_manual_concat_and_order_matters():
    torch.manual_seed(2)
    model = build_model("small", 32).eval()  # eval: BN uses running stats, rows independent
    x = torch.randn(4, 3, 32, 32) * 50
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]])
    with torch.no_grad():
        logits = model(x, pairs)
        emb = model.embed(x)
        manual = model.head(torch.cat([emb[pairs[:, 0]], emb[pairs[:, 1]]], dim=1))
    torch.testing.assert_close(logits, manual)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[2], logits[3], atol=1e-4)


def test_each_patch_embedded_once():
    model = build_model("small", 32)
    calls = []
    model.tower.conv1.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    model.tower.fc6.register_forward_hook(lambda m, inp, out: calls.append(-inp[0].shape[0]))
    x = torch.randn(4, 3, 32, 32)
    # 12 pairs over 4 patches (the full 2x2 grid): still one tower pass of 4 patches
    pairs = torch.tensor([[a, b] for a in range(4) for b in range(4) if a != b])
    out = model(x, pairs)
    assert out.shape == (12, 8)
    assert calls == [4, -4]


def test_channels_last_matches_contiguous():
    torch.manual_seed(3)
    model = build_model("small", 48).eval()
    x = torch.randn(6, 3, 48, 48) * 50
    pairs = torch.tensor([[0, 1], [2, 3], [5, 4]])
    with torch.no_grad():
        ref = model(x, pairs)
        cl = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last), pairs)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_small_tower_trains_on_toy_batch():
    torch.manual_seed(4)
    model = build_model("small", 32)
    x = torch.randn(16, 3, 32, 32) * 50
    g = torch.Generator().manual_seed(5)
    pairs = torch.randint(0, 16, (48, 2), generator=g)
    labels = torch.randint(0, 8, (48,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x, pairs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5  # near log(8) = 2.08 at Xavier init
    assert losses[-1] < 0.5 * losses[0]


def test_width_and_fc_dim_and_errors():
    tower = build_tower("small", 48, width=8, fc_dim=64)
    assert tower.conv1.out_channels == 8 and tower.conv5.out_channels == 32
    assert tower.fc6.in_features == 32 * 3 * 3 and tower.fc6.out_features == 64
    net = ContextNet("alexnet", 96, width=48, fc_dim=128)
    assert net.tower.conv1.out_channels == 48 and net.head.fc7.in_features == 256
    with pytest.raises(ValueError, match="unknown"):
        build_model("resnet", 96)
    with pytest.raises(ValueError, match="too small"):
        build_tower("alexnet", 8)  # conv1 gives 2x2, too small for the 3x3 pool1
    assert build_tower("vgg16", 16).fc6.in_features == 512  # 16 -> 8 -> 4 -> 2 -> 1 -> 1
