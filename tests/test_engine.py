"""Tests for ctxrepro.pretext.engine and ctxrepro.checkpoint: bit-identical resume (stop and SIGKILL), refusal of
changed params, the non-finite guard, the time budget, evaluation and export, and the pretrain stage."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctxrepro.checkpoint import CheckpointMismatch, NonFiniteState, atomic_torch_save, first_nonfinite, load_checkpoint
from ctxrepro.pretext import engine
from ctxrepro.pretext.color import PatchAugment
from ctxrepro.pretext.data import BatchSpec, heldout_plans, load_table, usable
from ctxrepro.pretext.distributed import DistInfo
from ctxrepro.pretext.engine import (OptimConfig, TrainConfig, TrainingError, TrainPaths, loss_scale, prepare_inputs,
                                     train)
from ctxrepro.pretext.model import build_model

from test_pretext_data import write_dataset

LOG = logging.getLogger("test_engine")
# Per-visit scale on (section 3): the images hold 12.3K..20.2K pixels; every visit draws 8K..20K.
SPEC = BatchSpec(patch=24, gap=12, jitter=2, grids_per_image=2, max_patches=40, min_pixels=8000, max_pixels=20000)


def make_cfg(**changes) -> TrainConfig:
    cfg = TrainConfig(data=SPEC, augment=PatchAugment.for_patch(24, color="drop"),
                      optim=OptimConfig("sgd", lr=1e-3, momentum=0.9, loss="mean"), tower="small", input_size=16,
                      steps=6, checkpoint_every=2, log_every=1, workers=0, heldout_images=3)
    return replace(cfg, **changes)


def tables(root: Path):
    manifest = root / "data" / "resized" / "manifest.csv"
    return usable(load_table(manifest, "train"), SPEC)[0], usable(load_table(manifest, "val"), SPEC)[0]


def paths(d: Path) -> TrainPaths:
    return TrainPaths(d / "state" / "last.pt", d / "pretrain.pt")


def run(root: Path, out: Path, cfg: TrainConfig, on_log=None):
    train_table, heldout = tables(root)
    return train(cfg, train_table, heldout, paths(out), "cpu", DistInfo(), LOG, on_log)


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for k, st in sa["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["optimizer"]["state"][k][name])), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 6-step run."""
    out = tmp_path_factory.mktemp("ref")
    metrics = run(data, out, make_cfg())
    return out, metrics


def test_loss_scale_makes_ddp_average_equal_the_single_process_loss():
    # W ranks, DDP divides the summed gradients by W: sum -> x W; mean over Q global pairs -> x W / Q
    assert loss_scale("sum", 100, 4) == 4.0
    assert loss_scale("mean", 100, 4) == 0.04
    assert loss_scale("mean", 7, 1) == 1 / 7
    with pytest.raises(ValueError, match="'median'"):
        loss_scale("median", 1, 1)


def test_prepare_inputs_preprocesses_then_shrinks_by_area():
    cfg = make_cfg(augment=PatchAugment.for_patch(24, color="none", downsample_prob=0.0), input_size=12)
    patches = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    x = prepare_inputs(patches, cfg, torch.Generator().manual_seed(0), channels_last=False)
    # by hand: minus each channel's mean, scaled to RMS 50 over the patch, then 2x2 means
    p = patches.double()
    centred = p - p.mean(dim=(2, 3), keepdim=True)
    normed = centred * 50 / centred.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    expected = normed.reshape(5, 3, 12, 2, 12, 2).mean(dim=(3, 5))
    assert x.shape == (5, 3, 12, 12) and x.dtype == torch.float32
    assert torch.allclose(x.double(), expected, atol=1e-3)


def test_stopped_and_resumed_run_is_bit_identical(data, reference, tmp_path):
    ref_out, ref_metrics = reference
    run(data, tmp_path, make_cfg(steps=3))  # stop at 3: a changed step budget may resume
    assert load_checkpoint(paths(tmp_path).state)["step"] == 3
    metrics = run(data, tmp_path, make_cfg(steps=6))
    assert_same_state(paths(ref_out).state, paths(tmp_path).state)
    assert metrics["heldout_accuracy"] == ref_metrics["heldout_accuracy"]
    assert metrics["train_loss"] == ref_metrics["train_loss"] and metrics["steps"] == 6


