"""Tests for ctxrepro.pretext.monitor: live ReLU shares and weight norms against hand computations."""

import pytest
import torch

from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.monitor import Monitor, collapsed, live_fraction, summary


def test_live_fraction_counts_positive_outputs():
    assert float(live_fraction(torch.tensor([[0.0, 1.0, -2.0, 3.0], [0.5, 0.0, 0.0, 0.0]]))) == 3 / 8


def test_monitor_reads_the_last_training_forward_and_every_weight_norm():
    torch.manual_seed(0)
    model = build_model("small", 16).train()
    monitor = Monitor(model)
    x, pairs = torch.randn(6, 3, 16, 16), torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    model(x, pairs)
    stats = monitor.read()
    with torch.no_grad():  # the same forward by hand: tower to fc6, then the head
        emb = model.tower(x)
        h7 = model.head.relu7(model.head.bn7(model.head.fc7(emb[pairs].flatten(1))))
        h8 = model.head.relu8(model.head.fc8(h7))
    assert stats["live_fc6"] == pytest.approx(float((emb > 0).double().mean()))
    assert stats["live_fc7"] == pytest.approx(float((h7 > 0).double().mean()))
    assert stats["live_fc8"] == pytest.approx(float((h8 > 0).double().mean()))
    for layer, weight in (("fc9", model.head.fc9.weight), ("conv1", model.tower.conv1.weight)):
        assert stats[f"wnorm_{layer}"] == pytest.approx(float(weight.detach().double().square().sum().sqrt()))
    model.eval()(torch.zeros(6, 3, 16, 16), pairs)  # evaluation passes do not overwrite the training numbers
    assert monitor.read()["live_fc8"] == stats["live_fc8"]
    assert monitor.read(lambda v: v * 2)["live_fc8"] == pytest.approx(2 * stats["live_fc8"])
    assert "fc8 " in summary(stats) and "fc9 " in summary(stats)
    monitor.close()


def test_collapsed_names_the_first_layer_under_the_threshold():
    stats = {"live_fc6": 0.5, "live_fc7": 0.01, "live_fc8": 0.001, "wnorm_fc8": 0.0}
    assert "fc7's ReLU outputs" in collapsed(stats, 0.02) and "1.00%" in collapsed(stats, 0.02)
    assert collapsed(stats, 0.0) is None  # off
    assert collapsed(stats, 0.001) is None
    with pytest.raises(ValueError, match="none of the layers"):
        Monitor(torch.nn.Linear(2, 2))
