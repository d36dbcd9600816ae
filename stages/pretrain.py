"""Pretrain the context-prediction network on resized images (section 3, Figure 3): resumable, data-parallel."""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from ctxrepro.checkpoint import CheckpointMismatch
from ctxrepro.config import BaseParams, ParamsError, param, parse_dataclass, to_plain
from ctxrepro.io import atomic_write_json, remove_stale_temps
from ctxrepro.pretext import distributed as D
from ctxrepro.pretext.color import COLOR_MODES, PatchAugment
from ctxrepro.pretext.data import BatchSpec, ImageTable, load_kinds, load_table, usable
from ctxrepro.pretext.engine import OptimConfig, TrainConfig, TrainingError, TrainPaths, train
from ctxrepro.pretext.precision import AMP_CHOICES, use_channels_last
from ctxrepro.pretext.sampling import MODES
from ctxrepro.stage import StageContext, StageError

MANIFEST = Path("data/resized/manifest.csv")
WORLD_INDEX = Path("data/raw/world_index.json")
# One of each per variant (dvc.yaml's foreach over pretrain.variants): <dir>/<variant>.pt, .json, /
STATE = Path("models/pretrain_state")  # <variant>/<config hash>/last.pt (ctxrepro.states.folders)
EXPORT = Path("models/pretrain")  # <variant>.pt
METRICS = Path("metrics/pretrain")  # <variant>.json
LIVE_DIR = Path("dvclive/pretrain")  # <variant>/


@dataclass(frozen=True)
class Params:
    variant: str = param("color_dropping", help="the variant this run trains: a key of `variants`")
    variants: dict[str, dict[str, Any]] = param(
        {"color_dropping": {}}, help="variant name -> overrides of this section (the paper trained several)")
    tower: str = param("alexnet", choices=("alexnet", "small", "vgg16"), help="per-patch tower (Figure 3)")
    width: int = param(0, min=0, help="conv1 channels, the tower's others in proportion; 0 = the tower's own")
    fc_dim: int = param(0, min=0, help="fc6 size; 0 = the tower's own (4096, small: 256)")
    patch: int = param(96, min=8, help="patch side in px (section 3: 96)")
    gap: int = param(48, min=0, help="gap between grid patches in px (section 3: 48)")
    jitter: int = param(7, min=0, help="per-patch jitter in px per axis (section 3: 7)")
    yoked: bool = param(False, help="one jitter offset per grid (Mundhenk et al. 2018; paper: off)")
    grid_mode: str = param("grid", choices=MODES, help="grid = paper; center8 = MMSelfSup's 3x3 layout")
    input_size: int = param(0, min=0, help="resize patches (area) to this side before the net; 0 = patch")
    grids_per_image: int = param(4, min=1, help="grids sampled per image (released code: 4)")
    min_pixels: int = param(150_000, min=0, help="pixel count drawn per visit from [min, max] (section 3: 150K)")
    max_pixels: int = param(450_000, min=0, help="(section 3: 450K); min = max = 0 visits the stored size")
    max_patches: int = param(512, min=4, help="patches per batch at most (released code: 512)")
    color: str = param("projection", choices=COLOR_MODES, help="section 3.1 colour handling")
    downsample_prob: float = param(0.33, min=0.0, max=1.0, help="random downsampling probability (0.33)")
    optimizer: str = param("sgd", choices=("sgd", "adam"), help="sgd = paper")
    lr: float = param(1e-5, min=0.0, help="learning rate (released solver: 1e-5)")
    momentum: float = param(0.0, min=0.0, max=0.9999, help="SGD momentum (released solver: 0)")
    weight_decay: float = param(0.0, min=0.0, help="weight decay (released solver: 0)")
    loss: str = param("sum", choices=("sum", "mean"), help="cross-entropy over pairs (released: sum)")
    clip_grad: float = param(0.0, min=0.0, help="max gradient norm; 0 = off")
    steps: int = param(1_700_000, min=1, help="training steps (released README: ~1.7M)")
    max_seconds: float = param(0.0, min=0.0, help="training time budget over all resumes; 0 = none")
    checkpoint_every: int = param(1000, min=1, help="steps between checkpoints")
    log_every: int = param(100, min=1, help="steps between log rows (dvclive, console)")
    min_live_fraction: float = param(0.05, min=0.0, max=1.0,
                                     help="stop when fc6/fc7/fc8 live ReLU share falls below; 0 = off")
    nproc: int = param(1, min=1, max=64, help="processes to spawn (ignored under torchrun)")
    amp: str = param("bf16", choices=AMP_CHOICES, help="autocast dtype (CUDA, or a CPU with native bf16); none = float32")
    channels_last: bool = param(True, help="channels_last memory format on CUDA and under CPU bf16 autocast")
    compile: bool = param(False, help="torch.compile the network")
    heldout_images: int = param(500, min=1, help="val images for held-out pretext accuracy")
    workers: int = param(4, min=0, max=64, help="DataLoader processes per rank (decode; on CPU also preprocess)")
    decode: str = param("worker", choices=("worker", "device"), help="device = torchvision's GPU decoder (CUDA only)")

    def __post_init__(self) -> None:
        if self.variants and self.variant not in self.variants:
            raise ValueError(f"pretrain.variant {self.variant!r} is not one of pretrain.variants: "
                             f"{', '.join(self.variants)}")
        for name in self.variants:
            resolve_variant(self, name)


