"""R-CNN fine-tuning on warped windows (section 4.3 "according to the procedure described in [21]").

R-CNN's pascal_finetune_solver.prototxt and train prototxt: SGD, lr 0.001 times 0.1 every 20k iterations,
momentum 0.9, weight decay 5e-4 on weights (none on biases), biases at 2x the rate, the new fc8 at 10x
(fc8_pascal: blobs_lr 10 / 20); the released VOC 2007 model stopped at 70k iterations (README). The loss is
softmax cross-entropy over the 21 classes of each window.

Resumable like Fast R-CNN's `train`: every `checkpoint_every` iterations the model, optimizer, RNG states,
iteration and loss history are saved (`ctxrepro.checkpoint.save_state`) with a record of the params and
starting weights; batches are a pure function of (seed, iteration), so a resumed run matches an uninterrupted one.

The forward runs under `amp` autocast (ctxrepro.pretext.precision), as Fast R-CNN's training does: the loss is
taken in float32 and parameters, gradients and momentum stay float32; fp16 scales the loss. `amp` is part of the
checkpoint's record, so another precision is another configuration (its own state folder).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctxrepro.checkpoint import digest, restore_state, save_state
from ctxrepro.states.folders import resume_state
from ctxrepro.detection.rcnn.net import WindowNet
from ctxrepro.detection.rcnn.windows import WindowBatches, WindowConfig, window_loader
from ctxrepro.detection.roidb import Entry
from ctxrepro.pretext.precision import autocast, check_amp, grad_scaler


@dataclass(frozen=True)
class FinetuneConfig:
    iterations: int = 70000
    lr: float = 0.001
    lr_step: int = 20000
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0
    fc8_lr_mult: float = 10.0
    log_every: int = 20
    checkpoint_every: int = 1000
    workers: int = 4
    amp: str = "none"  # autocast of the forward: "bf16", "fp16" (with a gradient scaler) or "none" (float32)

    def __post_init__(self) -> None:
        check_amp(self.amp)


def build_optimizer(net: WindowNet, cfg: FinetuneConfig) -> torch.optim.SGD:
    """Four groups, each with its rate multiplier `mult`: weights, biases, fc8's weight, fc8's bias."""
    fc8 = {id(net.fc8.weight): 2, id(net.fc8.bias): 3}
    params: list[list] = [[], [], [], []]
    for name, p in net.named_parameters():
        if p.requires_grad:
            params[fc8.get(id(p), 1 if name.endswith("bias") else 0)].append(p)
    mults = (1.0, cfg.bias_lr_mult, cfg.fc8_lr_mult, cfg.fc8_lr_mult * cfg.bias_lr_mult)
    groups = [{"params": ps, "mult": m, "lr": cfg.lr * m, "weight_decay": 0.0 if i % 2 else cfg.weight_decay}
              for i, (ps, m) in enumerate(zip(params, mults)) if ps]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: FinetuneConfig, iteration: int) -> float:
    """Caffe's "step" policy."""
    return cfg.lr * cfg.gamma ** (iteration // cfg.lr_step)


def _step(net: WindowNet, opt: torch.optim.SGD, windows: torch.Tensor, labels: torch.Tensor, lr: float,
          iteration: int, amp: str = "none", scaler: torch.amp.GradScaler | None = None) -> float:
    """One SGD step: the forward under `amp` autocast, the loss in float32, fp16's loss scaled by `scaler`."""
    for group in opt.param_groups:
        group["lr"] = lr * group["mult"]
    with autocast(windows.device, amp):
        logits = net(windows)
    loss = F.cross_entropy(logits.float(), labels)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"detect (R-CNN fine-tuning): loss {loss.item()} at iteration {iteration} "
                                 f"(lr {lr:g}): lower detect.rcnn.lr")
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.item()


def finetune(net: WindowNet, entries: Sequence[Entry], windows: WindowConfig, cfg: FinetuneConfig, seed: int,
             device: str | torch.device, log: logging.Logger, state: Path | None = None) -> list[dict]:
    """Fine-tune `net` in place (resuming from / checkpointing to `state`); returns the loss history, one row
    per `log_every` iterations (their mean)."""
    torch.manual_seed(seed)  # dropout's stream
    opt = build_optimizer(net, cfg)
    record = {**asdict(cfg), **asdict(windows), "side": net.side, "seed": seed, "start_weights": digest(net.state_dict().values()),
              "roidb": digest([a for e in entries for a in (e.gt_boxes, e.gt_classes, e.proposals)])}
    record.pop("workers")
    iteration, history, window = 0, [], []
    ckpt = None
    if state is not None:  # a folder: one state per configuration (states.folders.resume_state)
        state, ckpt = resume_state(state, record, "iteration", cfg.iterations, log)
    if ckpt is not None:
        restore_state(ckpt, net, opt)
        iteration, history, window = ckpt["iteration"], ckpt["history"], ckpt["window"]
    net.train()
    dataset = WindowBatches(entries, windows, net.side, net.fill, seed, cfg.iterations)
    log.info("R-CNN fine-tuning: %d foreground and %d background windows, %d iterations of %d", len(dataset.pool.fg_image),
             len(dataset.pool.bg_image), cfg.iterations, windows.batch)
    scaler = grad_scaler(device, cfg.amp)  # fp16 only; its state is rebuilt on resume (a few iterations)
    for batch, labels in window_loader(dataset, iteration, cfg.workers):
        lr = lr_at(cfg, iteration)
        window.append(_step(net, opt, batch.to(device), labels.to(device), lr, iteration, cfg.amp, scaler))
        iteration += 1
        last = iteration == cfg.iterations
        if iteration % cfg.log_every == 0 or last:
            history.append({"iteration": iteration, "loss": float(np.mean(window)), "lr": lr})
            log.info("R-CNN iter %d/%d: loss %.4f, lr %g", iteration, cfg.iterations, history[-1]["loss"], lr)
            window = []
        if state is not None and (iteration % cfg.checkpoint_every == 0 or last):
            save_state(state, net, opt, f"detect R-CNN iteration {iteration}", final=last, config=record,
                       iteration=iteration, history=history, window=window)
    return history
