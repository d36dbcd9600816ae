"""Fetch one data set into `data/raw/<name>`: find its archives, download or read them, verify, place.

The data sets are those of the paper's experiments (section 3 pretraining on ImageNet; 4.3-4.5 VOC and
NYUv2). A source is one of:
- a local folder holding the archives under their published names (see registry.ARCHIVES), and an
  optional MD5SUMS file; parts already extracted there (e.g. `VOCdevkit/VOC2007`, `train/`) are
  used as they are;
- a local file: one archive under its published name;
- an http(s) URL of a folder holding the archives (names are appended), or of one archive;
- "official": the publishers' own URLs from the registry (not for ImageNet, which needs a login).

Everything is placed into a temporary folder beside `dest` that replaces `dest` only when the whole data
set has been placed and verified, so a failed fetch leaves no half-written output. Files that already
exist on disk (local sources) are hard-linked into place, or copied where a hard link is impossible
(another file system): a link costs no space or time for the 3 GB NYU file or a 150 GB extracted tree,
and unlike a symlink it leaves a real file that DVC can hash and cache and that keeps working if the
source moves.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from ctxrepro.data import extract, imagenet
from ctxrepro.data.download import Downloaded, NotFoundError, RetryPolicy, download_file, fetch_small
from ctxrepro.data.registry import (IMAGENET_HELP, Archive, ChecksumError, Expected, Verdict, archives_for, hash_file,
                                    lookup, parse_md5sums)
from ctxrepro.io import atomic_dir

OFFICIAL = "official"
_log = logging.getLogger("ctxrepro.data.fetch")


@dataclass
class FetchReport:
    """What a fetch placed: counts for metrics/fetch.json, plus what was verified and any warnings."""

    dataset: str
    source: str
    archives: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    images: int = 0
    images_expected: int | None = None  # only when every counted archive is the real one
    verified: dict[str, str] = field(default_factory=dict)  # archive -> "registry" or the MD5SUMS used
    linked: int = 0
    copied: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Located:
    """Where one archive comes from: a local file, a URL, or an already-extracted local tree."""

    archive: Archive
    kind: str  # "file" | "url" | "tree"
    where: str
    expected: Expected


def _help(dataset: str) -> str:
    return " " + IMAGENET_HELP if dataset == "imagenet" else ""


def _local_md5sums(folder: Path) -> tuple[dict[str, str], str | None]:
    path = folder / "MD5SUMS"
    return (parse_md5sums(path.read_text(), str(path)), str(path)) if path.is_file() else ({}, None)


def _expected(archive: Archive, sums: dict[str, str], origin: str | None, official: bool = False) -> Expected:
    return Expected(archive, sums.get(archive.name), origin if archive.name in sums else None, official)


def _require_all(dataset: str, found: list[Located], where: str, needs: Mapping[str, str]) -> list[Located]:
    """`found`, unless a required archive or one the protocol needs (`needs`: name -> reason) is missing."""
    names = {loc.archive.name for loc in found}
    missing = [a.name for a in archives_for(dataset) if a.required and a.name not in names]
    needed = [f"{name} (needed by {reason})" for name, reason in needs.items() if name not in names]
    if missing or needed:
        wanted = ", ".join(f"{a.name} ({'required' if a.required else 'optional'})" for a in archives_for(dataset))
        raise FileNotFoundError(f"{dataset}: {', '.join(missing + needed)} not found in {where}; a source folder "
                                f"holds {wanted}, or their extracted trees.{_help(dataset)}")
    return found


def _plan_local(dataset: str, path: Path, needs: Mapping[str, str]) -> list[Located]:
    if not path.exists():
        raise FileNotFoundError(f"{dataset}: source {path} does not exist.{_help(dataset)}")
    if path.is_file():
        archive = lookup(dataset, path.name)
        if archive is None:
            names = ", ".join(a.name for a in archives_for(dataset))
            raise ValueError(f"{dataset}: {path.name} is not one of its archives ({names}).{_help(dataset)}")
        sums, origin = _local_md5sums(path.parent)
        return _require_all(dataset, [Located(archive, "file", str(path), _expected(archive, sums, origin))], str(path),
                            needs)
    sums, origin = _local_md5sums(path)
    found = []
    for archive in archives_for(dataset):
        expected = _expected(archive, sums, origin)
        if (path / archive.name).is_file():
            found.append(Located(archive, "file", str(path / archive.name), expected))
        elif (path / archive.extracts_to).exists():
            found.append(Located(archive, "tree", str(path / archive.extracts_to), expected))
    return _require_all(dataset, found, str(path), needs)


def _plan_url(dataset: str, url: str, retry: RetryPolicy, log: logging.Logger,
              needs: Mapping[str, str]) -> list[Located]:
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    single = lookup(dataset, last) if last else None
    base = url.rsplit("/", 1)[0] + "/" if single else url if url.endswith("/") else url + "/"
    listing = fetch_small(base + "MD5SUMS", retry=retry, log=log)
    sums = parse_md5sums(listing.decode("utf-8"), base + "MD5SUMS") if listing is not None else {}
    archives = [single] if single else archives_for(dataset)
    found = [Located(a, "url", url if single else base + urllib.parse.quote(a.name),
                     _expected(a, sums, base + "MD5SUMS")) for a in archives]
    return _require_all(dataset, found, url, needs)


def _plan_official(dataset: str, needs: Mapping[str, str]) -> list[Located]:
    """The registry's URLs of the required archives and of the optional ones the protocol needs."""
    found = [Located(a, "url", a.url, Expected(a, official=True)) for a in archives_for(dataset)
             if a.url and (a.required or a.name in needs)]
    return _require_all(dataset, found, "the registry's official URLs (ImageNet has none: it needs a login)", needs)


