"""DDP under autocast and the loop's collectives, on the CPU (gloo, 2 spawned processes; issue 25).

- A DDP step with global batch norm (`distributed.sync_batchnorm`; SyncBatchNorm on CUDA) under bf16 autocast:
  the forward runs in bf16 (read by forward hooks), the loss is finite, parameters and gradients stay float32,
  and both ranks end with equal parameters.
- `engine._loop` without a time budget runs no collective of its own between log steps (no per-step
  all-reduce and host sync: `distributed.any_rank` is never called); with one, the ranks agree at the log
  steps only, and the budget still stops them, together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ctxrepro.pretext import distributed as D
from ctxrepro.pretext import engine
from ctxrepro.pretext import precision as P
from ctxrepro.pretext.engine import OptimConfig
from ctxrepro.pretext.model import build_model

from test_ddp import global_batch
from test_engine import data, make_cfg, paths, tables  # noqa: F401 - data: the fixture
from test_precision import DtypeProbe

LOG = logging.getLogger("test_ddp_precision")
SUM = OptimConfig("sgd", lr=1e-3, momentum=0.9, loss="sum")  # no per-step all-reduce of the pair count


def _autocast_step(info: D.DistInfo) -> dict:
    torch.manual_seed(0)
    model = D.sync_batchnorm(build_model("small", 16), "cpu")
    probe = DtypeProbe(model)
    bn = [m for m in model.modules() if isinstance(m, D.GlobalBatchNorm)]
    bn_dtypes = []
    for m in bn:
        m.register_forward_hook(lambda mod, inp, out: bn_dtypes.append(str(out.dtype)))
    ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=SUM.lr, momentum=SUM.momentum)
    x, pairs, labels = global_batch()[info.rank]
    loss, _ = engine.train_step(ddp, optimizer, None, x, pairs, labels, make_cfg(amp="bf16", optim=SUM), "cpu",
                                info.world)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    both = D.gather_objects(params)
    return {"dtypes": sorted(str(d) for d in probe.dtypes()), "bn_layers": len(bn), "bn_dtypes": sorted(set(bn_dtypes)),
            "loss": float(loss), "float32": all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters()),
            "same_params": all(torch.equal(both[0][n], both[1][n]) for n in params)}


def _count_collectives(calls: list) -> dict:
    """Wrap the engine's collectives and its step so each collective is logged with the step it came after."""
    step = {"n": 0}
    real_step, real_sum, real_any, real_gather = engine.train_step, D.all_sum, D.any_rank, D.gather_objects

    def train_step(*args, **kwargs):
        step["n"] += 1
        return real_step(*args, **kwargs)

    def logged(kind, fn):
        def call(*args):
            calls.append((kind, step["n"]))
            return fn(*args)
        return call

    engine.train_step = train_step
    D.all_sum, D.any_rank, D.gather_objects = (logged("all_sum", real_sum), logged("any_rank", real_any),
                                               logged("gather", real_gather))
    return step


def _budget_runs(root: Path, info: D.DistInfo) -> dict:
    train_table, heldout = tables(root)
    real = engine.train_step, D.all_sum, D.any_rank, D.gather_objects
    out = {}
    for name, seconds in (("no_budget", 0.0), ("budget", 1e-9)):
        calls: list = []
        step = _count_collectives(calls)
        cfg = make_cfg(amp="bf16", optim=SUM, steps=8, log_every=4, checkpoint_every=8, max_seconds=seconds)
        try:
            metrics = engine.train(cfg, train_table.shard(info.rank, info.world), heldout,
                                   paths(root / f"{name}_out"), "cpu", info, LOG)
        finally:
            engine.train_step, D.all_sum, D.any_rank, D.gather_objects = real
        out[name] = {"calls": calls, "steps": step["n"], "metrics": metrics}
    return out


def _rank(root: str, out: str) -> None:
    P.cpu_has_native_bf16 = lambda: True  # as test_precision's native_bf16 fixture, in this process
    info = D.env_info()
    D.init(info, "cpu")
    try:
        result = {"step": _autocast_step(info)}
        result["runs"] = _budget_runs(Path(root), info)
        Path(f"{out}.{info.rank}").write_text(json.dumps(result))
    finally:
        D.shutdown()


def test_ddp_with_global_batchnorm_under_bf16_and_the_loops_collectives(data, tmp_path):
    D.spawn(2, _rank, str(data), str(tmp_path / "rank"))
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    for r in ranks:
        step = r["step"]
        assert step["dtypes"] == ["torch.bfloat16"] and step["bn_layers"] > 0 and step["bn_dtypes"] == ["torch.bfloat16"]
        assert step["float32"] and step["same_params"] and torch.isfinite(torch.tensor(step["loss"]))
        free = r["runs"]["no_budget"]
        assert free["steps"] == 8
        assert not [c for c in free["calls"] if c[0] == "any_rank"]
        assert {s for _, s in free["calls"]} == {4, 8}  # collectives at the log steps only (4, 8), none per step
        timed = r["runs"]["budget"]
        assert timed["steps"] == 4  # over budget from step 1; the ranks agree at the first log step and stop
        assert [c for c in timed["calls"] if c[0] == "any_rank"] == [["any_rank", 4]]
    assert ranks[0]["runs"]["budget"]["metrics"]["stopped_by"] == "max_seconds"
    assert ranks[0]["runs"]["budget"]["metrics"]["steps"] == 4 and ranks[1]["runs"]["budget"]["metrics"] is None
