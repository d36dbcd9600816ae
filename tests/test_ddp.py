"""Distributed training on the CPU (gloo, 2 processes): gradients equal one process on the global batch.

With batch norm synchronised over ranks (ctxrepro.pretext.distributed.GlobalBatchNorm) and the loss scaled by
engine.loss_scale, DDP's averaged gradient is the single-process gradient of the global batch; with
per-rank batch norm it is not (the control that shows the comparison can fail).
"""

import json
import logging
from dataclasses import replace

import pytest
import torch
from test_engine import make_cfg
from torch import nn

from ctxrepro.pretext import distributed as D
from ctxrepro.pretext.engine import OptimConfig, train_step
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.sampling import grid_pairs

VARIANTS = [(loss, sync) for loss in ("sum", "mean") for sync in (True, False)]


def global_batch():
    """Two unequal halves (10 and 14 patches), each with its own grid's pairs."""
    g = torch.Generator().manual_seed(0)
    halves = []
    for rows, cols in ((2, 5), (2, 7)):
        pairs, labels = grid_pairs(rows, cols)
        halves.append((torch.randn(rows * cols, 3, 16, 16, generator=g) * 50, pairs, labels))
    return halves


# The paper profile's recipe (the released solver): the summed loss, lr 1e-5, no momentum.
PAPER = OptimConfig("sgd", lr=1e-5, momentum=0.0, loss="sum")


def one_step(model: nn.Module, batch, loss: str, world: int, optim: OptimConfig | None = None):
    x, pairs, labels = batch
    optim = optim or OptimConfig("sgd", lr=0.01, momentum=0.9, loss=loss)
    cfg = make_cfg(optim=optim, amp="none")  # float32: the comparisons below are to float32 rounding
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum)
    plain = D.unwrap(model)
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    train_step(model, optimizer, None, x, pairs, labels, cfg, "cpu", world)
    return {"grad": {n: p.grad.clone() for n, p in plain.named_parameters()},
            "step": {n: p.detach() - before[n] for n, p in plain.named_parameters()},
            "state": {k: v.clone() for k, v in plain.state_dict().items()}}


def _rank(out: str) -> None:
    info = D.env_info()
    D.init(info, "cpu")
    try:
        results = {}
        for loss, sync in VARIANTS:
            torch.manual_seed(0)
            model = build_model("small", 16)
            if sync:
                model = D.sync_batchnorm(model, "cpu")
            ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
            results[f"{loss}-{sync}"] = one_step(ddp, global_batch()[info.rank], loss, info.world)
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(D.sync_batchnorm(build_model("small", 16), "cpu"),
                                                  forward_sync_buffers=False)
        results["paper"] = one_step(ddp, global_batch()[info.rank], "sum", info.world, PAPER)
        if info.is_main:
            torch.save(results, out)
    finally:
        D.shutdown()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    D.spawn(2, _rank, str(out))
    return torch.load(out, weights_only=True)


def single_process(loss: str, optim: OptimConfig | None = None):
    (x1, p1, l1), (x2, p2, l2) = global_batch()
    batch = (torch.cat([x1, x2]), torch.cat([p1, p2 + len(x1)]), torch.cat([l1, l2]))
    torch.manual_seed(0)
    return one_step(build_model("small", 16), batch, loss, 1, optim)


def test_paper_recipe_takes_the_same_step_per_pair_on_two_ranks_as_on_one(ddp_results):
    """Summed loss, lr 1e-5, momentum 0: each rank's sum is scaled by W (engine.loss_scale) and DDP averages,
    so two ranks holding halves of a global batch step exactly as one process on all of it, not W times more."""
    ref, got = single_process("sum", PAPER), ddp_results["paper"]
    scale = max(float(g.abs().max()) for g in ref["grad"].values())
    for name, grad in ref["grad"].items():  # the step is -lr x this gradient on both
        assert torch.allclose(got["grad"][name], grad, rtol=1e-4, atol=1e-6 * scale), name
    # the applied step is lr x the SUMMED gradient (SGD, momentum 0), up to float32 rounding of the weights
    for run in (ref, got):
        w = run["state"]["head.fc9.weight"]
        assert torch.allclose(run["step"]["head.fc9.weight"], -1e-5 * run["grad"]["head.fc9.weight"],
                              rtol=1e-3, atol=4e-8 * float(w.abs().max()))


