"""Tests for ctxrepro.transfer.rescale: Kraehenbuehl et al.'s within-layer and between-layer initialisation (docs/METHOD.md
"Transfer"), checked on held-out data and against hand computations."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctxrepro.transfer.rescale import (RescaleConfig, calibrate, gather_inputs, init_layer, kmeans, normalize_layer,
                                       receptive_fields, whiten_basis, within_layer_init)

LOG = logging.getLogger("test_rescale")


def smooth_images(n, seed, side=16):
    """Structured images: blurred noise plus a per-image colour offset (statistics generalise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, side + 4, side + 4, generator=g)
    x = F.avg_pool2d(x, 5, stride=1) * 3 + torch.randn(n, 3, 1, 1, generator=g)
    return x


def small_net(lrn=False):
    torch.manual_seed(0)
    layers = [("input", nn.Identity()), ("conv1", nn.Conv2d(3, 8, 3, padding=1)), ("relu1", nn.ReLU()),
              ("pool1", nn.MaxPool2d(2))]
    if lrn:
        layers.append(("norm1", nn.LocalResponseNorm(3, alpha=3.0, beta=0.75, k=1.0)))
    # pool2 keeps fc3's input (64) well below the fit samples: whitening 1024 inputs from 400 samples
    # would fit the sample, and held-out responses would come out smaller (a real effect, not the test's)
    layers += [("conv2", nn.Conv2d(8, 16, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(4)),
               ("flatten", nn.Flatten()), ("fc3", nn.Linear(16 * 2 * 2, 10))]
    return layers


def forward(layers, x, stop_name):
    for name, m in layers:
        x = m(x)
        if name == stop_name:
            return x
    raise KeyError(stop_name)


def test_normalize_layer_by_hand():
    lin = nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(2.0)
        lin.bias.fill_(1.0)
    # inputs 0,1,2,3 -> outputs 1,3,5,7: mean 4, biased variance 5
    dead = normalize_layer(lin, torch.tensor([4.0]), torch.tensor([5.0]), beta=0.1)
    assert dead == 0
    assert lin.weight.item() == pytest.approx(2 / math.sqrt(5))
    assert lin.bias.item() == pytest.approx((1 - 4) / math.sqrt(5) + 0.1)


@pytest.mark.parametrize("method", ["gaussian", "kmeans"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_within_layer_moments_on_heldout_data(method, beta):
    layers = small_net()
    fit, held = smooth_images(1000, 1), smooth_images(1000, 2)
    cfg = RescaleConfig(beta=beta, kmeans_samples=4000, kmeans_iters=10, batch=100)
    report = within_layer_init(layers, {n: method for n in ("conv1", "conv2", "fc3")}, fit, cfg,
                               torch.Generator().manual_seed(0), LOG)
    assert {r["method"] for r in report.values()} == {method}
    with torch.no_grad():
        for name, dims in (("conv1", (0, 2, 3)), ("conv2", (0, 2, 3)), ("fc3", (0,))):
            z = forward(layers, held, name)
            mean, std = z.mean(dims), z.std(dims, unbiased=False)
            assert (mean - beta).abs().max() < 0.15, (name, mean)
            assert (std - 1).abs().max() < 0.2, (name, std)
            assert (std - 1).abs().mean() < 0.08, (name, std)


def test_kmeans_falls_back_to_gaussian_without_enough_inputs():
    layers = [("input", nn.Identity()), ("fc", nn.Linear(4, 50))]
    used = init_layer(layers, 1, "kmeans", torch.randn(10, 4), RescaleConfig(), torch.Generator().manual_seed(0))
    assert used == "gaussian"


def test_kmeans_recovers_separated_blobs():
    g = torch.Generator().manual_seed(3)
    means = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat(40)
    z = means[labels] + 0.5 * torch.randn(120, 2, generator=g)
    centres = kmeans(z, 3, 10, torch.Generator().manual_seed(0))
    dist = torch.cdist(centres, means)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2]  # one centre per blob
    assert dist.min(1).values.max() < 0.5
    again = kmeans(z, 3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(centres, again)


def test_whitening_gives_identity_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    v, inv = whiten_basis(x, 5, eps=0.0)
    z = (x - x.mean(0)) @ v * inv
    assert torch.allclose(z.T @ z / (len(z) - 1), torch.eye(5, dtype=torch.float64), atol=1e-8)


def independent_ratios(layers, x, top):
    """r = sqrt(mean(dW^2) / mean(W^2)), dW^2 averaged over the top gradients, with plain autograd."""
    names = [n for n, m in layers if isinstance(m, (nn.Conv2d, nn.Linear))]
    sums = dict.fromkeys(names, 0.0)
    for g in top:
        for _, m in layers:
            m.zero_grad()
        out = x
        for _, m in layers:
            out = m(out)
        out.backward(g)
        for n, m in layers:
            if n in sums:
                sums[n] += float(m.weight.grad.double().square().mean())
    weights = {n: float(m.weight.detach().double().square().mean()) for n, m in layers if n in sums}
    return {n: math.sqrt(sums[n] / len(top) / weights[n]) for n in names}


def test_calibration_converges_and_keeps_a_homogeneous_network_function():
    layers = small_net()
    with torch.no_grad():  # badly scaled layers: ratios far apart
        layers[1][1].weight.mul_(100.0)
        layers[1][1].bias.mul_(100.0)
        layers[4][1].weight.mul_(0.01)
        layers[-1][1].weight.mul_(5.0)
    x = smooth_images(32, 5)
    with torch.no_grad():
        before = forward(layers, x, "fc3").clone()
    cfg = RescaleConfig(calib_draws=3)
    result = calibrate(layers, x, cfg, torch.Generator().manual_seed(7), LOG)
    assert result.converged and result.spread < 0.01 and result.iterations <= 10
    assert result.history[0] > 1.0  # it really had to rescale
    # the same top gradients, drawn as calibrate draws them, through plain autograd
    g = torch.Generator().manual_seed(7)
    top = [torch.randn((32, 10), generator=g) for _ in range(3)]
    ratios = independent_ratios(layers, x, top)
    target = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
    assert max(abs(r / target - 1) for r in ratios.values()) < 0.01
    with torch.no_grad():  # conv, ReLU, max pool, linear: the product of the scales is 1
        assert torch.allclose(forward(layers, x, "fc3"), before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_calibration_converges_through_a_non_homogeneous_lrn():
    layers = small_net(lrn=True)
    with torch.no_grad():
        layers[1][1].weight.mul_(30.0)
        layers[-1][1].weight.mul_(0.1)
    result = calibrate(layers, smooth_images(32, 6), RescaleConfig(), torch.Generator().manual_seed(1), LOG)
    assert result.converged and result.spread < 0.01
    assert 1 <= result.iterations <= 10


def test_receptive_fields_by_hand():
    """A 3x3 image 1..9, a 2x2 kernel with padding 1: a 4x4 grid of positions; zero padding where outside."""
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    conv = nn.Conv2d(1, 1, 2, padding=1)
    rows = receptive_fields(x, conv, torch.tensor([0, 5, 15, 3]))
    assert rows.tolist() == [[0, 0, 0, 1], [1, 2, 4, 5], [9, 0, 0, 0], [0, 0, 3, 0]]


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (2, 3, 0, 1), (3, 1, 2, 2),
                                                             ((3, 2), (2, 1), (1, 0), (1, 2))])
def test_receptive_fields_are_the_unfold_rows(kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 9, 7, generator=g)
    conv = nn.Conv2d(4, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    unfold = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    every = unfold.transpose(1, 2).reshape(-1, unfold.shape[1])
    pick = torch.randperm(len(every), generator=g)[:11]
    torch.testing.assert_close(receptive_fields(x, conv, pick), every[pick], rtol=0, atol=0)


def test_gather_inputs_keeps_the_rows_a_whole_unfold_would_give():
    """The same seed draws the same positions as sampling the unfolded batch did: the rows are equal."""
    layers = small_net()
    x = smooth_images(10, seed=3)
    got = gather_inputs(layers, 4, x, max_samples=50, batch=4, gen=torch.Generator().manual_seed(7))
    gen, rows = torch.Generator().manual_seed(7), []
    for xb in x.split(4):  # the unfold-then-sample gathering, by hand
        z = forward(layers, xb, "pool1")  # conv2 (layer 4) sees pool1's output
        z = F.unfold(z, 3, 1, 1, 1).transpose(1, 2).reshape(-1, 8 * 9)
        rows.append(z[torch.randperm(len(z), generator=gen)[:17]])
    assert got.shape == (50, 72)
    torch.testing.assert_close(got, torch.cat(rows)[:50], rtol=0, atol=0)
