"""Kept resume states (issue 22) and checked checkpoints (issue 27): a changed param never destroys a state,
going back resumes it bit-identically; a state with NaN/inf, random bytes or zero bytes is set aside with one
log line and the run resumes from the previous good state or starts afresh; states are listed and removed
only on request; the pretrain curves are live and a killed run leaves them up to its last logged step."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxrepro.checkpoint import CheckpointMismatch, load_checkpoint
from ctxrepro.pretext.distributed import DistInfo
from ctxrepro.pretext.engine import OptimConfig, TrainPaths, train
from ctxrepro.states.folders import config_hash, resume_state
from ctxrepro.states.listing import list_states, remove_state

from test_engine import LOG, assert_same_state, make_cfg, tables
from test_pretext_data import write_dataset

pytestmark = pytest.mark.faults
OTHER_LR = OptimConfig("sgd", lr=1e-2, momentum=0.9, loss="mean")  # make_cfg's is lr 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root)
    return root


def run(data: Path, out: Path, cfg):
    """Pretrain with `out/state` as the instance's state folder (as the stage does)."""
    train_table, heldout = tables(data)
    return train(cfg, train_table, heldout, TrainPaths(out / "state", out / "pretrain.pt"), "cpu", DistInfo(), LOG)


def only_state(out: Path, cfg) -> Path:
    return out / "state" / config_hash({**cfg.record(), "world_size": 1}) / "last.pt"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6)."""
    out = tmp_path_factory.mktemp("ref")
    return out, run(data, out, make_cfg())


def test_changed_lr_then_old_lr_resumes_the_original_state_bit_identical(data, reference, tmp_path, caplog):
    run(data, tmp_path, make_cfg(steps=3))  # stopped at step 3
    first = only_state(tmp_path, make_cfg())
    kept = first.read_bytes()
    with caplog.at_level(logging.INFO):
        changed = run(data, tmp_path, make_cfg(optim=OTHER_LR))
    assert changed["steps"] == 6 and first.read_bytes() == kept  # a new folder; the old state untouched
    assert re.search(rf"kept state .*{first.parent.name} \(step 3\) is not resumed: it differs in lr: 0.001 -> 0.01",
                     caplog.text)
    assert only_state(tmp_path, make_cfg(optim=OTHER_LR)).is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the old lr again, other workers and checkpoint frequency: the same state
        metrics = run(data, tmp_path, make_cfg(workers=1, checkpoint_every=3))
    assert f"resumed from {first} at step 3" in caplog.text
    assert "differs in lr: 0.01 -> 0.001" in caplog.text
    assert_same_state(only_state(reference[0], make_cfg()), first)
    assert metrics["heldout_accuracy"] == reference[1]["heldout_accuracy"]
    assert metrics["train_loss"] == reference[1]["train_loss"] and metrics["steps"] == 6
    assert sorted(p.parent.name for p in (tmp_path / "state").glob("*/last.pt")) == sorted(
        {first.parent.name, only_state(tmp_path, make_cfg(optim=OTHER_LR)).parent.name})


def _poison(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point())
    weight = state["model"][key]  # channels_last under CPU bf16: index, not view
    weight[(0,) * weight.dim()] = float("inf")
    torch.save(state, path)


def test_inf_in_last_pt_is_set_aside_and_the_run_resumes_from_prev(data, reference, tmp_path, caplog, monkeypatch):
    from ctxrepro.pretext import engine

    with monkeypatch.context() as m:  # a run stopped after step 5: last.pt at step 4, prev.pt at step 2
        m.setattr(engine, "collapsed", lambda row, fraction: "stopped by the test" if row["step"] == 5 else None)
        with pytest.raises(engine.TrainingError, match="stopped by the test"):
            run(data, tmp_path, make_cfg())
    last = only_state(tmp_path, make_cfg())
    assert load_checkpoint(last)["step"] == 4 and load_checkpoint(last.with_name("prev.pt"))["step"] == 2
    _poison(last)
    with caplog.at_level(logging.INFO):
        metrics = run(data, tmp_path, make_cfg())
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert re.fullmatch(rf"state {re.escape(str(last))} model\.\S+ holds NaN or inf: set aside as "
                        r"last\.pt\.nonfinite-\d{8}T\d{6}Z; resuming from prev\.pt", line)
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    assert len(list(last.parent.glob("last.pt.nonfinite-*"))) == 1
    assert_same_state(only_state(reference[0], make_cfg()), last)  # resumed at 2, ends where the reference did
    assert metrics["train_loss"] == reference[1]["train_loss"]
    assert not last.with_name("prev.pt").exists()  # the final state is kept once


@pytest.mark.parametrize("content", [b"", random.Random(4096).randbytes(4096)], ids=["zero-bytes", "random-bytes"])
def test_unreadable_last_and_prev_are_one_line_each_then_a_fresh_run(data, reference, tmp_path, caplog, content):
    last = only_state(tmp_path, make_cfg())
    last.parent.mkdir(parents=True)
    last.write_bytes(content)
    last.with_name("prev.pt").write_bytes(content)
    with caplog.at_level(logging.INFO):
        run(data, tmp_path, make_cfg())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.exc_info for r in warnings] == [None, None] and "weights_only=False" not in caplog.text
    why = "an empty file" if not content else r"not a checkpoint of plain tensors \(\w+\)"
    assert re.fullmatch(rf"state \S+last\.pt unreadable, {why}: set aside as last\.pt\.unreadable-\S+; "
                        r"resuming from prev\.pt", warnings[0].getMessage())
    assert warnings[1].getMessage().endswith("; starting afresh")
    assert_same_state(only_state(reference[0], make_cfg()), last)  # a fresh run: the reference's end


def test_a_single_file_state_of_the_old_layout_moves_into_its_folder_and_resumes(data, reference, tmp_path):
    run(data, tmp_path, make_cfg(steps=2))
    state = only_state(tmp_path, make_cfg())
    (tmp_path / "state" / "last.pt").write_bytes(state.read_bytes())  # as the old code left it
    for f in state.parent.iterdir():
        f.unlink()
    state.parent.rmdir()
    run(data, tmp_path, make_cfg())
    assert not (tmp_path / "state" / "last.pt").exists()
    assert_same_state(only_state(reference[0], make_cfg()), state)


def test_list_and_remove_states(data, reference, tmp_path):
    for cfg in (make_cfg(steps=2), make_cfg(steps=2, optim=OTHER_LR)):
        run(data, tmp_path / "run", cfg)  # two configurations: run/state/<hash>/
    (tmp_path / "models" / "pretrain_state").mkdir(parents=True)
    (tmp_path / "run" / "state").rename(tmp_path / "models" / "pretrain_state" / "w")
    (tmp_path / "models" / "pretrain_state" / "w" / "last.pt.unreadable-20260101T000000Z").write_bytes(b"x")
    current = {"pretrain/w": {**make_cfg(steps=99).record(), "world_size": 1}}
    rows = list_states(tmp_path, current)
    ours, other = (config_hash(current["pretrain/w"]), config_hash({**make_cfg(optim=OTHER_LR).record(),
                                                                    "world_size": 1}))
    assert sorted((r["stage"], r["instance"], r["config_hash"], r["step"]) for r in rows) == sorted(
        [("pretrain", "w", "-", None), ("pretrain", "w", ours, 2), ("pretrain", "w", other, 2)])
    assert [r["set_aside"] for r in rows if r["config_hash"] == "-"] == [["last.pt.unreadable-20260101T000000Z"]]
    by_hash = {r["config_hash"]: r for r in rows}
    assert by_hash[ours]["differs"] == [] and by_hash[other]["differs"] == ["lr: 0.01 -> 0.001"]
    folder = Path(by_hash[other]["path"])
    assert by_hash[other]["bytes"] == sum(f.stat().st_size for f in folder.iterdir())
    with pytest.raises(ValueError, match="no kept state is 'abc'"):
        remove_state(tmp_path, "abc")
    assert remove_state(tmp_path, other[:8]) == [folder] and not folder.exists()
    assert remove_state(tmp_path, str(folder.parent)) == [folder.parent]  # its own files only
    assert [r["config_hash"] for r in list_states(tmp_path)] == [ours]


def test_resume_state_beyond_the_budget_is_an_error_not_a_restart(tmp_path):
    log = logging.getLogger("test_states")
    record = {"lr": 0.1, "iterations": 5}
    path, ckpt = resume_state(tmp_path, record, "iteration", 5, log)
    assert ckpt is None and path == tmp_path / config_hash(record) / "last.pt"
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from ctxrepro.checkpoint import save_state

    save_state(path, model, opt, "here", config=record, iteration=5)
    assert json.loads(path.with_name("last.json").read_text())["at"] == 5
    assert resume_state(tmp_path, {**record, "iterations": 9}, "iteration", 9, log)[1]["iteration"] == 5
    with pytest.raises(CheckpointMismatch, match=r"at iteration 5, beyond this run's 3: .*--remove"):
        resume_state(tmp_path, {**record, "iterations": 3}, "iteration", 3, log)
    assert path.is_file()


@pytest.fixture(scope="module")
def detect_images(tmp_path_factory):
    from test_detection_train import make_entries

    root = tmp_path_factory.mktemp("detect_images")
    make_entries(root)
    return root


@pytest.mark.parametrize("content", [b"", random.Random(4096).randbytes(4096)], ids=["zero-bytes", "random-bytes"])
def test_unreadable_detect_states_are_one_line_and_the_run_goes_on(detect_images, tmp_path, caplog, content):
    """An unreadable state of the old single-file layout, then one in its configuration's folder."""
    from test_detection_train import assert_same_checkpoint, make_solver
    from test_detection_train import run as detect_run

    detect_run(detect_images, tmp_path / "ref", make_solver())
    [reference] = (tmp_path / "ref").glob("*/last.pt")
    state = tmp_path / "state"
    state.mkdir()
    (state / "last.pt").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        detect_run(detect_images, state, make_solver(iterations=4))
    [line] = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(rf"state {re.escape(str(state / 'last.pt'))} unreadable, .*: set aside as "
                        r"last\.pt\.unreadable-\S+; starting afresh", line)
    [last] = state.glob("*/last.pt")
    assert not last.with_name("prev.pt").exists()  # the run reached its budget: its final state is kept once
    last.write_bytes(content)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detect_run(detect_images, state, make_solver())
    [line] = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(rf"state {re.escape(str(last))} unreadable, .*: set aside as last\.pt\.unreadable-\S+; "
                        r"starting afresh", line) and "weights_only=False" not in line
    assert_same_checkpoint(reference, last)  # a fresh run: the reference's end


