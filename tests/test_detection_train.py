"""Tests for ctxrepro.detection.loader and the resumable loop of ctxrepro.detection.train (section 4.3): batches
are a pure function of (seed, iteration), DataLoader workers do not change the losses, and a SIGKILLed run
resumes bit-identically; changed params start afresh; a non-finite state is never checkpointed."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrepro.checkpoint import assert_finite_state, load_checkpoint
from ctxrepro.detection.loader import IterationBatches, picks
from ctxrepro.detection.model import FastRCNN
from ctxrepro.detection.roidb import Entry
from ctxrepro.detection.sampling import SamplingConfig
from ctxrepro.detection.train import SolverConfig, train
from ctxrepro.transfer.trunk import TrunkSpec, build_trunk

LOG = logging.getLogger("test_detection_train")
H, W = 48, 64
SAMPLING = SamplingConfig(rois_per_image=8)


def make_solver(**changes) -> SolverConfig:
    solver = SolverConfig(iterations=10, images_per_batch=2, lr=0.01, lr_step=6, scale=48, max_size=64,
                          log_every=2, checkpoint_every=3, workers=0)
    return replace(solver, **changes)


def make_entries(root: Path, n: int = 5) -> list[Entry]:
    """Images with one bright box each; proposals are shifted copies of it (foreground and background)."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        img = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        x1, y1 = int(rng.integers(0, 30)), int(rng.integers(0, 20))
        img[y1:y1 + 20, x1:x1 + 30] = (220, 40, 30) if i % 2 else (30, 40, 220)
        path = root / f"{i:06d}.png"
        Image.fromarray(img).save(path)
        gt = np.array([[x1, y1, x1 + 29, y1 + 19]], dtype=np.float64)
        props = np.array([[min(max(x1 + d, 0), W - 30), y1, min(max(x1 + d, 0), W - 30) + 29, y1 + 19]
                          for d in (-12, -6, -2, 0, 3, 8, 15, 25)], dtype=np.float64)
        entries.append(Entry(f"{i:06d}", path, H, W, gt, np.array([7 if i % 2 else 6]), props))
    return entries


def make_model() -> FastRCNN:
    spec = TrunkSpec(tower="small", width=4, conv6=8, conv6_kernel=2, conv6b=8, fc7=16, input_side=64)
    trunk, head = build_trunk(spec, seed=0)
    return FastRCNN(trunk, head, dropout=0.5, box_regression=True, seed=0)


def run(root: Path, state: Path | None, solver: SolverConfig) -> tuple[FastRCNN, list[dict]]:
    model = make_model()
    return model, train(model, make_entries(root), SAMPLING, solver, 3, "cpu", LOG, state)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["iteration"] == sb["iteration"] and sa["history"] == sb["history"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for k, st in sa["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, sb["optimizer"]["state"][k][name]), name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny steps only lose to thread start-up (and the child must use the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_entries(root)
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """An uninterrupted 10-iteration run."""
    state = tmp_path_factory.mktemp("ref") / "last.pt"
    model, history = run(images, state, make_solver())
    return state, history


def test_picks_shuffle_whole_epochs_from_seed_and_iteration():
    # 3 images and their mirrors, 2 per iteration: iterations 0..2 are one epoch, each item exactly once
    epoch = [p for it in range(3) for p in picks(3, True, seed=5, iteration=it, per_batch=2)]
    assert sorted(epoch) == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]
    second = [p for it in range(3, 6) for p in picks(3, True, seed=5, iteration=it, per_batch=2)]
    assert sorted(second) == sorted(epoch) and second != epoch  # a new permutation (fixed by the seed)
    assert picks(3, True, seed=5, iteration=4, per_batch=2) == second[2:4]  # no state: any order, any process
    assert sorted(p for it in range(3) for p in picks(2, False, 5, it, 2)) == [(0, False)] * 3 + [(1, False)] * 3


def test_iteration_batches_scale_and_sample_reproducibly(images):
    data = IterationBatches(make_entries(images), SAMPLING, 2, True, 96, 200, seed=1, iterations=4)
    a, b = data[2], data[2]
    assert len(data) == 4 and a.iteration == 2 and len(a.images) == 2
    assert a.images[0].shape == (3, 96, 128)  # shorter side 48 -> 96: factor 2
    for x, y in zip(a.rois + a.images, b.rois + b.images):
        assert torch.equal(x, y)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.targets, b.targets)
    assert (a.rois[0][:, 2:] <= torch.tensor([127.0, 95.0])).all()  # RoIs in scaled pixels


def test_zero_and_two_workers_give_identical_losses(images, reference, tmp_path):
    _, history = run(images, tmp_path / "last.pt", make_solver(workers=2))
    assert history == reference[1] and len(history) == 5
    assert_same_checkpoint(reference[0], tmp_path / "last.pt")


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identical(images, reference, tmp_path):
    """A child process SIGKILLs itself as iteration 7 starts (its last checkpoint is iteration 6)."""
    state = tmp_path / "last.pt"
    script = (
        "import os, signal, sys; from pathlib import Path; import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # the reference's reduction order
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "import test_detection_train as t\n"
        "from ctxrepro.detection import train as T\n"
        "real = T.set_lr\n"
        "def set_lr(opt, solver, iteration):\n"
        "    if iteration == 7:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(opt, solver, iteration)\n"
        "T.set_lr = set_lr\n"
        f"t.run(Path({str(images)!r}), Path({str(state)!r}), t.make_solver(workers=1))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(state)["iteration"] == 6
    _, history = run(images, state, make_solver())
    assert history == reference[1]
    assert_same_checkpoint(reference[0], state)


def test_stopped_run_extended_equals_one_long_run(images, reference, tmp_path):
    state = tmp_path / "last.pt"
    run(images, state, make_solver(iterations=4))  # a changed budget may resume
    assert load_checkpoint(state)["iteration"] == 4
    run(images, state, make_solver())
    assert_same_checkpoint(reference[0], state)


def test_changed_params_start_afresh_with_a_warning(images, reference, tmp_path, caplog):
    state = tmp_path / "last.pt"
    state.write_bytes(reference[0].read_bytes())
    with caplog.at_level("WARNING"):
        run(images, state, make_solver(lr=0.02))
    assert re.search(r"lr: checkpoint 0.01 != now 0.02.*starting afresh at iteration 0", caplog.text)
    run(images, tmp_path / "fresh.pt", make_solver(lr=0.02))
    assert_same_checkpoint(tmp_path / "fresh.pt", state)
    caplog.clear()
    with caplog.at_level("WARNING"):  # other starting weights (another trunk): not the same run either
        model = make_model()
        with torch.no_grad():
            model.fc7.weight.mul_(2.0)
        train(model, make_entries(images), SAMPLING, make_solver(), 3, "cpu", LOG, reference[0])
    assert "start_weights: checkpoint" in caplog.text and "starting afresh" in caplog.text


def test_assert_finite_state_names_the_bad_tensor():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert_finite_state(model, opt, "here")
    with torch.no_grad():
        model.fc7.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"here: model fc7.bias holds non-finite"):
        assert_finite_state(model, opt, "here")
    with torch.no_grad():
        model.fc7.bias.zero_()
    model(([torch.zeros(3, H, W)]), [torch.tensor([[0.0, 0.0, 20.0, 20.0]])]).scores.sum().backward()
    opt.step()
    opt.state[model.fc7.weight]["momentum_buffer"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"optimizer state \d+\.momentum_buffer"):
        assert_finite_state(model, opt, "here")
