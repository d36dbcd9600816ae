"""Tests for ctxrepro.pretext.precision and the mixed-precision code of pretrain, detect (Fast R-CNN and the R-CNN
protocol) and normals (issue 25).

The GPU path's code runs here on the CPU: bf16 and fp16 autocast (with the gradient scaler), channels_last,
torch.compile with inductor, and global batch norm under DDP with autocast (tests/test_ddp_precision.py). Each
test reads the dtype inside the forward (forward hooks on the convolutions and linear layers), so it fails if
autocast is silently off. `native_bf16` makes the CPU count as bf16-capable whatever it is (torch emulates bf16
where the hardware lacks it): the tests check the code, not this machine.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctxrepro.detection.infer import TestConfig as DetectTestConfig
from ctxrepro.detection.infer import score_image
from ctxrepro.detection.loader import IterationBatches
from ctxrepro.detection.rcnn import finetune as rcnn_finetune
from ctxrepro.detection.rcnn.features import window_features
from ctxrepro.detection.rcnn.net import WindowNet
from ctxrepro.detection.rcnn.protocol import RcnnConfig
from ctxrepro.detection.rcnn.windows import WindowBatches, WindowConfig
from ctxrepro.detection.roidb import read_rgb
from ctxrepro.detection.train import _step as detect_step
from ctxrepro.detection.train import build_optimizer as detect_optimizer
from ctxrepro.checkpoint import load_checkpoint
from ctxrepro.normals.model import _batch, _optimizer, _update, predict_coarse
from ctxrepro.pretext import engine
from ctxrepro.pretext import precision as P
from ctxrepro.pretext.distributed import DistInfo
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.sampling import grid_pairs
from ctxrepro.transfer.caffenet import CaffeNetSpec, build_caffenet
from ctxrepro.transfer.trunk import Converted, TrunkSpec, build_trunk

from test_detection_train import SAMPLING, make_entries, make_solver
from test_detection_train import make_model as detect_model
from test_detection_train import run as detect_run
from test_engine import assert_same_state, data, make_cfg, paths, run as pretrain_run  # noqa: F401 - data: fixture
from test_normals_train import SETTINGS, make_net, toy_data
from test_normals_train import run as normals_run

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)


class DtypeProbe:
    """Forward hooks on every Conv2d and Linear: (layer type, output dtype, input in channels_last?) per call."""

    def __init__(self, model: nn.Module):
        self.seen: list[tuple[str, torch.dtype, bool]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))]

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0]
        nhwc = x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        self.seen.append((type(module).__name__, output.dtype, nhwc))

    def dtypes(self) -> set[torch.dtype]:
        return {d for _, d, _ in self.seen}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def assert_float32_training_state(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def step_until_finite(step, model: nn.Module, tries: int = 24):
    """fp16: the gradient scaler skips a step whose scaled gradients overflow and halves its scale (it starts at
    2^16); take steps until one has finite gradients (bf16 and float32: the first)."""
    for _ in range(tries):
        out = step()
        if all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()):
            return out
    raise AssertionError(f"{tries} steps without finite gradients")


# ------------------------------------------------------------------------------------------- the helper

def test_cpu_flags_come_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "amx_bf16", "fpu"} <= P.cpu_flags(info)
    assert P.cpu_flags(tmp_path / "absent") == frozenset()


def test_a_cpu_without_native_bf16_runs_float32_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    P._say_float32_once.cache_clear()
    with caplog.at_level(logging.INFO, logger=P.__name__):
        assert P.effective_amp("cpu", "bf16") == "none"
        with P.autocast("cpu", "bf16"):
            y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32
    assert [r.message for r in caplog.records].count(
        "amp bf16: this CPU has no native bf16 (no amx_bf16 or avx512_bf16 in /proc/cpuinfo): running float32") == 1
    assert P.effective_amp("cuda:1", "bf16") == "bf16" and P.effective_amp("cpu", "none") == "none"
    assert P.grad_scaler("cpu", "bf16") is None
    assert not P.use_channels_last("cpu", "bf16", True) and P.use_channels_last("cuda", "none", True)
    assert P.describe("cpu", "bf16").startswith("float32 (amp bf16 needs native bf16")


def test_native_bf16_cpu_autocasts_and_unknown_amp_names_the_choices(native_bf16):
    with P.autocast("cpu", "bf16"):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert P.use_channels_last("cpu", "bf16", True) and not P.use_channels_last("cpu", "none", True)
    assert not P.use_channels_last("cpu", "bf16", False)
    assert isinstance(P.grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    with pytest.raises(ValueError, match="amp 'bf32' is not one of none, bf16, fp16"):
        P.effective_amp("cpu", "bf32")


def test_engine_keeps_the_autocast_name():
    assert engine.autocast is P.autocast


# ------------------------------------------------------------------------------------------- pretrain

def pretrain_batch(cfg, channels_last: bool):
    """A 3 x 4 grid's patches, prepared as the engine does (section 3.1 preprocessing, resize, memory format)."""
    g = torch.Generator().manual_seed(0)
    patches = torch.randint(0, 256, (12, 3, 24, 24), dtype=torch.uint8, generator=g)
    pairs, labels = grid_pairs(3, 4)
    return engine.prepare_inputs(patches, cfg, g, channels_last), pairs, labels