def plan_sources(dataset: str, source: str, *, retry: RetryPolicy = RetryPolicy(),
                 log: logging.Logger | None = None, needs: Mapping[str, str] | None = None) -> list[Located]:
    """Resolve `source` into one Located per archive to place, refusing when a required one is missing, or an
    optional one that the protocol needs (`needs`: archive name -> the params that need it; data.inputs)."""
    log = log or _log
    needs = needs or {}
    archives_for(dataset)  # unknown data set names fail here, naming the known ones
    if source in ("", "builtin"):
        raise ValueError(f"{dataset}: source {source!r} is generated by the fetch stage; pass the folder it wrote")
    if source == OFFICIAL:
        return _plan_official(dataset, needs)
    if source.lower().startswith(("http://", "https://")):
        return _plan_url(dataset, source, retry, log, needs)
    return _plan_local(dataset, Path(source).expanduser(), needs)


def link_or_copy(src: Path, dst: Path, report: FetchReport) -> None:
    """Hard-link `src` to `dst`, or copy it where linking is impossible (another file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        report.linked += 1
    except OSError:
        shutil.copy2(src, dst)
        report.copied += 1


def link_tree(src: Path, dst: Path, report: FetchReport) -> extract.Tally:
    """Mirror an extracted tree file by file (links followed, each real folder visited once)."""
    tally = extract.Tally()
    seen: set[str] = set()
    for folder, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        rel = Path(folder).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            link_or_copy(Path(folder) / name, dst / rel / name, report)
            tally.add(name, (dst / rel / name).stat().st_size)
    return tally


def _obtain(loc: Located, downloads: Path, retry: RetryPolicy, log: logging.Logger,
            every: float) -> tuple[Path, Downloaded | None]:
    """The local path of a file source; URLs are downloaded (resumably, verified) into `downloads`."""
    if loc.kind == "file":
        return Path(loc.where), None
    got = download_file(loc.where, downloads / loc.archive.name, expected=loc.expected, retry=retry, log=log,
                        progress_every=every)
    return got.path, got


def _place_file(loc: Located, path: Path, tmp: Path, downloads: Path, algos: tuple[str, ...], log: logging.Logger,
                report: FetchReport) -> extract.Extracted:
    a = loc.archive
    if a.place == "file":
        size, digests = hash_file(path, algos) if algos else (path.stat().st_size, {})
        link_or_copy(path, tmp / a.name, report)
        tally = extract.Tally()
        tally.add(a.name, size)
        if a.name == "nyu_depth_v2_labeled.mat":
            from ctxrepro.data.nyu import count_images

            tally.images = count_images(tmp / a.name)
        return extract.Extracted(tally, size, digests)
    if a.place == "imagenet_train":
        real_size = path.stat().st_size == a.size
        # resumable after a kill: finished class tars are kept beside the downloads until the end
        return imagenet.extract_train_tar(path, tmp / a.extracts_to, algos=algos, log=log,
                                          classes=imagenet.TRAIN_CLASSES if real_size else None,
                                          resume=downloads / f".{a.name}.extracting")
    target = tmp / a.extracts_to if a.place == "imagenet_val" else tmp
    return extract.extract_archive(path, target, algos=algos)


def _place(loc: Located, tmp: Path, downloads: Path, retry: RetryPolicy, log: logging.Logger,
           report: FetchReport, every: float) -> tuple[Verdict, extract.Tally]:
    a = loc.archive
    log.info("%s: placing %s from %s", a.dataset, a.name, loc.where)
    if loc.kind == "tree":
        return Verdict(False, None), link_tree(Path(loc.where), tmp / a.extracts_to, report)
    path, got = _obtain(loc, downloads, retry, log, every)
    if got is None:
        loc.expected.check_size(f"{a.name} ({path})", path.stat().st_size)
    hashed_already = got is not None and got.digests is not None
    done = _place_file(loc, path, tmp, downloads, () if hashed_already else loc.expected.algos(), log, report)
    if hashed_already:
        verdict = got.verdict
    else:
        verdict = loc.expected.verify(f"{a.name} ({path})", done.size, done.digests)
    if a.images is not None and verdict.real and done.tally.images != a.images:
        raise ChecksumError(f"{path}: {done.tally.images:,} images extracted, but the real {a.name} holds "
                            f"{a.images:,}")
    return verdict, done.tally


def fetch_dataset(dataset: str, source: str, dest: Path, downloads: Path, *, log: logging.Logger | None = None,
                  retry: RetryPolicy = RetryPolicy(), keep_downloads: bool = True,
                  progress_every: float = 10.0, needs: Mapping[str, str] | None = None) -> FetchReport:
    """Place data set `dataset` from `source` into `dest` (= data/raw/<dataset>), whole or not at all.

    Downloads go to `downloads` (= data/downloads) and stay there for re-runs unless `keep_downloads`
    is False. `needs` (archive name -> reason) makes optional archives required, as the protocol asks
    (ctxrepro.data.inputs). Raises FileNotFoundError (what is missing and where to get it), ChecksumError (file,
    expected, actual), extract.ArchiveError (archive, member: unsafe, truncated or corrupt) or
    download.DownloadError.
    """
    log = log or _log
    needs = needs or {}
    plan = plan_sources(dataset, source, retry=retry, log=log, needs=needs)
    report = FetchReport(dataset, source)
    expected, all_real, trees_done = 0, True, set()
    with atomic_dir(dest) as tmp:
        for loc in plan:
            if loc.kind == "tree" and loc.where in trees_done:
                report.archives.append(loc.archive.name)  # VOC 2007 trainval and test share one tree
                continue
            trees_done.add(loc.where)
            try:
                verdict, tally = _place(loc, tmp, Path(downloads), retry, log, report, progress_every)
            except NotFoundError as e:
                if loc.archive.required or loc.archive.name in needs:
                    why = f" (needed by {needs[loc.archive.name]})" if loc.archive.name in needs else ""
                    raise FileNotFoundError(f"{dataset}: {e}{why}.{_help(dataset)}") from e
                continue  # an optional archive the mirror lacks: warned about below
            _record(report, loc, verdict, tally, log)
            if tally.images or loc.archive.images:
                all_real &= verdict.real and loc.archive.images is not None
                expected += loc.archive.images or 0
    report.images_expected = expected if all_real and expected else None
    if not keep_downloads:
        for loc in plan:
            if loc.kind == "url":
                (Path(downloads) / loc.archive.name).unlink(missing_ok=True)
    for archive in archives_for(dataset):
        if not archive.required and archive.name not in report.archives:
            report.warnings.append(f"{dataset}: optional {archive.name} not in the source ({archive.note})")
    log.info("%s: %d files, %d images, %s bytes into %s", dataset, report.files, report.images,
             f"{report.bytes:,}", dest)
    return report


def _record(report: FetchReport, loc: Located, verdict: Verdict, tally: extract.Tally,
            log: logging.Logger) -> None:
    report.archives.append(loc.archive.name)
    report.files += tally.files
    report.bytes += tally.bytes
    report.images += tally.images
    if verdict.checked_against:
        report.verified[loc.archive.name] = verdict.checked_against
    for warning in verdict.warnings:
        log.warning(warning)
        report.warnings.append(warning)
