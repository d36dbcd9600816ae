"""Resized-JPEG chroma (issue 17): size, decode cost and colour fidelity of 4:2:0 against 4:4:4.

Re-encodes every 20th image of `--glob` (default: the tiny world's ImageNet-layout train images) at
quality 90/95 with 4:2:0 and 95/100 with 4:4:4 (PIL on libjpeg-turbo), then prints the mean file size,
the best-of-5 CPU time of torchvision's decode_jpeg (1 thread) and the RMS error of the chroma
differences (R-G, B-G) against the source pixels: the colour fringes of chromatic aberration
(section 4.2) live there.

    python bench/chroma_bench.py [--glob 'data/raw/imagenet/train/*/*.JPEG']
"""

from __future__ import annotations

import argparse
import glob
import io
import time

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_jpeg

SETTINGS = ((90, 2), (95, 2), (95, 0), (100, 0))  # (quality, PIL subsampling: 2 = 4:2:0, 0 = 4:4:4)


def encode(rgb: np.ndarray, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def decode_seconds(data: list[bytes], repeats: int = 5) -> float:
    """Best-of-`repeats` CPU seconds to decode all of `data` once."""
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for x in tensors:
            decode_jpeg(x)
        best = min(best, time.process_time() - start)
    return best


def chroma_error(source: np.ndarray, data: bytes) -> float:
    """RMS error (0..255) of R-G and B-G of the decoded image against the source."""
    r = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
    s = source.astype(np.float64)
    d_rg = (r[..., 0] - r[..., 1]) - (s[..., 0] - s[..., 1])
    d_bg = (r[..., 2] - r[..., 1]) - (s[..., 2] - s[..., 1])
    return float(np.sqrt((d_rg ** 2 + d_bg ** 2).mean() / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glob", default="data/raw/imagenet/train/*/*.JPEG")
    args = parser.parse_args()
    files = sorted(glob.glob(args.glob))[::20][:60]
    if not files:
        raise SystemExit(f"no images match {args.glob!r}: run `dvc repro fetch` or pass --glob")
    torch.set_num_threads(1)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    print(f"{len(images)} images, median {np.median([im.shape[0] * im.shape[1] for im in images]):.0f} pixels")
    for quality, subsampling in SETTINGS:
        data = [encode(im, quality, subsampling) for im in images]
        print(f"q{quality} {'4:2:0' if subsampling == 2 else '4:4:4'}: "
              f"{np.mean([len(d) for d in data]) / 1024:.1f} KiB/image, "
              f"decode {decode_seconds(data) / len(data) * 1e3:.2f} ms/image (CPU, 1 thread), "
              f"chroma RMS error {np.mean([chroma_error(im, d) for im, d in zip(images, data)]):.2f}")


if __name__ == "__main__":
    main()