def resolve_variant(p: Params, name: str) -> Params:
    """The section with variant `name`'s overrides applied (checked like the section itself)."""
    overrides = p.variants.get(name)
    if not isinstance(overrides, dict):
        raise ParamsError(f"pretrain.variants.{name}: expected a mapping of overrides, got {overrides!r}")
    nested = sorted({"variant", "variants"} & set(overrides))
    if nested:
        raise ParamsError(f"pretrain.variants.{name}: '{nested[0]}' cannot be overridden by a variant")
    plain = {**to_plain(p), **overrides, "variant": name, "variants": {}}
    return parse_dataclass(Params, plain, f"pretrain.variants.{name}")


def train_config(p: Params, seed: int) -> TrainConfig:
    """The library's configuration from the params section (read once, at the edge)."""
    return TrainConfig(
        data=BatchSpec(p.patch, p.gap, p.jitter, p.grids_per_image, p.max_patches, p.yoked, p.grid_mode,
                       p.min_pixels, p.max_pixels),
        augment=PatchAugment.for_patch(p.patch, color=p.color, downsample_prob=p.downsample_prob),
        optim=OptimConfig(p.optimizer, p.lr, p.momentum, p.weight_decay, p.loss, p.clip_grad),
        tower=p.tower, width=p.width or None, fc_dim=p.fc_dim or None, input_size=p.input_size, seed=seed,
        steps=p.steps, max_seconds=p.max_seconds,
        checkpoint_every=p.checkpoint_every, log_every=p.log_every, amp=p.amp, channels_last=p.channels_last,
        min_live_fraction=p.min_live_fraction, compile=p.compile, heldout_images=p.heldout_images, workers=p.workers,
        decode=p.decode)


def state_records(p: Params, base: BaseParams) -> dict[str, dict[str, Any]]:
    """`pretrain/<variant>` -> the record its resume state is kept under (`ctxrepro states`; the world size is
    `nproc`, as without torchrun)."""
    return {f"pretrain/{name}": {**train_config(resolve_variant(p, name), base.seed).record(),
                                 "world_size": p.nproc} for name in p.variants}


def load_tables(root: Path, spec: BatchSpec, log: logging.Logger) -> tuple[ImageTable, ImageTable]:
    """Train and val images large enough for a grid; the world index, when present, gives their kinds."""
    index = root / WORLD_INDEX
    kinds = load_kinds(index) if index.is_file() else None
    tables = []
    for split in ("train", "val"):
        table, small = usable(load_table(root / MANIFEST, split, kinds), spec)
        if small:
            log.warning("%s: skipped %d %s images too small for a 2x2 grid of %d px patches at %d pixels",
                        root / MANIFEST, small, split, spec.patch, spec.min_pixels)
        if len(table) == 0:
            raise ValueError(f"{root / MANIFEST}: no {split} image holds a grid of {spec.patch} px patches")
        tables.append(table)
    return tables[0], tables[1]