@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_ddp_gradients_and_bn_stats_match_one_process_with_sync_bn(ddp_results, loss):
    ref = single_process(loss)
    got = ddp_results[f"{loss}-True"]
    scale = max(float(g.abs().max()) for g in ref["grad"].values())
    for name, grad in ref["grad"].items():
        # absolute floor from the largest gradient: biases before a BN have a true gradient of 0 (float noise)
        assert torch.allclose(got["grad"][name], grad, rtol=1e-4, atol=1e-6 * scale), name
    for key, value in ref["state"].items():  # weights after the step and BN running statistics
        assert torch.allclose(got["state"][key].double(), value.double(), rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_without_sync_bn_the_gradients_differ(ddp_results, loss):
    ref = single_process(loss)
    got = ddp_results[f"{loss}-False"]
    worst = max(float((got["grad"][n] - g).abs().max() / g.abs().max()) for n, g in ref["grad"].items())
    assert worst > 1e-2


def test_global_batchnorm_is_plain_batchnorm_on_one_process():
    bn = nn.BatchNorm2d(4, affine=False)
    converted = D.sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, affine=False)), "cpu")[0]
    assert isinstance(converted, D.GlobalBatchNorm)
    x = torch.randn(6, 4, 5, 5)
    assert torch.allclose(converted(x), bn(x), atol=1e-6)
    assert set(converted.state_dict()) == set(bn.state_dict())


def test_free_port_is_bindable_and_not_fixed():
    import socket

    ports = {D.free_port() for _ in range(3)}
    assert all(1024 <= p < 65536 for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_env_info_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.env_info() == D.DistInfo(rank=2, world=4, local_rank=0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        D.env_info()


@pytest.mark.slow
def test_pretrain_stage_with_two_spawned_ranks(tmp_path, monkeypatch, caplog):
    from test_pretext_data import write_dataset

    from ctxrepro.config import BaseParams
    from ctxrepro.stage import StageContext
    from stages import pretrain

    write_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = pretrain.Params(tower="small", patch=24, gap=12, jitter=2, input_size=16, grids_per_image=2,
                             max_patches=40, min_pixels=8000, max_pixels=20000, color="drop", optimizer="adam",
                             lr=1e-3, loss="mean", steps=3,
                             checkpoint_every=2, log_every=1, heldout_images=2, workers=0, nproc=2)
    log = logging.getLogger("test_ddp")
    pretrain.run(params, StageContext(BaseParams(seed=0), "cpu", log, root=tmp_path))
    metrics = json.loads((tmp_path / "metrics" / "pretrain" / "color_dropping.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    folder = tmp_path / "models" / "pretrain_state" / "color_dropping"
    [two] = folder.glob("*/last.pt")
    state = torch.load(two, weights_only=True)
    assert len(state["rng"]) == 2 and state["config"]["world_size"] == 2
    # The shards depend on the world size: one process does not resume the 2-rank state, it starts afresh in
    # its own configuration's folder and leaves the 2-rank state as it was.
    kept = two.read_bytes()
    with caplog.at_level(logging.INFO):
        pretrain.run(replace(params, nproc=1, steps=4), StageContext(BaseParams(seed=0), "cpu", log, root=tmp_path))
    assert "differs in world_size: 2 -> 1" in caplog.text and "starting at step 0" in caplog.text
    [one] = set(folder.glob("*/last.pt")) - {two}
    state = torch.load(one, weights_only=True)
    assert len(state["rng"]) == 1 and state["config"]["world_size"] == 1 and state["step"] == 4
    assert two.read_bytes() == kept
