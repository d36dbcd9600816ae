"""Store ImageNet once at a canonical size (<= 450K pixels, never enlarged; pretrain draws 150K..450K at every
visit, section 3), aspect kept, 4:4:4 JPEG, junk counted; resumable, shardable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctxrepro.config import param
from ctxrepro.data.resize import ResizeConfig
from ctxrepro.data.resize_run import ResizeError, run_shard
from ctxrepro.io import atomic_write_json
from ctxrepro.stage import StageContext, StageError

RAW = Path("data/raw")
OUT = Path("data/resized")
METRICS = Path("metrics/resize.json")
SHARDS = True  # `ctxrepro stage resize --shard i/n`: the only stage that splits its work across machines


@dataclass(frozen=True)
class Params:
    workers: int = param(4, min=1, max=256, help="worker processes (one image stream each)")
    min_pixels: int = param(150_000, min=1, help="smallest visit's pixels, for the too-small rule (section 3: 150K)")
    max_pixels: int = param(450_000, min=2, help="most pixels of a stored image (section 3: 450K)")
    quality: int = param(95, min=1, max=100, help="JPEG quality, 4:4:4 chroma (not in the paper)")
    patch: int = param(96, min=1, help="patch side; with gap, sets the too-small rule (section 3: 96)")
    gap: int = param(48, min=0, help="gap between patches; short side >= 2*patch+gap (section 3: 48)")
    max_upscale: float = param(0.0, min=0.0, help="skip images needing a larger enlargement (0: no limit, as released)")
    splits: tuple[str, ...] = param(("train", "val"), choices=("train", "val"), help="ImageNet splits")

    def __post_init__(self) -> None:
        self.config()  # the library checks the values that only make sense together
        if not self.splits:
            raise ValueError("splits is empty; list at least one of train, val")

    def config(self) -> ResizeConfig:
        return ResizeConfig(min_pixels=self.min_pixels, max_pixels=self.max_pixels, quality=self.quality,
                            patch=self.patch, gap=self.gap, max_upscale=self.max_upscale)


def run(params: Params, ctx: StageContext) -> None:
    cfg = params.config()
    try:
        mine, merged = run_shard(ctx.root / RAW, ctx.root / OUT, params.splits, cfg, params.workers,
                                 ctx.shard, ctx.log)
    except (ResizeError, OSError) as e:  # OSError: a full disk or read-only output, naming the path
        raise StageError(f"resize: {e}") from e
    handled = mine["images_in"]
    ctx.log.info("shard %d/%d: %d images in %.1f s: %d written, %d reused, %d converted, %d skipped %s",
                 *ctx.shard, handled, mine["seconds"], mine["images_written"] - mine["images_reused"],
                 mine["images_reused"], mine["images_converted"], mine["images_skipped"],
                 {k: v for k, v in mine["skipped_by_reason"].items() if v})
    if merged is None:
        return  # the last shard to finish writes the metrics of the whole run
    seconds = mine["seconds"]
    atomic_write_json(ctx.root / METRICS, {
        **merged,
        # These describe this invocation (the one that completed the run), not the other shards:
        "shard": f"{ctx.shard[0]}/{ctx.shard[1]}",
        "workers": params.workers,
        "images_reused": mine["images_reused"],
        "seconds": round(seconds, 3),
        "images_per_second": round(handled / seconds, 2) if seconds > 0 else 0.0,
    })
