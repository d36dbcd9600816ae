"""Resizing ImageNet for the pretext task: "we resize each image to between 150K and 450K total pixels,
preserving the aspect-ratio" (paper section 3, Implementation Details).

The released code (cdoersch/deepcontext, train.py) draws a fresh pixel count in [150K, 450K] every time
it loads an image, about 17 times per image over a run. So this stage stores each image ONCE at a
canonical size (`plan_size`: at most max_pixels, aspect kept, never enlarged) and the pretrain stage
draws the count at every visit (ctxrepro.pretext.data.visit_size). An image whose short side at
min_pixels (its smallest visit) cannot hold a 2x2 grid of patches with their gap (2 * patch + gap
pixels; 240 in the paper) is skipped as too small: the patch sampler (ctxrepro.pretext.sampling) needs
exactly that much. (The released code skips after resizing, with a 7-px jitter margin that our sampler
does not need because it clamps the jitter.) Optionally (`max_upscale`, off in the paper profile),
thumbnails that the smallest visit would enlarge more than that factor are skipped as too small.

Outputs are JPEGs with full chroma (4:4:4, quality 95): 4:2:0 subsampling blurs the colour fringes of
chromatic aberration that section 4.2 studies (bench/README.md measures the size and decode cost).

Speed: JPEG draft mode decodes at 1/2..1/8 scale when the image shrinks at least `reducing_gap` x 2
times; OpenCV resamples (bicubic to enlarge, supersampling to shrink; see `resample`), and libjpeg-turbo
(PIL's backend) decodes and encodes. The whole-run orchestration (walk, processes,
resume, shards, manifest) is in ctxrepro.data.resize_run.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ctxrepro.data.images import JunkImage, decode_rgb, draft_size, open_jpeg

# Written into the params stamp: change it whenever the pixels an unchanged config produces change.
ALGORITHM = ("v2: canonical size (<= max_pixels, never enlarged) via pil draft(reducing_gap) + bicubic-to-k-times"
             " + k x k area down + pil jpeg 4:4:4")
JPEG_EOI = b"\xff\xd9"


def check_pixel_range(min_pixels: int, max_pixels: int, min_side: int) -> None:
    """Refuse a range that `target_size` cannot honour for every image that is not too small.

    Rounding the sides moves the pixel count by about one side length; an image that is not too small
    has a long side of at most max_pixels / min_side, so the range must be at least that wide.
    """
    if not 0 < min_pixels < max_pixels:
        raise ValueError(f"need 0 < min_pixels < max_pixels, got min_pixels={min_pixels}, "
                         f"max_pixels={max_pixels}")
    if max_pixels - min_pixels < max_pixels / max(min_side, 1):
        raise ValueError(f"max_pixels - min_pixels = {max_pixels - min_pixels} is narrower than the longest "
                         f"side an image may have ({max_pixels / min_side:.0f} px); widen the range")


@dataclass(frozen=True)
class ResizeConfig:
    """Everything that decides the bytes of one output image (defaults: the paper, section 3)."""

    min_pixels: int = 150_000  # section 3: "between 150K and 450K total pixels"
    max_pixels: int = 450_000
    quality: int = 95  # not in the paper; with 4:4:4 chroma, so aberration fringes survive (section 4.2)
    patch: int = 96  # section 3: 96x96 patches
    gap: int = 48  # section 3: a gap of 48 pixels between grid patches
    max_upscale: float = 0.0  # 0: visits may enlarge any image, as the released code does; else skip more
    reducing_gap: float = 2.0  # PIL thumbnail's default: DCT-scale only to >= 2x the target

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.patch < 1 or self.gap < 0:
            raise ValueError(f"need patch >= 1 and gap >= 0, got patch={self.patch}, gap={self.gap}")
        if self.max_upscale != 0 and self.max_upscale < 1:
            raise ValueError(f"max_upscale must be 0 (no limit) or >= 1, got {self.max_upscale}")
        if self.reducing_gap < 1.0:
            raise ValueError(f"reducing_gap must be >= 1, got {self.reducing_gap}")
        check_pixel_range(self.min_pixels, self.max_pixels, self.min_side)

    @property
    def min_side(self) -> int:
        """The short side a 2x2 patch grid needs: two patches and one gap."""
        return 2 * self.patch + self.gap


def stable_int(*parts: str) -> int:
    """A 64-bit integer from sha256 of the parts: the same on every machine, process and run."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def shard_of(key: str, shards: int) -> int:
    """The shard (0..shards-1) that owns the image with relative path `key`; independent of the seed."""
    return stable_int("resize-shard", key) % shards


