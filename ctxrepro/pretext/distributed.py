"""Data-parallel training across processes: setup from the environment, spawning, synchronised BN.

The paper trained on one K40 (section 3); data parallelism must therefore behave like one device on the
global batch. Two things make it so: batch norm statistics are computed over the global batch
(SyncBatchNorm on CUDA; `GlobalBatchNorm` below on the CPU, where PyTorch's SyncBatchNorm refuses to
run), and each rank's loss is scaled so DDP's gradient average equals the single-process gradient of the
summed (or averaged) loss (`engine.loss_scale`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size and the local rank (its GPU on a node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, 0) when unset."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"distributed environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from e
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"distributed environment: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return DistInfo(rank, world, local)


def init(info: DistInfo, device: str) -> str:
    """Join the process group (gloo on the CPU, nccl on CUDA); returns this rank's device string.

    One thread per rank: torchrun's default, because more threads oversubscribe the cores (measured 4x
    slower on the 2-core machine, issue 5).
    """
    if info.world == 1:
        return device
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = f"cuda:{info.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method="env://",
                                rank=info.rank, world_size=info.world)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A port the OS reports free on 127.0.0.1: never a hard-coded rendezvous port (two runs collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    fn(*args)


def spawn(nproc: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run fn(*args) in `nproc` fresh processes that see torchrun-style variables; waits for all.

    A failure in any rank raises here (torch.multiprocessing's ProcessRaisedException).
    """
    torch.multiprocessing.start_processes(_spawned, args=(nproc, free_port(), fn, args), nprocs=nproc,
                                          join=True, start_method="spawn")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of the ranks' gradients (another all-reduce)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose batch statistics cover all ranks' inputs, differentiably (gloo or nccl).

    Two differentiable all-reduces: (sum, count), then the sum of squared deviations (two-pass, so the
    variance is as exact as a single process's). In eval mode it is plain batch norm on running stats.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected (N, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() / x.shape[1]], dtype=torch.float32)
        total = _AllReduceSum.apply(torch.cat([x.float().sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x.float() - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        self._update_running(mean.detach(), var.detach(), n.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1)  # PyTorch keeps the unbiased variance
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)


def _to_global_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm, nn.SyncBatchNorm)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new.to(next(iter(module.buffers()), torch.empty(0)).device)
    for name, child in module.named_children():
        module.add_module(name, _to_global_bn(child))
    return module


def sync_batchnorm(model: nn.Module, device: str) -> nn.Module:
    """Replace every batch norm by one with global statistics: SyncBatchNorm on CUDA, else ours.

    State-dict keys are unchanged, so checkpoints and exported weights load into the plain model.
    """
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global_bn(model)


def all_sum(values: Tensor) -> Tensor:
    """Sum a tensor over ranks (identity on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(flag: bool, device: str) -> bool:
    """True if `flag` is true on any rank (so all ranks stop together)."""
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def over_budget(max_seconds: float, log_every: int, step: int, elapsed: float, device: str, world: int) -> bool:
    """Whether the time budget is spent, agreed by all ranks so that they stop together.

    Without a budget no rank can stop early: no collective at all. With one, several ranks agree only
    every `log_every` steps (one all-reduce and host sync there, not per step), so a run may overshoot
    its budget by up to log_every - 1 steps; one process checks every step.
    """
    if max_seconds <= 0:
        return False
    if world == 1:
        return elapsed >= max_seconds
    return step % log_every == 0 and any_rank(elapsed >= max_seconds, device)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list on one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model



def barrier() -> None:
    """Wait for every rank (nothing on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
