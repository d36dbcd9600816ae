"""The analyses under bf16 autocast (issue 25): pretext_eval, nn, aberration and mine run their networks in bf16
(read inside the forward by test_precision.DtypeProbe), return float32 results, and agree with float32 to bf16's
precision; a CPU without native bf16 runs them in float32 (test_precision covers the fallback)."""

from __future__ import annotations

import pytest
import torch

from ctxrepro.analysis import aberration as A
from ctxrepro.analysis import pretext_eval as E
from ctxrepro.analysis import retrieval as R
from ctxrepro.mining.search import BankSpec, embed
from ctxrepro.pretext import precision as P
from ctxrepro.pretext.model import build_model

from test_pretext_eval import GAP, JITTER, PATCH, write_model
from test_precision import DtypeProbe


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.pt"
    write_model(path, color="projection")
    return E.load_pretrained(path)


def test_pretext_eval_predictions_under_bf16(pre):
    images = [torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    sels = E.select_images([(90, 120)] * 3, 10, seed=0, purpose=1, patch=PATCH, gap=GAP, jitter=JITTER)
    probe = DtypeProbe(pre.model)
    low = E.predict_selections(pre, sels, images.__getitem__, "cpu", seed=0, max_patches=12, amp="bf16")
    assert probe.dtypes() == {torch.bfloat16}
    probe.seen.clear()
    full = E.predict_selections(pre, sels, images.__getitem__, "cpu", seed=0, max_patches=12, amp="none")
    assert probe.dtypes() == {torch.float32}
    low, full = torch.cat(low), torch.cat(full)
    assert low.dtype == torch.int64 and len(low) == len(full) > 0
    assert (low == full).double().mean() >= 0.8  # argmax flips only where two logits are within bf16's rounding


def test_nn_context_features_under_bf16_are_float32_and_close(pre):
    patches = torch.randint(0, 256, (6, 3, PATCH, PATCH), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    probe = DtypeProbe(pre.model)
    low = R.context_features(pre, "cpu", 0, "bf16")(patches)
    assert probe.dtypes() == {torch.bfloat16} and low.dtype == torch.float32
    full = R.context_features(pre, "cpu", 0, "none")(patches)
    assert torch.allclose(low, full, rtol=0.05, atol=0.05 * float(full.abs().max()))


def test_aberration_regressor_trains_and_predicts_under_bf16():
    g = torch.Generator().manual_seed(0)
    data = A.PatchSet(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.zeros(40, 2, dtype=torch.int64), torch.rand(40, 2, generator=g), torch.arange(40) // 10)
    model = A.train_regressor(data, A.RegressorConfig(steps=3, batch=8, amp="bf16"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    probe = DtypeProbe(model)
    pred = A.predict(model, data.patches, "none", amp="bf16")
    assert probe.dtypes() == {torch.bfloat16} and pred.dtype == torch.float32 and pred.shape == (40, 2)
    with pytest.raises(ValueError, match="amp 'half' is not one of"):
        A.RegressorConfig(amp="half")


def test_mining_features_under_bf16_are_unit_norm_float32():
    torch.manual_seed(0)
    model = build_model("small", 32).eval().to(memory_format=torch.channels_last)
    patches = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    probe = DtypeProbe(model)
    feats = {amp: embed(model, patches, BankSpec(patch=32, net_size=32, color="projection", amp=amp),
                        torch.Generator().manual_seed(0), "cpu") for amp in ("bf16", "none")}
    assert {d for _, d, _ in probe.seen} == {torch.bfloat16, torch.float32}  # one pass each
    assert feats["bf16"].dtype == torch.float32
    assert torch.allclose(feats["bf16"].norm(dim=1), torch.ones(5), atol=1e-5)
    assert (feats["bf16"] * feats["none"]).sum(1).min() > 0.98  # cosine to the float32 features
