"""GPU check (issue 16): the paper's shapes through the real training code on one GPU, as one markdown table.

Prepared without a GPU for a session that gets one (one H100/H200, 16 cores, no network): the defaults take well
under 8 minutes there. Rows (bench/README.md "GPU check" explains the columns):

- `pretrain-<decode>[-compile]`: profiles/paper.yaml's `pretrain` section (AlexNet tower, 96 px patches, gap 48,
  jitter 7, grid mode, <= 512 patches, SGD lr 1e-5 momentum 0 on the summed loss, bf16, channels_last) with
  decode worker/device and compile off/on, on synthetic ImageNet-sized JPEGs: the engine's model, optimiser
  and torch.compile (`engine._build`, `engine._wrap`), the monitor's hooks, the real DataLoader and
  `engine.train_step`, step by step as `engine._loop` runs them; `--steps` timed after `--warmup`.
- `recipe`: the first `--recipe-steps` (2,000) steps through `engine.train` itself: loss falling, fc8 alive.
- `detect-figure6`, `detect-caffenet`: `detection.train.train` with the `detect` section (600/1000 px,
  2 images x 64 RoIs) on scratch networks shaped by the `convert` section, synthetic images, random proposals.

`--dry-run`: tiny sizes, seconds on a CPU; rows that need CUDA then say "skipped (no CUDA)". Run bench/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from ctxrepro.detection.model import FastRCNN
from ctxrepro.detection.roidb import read_rgb
from ctxrepro.detection.sampling import SamplingConfig
from ctxrepro.detection.train import SolverConfig, train as detect_train
from ctxrepro.pretext import engine
from ctxrepro.pretext.data import StepBatches, finish_batch, load_table, make_loader, usable
from ctxrepro.pretext.distributed import DistInfo
from ctxrepro.pretext.engine import Prepare, TrainConfig, TrainingError, TrainPaths, train_step
from ctxrepro.pretext.model import DEFAULT_FC, DEFAULT_WIDTH, TOWERS, conv_output
from ctxrepro.pretext.monitor import Monitor
from ctxrepro.pretext.precision import describe, use_channels_last
from ctxrepro.transfer.caffenet import CaffeNetSpec, build_caffenet
from ctxrepro.transfer.convert import sample_crops, set_input_norm
from ctxrepro.transfer.trunk import TrunkSpec, build_trunk

from profile_sections import detect_configs, sections, train_config
from synthetic import detect_roidb, pretrain_tree

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("gpu_check")
# --dry-run: overrides of the profile's sections, small enough for a CPU in seconds
DRY_SECTIONS = {
    "pretrain": {"tower": "small", "width": 8, "fc_dim": 32, "patch": 48, "gap": 24, "jitter": 5, "max_patches": 64,
                 "min_pixels": 25_000, "max_pixels": 35_000, "workers": 1},
    "convert": {"conv6b": 16, "fc7": 32, "fc6": 32, "input_side": 96, "roi_pool": {"small": 3}},
    "detect": {"scale": 96, "max_size": 128, "rois_per_image": 16, "workers": 1},
}
ROWS = ("pretrain-worker", "pretrain-device", "pretrain-worker-compile", "pretrain-device-compile", "recipe",
        "detect-figure6", "detect-caffenet")
RUN_ORDER = ("pretrain-worker", "pretrain-device", "recipe", "detect-figure6", "detect-caffenet",
             "pretrain-worker-compile", "pretrain-device-compile")  # compilation last: the slowest to start
COLUMNS = ("row", "config", "status", "steps/s (detect: it/s)", "pairs/s", "data wait", "extrapolated to", "hours",
           "loss start", "loss end", "fc8 live (min)", "peak GPU MiB", "note")


@dataclass(frozen=True)
class Budget:
    """How much each row runs (command-line flags override the fields)."""

    images: int = 300  # pretrain train images; sides uniform in `sides` (ImageNet-sized)
    heldout: int = 40  # val images: the recipe's held-out evaluation
    sides: tuple[int, int] = (300, 500)
    warmup: int = 40  # > workers x prefetch (8 x 4): the timed steps never start on a queue filled while compiling
    steps: int = 200
    recipe_steps: int = 2000
    recipe_log_every: int = 100
    detect_images: int = 40
    detect_size: tuple[int, int] = (375, 500)  # VOC's usual 500x375
    proposals: int = 2000
    detect_warmup: int = 20
    detect_iters: int = 200
    minutes: float = 6.5  # a row that would start later is skipped ("skipped (time budget)"): the whole < 8 min


DRY_BUDGET = Budget(images=8, heldout=4, sides=(160, 200), warmup=1, steps=3, recipe_steps=4, recipe_log_every=2,
                    detect_images=4, detect_size=(72, 96), proposals=64, detect_warmup=1, detect_iters=2, minutes=5)


@dataclass
class Row:
    name: str
    config: str
    status: str = "ok"
    steps_s: float | None = None
    pairs_s: float | None = None
    data_wait: float | None = None
    target: int | None = None  # the steps (iterations) that `hours` extrapolates to
    loss_start: float | None = None
    loss_end: float | None = None
    live_fc8: float | None = None
    peak_mib: float | None = None
    note: str = ""

    @property
    def hours(self) -> float | None:
        return self.target / self.steps_s / 3600 if self.steps_s and self.target else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pretrain_throughput(row: Row, cfg: TrainConfig, table, device: str, budget: Budget) -> Row:
    """`budget.steps` timed steps after `budget.warmup`, as engine._loop runs them (no checkpoints, no logging)."""
    engine.configure_backend(device, cfg.amp, LOG)
    run = engine._build(cfg, device, 1)  # the engine's own model, optimiser and scaler
    model = engine._wrap(run.model, cfg, device, DistInfo())  # and its torch.compile
    monitor = Monitor(run.model)  # its hooks run in every training step
    on_cpu = device == "cpu"
    prepare = Prepare(cfg, 0, device, cfg.channels_last)
    dataset = StepBatches(table, cfg.data, cfg.seed, 0, budget.warmup + budget.steps, cfg.decode == "worker" or on_cpu,
                          prepare if on_cpu else None, cut_in_worker=on_cpu)
    loader = make_loader(dataset, 0, cfg.workers, pin_memory=not on_cpu)
    wait, pairs, start = 0.0, 0, time.perf_counter()
    for k in range(budget.warmup + budget.steps):
        if k == budget.warmup:
            sync(device)
            wait, pairs, start = 0.0, 0, time.perf_counter()
        t = time.perf_counter()
        batch = next(loader)
        wait += time.perf_counter() - t
        b = finish_batch(batch, table, cfg.data.patch, device)
        x = b["patches"] if on_cpu else prepare(b["patches"], batch["step"])
        loss, _ = train_step(model, run.optimizer, run.scaler, x, b["pairs"], b["labels"], cfg, device, 1)
        pairs += len(b["labels"])
    sync(device)
    seconds = time.perf_counter() - start
    monitor.close()
    del loader
    row.steps_s, row.pairs_s, row.data_wait = budget.steps / seconds, pairs / seconds, wait / seconds
    row.target = cfg.steps
    if not math.isfinite(float(loss)):
        row.status = f"failed: non-finite loss {float(loss)}"
    return row


def recipe(row: Row, cfg: TrainConfig, tables, device: str, budget: Budget, tmp: Path) -> Row:
    """The first steps of the paper recipe through engine.train: loss falling, fc8 alive."""
    target = cfg.steps
    cfg = replace(cfg, steps=budget.recipe_steps, log_every=budget.recipe_log_every,
                  checkpoint_every=budget.recipe_steps, max_seconds=0.0, heldout_images=budget.heldout)
    history: list[dict] = []
    paths = TrainPaths(tmp / "recipe" / "last.pt", tmp / "recipe" / "pretrain.pt")
    metrics = None
    try:
        metrics = engine.train(cfg, tables[0], tables[1], paths, device, DistInfo(), LOG, history.append)
    except TrainingError as e:  # the collapse monitor (or a non-finite loss) stopped the run
        row.status = f"stopped: {e}"
    if history:
        lives = [h["live_fc8"] for h in history]
        row.loss_start, row.loss_end, row.live_fc8 = history[0]["loss"], history[-1]["loss"], min(lives)
        falls = "falls" if row.loss_end < row.loss_start else "does NOT fall"
        alive = "above" if min(lives) >= cfg.min_live_fraction else "BELOW"
        row.note = (f"loss {falls} over {history[-1]['step']} steps; fc8 live {alive} {cfg.min_live_fraction:g} "
                    f"throughout (last {lives[-1]:.3f})")
    if metrics is not None:
        row.steps_s, row.pairs_s = metrics["steps"] / metrics["seconds"], metrics["pairs_per_second"]
        row.target = target
        row.note += (f"; held-out accuracy {metrics['heldout_accuracy']:.3f} (chance 0.125); "
                     f"steps/s include start-up, logging and the checkpoint")
    return row


def detect_model(network: str, pre: TrainConfig, convert: dict, dropout: float, box: bool, seed: int,
                 crops: torch.Tensor) -> FastRCNN:
    """A scratch Figure 6 network (as stages/convert.py shapes it) or CaffeNet, its input scaled to RMS `rms`."""
    width = pre.width or DEFAULT_WIDTH[pre.tower]
    if network == "figure6":
        kernel = conv_output(TOWERS[pre.tower](width), pre.net_size)[1]  # pool5's side at the pretext patch
        spec = TrunkSpec(pre.tower, width, pre.fc_dim or DEFAULT_FC[pre.tower], kernel, convert["conv6b"],
                         convert["fc7"], convert["classes"], convert["input_side"])
        trunk, head = build_trunk(spec, seed)
    else:
        spec = CaffeNetSpec(pre.tower, width, convert["roi_pool"][pre.tower], convert["fc6"], convert["fc7"],
                            convert["classes"], convert["input_side"])
        trunk, head = build_caffenet(spec, seed), None
    set_input_norm(trunk, crops, convert["rms"])
    return FastRCNN(trunk, head, dropout, box, seed)


class IterationClock(logging.Handler):
    """Wall-clock times of detection.train's loss lines ("iter %d/%d: ..."), one every `log_every` iterations."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("iter ") and record.args:
            self.marks[int(record.args[0])] = record.created


