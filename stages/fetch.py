"""Fetch the data sets into data/raw: the embedded tiny world, local archives or folders, or URLs."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ctxrepro.config import ParamsError, load_yaml, param
from ctxrepro.data.download import DownloadError, RetryPolicy
from ctxrepro.data.fetch import fetch_dataset
from ctxrepro.data.inputs import DATASETS, Need, inputs_for, needed_archives, protocol_needs
from ctxrepro.io import atomic_dir, atomic_write_json, remove_stale_temps, temp_prefix
from ctxrepro.stage import StageContext, StageError
from ctxrepro.world import INDEX, WorldSpec, generate

RAW = Path("data/raw")
DOWNLOADS = Path("data/downloads")
METRICS = Path("metrics/fetch.json")
# Where each data set's images sit under data/raw, to keep only the builtin ones in the world index.
_INDEX_PREFIX = {"imagenet": "imagenet/", "voc2007": "voc2007/", "voc2011": "voc2011/", "nyuv2": "nyuv2/"}

SOURCE_HELP = "builtin | official (not imagenet) | local folder or archive | http(s) URL of a folder or file"


@dataclass(frozen=True)
class Params:
    imagenet_source: str = param("builtin", help=SOURCE_HELP)
    voc2007_source: str = param("builtin", help=SOURCE_HELP)
    voc2011_source: str = param("builtin", help=SOURCE_HELP)
    nyuv2_source: str = param("builtin", help=SOURCE_HELP)
    download_attempts: int = param(5, min=1, max=100, help="consecutive failures without progress before giving up")
    download_base_delay: float = param(2.0, min=0.0, max=600.0, help="first retry wait in seconds; doubles")
    download_timeout: float = param(60.0, min=1.0, max=3600.0, help="seconds without data before a read fails")
    keep_downloads: bool = param(True, help="keep data/downloads/<archive> after a successful extraction")
    world: WorldSpec = param(WorldSpec(), help="the embedded tiny world, used where a source is builtin")


def _sources(params: Params) -> dict[str, str]:
    return {name: getattr(params, f"{name}_source") for name in DATASETS}


def _protocol_needs(params: Params, ctx: StageContext) -> tuple[Need, ...]:
    """What the other sections' protocol needs (linear_probe, normals, proposals); stops before anything is
    placed when one of those archives, or a required one, is missing from a local source or the world."""
    path = ctx.params_path if ctx.params_path.is_absolute() else ctx.root / ctx.params_path
    try:
        needs = protocol_needs(load_yaml(path))
    except ParamsError as e:
        raise StageError(f"fetch: {e}") from e
    missing = [i for i in inputs_for(_sources(params), needs, ctx.root) if i.present is False]
    if missing:
        raise StageError("fetch: " + "\nfetch: ".join(i.line() for i in missing))
    for need in needs:
        ctx.log.info("%s is needed by %s", need.archive, need.reason)
    return needs


def run(params: Params, ctx: StageContext) -> None:
    start = time.monotonic()
    sources = _sources(params)
    needs = _protocol_needs(params, ctx)
    builtin = [name for name, src in sources.items() if src == "builtin"]
    retry = RetryPolicy(attempts=params.download_attempts, base_delay=params.download_base_delay,
                        timeout=params.download_timeout)
    raw, downloads = ctx.root / RAW, ctx.root / DOWNLOADS
    downloads.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"datasets": {}}
    remove_stale_temps(downloads, "builtin", ctx.log)  # a killed run's world (atomic_dir cleans data/.raw.*)
    builtin_dir = tempfile.TemporaryDirectory(dir=downloads, prefix=temp_prefix("builtin"), suffix=".tmp")
    with builtin_dir as world_dir, atomic_dir(raw) as out:
        if builtin:
            ctx.log.info("generating the embedded tiny world (seed %d) for %s", ctx.base.seed, ", ".join(builtin))
            summary = generate(Path(world_dir), params.world, ctx.base.seed, log=ctx.log)
            metrics["world"] = {k: v for k, v in summary.items() if k in DATASETS}
            _write_index(Path(world_dir) / INDEX, out / INDEX, builtin)
        else:  # always present, as stages declare it a dep: no data set is the world's
            atomic_write_json(out / INDEX, {})
        for name, source in sources.items():
            where = world_dir if source == "builtin" else source
            report = _fetch_one(name, where, out / name, downloads, retry, params.keep_downloads, ctx,
                                needed_archives(name, source, needs))
            metrics["datasets"][name] = _report_metrics(report, source)
    metrics["seconds"] = round(time.monotonic() - start, 2)
    atomic_write_json(ctx.root / METRICS, metrics)


def _fetch_one(name, source, dest, downloads, retry, keep, ctx, needs=None):
    try:
        return fetch_dataset(name, str(source), dest, downloads, log=ctx.log, retry=retry, keep_downloads=keep,
                             needs=needs)
    # ValueError covers ChecksumError, extract.ArchiveError (unsafe, truncated or corrupt archives, naming the
    # archive and member), a malformed MD5SUMS and a file that is not one of the data set's archives.
    except (OSError, ValueError, DownloadError) as e:  # OSError: a full disk or read-only target, naming the path
        raise StageError(f"fetch {name} from {source!r} failed: {e}") from e


def _write_index(src: Path, dst: Path, builtin: list[str]) -> None:
    """Keep the world index entries of the data sets that really come from the tiny world."""
    index = json.loads(src.read_text())
    keep = tuple(_INDEX_PREFIX[name] for name in builtin)
    atomic_write_json(dst, {path: entry for path, entry in index.items() if path.startswith(keep)})


def _report_metrics(report, source: str) -> dict:
    """Numbers for `dvc metrics diff`, plus the source kind (the path itself is in params)."""
    return {
        "source": "builtin" if source == "builtin" else "external",
        "files": report.files,
        "bytes": report.bytes,
        "images": report.images,
        "images_expected": report.images_expected,
        "archives_verified": len(report.verified),
        "warnings": len(report.warnings),
    }