@pytest.mark.parametrize("amp,channels_last", [("bf16", False), ("bf16", True), ("fp16", False), ("none", True)])
def test_pretrain_step_runs_the_forward_in_amp_and_keeps_float32_state(native_bf16, amp, channels_last):
    cfg = make_cfg(amp=amp, channels_last=channels_last)
    run = engine._build(cfg, "cpu", 1)
    assert (run.scaler is not None) == (amp == "fp16")
    probe = DtypeProbe(run.model)
    before = [p.detach().clone() for p in run.model.parameters()]
    x, pairs, labels = pretrain_batch(cfg, channels_last)
    loss, correct = step_until_finite(lambda: engine.train_step(run.model, run.optimizer, run.scaler, x, pairs,
                                                                labels, cfg, "cpu", 1), run.model)
    assert math.isfinite(float(loss)) and 0 <= int(correct) <= len(labels)
    assert probe.dtypes() == {LOW[amp]}
    convs = [nhwc for kind, _, nhwc in probe.seen if kind == "Conv2d"]
    assert len(convs) >= 2 and all(convs) == channels_last and any(convs) == channels_last
    assert_float32_training_state(run.model)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    for state in run.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_bf16_pretrain_checkpoint_and_export_load_into_a_float32_run(native_bf16, data, tmp_path, caplog):
    cfg = make_cfg(amp="bf16", steps=2, checkpoint_every=2)
    with caplog.at_level(logging.INFO):
        pretrain_run(data, tmp_path, cfg)
    assert "precision: bf16 autocast on cpu" in caplog.text
    ckpt = load_checkpoint(paths(tmp_path).state)
    exported = torch.load(paths(tmp_path).export, weights_only=True)["model"]
    for state in (ckpt["model"], exported):
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    fp32 = replace(cfg, amp="none", channels_last=False)
    model = build_model(fp32.tower, fp32.net_size)
    model.load_state_dict(exported)  # strict: every key, every shape
    run = engine._build(fp32, "cpu", 1)
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    x, pairs, labels = pretrain_batch(fp32, False)
    probe = DtypeProbe(run.model)
    loss, _ = engine.train_step(run.model, run.optimizer, None, x, pairs, labels, fp32, "cpu", 1)
    assert math.isfinite(float(loss)) and probe.dtypes() == {torch.float32}