def detect(row: Row, model: FastRCNN, entries, solver: SolverConfig, sampling: SamplingConfig, device: str,
           budget: Budget) -> Row:
    """detection.train.train for warmup + iters iterations; it/s between the loss lines at `warmup` and the last.
    A scratch network may diverge (the loop stops at a non-finite loss): the rate then covers the lines before."""
    row.target = solver.iterations
    solver = replace(solver, iterations=budget.detect_warmup + budget.detect_iters, log_every=budget.detect_warmup)
    clock, log = IterationClock(), logging.getLogger("gpu_check.detect")
    log.addHandler(clock)
    try:
        history = detect_train(model.to(device), entries, sampling, solver, 0, device, log, None)
    except FloatingPointError as e:
        history, row.status = [], f"diverged ({e}); timed up to iteration {max(clock.marks, default=0)}"
    finally:
        log.removeHandler(clock)
    first, last = budget.detect_warmup, max(clock.marks, default=0)
    if last > first:
        row.steps_s = (last - first) / (clock.marks[last] - clock.marks[first])
    if history:
        row.loss_start, row.loss_end = history[0]["loss"], history[-1]["loss"]
    return row


def fmt(value: float | None, kind: str = "g") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:,.0f}" if kind == "int" or abs(value) >= 1000 else f"{value:.4g}"  # >= 4 significant digits


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        target = f"{r.target:,} {'iterations' if r.name.startswith('detect') else 'steps'}" if r.target else "-"
        ran = not r.status.startswith(("skipped", "not run"))
        peak = fmt(r.peak_mib, "int") if r.peak_mib is not None else ("n/a (CPU)" if ran else "-")
        cells = [r.name, r.config, r.status, fmt(r.steps_s), fmt(r.pairs_s), fmt(r.data_wait, "pct"), target,
                 fmt(r.hours), fmt(r.loss_start), fmt(r.loss_end), fmt(r.live_fc8), peak, r.note or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def measure(row: Row, device: str, fn: Callable[[Row], Row]) -> Row:
    """Run one row; an exception fails that row only (the table of a one-shot GPU session keeps the rest)."""
    cuda = device.startswith("cuda")
    torch._dynamo.reset()  # no compiled graph of an earlier row stays alive (or in this row's peak memory)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    try:
        row = fn(row)
    except Exception as e:  # noqa: BLE001 - reported in the row's status, with the traceback on stderr
        traceback.print_exc()
        row.status = f"failed: {type(e).__name__}: {e}"[:240]
    if cuda:
        row.peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20
    LOG.info("%s: %s in %.1f s", row.name, row.status, time.monotonic() - start)
    return row


def plan(sec: dict, device: str, budget: Budget, tmp: Path) -> dict[str, tuple[Row, Callable[[Row], Row] | None]]:
    """Each row with the function that measures it (None: it cannot run here)."""
    cuda = device.startswith("cuda")
    base = train_config(sec["pretrain"], sec["base"]["seed"])
    # as stages/pretrain.py resolves it: NHWC on CUDA and under CPU bf16 autocast
    base = replace(base, channels_last=use_channels_last(device, base.amp, base.channels_last))
    manifest = pretrain_tree(tmp / "resized", {"train": budget.images, "val": budget.heldout}, budget.sides)
    tables = tuple(usable(load_table(manifest, split), base.data)[0] for split in ("train", "val"))
    numerics = describe(device, base.amp) + (", channels_last" if base.channels_last else ", NCHW")
    out: dict[str, tuple[Row, Callable[[Row], Row] | None]] = {}
    for name in (n for n in ROWS if n.startswith("pretrain")):
        decode, compiled = name.split("-")[1], name.endswith("compile")
        cfg = replace(base, decode=decode, compile=compiled)
        row = Row(name, f"decode {decode}, compile {'on' if compiled else 'off'}, {numerics}")
        runnable = cuda or (decode == "worker" and not compiled)
        out[name] = (row, (lambda r, c=cfg: pretrain_throughput(r, c, tables[0], device, budget)) if runnable else None)
    row = Row("recipe", f"{budget.recipe_steps:,} steps; decode {base.decode}, compile "
              f"{'on' if base.compile else 'off'}, {numerics}")
    out["recipe"] = (row, lambda r: recipe(r, base, tables, device, budget, tmp))
    solver, sampling = detect_configs(sec["detect"])
    entries = detect_roidb(tmp / "voc", budget.detect_images, budget.detect_size, budget.proposals)
    images = [torch.from_numpy(read_rgb(e.path, e.height, e.width)).permute(2, 0, 1) for e in entries[:8]]
    crops = sample_crops(images, 2, sec["convert"]["input_side"], 0.3, torch.Generator().manual_seed(0))
    for name in (n for n in ROWS if n.startswith("detect")):
        network = name.split("-")[1]
        box = sec["detect"]["box_regression"][network]
        row = Row(name, f"{network} ({base.tower}), {solver.scale}/{solver.max_size} px, {solver.images_per_batch} "
                  f"images x {sampling.rois_per_image} RoIs, box regression {'on' if box else 'off'}, "
                  f"{describe(device, solver.amp)}")
        out[name] = (row, lambda r, n=network, b=box: detect(
            r, detect_model(n, base, sec["convert"], sec["detect"]["dropout"], b, 0, crops), entries, solver,
            sampling, device, budget))
    return out


def environment(device: str) -> str:
    try:  # the device machine gets a copy of the working tree, maybe without .git
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "no CUDA device (CPU)"
    return (f"{card}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python {sys.version.split()[0]}, "
            f"git {sha or 'unknown'}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Budget]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU-friendly, seconds")
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "paper.yaml")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (others: not run)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--json", type=Path, help="also write the rows' raw numbers here")
    for f in fields(Budget):
        if f.type in ("int", "float"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type == "int" else float,
                                help=f"default {getattr(Budget(), f.name)}, dry run {getattr(DRY_BUDGET, f.name)}")
    args = parser.parse_args(argv)
    budget = DRY_BUDGET if args.dry_run else Budget()
    changes = {f.name: getattr(args, f.name) for f in fields(Budget) if getattr(args, f.name, None) is not None}
    budget = replace(budget, **changes)
    if budget.warmup < 1 or budget.detect_warmup < 1 or min(budget.steps, budget.detect_iters, budget.recipe_steps) < 1:
        parser.error("warm-ups and step counts must be >= 1")
    return args, budget