def _aspect_error(w: int, h: int, aspect: float) -> float:
    return abs(math.log(w / h) - math.log(aspect))


def target_size(width: int, height: int, pixels: float, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Integer (w, h) with the aspect of width x height and about `pixels` pixels, w * h in the bounds.

    Each side is rounded; if that leaves the count outside [min_pixels, max_pixels], one side at a time
    grows (or shrinks) by a pixel, choosing the side that keeps the aspect closer. Bounds always hold
    when the range is wider than the longer side (`check_pixel_range` ensures it for images that are
    not too small).
    """
    aspect = width / height
    scale = math.sqrt(pixels / (width * height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    while w * h < min_pixels:
        w, h = min([(w + 1, h), (w, h + 1)], key=lambda s: _aspect_error(*s, aspect))
    while w * h > max_pixels and (w > 1 or h > 1):
        options = [s for s in [(w - 1, h), (w, h - 1)] if min(s) >= 1]
        w, h = min(options, key=lambda s: _aspect_error(*s, aspect))
    return w, h


def plan_size(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int]:
    """The canonical (stored) size of a width x height image: at most max_pixels, aspect kept, never enlarged."""
    if width * height <= cfg.max_pixels:
        return width, height
    return target_size(width, height, cfg.max_pixels, 1, cfg.max_pixels)


def smallest_visit(width: int, height: int, cfg: ResizeConfig) -> tuple[int, int]:
    """The size of the image at its smallest visit (min_pixels), which the too-small rule judges."""
    return target_size(width, height, cfg.min_pixels, cfg.min_pixels, cfg.max_pixels)


def resample(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 array to size (w, h): bicubic to enlarge, supersampling to shrink.

    Shrinking by a factor f: bicubic to k = ceil(f) times the target (an enlargement or identity, so
    nothing aliases), then the mean of each k x k block. That is an anti-aliasing filter at any ratio,
    closer to PIL's Lanczos than OpenCV's INTER_AREA is (bench/README.md) and about twice as fast as it:
    OpenCV averages integer ratios on a fast path and non-integer ones on a slow general path.
    """
    h, w = rgb.shape[:2]
    tw, th = size
    if (w, h) == (tw, th):
        return rgb
    if tw > w or th > h:  # the aspect is kept, so both sides grow (one may stay equal after rounding)
        return cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_CUBIC)
    k = math.ceil(max(w / tw, h / th))
    fine = cv2.resize(rgb, (tw * k, th * k), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(fine, (tw, th), interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG, 4:4:4 chroma (no subsampling), no metadata: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False,
                                     progressive=False)
    return buf.getvalue()


def is_complete(path: Path, size: tuple[int, int], source_mtime_ns: int | None = None) -> bool:
    """True if `path` is a whole JPEG of `size` (header parses, end-of-image marker present), written from
    a source with modification time `source_mtime_ns` (outputs carry their source's mtime).

    Outputs are renamed into place only when written, so a partial file is unexpected; the check also
    catches a file damaged since (e.g. by a crash before the page cache reached the disk), and the mtime
    a source whose pixels changed since (same size, so the planned size alone would not tell).
    """
    try:
        if source_mtime_ns is not None and os.stat(path).st_mtime_ns != source_mtime_ns:
            return False
        with open(path, "rb") as f:
            with Image.open(f, formats=("JPEG",)) as im:
                if im.size != tuple(size):
                    return False
            f.seek(-2, os.SEEK_END)
            return f.read(2) == JPEG_EOI
    except (OSError, SyntaxError, ValueError):  # absent, unreadable or not a JPEG: (re)write it
        return False


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write `data` to a fresh file in `tmp_dir` (same file system), then rename it onto `path`.

    A killed run leaves at most stray files in `tmp_dir`, which the next run deletes before it starts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=".jpg")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Task:
    """One source image: `key` is its path under the data set root (e.g. train/n01440764/x.JPEG),
    `path` its output path under the output root (train/n01440764/x.jpg)."""

    split: str
    key: str
    path: str
    source: str  # relative to the raw data root, e.g. imagenet/train/n01440764/x.JPEG
    duplicate: bool = False  # another source file in the folder maps onto the same output name