def test_pretrain_reruns_are_bit_identical_under_the_tiny_profiles_precision(native_bf16, data, tmp_path):
    """amp bf16 + channels_last (the tiny and smoke profiles' values): two runs end in equal states."""
    cfg = make_cfg(amp="bf16", channels_last=True, steps=4, checkpoint_every=2)
    a, b = pretrain_run(data, tmp_path / "a", cfg), pretrain_run(data, tmp_path / "b", cfg)
    assert_same_state(paths(tmp_path / "a").state, paths(tmp_path / "b").state)
    assert a["train_loss"] == b["train_loss"] and a["heldout_accuracy"] == b["heldout_accuracy"]


@pytest.mark.slow
def test_compiled_pretrain_step_with_inductor_under_bf16(native_bf16):
    """One inductor-compiled pretrain step under bf16, in a fresh interpreter: inductor's C++ builder imports
    setuptools, whose distutils shim refuses a process in which an earlier test already imported the stdlib's
    distutils (it failed so inside the full suite, alone it passed)."""
    script = ("import sys, torch; sys.path.insert(0, 'tests'); torch.set_num_threads(1); import test_precision as T; "
              "T.P.cpu_has_native_bf16 = lambda: True; T.compiled_step(); print('compiled step ok')")
    # setuptools' own distutils is what its shim insists on; the stdlib's (Python 3.11 still has it) is as good
    # for inductor's compiler flags and leaves the shim nothing to refuse
    env = {**os.environ, "SETUPTOOLS_USE_DISTUTILS": "stdlib"}
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and done.stdout.strip().endswith("compiled step ok"), done.stderr[-3000:]


def compiled_step() -> None:
    """The compiled step itself (run by the test above in its own process)."""
    cfg = make_cfg(amp="bf16", channels_last=True, compile=True)
    run = engine._build(cfg, "cpu", 1)
    model = engine._wrap(run.model, cfg, "cpu", DistInfo())
    assert model is not run.model and getattr(model, "_orig_mod", None) is run.model
    x, pairs, labels = pretrain_batch(cfg, True)
    with P.autocast("cpu", "bf16"):
        logits = model(x, pairs)
    assert logits.dtype == torch.bfloat16  # the head's last linear layer ran under autocast inside the graph
    loss, _ = engine.train_step(model, run.optimizer, run.scaler, x, pairs, labels, cfg, "cpu", 1)
    assert math.isfinite(float(loss))
    assert_float32_training_state(run.model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretrain_step_on_cuda_under_bf16_and_channels_last():
    cfg = make_cfg(amp="bf16", channels_last=True)
    run = engine._build(cfg, "cuda", 1)
    probe = DtypeProbe(run.model)
    x, pairs, labels = pretrain_batch(cfg, True)
    loss, _ = engine.train_step(run.model, run.optimizer, run.scaler, x.cuda(), pairs.cuda(), labels.cuda(), cfg,
                                "cuda", 1)
    assert math.isfinite(float(loss)) and probe.dtypes() == {torch.bfloat16}
    assert_float32_training_state(run.model)


# ------------------------------------------------------------------------------------------- detect

@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_detect_step_and_test_run_in_amp_with_float32_state(native_bf16, tmp_path, amp):
    entries = make_entries(tmp_path)
    model = detect_model().train()
    solver = make_solver(amp=amp)
    batch = IterationBatches(entries, SAMPLING, 2, True, 48, 64, 3, 10)[0]
    opt = detect_optimizer(model, solver)
    probe = DtypeProbe(model)
    scaler = P.grad_scaler("cpu", amp)
    stats = step_until_finite(lambda: detect_step(model, opt, batch, solver, scaler), model)
    assert stats is not None and all(math.isfinite(v) for v in stats)
    assert probe.dtypes() == {LOW[amp]}
    assert_float32_training_state(model)
    probe.seen.clear()
    probs, boxes = score_image(model.eval(), entries[0], DetectTestConfig(scale=48, max_size=64, amp=amp), "cpu")
    assert probe.dtypes() == {LOW[amp]}
    assert probs.dtype == boxes.dtype == torch.float64
    assert torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=torch.float64), atol=1e-5)


