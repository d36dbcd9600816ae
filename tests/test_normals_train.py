"""Tests for the resumable normals fine-tuning (ctxrepro.normals.model.train_normals) and the memory-bounded
training set (ctxrepro.normals.data: images written to a .npy file and read back per batch), section 4.4."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from ctxrepro.checkpoint import load_checkpoint
from ctxrepro.data.nyu import NyuLabeled
from ctxrepro.normals.data import NpyRows, load_images, load_train, scratch_dir
from ctxrepro.normals.grid import cell_grid
from ctxrepro.normals.model import TrainSettings, _batch, build_net, train_normals

LOG = logging.getLogger("test_normals_train")
SETTINGS = TrainSettings(steps=12, batch=3, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, flip=True,
                         seed=3, log_every=5, checkpoint_every=4)


class _ToyTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x / 255.0))


def make_net():
    torch.manual_seed(0)
    return build_net(_ToyTrunk(), 8, 8, 3, seed=3)


def toy_data(n: int = 6):
    """Random 16 x 16 images with random unit normals on their 4 x 4 cells (some cells without ground truth)."""
    from ctxrepro.normals.model import TrainSet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    normals = rng.normal(size=(2, n, 4, 4, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    valid = rng.random((2, n, 4, 4)) > 0.2
    book = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    return TrainSet(images, normals[0], valid[0], normals[1], valid[1]), book


def run(state: Path | None, settings: TrainSettings = SETTINGS):
    data, book = toy_data()
    net = make_net()
    return net, train_normals(net, data, book, settings, "cpu", LOG, state)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"] and sa["losses"] == sb["losses"]
    assert torch.equal(sa["batches"], sb["batches"])
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for k, st in sa["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, sb["optimizer"]["state"][k][name]), name


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run: checkpoints at steps 4, 8, 12."""
    state = tmp_path_factory.mktemp("ref") / "last.pt"
    net, stats = run(state)
    return state, net, stats


def test_checkpointing_does_not_change_the_run(reference):
    net, stats = run(None)
    assert stats["train_loss"] == reference[2]["train_loss"] and stats["steps"] == 12
    for (name, p), q in zip(net.state_dict().items(), reference[1].state_dict().values()):
        assert torch.equal(p, q), name
    assert load_checkpoint(reference[0])["step"] == 12 and len(load_checkpoint(reference[0])["losses"]) == 3


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identical(reference, tmp_path):
    """A child process SIGKILLs itself in step 7's update (its last checkpoint is step 4)."""
    state = tmp_path / "last.pt"
    script = (
        "import os, signal, sys; from pathlib import Path; import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # the reference's reduction order
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "import test_normals_train as t\n"
        "from ctxrepro.normals import model as M\n"
        "real = M._update\n"
        "def update(net, opt, x, codes, step, *rest):\n"
        "    if step == 7:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(net, opt, x, codes, step, *rest)\n"
        "M._update = update\n"
        f"t.run(Path({str(state)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(state)["step"] == 4
    _, stats = run(state)
    assert stats["train_loss"] == reference[2]["train_loss"]
    assert_same_checkpoint(reference[0], state)


def test_stopped_run_extended_equals_one_long_run(reference, tmp_path):
    state = tmp_path / "last.pt"
    run(state, replace(SETTINGS, steps=10))  # the step budget may change: a longer run resumes
    assert load_checkpoint(state)["step"] == 10
    _, stats = run(state)
    assert stats["train_loss"] == reference[2]["train_loss"]
    assert_same_checkpoint(reference[0], state)
    _, stats = run(state)  # already at the end: nothing more to train, the same result
    assert stats["train_loss"] == reference[2]["train_loss"]


def test_changed_params_start_afresh_with_a_warning(reference, tmp_path, caplog):
    state = tmp_path / "last.pt"
    state.write_bytes(reference[0].read_bytes())
    other = replace(SETTINGS, lr=0.01)
    with caplog.at_level("WARNING"):
        run(state, other)
    assert re.search(r"lr: checkpoint 0.05 != now 0.01.*starting afresh at step 0", caplog.text)
    run(tmp_path / "fresh.pt", other)
    assert_same_checkpoint(tmp_path / "fresh.pt", state)
    caplog.clear()
    with caplog.at_level("WARNING"):  # a shorter budget than the checkpoint's step: retrained, not truncated
        run(state, replace(other, steps=2))
    assert "beyond this run's 2: starting afresh" in caplog.text


# ------------------------------------------------------------------------------ memory-bounded images

def test_npy_rows_reads_what_numpy_wrote(tmp_path):
    a = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows(tmp_path / "a.npy")
    assert len(rows) == 5 and rows.shape == (5, 2, 3) and rows.dtype == np.uint8
    assert np.array_equal(rows[np.array([4, 0, 4])], a[[4, 0, 4]])
    assert np.array_equal(rows[1:3], a[1:3]) and np.array_equal(rows[2], a[2]) and rows[3:3].shape == (0, 2, 3)
    with pytest.raises(IndexError):
        rows[np.array([5])]
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 2))))
    with pytest.raises(ValueError, match="C-order"):
        NpyRows(tmp_path / "f.npy")


def _labeled(path: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:  # MATLAB v7.3 layout as h5py shows it
        f["images"] = rng.integers(0, 256, (n, 3, 640, 480), dtype=np.uint8)
        f["depths"] = f["rawDepths"] = np.ones((n, 640, 480), np.float32)


def _gt(i: int):
    rng = np.random.default_rng(i)
    n = rng.normal(size=(480, 640, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return n, rng.random((480, 640)) > 0.3


def test_training_set_in_a_file_equals_the_in_memory_one(tmp_path):
    _labeled(tmp_path / "nyu.mat", 4)
    grid = cell_grid([("conv", nn.Conv2d(3, 8, 4, stride=4))], (48, 64), (480, 640))
    idx = np.array([3, 0, 2])
    with NyuLabeled(tmp_path / "nyu.mat") as nyu, scratch_dir(tmp_path / "scratch") as scratch:
        mem, mem_sample = load_train(nyu, _gt, idx, (48, 64), grid, 0.5, 20, 7, LOG)
        disk, disk_sample = load_train(nyu, _gt, idx, (48, 64), grid, 0.5, 20, 7, LOG, scratch)
        assert isinstance(mem.images, np.ndarray) and isinstance(disk.images, NpyRows)
        assert np.array_equal(np.load(scratch / "train_images.npy"), mem.images) and mem.images.shape == (3, 48, 64, 3)
        for name in ("normals", "valid", "mirrored_normals", "mirrored_valid"):
            assert np.array_equal(getattr(mem, name), getattr(disk, name)), name
        assert np.array_equal(mem_sample, disk_sample)
        book = torch.eye(3)
        pick, flips = torch.tensor([2, 0, 2]), torch.tensor([True, False, False])
        for x, y in zip(_batch(mem, pick, flips, book, "cpu"), _batch(disk, pick, flips, book, "cpu")):
            assert torch.equal(x, y)
        test = load_images(nyu, idx, (48, 64), LOG, scratch)
        assert np.array_equal(test[0:3], load_images(nyu, idx, (48, 64), LOG))
        assert sorted(p.name for p in scratch.iterdir()) == ["test_images.npy", "train_images.npy"]
    assert not (tmp_path / "scratch").exists()  # removed with the run