@dataclass(frozen=True)
class Outcome:
    """What happened to one image: written (now), reused (complete from an earlier run) or skipped."""

    task: Task
    status: str
    orig_size: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    converted_from: str | None = None
    reason: str = ""
    detail: str = ""


def _check_and_plan(im: Image.Image, task: Task, cfg: ResizeConfig) -> tuple[int, int]:
    if min(im.size) < 1:
        raise JunkImage("corrupt", f"the header gives an empty image ({im.size[0]}x{im.size[1]})")
    small = smallest_visit(im.size[0], im.size[1], cfg)
    if min(small) < cfg.min_side:
        raise JunkImage("too_small", f"{im.size[0]}x{im.size[1]} is {small[0]}x{small[1]} at {cfg.min_pixels} "
                                     f"pixels; a 2x2 grid needs {cfg.min_side} px per side")
    if cfg.max_upscale and small[0] > cfg.max_upscale * im.size[0]:
        raise JunkImage("too_small", f"{im.size[0]}x{im.size[1]} would be enlarged {small[0] / im.size[0]:.2f}x "
                                     f"to {small[0]}x{small[1]}; max_upscale is {cfg.max_upscale:g}")
    return plan_size(im.size[0], im.size[1], cfg)


def process_image(task: Task, cfg: ResizeConfig, raw_root: Path, out_root: Path, tmp_dir: Path) -> Outcome:
    """Resize one image into out_root/task.path, or reuse a complete earlier output, or skip it as junk.

    Junk is reported in the Outcome; failures to write outputs (a full disk) raise and stop the run.
    """
    if task.duplicate:
        return Outcome(task, "skipped", reason="duplicate_name", detail=f"another file maps onto {task.path}")
    if not task.source.lower().endswith((".jpeg", ".jpg")):  # e.g. x.png: fetch counts it, ImageNet has none
        return Outcome(task, "skipped", reason="not_jpeg_name",
                       detail=f"{os.path.basename(task.source)}: ImageNet's class folders hold only .JPEG files")
    try:
        fp = open(raw_root / task.source, "rb")
    except OSError as e:
        return Outcome(task, "skipped", reason="unreadable", detail=f"{type(e).__name__}: {e.strerror}")
    with fp:
        try:
            im = open_jpeg(fp)
            orig = im.size
            size = _check_and_plan(im, task, cfg)
            out = out_root / task.path
            mtime_ns = os.fstat(fp.fileno()).st_mtime_ns
            if is_complete(out, size, mtime_ns):
                return Outcome(task, "reused", orig, size, None if im.mode == "RGB" else im.mode)
            decoded = decode_rgb(im, draft_size(orig, size, cfg.reducing_gap))
        except JunkImage as e:
            return Outcome(task, "skipped", reason=e.reason, detail=e.detail)
    write_atomic(out, encode_jpeg(resample(decoded.rgb, size), cfg.quality), tmp_dir)
    os.utime(out, ns=(mtime_ns, mtime_ns))  # the reuse key of a later run (is_complete)
    return Outcome(task, "written", orig, size, decoded.converted_from)
