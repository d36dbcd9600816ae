"""Fast R-CNN fine-tuning (paper section 4.3: "we fine-tune this network"; Fast R-CNN's solver, docs/DATA.md).

Each iteration takes a mini-batch from `loader` (images from a seeded shuffle of the training images and their
mirror images, scaled, with sampled RoIs; built in DataLoader workers) and takes one SGD step on the multi-task
loss. Caffe's convention: biases learn at `bias_lr_mult` times the rate, without weight decay.

The run is resumable (as `pretrain`, `ctxrepro.checkpoint`): every `checkpoint_every` iterations the model, the
optimizer, every RNG state (dropout draws from torch's), the iteration, the loss history and the run's record
are written atomically. Batches are a pure function of (seed, iteration), so a run killed at any moment and
rerun ends bit-identical to an uninterrupted one (CPU, same threads). The record holds the params and digests
of the starting weights and of the roidb: a run whose params, trunk or proposals changed starts afresh.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ctxrepro.checkpoint import digest, restore_state, save_state
from ctxrepro.detection.loader import Batch, IterationBatches, make_loader
from ctxrepro.detection.model import FastRCNN, Output, multitask_loss
from ctxrepro.detection.roidb import Entry
from ctxrepro.detection.sampling import SamplingConfig
from ctxrepro.pretext.precision import autocast, check_amp, grad_scaler
from ctxrepro.states.folders import resume_state


@dataclass(frozen=True)
class SolverConfig:
    """Fast R-CNN's VOC 2007 solver (docs/DATA.md "Fast R-CNN defaults"): 40k iterations of 2 images, lr 0.001 x0.1 at 30k,
    momentum 0.9, weight decay 5e-4, flips, shorter side 600 capped at 1000."""

    iterations: int = 40000
    images_per_batch: int = 2
    optimizer: str = "sgd"
    lr: float = 0.001
    lr_step: int = 30000
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0
    flip: bool = True
    scale: int = 600
    max_size: int = 1000
    log_every: int = 20
    checkpoint_every: int = 1000  # iterations between resumable checkpoints
    workers: int = 4  # DataLoader processes building batches (0: the training process)
    amp: str = "none"  # autocast of the forward (ctxrepro.pretext.precision): "bf16", "fp16" or "none"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"SolverConfig.optimizer={self.optimizer!r}: 'sgd' or 'adam'")
        check_amp(self.amp)


def build_optimizer(model: FastRCNN, solver: SolverConfig) -> torch.optim.Optimizer:
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    groups = [{"params": weights, "lr": solver.lr, "weight_decay": solver.weight_decay},
              {"params": biases, "lr": solver.lr * solver.bias_lr_mult, "weight_decay": 0.0}]
    if solver.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=solver.momentum)


def lr_at(solver: SolverConfig, iteration: int) -> float:
    """Caffe's "step" policy: lr * gamma ^ floor(iteration / lr_step)."""
    return solver.lr * solver.gamma ** (iteration // solver.lr_step)


def set_lr(opt: torch.optim.Optimizer, solver: SolverConfig, iteration: int) -> float:
    lr = lr_at(solver, iteration)
    for group, mult in zip(opt.param_groups, (1.0, solver.bias_lr_mult)):
        group["lr"] = lr * mult
    return lr




@dataclass
class _Run:
    """What a checkpoint saves besides the model and optimizer."""

    iteration: int = 0  # completed iterations = the next batch's index
    history: list[dict] = field(default_factory=list)
    window: list[list[float]] = field(default_factory=list)  # (loss, cls, box, fg) since the last history row


def run_record(model: FastRCNN, entries: Sequence[Entry], sampling: SamplingConfig, solver: SolverConfig,
               seed: int) -> dict[str, Any]:
    """The identity of a run (stored in its checkpoints, compared on resume): params, starting weights, roidb."""
    roidb = [np.array([e.image_id for e in entries]), np.array([(e.height, e.width) for e in entries])]
    roidb += [a for e in entries for a in (e.gt_boxes, e.gt_classes, e.proposals)]
    return {**asdict(solver), **asdict(sampling), "seed": seed, "dropout": model.drop7.p,
            "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
            "start_weights": digest(model.state_dict().values()), "roidb": digest(roidb)}


def _step(model: FastRCNN, opt: torch.optim.Optimizer, batch: Batch, solver: SolverConfig,
          scaler: torch.amp.GradScaler | None = None) -> list[float] | None:
    """One SGD step on the multi-task loss; (loss, cls, box, foreground share), or None for a batch without RoIs.

    The forward runs under `solver.amp` autocast; the loss is taken in float32 (parameters and gradients stay
    float32); fp16 scales the loss (`scaler`) so that small gradients survive."""
    lr = set_lr(opt, solver, batch.iteration)
    if not batch.images:
        return None
    device = batch.images[0].device
    with autocast(device, solver.amp):
        out = model(batch.images, batch.rois)
    out = Output(out.scores.float(), out.deltas.float() if out.deltas is not None else None)
    cls, box = multitask_loss(out, batch.labels, batch.targets)
    loss = cls + box
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"detect: loss {loss.item()} at iteration {batch.iteration} (lr {lr:g}): "
                                 f"lower detect.lr")
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return [loss.item(), cls.item(), box.item(), (batch.labels > 0).float().mean().item()]


