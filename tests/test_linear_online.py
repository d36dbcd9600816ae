"""ctxrepro.analysis.linear_online: the ImageNet heads trained online on the frozen trunk, resumable (issue 23)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_online as O
from ctxrepro.analysis import linear_probe as L
from ctxrepro.checkpoint import load_checkpoint
from ctxrepro.pretext.model import ContextNet

LOG = logging.getLogger("test_linear_online")
CFG = H.SgdConfig(batch=4, iterations=8, lr=0.05, lr_step=3)


def images(folder: Path, n: int = 6) -> O.TrainSet:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 50, 3), dtype=np.uint8)).save(paths[-1])
    return O.TrainSet(paths, np.arange(n) % 3, 3, L.ViewSpec("random", 32, 36, "drop"))


def taps() -> L.LayerTaps:
    torch.manual_seed(0)
    return L.LayerTaps(ContextNet("small", 32).eval().tower, 32, 32, 64, layers=("conv1", "conv5"))


def train(data: O.TrainSet, state: Path | None, workers: int = 0, after_step=None, cfg: H.SgdConfig = CFG):
    return O.train_heads(taps(), data, cfg, 0, "drop", O.Runtime(workers=workers), LOG, "trunk", 4, state,
                         checkpoint_every=2, after_step=after_step)


def test_every_pass_draws_fresh_views_and_a_new_order(tmp_path):
    """Mutations caught (checked by hand): crops seeded by the image index (the same view at every pass), one
    order for all passes (pass 1 = pass 0)."""
    data = images(tmp_path)
    pos = O.Positions(data, 0, 24)
    first, second = [pos.image(p) for p in range(6)], [pos.image(p) for p in range(6, 12)]
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    i = first[0]
    again = second.index(i) + 6
    assert not torch.equal(pos[0][0], pos[again][0])  # the same image, another crop / flip
    assert torch.equal(pos[0][0], O.Positions(data, 0, 24)[0][0])  # a pure function of (seed, position)


def test_train_applies_the_step_schedule(tmp_path, monkeypatch):
    """The lr of each iteration as train_heads passes it on: 0.05 for iterations 1-3, 0.005 for 4-6, then
    0.0005 (lr_step 3, gamma 0.1). Mutations caught (checked by hand): a schedule that never steps (lr_at(0)),
    passes reported as the iteration count."""
    seen = []
    real = O.sgd_step
    monkeypatch.setattr(O, "sgd_step", lambda h, o, f, y, lr, i: seen.append(lr) or real(h, o, f, y, lr, i))
    _, out = train(images(tmp_path), None)
    assert seen == pytest.approx([0.05] * 3 + [0.005] * 3 + [0.0005] * 2)
    assert out["passes"] == pytest.approx(8 * 4 / 6, abs=1e-3)  # fresh views per image, rounded to 3 places


def _assert_same_state(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["iteration"] == cb["iteration"] == CFG.iterations
    assert ca["first"] == cb["first"] and ca["last"] == cb["last"]
    for part in ("model", "optimizer"):
        flat_a = {k: v for k, v in ca[part].items()} if part == "model" else ca[part]["state"]
        flat_b = {k: v for k, v in cb[part].items()} if part == "model" else cb[part]["state"]
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            va, vb = flat_a[k], flat_b[k]
            if isinstance(va, dict):
                assert all(torch.equal(va[j], vb[j]) for j in va), (part, k)
            else:
                assert torch.equal(va, vb), (part, k)


@pytest.mark.faults
def test_sigkilled_training_resumes_bit_identical(tmp_path):
    """A child SIGKILLs itself right after iteration 5 (the last checkpoint is iteration 4); a rerun (with a
    decoding worker this time) ends with the heads, their standardisation and the optimizer's momentum equal,
    bit for bit, to an uninterrupted run's. Mutations caught (each checked by hand): the optimizer's momentum not
    restored (heads.load_state_dict only), the standardisation recomputed after a resume from other crops, a
    resume that replays the batches from position 0."""
    data = images(tmp_path / "img")
    train(data, tmp_path / "ref" / "heads.pt")
    script = (
        "import os, signal, sys; from pathlib import Path; import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # the reference's reduction order
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "from test_linear_online import images, train\n"
        "def hook(i):\n"
        "    if i == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train(images(Path({str(tmp_path / 'img')!r})), Path({str(tmp_path / 'killed' / 'heads.pt')!r}), "
        "after_step=hook)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "killed" / "heads.pt")["iteration"] == 4
    resumed = []
    train(data, tmp_path / "killed" / "heads.pt", workers=1, after_step=resumed.append)
    assert resumed == [5, 6, 7, 8]  # only what the kill lost is redone
    _assert_same_state(tmp_path / "ref" / "heads.pt", tmp_path / "killed" / "heads.pt")


def test_a_checkpoint_of_other_params_is_not_resumed(tmp_path, caplog):
    data = images(tmp_path / "img")
    state = tmp_path / "s" / "heads.pt"
    train(data, state)
    steps = []
    with caplog.at_level("WARNING"):
        train(data, state, after_step=steps.append, cfg=H.SgdConfig(batch=4, iterations=8, lr=0.01, lr_step=3))
    assert steps == list(range(1, 9)) and "lr: checkpoint 0.05 != now 0.01" in caplog.text