def report(rows: dict[str, Row], sec: dict, budget: Budget, device: str, dry_run: bool, seconds: float) -> str:
    """The table (rows not measured yet say "pending") with what it ran on and what the rows share."""
    ordered = [rows.get(name, Row(name, "-", "pending")) for name in ROWS]
    pre, b = train_config(sec["pretrain"], 0), budget
    shape = (f"{pre.tower} tower, {pre.data.patch} px patches, gap {pre.data.gap}, jitter {pre.data.jitter}, "
             f"{pre.data.mode} mode, <= {pre.data.max_patches} patches, {pre.data.min_pixels:,}.."
             f"{pre.data.max_pixels:,} px per visit, {pre.optim.name} lr {pre.optim.lr:g} momentum "
             f"{pre.optim.momentum:g} loss {pre.optim.loss}, DataLoader workers {pre.workers}")
    data = (f"{b.images} synthetic JPEGs of {b.sides[0]}..{b.sides[1]} px sides; {b.warmup} warm-up + {b.steps} "
            f"timed steps per row")
    detect = (f"{b.detect_images} synthetic {b.detect_size[1]}x{b.detect_size[0]} images, {b.proposals} random "
              f"proposals each; {b.detect_warmup} warm-up + {b.detect_iters} timed iterations")
    return (f"## GPU check{' (dry run)' if dry_run else ''}\n\n{environment(device)}\n\n{markdown(ordered)}\n"
            f"Pretrain: {shape}; {data}. Detect: {detect}. Wall time of the check: {seconds:.0f} s.\n")


def main(argv: list[str] | None = None) -> str:
    args, budget = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sec = sections(args.profile, DRY_SECTIONS if args.dry_run else None)
    start = time.monotonic()
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        planned = plan(sec, device, budget, Path(tmp))
        LOG.info("synthetic data ready in %.1f s", time.monotonic() - start)
        for name in RUN_ORDER:
            row, fn = planned[name]
            if name not in args.rows:
                row.status = "not run (--rows)"
            elif fn is None:
                row.status = "skipped (no CUDA)"
            elif time.monotonic() - start > 60 * budget.minutes:
                row.status = f"skipped (time budget {budget.minutes:g} min)"
            else:
                row = measure(row, device, fn)
            rows[name] = row
            if args.out:  # after every row: a run killed at its time limit still leaves the rows it finished
                args.out.write_text(report(rows, sec, budget, device, args.dry_run, time.monotonic() - start))
    text = report(rows, sec, budget, device, args.dry_run, time.monotonic() - start)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"budget": asdict(budget), "rows": [
            {**asdict(rows[name]), "hours": rows[name].hours} for name in ROWS]}, indent=1))
    return text


if __name__ == "__main__":
    main()