def test_bf16_detect_checkpoint_loads_into_a_float32_model_and_reruns_are_bit_identical(native_bf16, tmp_path):
    from test_detection_train import assert_same_checkpoint

    solver = make_solver(amp="bf16", iterations=4, checkpoint_every=2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    detect_run(tmp_path / "a", tmp_path / "a.pt", solver)
    detect_run(tmp_path / "b", tmp_path / "b.pt", solver)
    assert_same_checkpoint(tmp_path / "a.pt", tmp_path / "b.pt")
    state = load_checkpoint(tmp_path / "a.pt")["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    detect_model().load_state_dict(state)


# ------------------------------------------------------------------------------------------- normals

@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_normals_step_and_prediction_run_in_amp_with_float32_state(native_bf16, amp):
    data, book = toy_data()
    net = make_net().train()
    opt = _optimizer(net, SETTINGS)
    codes_book = torch.as_tensor(book, dtype=torch.float32)
    x, codes = _batch(data, torch.arange(3), torch.tensor([False, True, False]), codes_book, "cpu")
    probe = DtypeProbe(net)
    scaler = P.grad_scaler("cpu", amp)
    loss = step_until_finite(lambda: _update(net, opt, x, codes, 1, amp, scaler), net)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert probe.dtypes() == {LOW[amp]}
    assert_float32_training_state(net)
    probe.seen.clear()
    pred = predict_coarse(net, data.images, book, 4, "cpu", amp)
    assert probe.dtypes() == {LOW[amp]} and pred.dtype == np.float32
    assert np.allclose(np.linalg.norm(pred, axis=-1), 1.0, atol=1e-4)


def test_bf16_normals_checkpoint_loads_into_a_float32_net_and_reruns_are_bit_identical(native_bf16, tmp_path):
    from test_normals_train import assert_same_checkpoint

    settings = replace(SETTINGS, steps=4, amp="bf16")
    normals_run(tmp_path / "a.pt", settings)
    normals_run(tmp_path / "b.pt", settings)
    assert_same_checkpoint(tmp_path / "a.pt", tmp_path / "b.pt")
    state = load_checkpoint(tmp_path / "a.pt")["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    make_net().load_state_dict(state)


# ------------------------------------------------------------------------------------------- detect, R-CNN protocol

RCNN_WINDOWS = WindowConfig(pad=2, batch=8, fg_fraction=0.25)


def window_net(network: str) -> WindowNet:
    """Figure 6's small network, or a small CaffeNet (the rescale rows' shape), on 64 px windows."""
    if network == "caffenet":
        net = build_caffenet(CaffeNetSpec(tower="small", width=4, roi_pool=3, fc6=16, fc7=16, input_side=64), seed=0)
        return WindowNet(Converted(net, None, "kmeans_rescale", [], None, {}, "caffenet"), 0.5)
    trunk, head = build_trunk(TrunkSpec(tower="small", width=4, conv6=16, conv6_kernel=2, conv6b=8, fc7=16,
                                        input_side=64), seed=0)
    return WindowNet(Converted(trunk, head, "scratch", [], None, {}), 0.5)


@pytest.mark.parametrize("amp,network", [("bf16", "figure6"), ("bf16", "caffenet"), ("fp16", "figure6"),
                                         ("none", "figure6")])
def test_rcnn_finetune_step_and_fc7_run_in_amp_with_float32_state(native_bf16, tmp_path, amp, network):
    net = window_net(network).train()
    cfg = rcnn_finetune.FinetuneConfig(lr=0.01, amp=amp)
    opt = rcnn_finetune.build_optimizer(net, cfg)
    entries = make_entries(tmp_path)
    windows, labels = WindowBatches(entries, RCNN_WINDOWS, net.side, net.fill, 0, 1)[0]
    probe = DtypeProbe(net)
    scaler = P.grad_scaler("cpu", amp)
    assert (scaler is not None) == (amp == "fp16")
    loss = step_until_finite(lambda: rcnn_finetune._step(net, opt, windows, labels, 0.01, 0, amp, scaler), net)
    assert math.isfinite(loss) and len(probe.seen) >= 5  # conv1..conv5 at least, then fc7 and fc8
    assert probe.dtypes() == {LOW[amp]}
    assert_float32_training_state(net)
    for state in opt.state.values():
        assert state["momentum_buffer"].dtype == torch.float32
    probe.seen.clear()
    rgb = read_rgb(entries[0].path, entries[0].height, entries[0].width)
    feats = window_features(net.eval(), rgb, np.array([[0, 0, 30, 20], [10, 5, 40, 40], [2, 2, 9, 9]], float), 2, 2,
                            "cpu", amp)
    assert probe.dtypes() == {LOW[amp]} and len(probe.seen) >= 2 * 5  # two forward passes of 2 and 1 windows
    assert feats.dtype == np.float16 and feats.shape == (3, 16) and (feats >= 0).all() and np.isfinite(feats).all()


def test_bf16_rcnn_reruns_are_bit_identical_and_another_amp_is_another_state(native_bf16, tmp_path):
    from test_detection_train import assert_same_checkpoint

    entries = make_entries(tmp_path)
    cfg = rcnn_finetune.FinetuneConfig(iterations=4, lr=0.01, log_every=2, checkpoint_every=2, workers=0, amp="bf16")
    log = logging.getLogger("test")
    for run in ("a", "b"):
        rcnn_finetune.finetune(window_net("figure6"), entries, RCNN_WINDOWS, cfg, 3, "cpu", log, tmp_path / run)
    [a], [b] = (list((tmp_path / run).glob("*/last.pt")) for run in ("a", "b"))
    assert_same_checkpoint(a, b)
    ckpt = load_checkpoint(a)
    assert ckpt["config"]["amp"] == "bf16" and ckpt["iteration"] == 4
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    window_net("figure6").load_state_dict(ckpt["model"])  # loads into a float32 net, every key
    rcnn_finetune.finetune(window_net("figure6"), entries, RCNN_WINDOWS, replace(cfg, amp="none"), 3, "cpu", log,
                           tmp_path / "a")
    assert len(list((tmp_path / "a").glob("*/last.pt"))) == 2  # float32 opened its own state, bf16's kept as it was
    assert_same_checkpoint(a, b)
    with pytest.raises(ValueError, match="amp 'bf32' is not one of none, bf16, fp16"):
        RcnnConfig(RCNN_WINDOWS, cfg, None, amp="bf32")


def test_rcnn_fc7_cache_recomputes_the_features_of_another_amp(native_bf16, tmp_path):
    from ctxrepro.detection.rcnn.protocol import _Features
    from ctxrepro.detection.rcnn.svm import SvmConfig

    entries = make_entries(tmp_path)[:2]
    net = window_net("figure6")
    log = logging.getLogger("test")

    def computed(amp: str) -> tuple[list[np.ndarray], int]:
        cfg = RcnnConfig(RCNN_WINDOWS, rcnn_finetune.FinetuneConfig(), SvmConfig(), feature_batch=4, cache="all",
                         amp=amp)
        feats = _Features(net, cfg, tmp_path / "state", "cpu", log)
        out = [f for _, _, f in feats.stream(entries, "test", False)]
        return out, feats.windows

    bf16, n = computed("bf16")
    assert n == 16 and computed("bf16")[1] == 0  # read back from the cache
    fp32, n = computed("none")
    assert n == 16 and any(not np.array_equal(a, b) for a, b in zip(bf16, fp32))
    assert all(np.allclose(a, b, rtol=0.05, atol=0.05) for a, b in zip(bf16, fp32))
