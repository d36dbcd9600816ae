"""Decoding JPEG files into RGB arrays, and classifying the junk that real data sets contain.

The pretext task (paper section 3) trains on ImageNet photographs; ImageNet holds a few files that are
not what their name says (a PNG named .JPEG, CMYK and grayscale JPEGs; docs/DATA.md "Known traps"). This module
turns every file into either an RGB uint8 array or a `JunkImage` with a reason from `REASONS`, so that
the resize stage can count and list bad files instead of dying on them.

EXIF Orientation is not applied: pixels are used as stored, as the usual ImageNet loader does (PIL-based
torchvision ImageFolder), so the pretext task sees the same images as most ImageNet models do;
outputs carry no metadata, so no reader can rotate them later either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

# Why an image is skipped. Order matters only for reading; every reason appears in the metrics (zeros too),
# so that `dvc metrics diff` compares the same keys from run to run.
REASONS = (
    "unreadable",  # the file could not be read (permissions, I/O error, vanished)
    "empty",  # zero bytes
    "png_named_jpeg",  # PNG magic bytes behind a .JPEG name (ImageNet's n02105855_2933.JPEG)
    "other_format",  # another known image format (GIF, BMP, TIFF, WebP) behind a .JPEG name
    "corrupt",  # JPEG magic, but the header or the data cannot be decoded
    "truncated",  # the JPEG data ends before the image does
    "too_large",  # more pixels than PIL's decompression-bomb limit
    "unsupported_mode",  # a JPEG colour mode that cannot be converted to RGB
    "duplicate_name",  # two source files that map onto the same output name (a.JPEG and a.jpg)
    "not_jpeg_name",  # an image file not named .JPEG/.jpg (x.png in a class folder): not part of ImageNet
    "too_small",  # after resizing, a 2x2 grid of patches with gaps does not fit (see ctxrepro.data.resize)
)

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
)

# The exceptions PIL raises on bad image data (it uses SyntaxError for some malformed headers). Errors
# outside this list are bugs and must stop the run.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class JunkImage(Exception):
    """A file that is not a usable JPEG photograph; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown junk reason {reason!r}; known: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    """An RGB image as an (H, W, 3) uint8 array; `converted_from` names the source mode if not RGB."""

    rgb: np.ndarray
    converted_from: str | None


def sniff_format(head: bytes) -> str:
    """The format that a file's first bytes announce: jpeg, png, gif, tiff, bmp, webp, empty or unknown.

    Names lie (ImageNet holds a PNG named .JPEG); magic bytes do not.
    """
    if not head:
        return "empty"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return "unknown"


def _error_detail(exc: BaseException) -> str:
    """A message that names no path or memory address, so skip lists are identical across machines."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return "cannot identify the data as a JPEG image"
    return f"{type(exc).__name__}: {exc}"


def _reason_for(exc: BaseException) -> str:
    # PIL reports missing data as "image file is truncated (...)" or "Truncated File Read".
    return "truncated" if "truncated" in str(exc).lower() else "corrupt"


def open_jpeg(fp: BinaryIO) -> Image.Image:
    """Check the magic bytes and parse the JPEG header of an open binary file (no pixels decoded yet).

    Raises `JunkImage` for empty files, other formats behind a JPEG name, and unparsable headers.
    """
    head = fp.read(16)
    kind = sniff_format(head)
    if kind == "empty":
        raise JunkImage("empty", "the file has 0 bytes")
    if kind == "png":
        raise JunkImage("png_named_jpeg", "PNG data in a file named like a JPEG")
    if kind not in ("jpeg", "unknown"):
        raise JunkImage("other_format", f"{kind.upper()} data in a file named like a JPEG")
    if kind == "unknown":
        raise JunkImage("corrupt", f"no JPEG magic bytes (starts with {head[:4].hex()})")
    fp.seek(0)
    try:
        return Image.open(fp, formats=("JPEG",))
    except Image.DecompressionBombError as e:
        raise JunkImage("too_large", str(e)) from e
    except _DECODE_ERRORS as e:
        raise JunkImage(_reason_for(e), _error_detail(e)) from e


def draft_size(size: tuple[int, int], target: tuple[int, int], reducing_gap: float) -> tuple[int, int] | None:
    """The size to ask JPEG draft mode for, or None when the image is not shrunk by `reducing_gap` or more.

    libjpeg-turbo can decode at 1/2, 1/4 or 1/8 scale by skipping DCT coefficients, which is both much
    faster and a proper low-pass filter. Asking for `reducing_gap` times the target (PIL's `thumbnail`
    does the same) leaves the final resampling at least that factor of real reduction to do.
    """
    want = (int(target[0] * reducing_gap), int(target[1] * reducing_gap))
    if want[0] < 1 or want[1] < 1 or size[0] < 2 * want[0] or size[1] < 2 * want[1]:
        return None
    return want


def decode_rgb(im: Image.Image, draft: tuple[int, int] | None) -> Decoded:
    """Decode the pixels of an opened JPEG (at a reduced DCT scale when `draft` is given) as RGB.

    CMYK (PIL undoes Adobe's inverted CMYK) and grayscale images are converted; the caller counts them.
    """
    if draft is not None:
        im.draft(None, draft)
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise JunkImage("too_large", str(e)) from e
    except _DECODE_ERRORS as e:
        raise JunkImage(_reason_for(e), _error_detail(e)) from e
    converted = None
    if im.mode != "RGB":
        converted = im.mode
        try:
            im = im.convert("RGB")
        except ValueError as e:
            raise JunkImage("unsupported_mode", f"cannot convert mode {im.mode} to RGB: {e}") from e
    return Decoded(rgb=np.asarray(im), converted_from=converted)


def read_rgb(path) -> np.ndarray:
    """An image file as a writable (H, W, 3) uint8 RGB array (grayscale, CMYK and palette files converted).

    For the evaluation stages, which read files the pipeline already vetted: an unreadable file is a
    ValueError that names it (the resize stage classifies junk by reason instead, with `decode_rgb`).
    """
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode {path}: {e}") from e