@contextlib.contextmanager
def live_logger(live_dir: Path) -> Iterator[Callable[[dict], None]]:
    """A dvclive logger writing straight into `live_dir`, so `dvc plots show` follows the run as it goes.

    dvclive's Live() clears its folder when it starts, so it starts at the run's first row: a run that
    fails before it logs anything (a bad param, a non-finite first loss) leaves the last run's curves as
    they were. A resumed run first replays its checkpoint's history, so the curves continue, not restart.
    A killed run leaves its curves up to its last logged step.
    """
    from dvclive import Live

    remove_stale_temps(live_dir.parent, live_dir.name)  # what earlier code's killed runs left beside it
    live = None

    def on_log(row: dict) -> None:
        nonlocal live
        if live is None:
            live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
        live.step = row["step"]
        for key, value in row.items():  # loss, accuracy, pairs/s and the collapse monitor's live_*, wnorm_*
            if key != "step":
                live.log_metric(f"train/{key}", value)
        live.next_step()

    yield on_log
    if live is not None:
        live.end()


def _train_process(p: Params, seed: int, device: str, root: Path) -> None:
    """One rank's work (also the whole job on one process)."""
    info = D.env_info()
    if not logging.getLogger().handlers:  # a spawned rank starts without the CLI's logging setup
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s rank {info.rank} %(name)s: %(message)s")
    log = logging.getLogger("ctxrepro.stage.pretrain")
    cfg = train_config(p, seed)
    try:
        train_table, heldout = load_tables(root, cfg.data, log)
    except (OSError, ValueError) as e:  # a missing or malformed manifest / world index: say which
        raise StageError(str(e)) from e
    device = D.init(info, device)
    cfg = replace(cfg, channels_last=use_channels_last(device, cfg.amp, cfg.channels_last))
    try:
        paths = TrainPaths(root / STATE / p.variant, root / EXPORT / f"{p.variant}.pt")
        with live_logger(root / LIVE_DIR / p.variant) if info.is_main else contextlib.nullcontext() as on_log:
            metrics = train(cfg, train_table.shard(info.rank, info.world), heldout, paths, device, info, log, on_log)
        if metrics is not None:
            atomic_write_json(root / METRICS / f"{p.variant}.json", {"variant": p.variant, **metrics})
            log.info("held-out pretext accuracy %.3f (chance %.3f) after %d steps",
                     metrics["heldout_accuracy"], metrics["chance"], metrics["steps"])
    except (TrainingError, CheckpointMismatch) as e:
        raise StageError(str(e)) from e
    finally:
        D.shutdown()


def run(params: Params, ctx: StageContext) -> None:
    """One process, `nproc` spawned ranks, or this rank of a torchrun job (detected from RANK/WORLD_SIZE)."""
    if params.variants:
        ctx.log.info("variant %s: overrides %s", params.variant, params.variants[params.variant])
        params = resolve_variant(params, params.variant)
    env = D.env_info()
    if params.nproc > 1 and env.world == 1:
        ctx.log.info("spawning %d ranks (%s)", params.nproc, ctx.device)
        try:
            D.spawn(params.nproc, _train_process, params, ctx.base.seed, ctx.device, ctx.root)
        except (ProcessRaisedException, ProcessExitedException) as e:  # carries the rank's traceback
            raise StageError(f"a pretrain rank failed: {e}") from e
        return
    if env.world > 1 and params.nproc not in (1, env.world):
        ctx.log.warning("torchrun gave WORLD_SIZE=%d; pretrain.nproc=%d is ignored", env.world, params.nproc)
    _train_process(params, ctx.base.seed, ctx.device, ctx.root)
