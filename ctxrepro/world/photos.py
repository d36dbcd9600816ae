"""Real photographs that ship inside installed packages, and the image encoders every writer shares.

docs/METHOD.md "The tiny-world prototype": a handful of real photos used for training are simply memorised (0.96 train accuracy, chance
held out), so the world puts them where they probe transfer instead: the ImageNet val tar and the VOC 2011
set (mining, paper section 4.5). A photo whose package or file is missing offline is skipped and counted.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# (name, package, file inside the installed package, VOC category or None): the order fixes placement.
# The files are what skimage.data.<name>() (stereo_motorcycle for the two motorcycles),
# sklearn.datasets.load_sample_image and matplotlib.cbook.get_sample_data read; opening them directly
# avoids importing scikit-learn (a second of start-up) and skimage's network fallback for missing data.
PHOTO_SOURCES = (
    ("astronaut", "skimage", "data/astronaut.png", None),
    ("chelsea", "skimage", "data/chelsea.png", None),
    ("coffee", "skimage", "data/coffee.png", None),
    ("rocket", "skimage", "data/rocket.jpg", None),
    ("motorcycle_left", "skimage", "data/motorcycle_left.png", "motorbike"),
    ("motorcycle_right", "skimage", "data/motorcycle_right.png", "motorbike"),
    ("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", None),
    ("china", "sklearn", "datasets/images/china.jpg", None),
    ("flower", "sklearn", "datasets/images/flower.jpg", None),
    ("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", None),
)


@dataclass(frozen=True)
class Photo:
    name: str
    category: str | None
    image: np.ndarray  # (H, W, 3) uint8 RGB


def _package_file(package: str, relative: str) -> Path:
    """The path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist in this installation")
    return path


def load_photos() -> tuple:
    """(photos found, {name: why skipped}) for PHOTO_SOURCES, every photo as 3-channel uint8 RGB."""
    found, skipped = [], {}
    for name, package, relative, category in PHOTO_SOURCES:
        try:
            with Image.open(_package_file(package, relative)) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:  # missing file or package, or an unreadable image
            skipped[name] = f"{package}/{relative}: {type(e).__name__}: {e}"
            continue
        found.append(Photo(name, category, rgb))
    return found, skipped


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes of an RGB or L uint8 array (libjpeg via Pillow: deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def junk_variant(image: np.ndarray, reason: str, quality: int) -> bytes:
    """The real ImageNet train tar's traps, made from a scene (docs/DATA.md "Known traps").

    png: PNG data under a .JPEG name; cmyk: a CMYK JPEG; grayscale: a one-channel JPEG; truncated: a JPEG
    cut to 60% of its bytes; too_small: a 40x30 JPEG, too small for a 2x2 patch grid.
    """
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if reason == "png":
        pil.save(buf, format="PNG")
    elif reason == "cmyk":
        pil.convert("CMYK").save(buf, format="JPEG", quality=quality)
    elif reason == "grayscale":
        pil.convert("L").save(buf, format="JPEG", quality=quality)
    elif reason == "truncated":
        data = encode_jpeg(image, quality)
        return data[: int(len(data) * 0.6)]
    elif reason == "too_small":
        pil.resize((40, 30), Image.BILINEAR).save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown junk reason {reason!r}")
    return buf.getvalue()


JUNK_REASONS = ("png", "cmyk", "grayscale", "truncated", "too_small")