@pytest.mark.faults
def test_sigkilled_run_resumes_bit_identical(data, reference, tmp_path):
    """A child process SIGKILLs itself right after logging step 5 (the last checkpoint is step 4)."""
    script = (
        "import os, signal, sys; from pathlib import Path; import torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # the reference's reduction order
        f"sys.path[:0] = [{str(Path(__file__).parent)!r}]\n"
        "from test_engine import run, make_cfg\n"
        "def hook(row):\n"
        "    if row['step'] == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run(Path({str(data)!r}), Path({str(tmp_path)!r}), make_cfg(workers=1), hook)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(paths(tmp_path).state)["step"] == 4
    assert not paths(tmp_path).export.exists()
    run(data, tmp_path, make_cfg())
    assert_same_state(paths(reference[0]).state, paths(tmp_path).state)


def test_resume_with_other_params_starts_afresh_naming_them(data, reference, tmp_path, caplog):
    """A changed param (as after editing params.yaml before `dvc repro`) ignores the stale state."""
    state = paths(tmp_path / "stale").state
    state.parent.mkdir(parents=True)
    state.write_bytes(paths(reference[0]).state.read_bytes())
    other = make_cfg(optim=OptimConfig("sgd", lr=1e-2, momentum=0.9, loss="mean"))
    with caplog.at_level("WARNING"):
        run(data, tmp_path / "stale", other)
    assert re.search(r"lr: checkpoint 0.001 != now 0.01.*starting afresh at step 0", caplog.text)
    run(data, tmp_path / "fresh", other)
    assert_same_state(paths(tmp_path / "fresh").state, state)
    caplog.clear()
    metrics = run(data, tmp_path / "stale", make_cfg(optim=other.optim, log_every=3, workers=1))
    assert metrics["steps"] == 6  # budget/logging keys may change: this one resumes
    assert "starting afresh" not in caplog.text


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.preprocess

    def poisoned(patches, g, cfg):
        calls["n"] += 1
        x = real(patches, g, cfg)
        return x * float("nan") if calls["n"] == 4 else x  # the 4th training step

    monkeypatch.setattr(engine, "preprocess", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 4"):
        run(data, tmp_path, make_cfg(log_every=3, checkpoint_every=2))
    state = load_checkpoint(paths(tmp_path).state)
    assert state["step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


def test_collapse_monitor_stops_naming_the_layer_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.train_step

    def killing_fc8(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # from the 3rd step on, every fc8 pre-activation is negative: relu8 is dead
            with torch.no_grad():
                model.head.fc8.bias.fill_(-1e4)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_step", killing_fc8)
    with pytest.raises(TrainingError, match=r"collapse at step 3: only 0.00% of fc8's ReLU outputs are live"):
        run(data, tmp_path, make_cfg(log_every=3, checkpoint_every=2, min_live_fraction=0.05))
    state = load_checkpoint(paths(tmp_path).state)
    assert state["step"] == 2 and float(state["model"]["head.fc8.bias"].min()) > -1.0
    row = state["history"][-1]  # the checked row of step 2 holds the monitor's numbers
    assert row["step"] == 2 and {"live_fc6", "live_fc7", "live_fc8", "wnorm_fc8", "wnorm_conv1"} <= set(row)
    assert 0.05 < row["live_fc8"] < 1.0


def test_time_budget_ends_the_run_and_is_recorded(data, tmp_path):
    metrics = run(data, tmp_path, make_cfg(max_seconds=1e-6))
    assert metrics["steps"] == 1 and metrics["stopped_by"] == "max_seconds"
    again = run(data, tmp_path, make_cfg(max_seconds=1e-6))  # budget spent: nothing more to train
    assert again["steps"] == 1


def test_metrics_evaluation_and_export(data, reference):
    out, metrics = reference
    for key in ("train_loss", "train_accuracy", "pairs_per_second", "steps", "heldout_accuracy"):
        assert key in metrics
    assert metrics["chance"] == 0.125 and metrics["stopped_by"] == "steps" and metrics["steps"] == 6
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0 and metrics["heldout_pairs"] > 0
    saved = torch.load(paths(out).export, weights_only=True)
    assert saved["config"]["tower"] == "small" and saved["config"]["patch"] == 16
    model = build_model(saved["config"]["tower"], saved["config"]["patch"])
    model.load_state_dict(saved["model"])  # strict: every key present and shaped right
    ckpt = load_checkpoint(paths(out).state)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in saved["model"].items())


class AlwaysLabel(torch.nn.Module):
    """Predicts one fixed label for every pair: its accuracy is that label's share of the pairs."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, patches, pairs):
        return F.one_hot(torch.full((len(pairs),), self.label), 8).float()


def test_heldout_accuracy_per_group_matches_label_shares_from_the_plans(data):
    _, heldout = tables(data)
    grouped = replace(heldout, groups=torch.tensor([0, 1, 1]).numpy(), group_names=("photo", "procedural"))
    cfg = make_cfg(heldout_images=3)
    metrics = engine.evaluate(AlwaysLabel(4), grouped, cfg, "cpu")
    hits = {0: 0, 1: 0}
    pairs = {0: 0, 1: 0}
    for plan in heldout_plans(grouped, cfg.data, cfg.seed, 3):
        for i, _, grids in plan:
            for _, _, labels in grids:
                hits[int(grouped.groups[i])] += int((labels == 4).sum())
                pairs[int(grouped.groups[i])] += len(labels)
    assert metrics["heldout_pairs"] == pairs[0] + pairs[1]
    assert metrics["heldout_accuracy_photo"] == pytest.approx(hits[0] / pairs[0])
    assert metrics["heldout_accuracy_procedural"] == pytest.approx(hits[1] / pairs[1])
    assert metrics["heldout_accuracy"] == pytest.approx((hits[0] + hits[1]) / (pairs[0] + pairs[1]))


class Recorder(torch.nn.Module):
    """Records the inputs it sees; predicts label 0."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, patches, pairs):
        self.inputs.append(patches.clone())
        return torch.zeros(len(pairs), 8)


def test_heldout_evaluation_never_downsamples(data):
    _, heldout = tables(data)
    seen = []
    for prob in (0.0, 1.0):  # with downsampling every patch would lose detail at prob 1
        model = Recorder()
        engine.evaluate(model, heldout, make_cfg(augment=PatchAugment.for_patch(24, color="drop",
                                                                                 downsample_prob=prob)), "cpu")
        seen.append(torch.cat(model.inputs))
    assert torch.equal(seen[0], seen[1])


def test_pretrain_stage_writes_metrics_weights_and_dvclive(data, tmp_path, monkeypatch):
    from ctxrepro.config import BaseParams
    from ctxrepro.stage import StageContext, StageError
    from stages import pretrain

    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "resized").symlink_to(data / "data" / "resized")
    monkeypatch.chdir(root)
    params = pretrain.Params(tower="small", patch=24, gap=12, jitter=2, input_size=16, grids_per_image=2,
                             max_patches=40, min_pixels=8000, max_pixels=20000, color="drop", optimizer="adam",
                             lr=1e-3, loss="mean", steps=4, checkpoint_every=2, log_every=2, heldout_images=3,
                             workers=0)
    pretrain.run(params, StageContext(BaseParams(seed=1), "cpu", LOG, root=root))
    metrics = json.loads((root / "metrics" / "pretrain" / "color_dropping.json").read_text())
    assert metrics["steps"] == 4 and metrics["chance"] == 0.125 and metrics["variant"] == "color_dropping"
    assert (root / "models" / "pretrain" / "color_dropping.pt").is_file()
    # one kept state, in its configuration's folder (ctxrepro.states.folders)
    assert len(list((root / "models" / "pretrain_state" / "color_dropping").glob("*/last.pt"))) == 1
    rows = (root / "dvclive" / "pretrain" / "color_dropping" / "plots" / "metrics" / "train" / "loss.tsv"
            ).read_text().splitlines()
    assert rows[0].split("\t")[:2] == ["step", "loss"] and [r.split("\t")[0] for r in rows[1:]] == ["2", "4"]
    for key in ("live_fc6", "live_fc7", "live_fc8", "wnorm_fc8"):  # the collapse monitor
        curves = root / "dvclive" / "pretrain" / "color_dropping" / "plots" / "metrics" / "train"
        rows = (curves / f"{key}.tsv").read_text().splitlines()
        assert len(rows) == 3 and 0.0 <= float(rows[1].split("\t")[1]) <= (1.0 if "live" in key else 1e3)
    # A failed run (lr 1e30: a non-finite loss or state) leaves the curves, metrics and weights as they were.
    kept = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "pretrain_state" not in p.parts}
    with pytest.raises(StageError, match="NaN|non-finite"):
        pretrain.run(replace(params, lr=1e30), StageContext(BaseParams(seed=1), "cpu", LOG, root=root))
    assert {p: p.read_bytes() for p in kept} == kept
    assert sorted(p.name for p in (root / "dvclive").iterdir()) == ["pretrain"]  # no temporary folder left


def test_first_nonfinite_names_the_key_and_ignores_integer_tensors():
    state = {"model": {"a": torch.ones(2), "steps": torch.tensor([2 ** 62])},
             "optimizer": {"state": {0: {"momentum_buffer": torch.tensor([1.0, float("inf")])}}}}
    assert first_nonfinite(state) == "optimizer.state.0.momentum_buffer"
    state["optimizer"]["state"][0]["momentum_buffer"][1] = 0.0
    assert first_nonfinite(state) is None
    state["model"]["a"][0] = float("nan")
    assert first_nonfinite([state]) == "0.model.a"
    with pytest.raises(NonFiniteState, match=r"model.a holds NaN or inf: not saved to .*x.pt"):
        atomic_torch_save(state, Path("/nonexistent/x.pt"))


def test_inf_state_after_a_finite_loss_is_not_checkpointed(data, tmp_path, monkeypatch):
    """Finding 3: the loss of step 3 is finite, but the update after it makes a buffer inf."""
    calls = {"n": 0}
    real = engine.train_step

    def overflowing(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            name, buffer = next((n, b) for n, b in model.named_buffers() if b.is_floating_point())
            buffer.fill_(float("inf"))
            calls["poisoned"] = name
        return out

    monkeypatch.setattr(engine, "train_step", overflowing)
    with pytest.raises(TrainingError, match=r"model\..* holds NaN or inf after step 3: not saved"):
        run(data, tmp_path, make_cfg(checkpoint_every=1))
    state = load_checkpoint(paths(tmp_path).state)
    assert state["step"] == 2 and first_nonfinite(state) is None
    assert calls["poisoned"] in state["model"]



def test_pretrain_variants_override_the_section_and_are_checked():
    from ctxrepro.config import ParamsError, parse_dataclass
    from stages.pretrain import Params, resolve_variant

    section = {"tower": "small", "steps": 100, "color": "drop",
               "variants": {"color_dropping": {}, "projection": {"color": "projection", "steps": 50},
                            "vgg16": {"tower": "vgg16", "width": 4, "fc_dim": 32}}}
    p = parse_dataclass(Params, {**section, "variant": "projection"}, "pretrain")
    proj = resolve_variant(p, p.variant)
    assert (proj.variant, proj.color, proj.steps, proj.tower, proj.variants) == ("projection", "projection", 50,
                                                                                 "small", {})
    vgg = resolve_variant(p, "vgg16")
    assert (vgg.tower, vgg.width, vgg.fc_dim, vgg.color, vgg.steps) == ("vgg16", 4, 32, "drop", 100)
    assert resolve_variant(p, "color_dropping") == replace(p, variant="color_dropping", variants={})
    with pytest.raises(ParamsError, match=r"section 'pretrain.variants.vgg16': unknown key 'towr'"):
        parse_dataclass(Params, {**section, "variants": {"vgg16": {"towr": "vgg16"}}, "variant": "vgg16"}, "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain.variants.vgg16.color: 'blue' is not allowed"):
        parse_dataclass(Params, {**section, "variants": {"vgg16": {"color": "blue"}}, "variant": "vgg16"}, "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain.variant 'nope' is not one of pretrain.variants"):
        parse_dataclass(Params, {**section, "variant": "nope"}, "pretrain")
    with pytest.raises(ParamsError, match=r"'variants' cannot be overridden by a variant"):
        parse_dataclass(Params, {**section, "variants": {"a": {"variants": {}}}, "variant": "a"}, "pretrain")


def test_a_narrow_vgg_export_round_trips_with_its_width(tmp_path):
    from ctxrepro.pretext.export import load_pretrained

    cfg = TrainConfig(tower="vgg16", width=4, fc_dim=32, input_size=32)
    net = build_model("vgg16", 32, 4, 32)
    engine.export_weights(tmp_path / "v.pt", net, cfg, 3)
    pre = load_pretrained(tmp_path / "v.pt")
    assert pre.model.tower.conv1_1.out_channels == 4 and pre.model.feature_dim == 32 and pre.step == 3
