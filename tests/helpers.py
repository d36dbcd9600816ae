"""Small file makers shared by the data tests (images and archives made in the test, never committed)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image with mild noise: compresses like a photograph, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding `members` (name -> content) in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_md5sums(folder: Path, wrong: dict[str, str] | None = None) -> None:
    """An MD5SUMS in `folder` listing every file there (what vouches for archives that are not the published
    ones); `wrong` overrides some names' digests."""
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != "MD5SUMS"}
    sums.update(wrong or {})
    (Path(folder) / "MD5SUMS").write_text("".join(f"{md5}  {name}\n" for name, md5 in sums.items()))