def _flush(run: _Run, solver: SolverConfig, log: logging.Logger) -> None:
    mean = np.mean(run.window, axis=0)
    lr = lr_at(solver, run.iteration - 1)
    run.history.append({"iteration": run.iteration, "loss": float(mean[0]), "loss_cls": float(mean[1]),
                        "loss_box": float(mean[2]), "fg_fraction": float(mean[3]), "lr": lr})
    log.info("iter %d/%d: loss %.4f (cls %.4f, box %.4f), fg %.2f, lr %g", run.iteration, solver.iterations,
             *mean, lr)
    run.window = []


def train(model: FastRCNN, entries: Sequence[Entry], sampling: SamplingConfig, solver: SolverConfig, seed: int,
          device: str | torch.device, log: logging.Logger, state: Path | None = None) -> list[dict]:
    """Fine-tune `model` in place, resuming from and checkpointing to `state` (None: neither; a folder keeps one
    state per configuration, `states.folders.resume_state`); returns the loss history, one row per `log_every`
    iterations (mean over them)."""
    if not entries:
        raise ValueError("train: no training images")
    torch.manual_seed(seed)  # dropout draws from the global generator
    opt = build_optimizer(model, solver)
    run = _Run()
    record = run_record(model, entries, sampling, solver, seed)
    ckpt = None
    if state is not None:
        state, ckpt = resume_state(state, record, "iteration", solver.iterations, log)
    if ckpt is not None:
        restore_state(ckpt, model, opt)
        run = _Run(ckpt["iteration"], ckpt["history"], ckpt["window"])
    model.train()
    dataset = IterationBatches(entries, sampling, solver.images_per_batch, solver.flip, solver.scale,
                               solver.max_size, seed, solver.iterations)
    scaler = grad_scaler(device, solver.amp)  # fp16 only; its state is rebuilt on resume (a few iterations)
    for batch in make_loader(dataset, run.iteration, solver.workers):
        stats = _step(model, opt, batch.to(device), solver, scaler)
        if stats is not None:
            run.window.append(stats)
        run.iteration = batch.iteration + 1
        last = run.iteration == solver.iterations
        if (run.iteration % solver.log_every == 0 or last) and run.window:
            _flush(run, solver, log)
        if state is not None and (run.iteration % solver.checkpoint_every == 0 or last):
            save_state(state, model, opt, f"detect iteration {run.iteration}", final=last, config=record,
                       **asdict(run))
    return run.history