STAGE_PARAMS = dict(tower="small", patch=24, gap=12, jitter=2, input_size=16, grids_per_image=2, max_patches=40,
                    min_pixels=8000, max_pixels=20000, color="drop", optimizer="adam", lr=1e-3, loss="mean", steps=6,
                    checkpoint_every=2, log_every=1, heldout_images=3, workers=0)


def run_stage(root: Path, data: Path, **changes) -> None:
    """The pretrain stage in `root` (data/resized linked from `data`)."""
    from ctxrepro.config import BaseParams
    from ctxrepro.stage import StageContext
    from stages import pretrain

    if not (root / "data" / "resized").exists():
        (root / "data").mkdir(parents=True)
        (root / "data" / "resized").symlink_to(data / "data" / "resized")
    pretrain.run(pretrain.Params(**{**STAGE_PARAMS, **changes}), StageContext(BaseParams(seed=1), "cpu", LOG, root=root))


def curve(root: Path, name: str = "loss") -> list[str]:
    return (root / "dvclive/pretrain/color_dropping/plots/metrics/train" / f"{name}.tsv").read_text().splitlines()


def test_a_killed_pretrain_leaves_its_curves_to_its_last_logged_step_and_a_rerun_continues_them(data, tmp_path):
    """Curves are written in place as the run goes (what `dvc plots show` reads); the child SIGKILLs itself
    right after logging step 3 (its last checkpoint is step 2)."""
    run_stage(tmp_path / "ref", data)
    root = tmp_path / "killed"
    run_stage(root, data, lr=2e-3)  # an earlier, finished run: its curves are replaced from the new run's first row
    script = (
        "import os, signal, sys; from pathlib import Path; import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "from ctxrepro.pretext import engine\n"
        "from test_states import run_stage\n"
        "def hook(row, fraction):\n"
        "    if row['step'] == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "engine.collapsed = hook\n"
        f"run_stage(Path({str(root)!r}), Path({str(data)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert curve(root) == curve(tmp_path / "ref")[:4]  # header and steps 1..3 of this run
    assert [r.split("\t")[0] for r in curve(root, "accuracy")] == ["step", "1", "2", "3"]
    run_stage(root, data)  # resumes at step 2: the history's rows first, then steps 3..6
    assert curve(root) == curve(tmp_path / "ref") and len(curve(root)) == 7


def test_states_command_lists_compares_and_removes(data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ctxrepro.cli import app

    run(data, tmp_path / "run", make_cfg(steps=2))
    (tmp_path / "models" / "pretrain_state").mkdir(parents=True)
    (tmp_path / "run" / "state").rename(tmp_path / "models" / "pretrain_state" / "color_dropping")
    [folder] = (tmp_path / "models" / "pretrain_state" / "color_dropping").iterdir()
    params = Path(__file__).parents[1] / "params.yaml"  # the tiny profile: other shapes than these tests'
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["states", "--params", str(params)])
    assert listed.exit_code == 0, listed.output
    line = listed.output.splitlines()[0]
    assert line.startswith(f"pretrain/color_dropping {folder.name}  step 2  ") and "differs: " in line
    assert "patch: 24 -> " in line and "1 kept state, " in listed.output
    rows = json.loads(runner.invoke(app, ["states", "--json", "--params", str(params)]).output)
    assert [r["config_hash"] for r in rows] == [folder.name]
    refused = runner.invoke(app, ["states", "--remove", "0000000"])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and "no kept state is '0000000'" in refused.output
    removed = runner.invoke(app, ["states", "--remove", folder.name])
    assert removed.exit_code == 0 and not folder.exists() and list_states(tmp_path) == []


def test_a_pretrain_state_past_the_step_budget_is_an_error_that_keeps_it(data, tmp_path):
    run(data, tmp_path, make_cfg(steps=2))
    state = only_state(tmp_path, make_cfg())
    kept = state.read_bytes()
    with pytest.raises(CheckpointMismatch, match=rf"state {re.escape(str(state))} is at step 2, beyond this run's 1: "
                                                 r"raise the budget to resume it, or remove it with `ctxrepro states"):
        run(data, tmp_path, make_cfg(steps=1))
    assert state.read_bytes() == kept


def test_a_killed_writers_temp_files_go_at_the_next_checkpoint(tmp_path):
    from ctxrepro.checkpoint import save_state

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path = tmp_path / "abc" / "last.pt"
    path.parent.mkdir()
    left = [path.with_name(f".last.pt.{dead}.x1y2.tmp"), path.with_name(f".prev.pt.{dead}.link.tmp")]
    for f in left:
        f.write_bytes(b"torn")
    model = torch.nn.Linear(2, 1)
    save_state(path, model, torch.optim.SGD(model.parameters(), lr=0.1), "here", config={}, step=1)
    assert sorted(f.name for f in path.parent.iterdir()) == ["last.json", "last.pt"]


def test_a_state_under_an_older_hash_of_the_same_maths_is_renamed_and_resumed(tmp_path):
    """If the set of keys that do not change the maths grows, a kept state's folder name is re-derived."""
    from ctxrepro.checkpoint import save_state

    log = logging.getLogger("test_states")
    record = {"lr": 0.1, "iterations": 5, "decode": "worker"}
    old = tmp_path / config_hash(record, frozenset({"iterations"}))  # decode was a maths key then
    model = torch.nn.Linear(2, 1)
    save_state(old / "last.pt", model, torch.optim.SGD(model.parameters(), lr=0.1), "here", config=record,
               iteration=3)
    path, ckpt = resume_state(tmp_path, {**record, "decode": "device"}, "iteration", 5, log)
    assert path.parent.name == config_hash(record) != old.name and not old.exists()
    assert ckpt["iteration"] == 3


@pytest.mark.parametrize("bad, why, said", [
    ({"config": {}, "iteration": -1}, "format", "has no config mapping or a bad iteration -1"),
    ({"config": {}}, "format", "lacks iteration"),
    ({"config": {}, "iteration": 1, "format": 99}, "format", "has format 99, this code reads 1"),
    ([1, 2], "format", "holds a list, not a state dict"),
    ({"config": {}, "iteration": 1, "optimizer": {"state": {0: {"m": torch.tensor([float("nan")])}}}},
     "nonfinite", "optimizer.state.0.m holds NaN or inf"),
])
def test_check_state_names_what_is_wrong(tmp_path, caplog, bad, why, said):
    from ctxrepro.checkpoint import load_verified

    path = tmp_path / "last.pt"
    torch.save(bad, path)
    with caplog.at_level(logging.WARNING):
        assert load_verified(path, "iteration", logging.getLogger("test_states")) is None
    [aside] = tmp_path.glob(f"last.pt.{why}-*")
    assert caplog.records[0].getMessage() == f"state {path} {said}: set aside as {aside.name}; starting afresh"
