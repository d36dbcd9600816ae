"""Training the context-prediction network (section 3): steps, evaluation, the resumable loop.

One step (section 3 "Implementation Details", docs/METHOD.md): a batch of grid patches (uint8, from
`pretext.data`) is preprocessed in one batched pass (`color.preprocess`: downsampling, mean
subtraction, projection or colour dropping, RMS 50) and optionally shrunk to `input_size` (area): on
CUDA on the GPU after the transfer, on the CPU in the DataLoader workers (the same step-seeded
generator, so the same numbers, off the training process's critical path). The tower embeds every
patch once, and the pair head classifies each (first, second) pair into 8 positions with a
cross-entropy summed (released code) or averaged over pairs. The optimiser is the released solver's SGD
(lr 1e-5, momentum 0; section 3's momentum 0.999 would need lr ~1e-8 on the summed loss); Adam is an
option for tiny runs. `pretext.monitor` watches for the collapse a too-large step causes.

The loop (`train`) resumes from its checked state (kept per configuration, `states.folders`), checks
every loss for finiteness before a checkpoint can be written, stops on a step budget or a time budget,
evaluates held-out pretext accuracy and exports the weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.checkpoint import (CheckpointMismatch, capture_rng, check_config, first_nonfinite, restore_rng,
                                 write_state)
from ctxrepro.pretext import distributed as D
from ctxrepro.pretext.color import PatchAugment, preprocess
from ctxrepro.pretext.export import export_weights
from ctxrepro.pretext.data import (AUGMENT, HELDOUT, INIT, BatchSpec, ImageTable, StepBatches, finish_batch,
                                   heldout_plans, load_plan, make_loader)
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.monitor import Monitor, collapsed, summary
from ctxrepro.pretext.precision import autocast, describe, grad_scaler  # autocast: also ctxrepro.pretext.engine's
from ctxrepro.seeds import derive_seed, generator
from ctxrepro.states.folders import find_state

CHANCE = 1.0 / 8.0


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable data); the message says where and why."""


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and loss (section 3; docs/METHOD.md "Pretext task" gives the released solver's values)."""

    name: str = "sgd"  # "sgd" (paper) or "adam"
    lr: float = 1e-5  # released solver: fixed 1e-5
    momentum: float = 0.0  # released solver: none (Caffe's 0); section 3's 0.999 needs lr ~1e-8 here
    weight_decay: float = 0.0  # released solver: 0
    loss: str = "sum"  # released code: summed over pairs; "mean" averages
    clip_grad: float = 0.0  # max global gradient norm; 0 = off


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a pretraining run (the library's view of the `pretrain` params)."""

    data: BatchSpec = field(default_factory=BatchSpec)
    augment: PatchAugment = field(default_factory=PatchAugment)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tower: str = "alexnet"
    width: int | None = None  # conv1 channels; None = the tower's default (model.DEFAULT_WIDTH)
    fc_dim: int | None = None  # fc6 size; None = the tower's default (model.DEFAULT_FC)
    input_size: int = 0  # 0: the network sees patches at their sampled size
    seed: int = 0
    steps: int = 1_700_000  # docs/METHOD.md: the released README's ~1.7M iterations
    max_seconds: float = 0.0  # training-loop time budget over all resumes; 0 = none
    checkpoint_every: int = 1000
    log_every: int = 100
    min_live_fraction: float = 0.0  # stop when a watched ReLU's live share falls below it (pretext.monitor)
    amp: str = "bf16"  # "bf16", "fp16" (with a grad scaler) or "none", on any device (pretext.precision)
    channels_last: bool = True  # as given; stages/pretrain.py resolves it per device (precision.use_channels_last)
    compile: bool = False
    heldout_images: int = 500  # docs/METHOD.md: pretext accuracy on 500 VOC07 images
    workers: int = 4
    decode: str = "worker"  # "worker": DataLoader workers decode; "device": torchvision on the device

    @property
    def net_size(self) -> int:
        return self.input_size or self.data.patch

    def record(self) -> dict[str, Any]:
        """A flat, plain record (stored in checkpoints, compared on resume)."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("data", "augment", "optim")}
        return {**asdict(self.data), **asdict(self.augment), **asdict(self.optim), **flat}


@dataclass(frozen=True)
class TrainPaths:
    state: Path  # resume states: a `persist: true` folder, one per config (`states.folders`), or one .pt file
    export: Path  # final weights + the config to rebuild the model (the stage's DVC out)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer {cfg.name!r} is not one of 'sgd', 'adam'")


def prepare_inputs(patches: Tensor, cfg: TrainConfig, g: torch.Generator, channels_last: bool) -> Tensor:
    """uint8 patches -> network input: section 3.1 preprocessing, then the optional resize to input_size."""
    x = preprocess(patches, g, cfg.augment)
    if cfg.input_size and cfg.input_size != x.shape[-1]:
        # area averaging: the tiny profile's 48 px patches shrunk to 32 px (docs/METHOD.md "The tiny-world prototype")
        x = F.interpolate(x, size=(cfg.input_size, cfg.input_size), mode="area")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass(frozen=True)
class Prepare:
    """Picklable `prepare_inputs` for one rank, with the step-seeded augmentation generator.

    The generator depends only on (seed, rank, step), so preparing a batch in a DataLoader worker or on
    the training device gives the same input (CPU training does the former, CUDA the latter).
    """

    cfg: TrainConfig
    rank: int
    device: str
    channels_last: bool

    def __call__(self, patches: Tensor, step: int) -> Tensor:
        g = generator(self.cfg.seed, AUGMENT, self.rank, step, device=self.device)
        return prepare_inputs(patches, self.cfg, g, self.channels_last)


def loss_scale(reduction: str, global_pairs: int, world: int) -> float:
    """Factor on this rank's summed cross-entropy so DDP's gradient AVERAGE equals one process's gradient.

    Single process: the loss is summed (released code) or averaged over pairs. With W ranks DDP averages
    gradients, so the local sum is multiplied by W (sum) or by W / the global pair count (mean).
    """
    if reduction == "sum":
        return float(world)
    if reduction == "mean":
        return world / global_pairs
    raise ValueError(f"loss {reduction!r} is not one of 'sum', 'mean'")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, x: Tensor, pairs: Tensor,
               labels: Tensor, cfg: TrainConfig, device: str, world: int) -> tuple[Tensor, Tensor]:
    """One optimiser step; returns (summed cross-entropy, number correct) as device tensors (no sync)."""
    global_pairs = len(labels)
    if world > 1 and cfg.optim.loss == "mean":
        global_pairs = int(D.all_sum(torch.tensor([len(labels)], device=device)).item())
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.amp):
        logits = model(x, pairs)
    total = F.cross_entropy(logits.float(), labels, reduction="sum")
    loss = total * loss_scale(cfg.optim.loss, global_pairs, world)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.optim.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():
        correct = (logits.argmax(1) == labels).sum()
    return total.detach(), correct


@torch.no_grad()
def evaluate(model: nn.Module, table: ImageTable, cfg: TrainConfig, device: str) -> dict[str, float]:
    """Held-out pretext accuracy (section 4.6) on fixed, seeded images, scales and grids; no downsampling.

    Batch norm uses its running statistics (eval mode). With several image groups (the tiny world's
    kinds) each group's accuracy is reported too: real photos lag procedural scenes (docs/METHOD.md "The tiny-world prototype").
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(table.group_names), dtype=torch.float64)
    counts = torch.zeros_like(correct)
    g = generator(cfg.seed, HELDOUT, AUGMENT, device=device)
    cfg = replace(cfg, augment=replace(cfg.augment, downsample_prob=0.0))  # no random downsampling here
    for plan in heldout_plans(table, cfg.data, cfg.seed, cfg.heldout_images):
        batch = finish_batch(load_plan(table, plan, cfg.data.patch), table, cfg.data.patch, device)
        with autocast(device, cfg.amp):
            logits = model(prepare_inputs(batch["patches"], cfg, g, cfg.channels_last), batch["pairs"])
        hit = (logits.argmax(1) == batch["labels"]).double().cpu()
        group = torch.from_numpy(table.groups)[batch["images"].cpu()[batch["pair_image"].cpu()]]
        correct.index_add_(0, group, hit)
        counts.index_add_(0, group, torch.ones_like(hit))
    model.train(was_training)
    if counts.sum() == 0:
        raise TrainingError("held-out evaluation: no held-out image is large enough for a grid")
    out = {"heldout_accuracy": float(correct.sum() / counts.sum()), "heldout_pairs": int(counts.sum())}
    if len(table.group_names) > 1:
        out.update({f"heldout_accuracy_{name}": float(correct[i] / counts[i])
                    for i, name in enumerate(table.group_names) if counts[i] > 0})
    return out


@dataclass
class _Run:
    """The mutable state of a run: exactly what a checkpoint saves and a resume restores."""

    model: nn.Module  # the plain module (batch norm made global when distributed)
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    step: int = 0  # completed steps = the data sampler's position (batches are step-seeded)
    seconds: float = 0.0  # training-loop seconds of earlier invocations (the time budget spans resumes)
    pairs: int = 0  # pairs trained (all ranks), for pairs_per_second
    history: list[dict[str, float]] = field(default_factory=list)


def _build(cfg: TrainConfig, device: str, world: int) -> _Run:
    torch.manual_seed(derive_seed(cfg.seed, INIT))  # Xavier init from the one seed
    model = build_model(cfg.tower, cfg.net_size, cfg.width, cfg.fc_dim).to(device)
    if world > 1:
        model = D.sync_batchnorm(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return _Run(model, build_optimizer(model.parameters(), cfg.optim), grad_scaler(device, cfg.amp))


def _record(cfg: TrainConfig, info: D.DistInfo) -> dict[str, Any]:
    # the shards depend on the world size: resuming with another one is refused
    return {**cfg.record(), "world_size": info.world}


def _resume(run: _Run, cfg: TrainConfig, state: Path, info: D.DistInfo, log: logging.Logger) -> Path:
    """Restore the run from its checked state, if any; the path the run checkpoints to."""
    record = _record(cfg, info)
    try:  # rank 0 first: it sets a bad state aside, the others load what it left (all raise past the budget)
        found = find_state(state, record, "step", log, budget=cfg.steps) if info.is_main else None
    finally:
        D.barrier()
    path, ckpt = found or find_state(state, record, "step", log, announce=False, budget=cfg.steps)
    if ckpt is None:
        log.info("no checkpoint at %s: starting at step 0", path)
        return path
    try:
        check_config(ckpt["config"], record, path)
    except CheckpointMismatch as e:  # a single-file state of another config: overwritten by this run
        log.warning("%s: starting afresh at step 0", e)
        return path
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.scaler is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"][info.rank])
    run.step, run.seconds, run.pairs, run.history = ckpt["step"], ckpt["seconds"], ckpt["pairs"], ckpt["history"]
    log.info("resumed from %s at step %d (%.0f s trained)", path, run.step, run.seconds)
    return path


def _save(run: _Run, cfg: TrainConfig, path: Path, seconds: float, info: D.DistInfo) -> None:
    # Every rank checks (their states are equal) so that all stop together rather than wait on rank 0.
    bad = first_nonfinite({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()})
    if bad is not None:
        raise TrainingError(f"{bad} holds NaN or inf after step {run.step}: not saved, the last good checkpoint "
                            f"{path} is kept (lower the lr or enable clip_grad)")
    rngs = D.gather_objects(capture_rng())  # every rank's RNG state, in rank order
    if not info.is_main:
        return
    write_state({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else None, "rng": rngs,
                 "step": run.step, "seconds": seconds, "pairs": run.pairs, "history": run.history,
                 "sampler": {"next_step": run.step, "seed": cfg.seed}, "config": _record(cfg, info)},
                path, final=run.step >= cfg.steps)


def _wrap(model: nn.Module, cfg: TrainConfig, device: str, info: D.DistInfo) -> nn.Module:
    if info.world > 1:
        # SyncBN keeps buffers equal on all ranks, so DDP need not broadcast them every step.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.startswith("cuda") else None, forward_sync_buffers=False)
    # dynamic: the patch count changes every step; static shapes would recompile each time
    return torch.compile(model, dynamic=True) if cfg.compile else model


def _flush(run: _Run, window: list[Tensor], pairs: list[int], seconds: float, device: str) -> dict[str, float]:
    """Sum the window's per-step stats over ranks, refuse non-finite losses, append a history row."""
    counts = torch.tensor(pairs, device=device, dtype=torch.float32)[:, None]
    stats = D.all_sum(torch.cat([torch.stack(window), counts], 1))  # (steps, [loss, correct, pairs])
    stats = stats.double().cpu()
    bad = (~torch.isfinite(stats[:, 0])).nonzero()
    if len(bad):
        i = int(bad[0])
        raise TrainingError(f"non-finite loss {float(stats[i, 0])} at step {run.step - len(window) + i + 1}: "
                            f"stopping; the last good checkpoint is kept (lower the lr or enable clip_grad)")
    total = stats.sum(0)
    run.pairs += int(total[2])
    row = {"step": run.step, "loss": float(total[0] / total[2]), "accuracy": float(total[1] / total[2]),
           "pairs_per_second": float(total[2]) / max(seconds, 1e-9)}
    run.history.append(row)
    return row


def _loop(run: _Run, cfg: TrainConfig, table: ImageTable, state: Path, device: str, info: D.DistInfo,
          log: logging.Logger, on_log: Callable[[dict], None] | None) -> None:
    """Steps run.step..cfg.steps-1, or until the time budget ends; checkpoints only verified states."""
    step_model = _wrap(run.model, cfg, device, info)
    monitor = Monitor(run.model)
    prepare = Prepare(cfg, info.rank, device, cfg.channels_last)
    on_cpu = device == "cpu"  # CPU: preprocess in the workers; CUDA: on the GPU after the transfer
    dataset = StepBatches(table, cfg.data, cfg.seed, info.rank, cfg.steps, cfg.decode == "worker" or on_cpu,
                          prepare if on_cpu else None, cut_in_worker=on_cpu)  # CUDA: rescale + cut on the device
    start = window_start = time.monotonic()
    elapsed = run.seconds
    window: list[Tensor] = []
    pairs: list[int] = []
    for batch in make_loader(dataset, run.step, cfg.workers, pin_memory=device.startswith("cuda")):
        b = finish_batch(batch, table, cfg.data.patch, device)
        x = b["patches"] if on_cpu else prepare(b["patches"], batch["step"])
        loss, correct = train_step(step_model, run.optimizer, run.scaler, x, b["pairs"], b["labels"], cfg,
                                   device, info.world)
        window.append(torch.stack([loss.float(), correct.float()]))
        pairs.append(len(b["labels"]))
        run.step = batch["step"] + 1
        elapsed = run.seconds + time.monotonic() - start
        over = D.over_budget(cfg.max_seconds, cfg.log_every, run.step, elapsed, device, info.world)
        done = over or run.step >= cfg.steps
        save = done or run.step % cfg.checkpoint_every == 0
        if save or run.step % cfg.log_every == 0:
            row = _flush(run, window, pairs, time.monotonic() - window_start, device)
            window, pairs, window_start = [], [], time.monotonic()
            row.update(monitor.read(lambda v: D.all_sum(v) / info.world))
            if info.is_main:
                log.info("step %d/%d loss %.4f accuracy %.3f %.0f pairs/s; %s", row["step"], cfg.steps,
                         row["loss"], row["accuracy"], row["pairs_per_second"], summary(row))
                if on_log is not None:
                    on_log(row)
            dead = collapsed(row, cfg.min_live_fraction)  # averaged over ranks: all ranks stop together
            if dead is not None:
                raise TrainingError(f"collapse at step {run.step}: {dead}; stopping, the last good checkpoint is kept")
        if save:
            _save(run, cfg, state, elapsed, info)
        if done:
            break
    run.seconds = elapsed  # as saved in the final checkpoint, so a resumed run reports the same rate


def configure_backend(device: str, amp: str, log: logging.Logger) -> None:
    """Set the numerics flags that matter here and write them all to the log (determinism: the flags are part of the result)."""
    if device.startswith("cuda"):
        # The patch count changes every step: cuDNN autotuning would re-benchmark for each new shape.
        torch.backends.cudnn.benchmark = False
        log.info("cuDNN %s: enabled=%s benchmark=%s deterministic=%s allow_tf32=%s; matmul allow_tf32=%s",
                 torch.backends.cudnn.version(), torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                 torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
                 torch.backends.cuda.matmul.allow_tf32)
    else:
        log.info("CPU training: %d threads", torch.get_num_threads())
    log.info("precision: %s", describe(device, amp))


def train(cfg: TrainConfig, table: ImageTable, heldout: ImageTable, paths: TrainPaths, device: str,
          info: D.DistInfo, log: logging.Logger,
          on_log: Callable[[dict], None] | None = None) -> dict[str, Any] | None:
    """Train (resuming from paths.state), evaluate on `heldout`, export; metrics on rank 0, else None.

    `table` is this rank's shard of the training images; `on_log(row)` receives every history row
    (first the rows of the resumed checkpoint, so a logger can rebuild its plots from scratch).
    """
    configure_backend(device, cfg.amp, log)
    run = _build(cfg, device, info.world)
    state = _resume(run, cfg, paths.state, info, log)
    if on_log is not None and info.is_main:
        for row in run.history:
            on_log(row)
    if run.step < cfg.steps and not (cfg.max_seconds > 0 and run.seconds >= cfg.max_seconds):
        _loop(run, cfg, table, state, device, info, log, on_log)
    if not info.is_main:
        return None
    last = run.history[-1]  # never empty: the loop logs its last step, a resumed run its checkpoint's rows
    metrics = {"steps": run.step, "stopped_by": "steps" if run.step >= cfg.steps else "max_seconds",
               "seconds": round(run.seconds, 2), "pairs_per_second": run.pairs / max(run.seconds, 1e-9),
               "train_loss": last["loss"], "train_accuracy": last["accuracy"], "chance": CHANCE,
               "world_size": info.world}
    metrics.update(evaluate(run.model, heldout, cfg, device))
    export_weights(paths.export, run.model, cfg, run.step)
    return metrics
