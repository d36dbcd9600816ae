"""What the embedded tiny world holds: sizes, switches, and the fixed facts it shares with the real data.

The tiny world stands in for ImageNet, PASCAL VOC 2007/2011 and NYUv2 (paper sections 4.1-4.3) in their
exact on-disk formats, so that the real fetch code and loaders run on it (docs/DATA.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctxrepro.config import param

# The eight object categories, named with VOC class names. Purity-coverage (paper section 4.5.1) mines six
# of them (bus, diningtable, horse, motorbike, sofa, train); car and tvmonitor add detection variety.
CATEGORIES = ("bus", "car", "diningtable", "horse", "motorbike", "sofa", "train", "tvmonitor")

# Real WordNet noun synsets for the categories: the ImageNet layout names class folders by these ids.
WNIDS = {
    "bus": "n02924116",
    "car": "n02958343",
    "diningtable": "n03201208",
    "horse": "n02374451",
    "motorbike": "n03790512",
    "sofa": "n04256520",
    "train": "n04468005",
    "tvmonitor": "n03782006",
}

# The 20 PASCAL VOC classes: ImageSets/Main gets one list per class, as the real devkit has.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Categories drawn outdoors (sky / ground / horizon) and indoors (wall / floor).
OUTDOOR = ("bus", "car", "horse", "motorbike", "train")
INDOOR = ("diningtable", "sofa", "tvmonitor")

# NYU toolbox intrinsics of the RGB camera (camera_params.m), in the toolbox's 1-based pixel convention.
NYU_FX, NYU_FY, NYU_CX, NYU_CY = 518.857901, 519.469611, 325.582449, 253.736166
NYU_HEIGHT, NYU_WIDTH = 480, 640


# Stream ids: every part of the world draws from its own generator, so changing one size does not
# reshuffle the others.
IMAGENET_TRAIN, IMAGENET_VAL, VOC2007, VOC2011, NYU = 1, 2, 3, 4, 5


def stream(seed: int, *keys: int) -> np.random.Generator:
    """The generator for one item of the world: NumPy SeedSequence over [seed, *keys] (never hash())."""
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the tiny world; the defaults generate everything in seconds on one core."""

    imagenet_classes: int = param(8, min=1, max=len(CATEGORIES), help="ImageNet-layout classes (synsets)")
    imagenet_train_per_class: int = param(100, min=1, max=100000, help="train images per class")
    imagenet_val: int = param(80, min=1, max=100000, help="procedural val images (photos come on top)")
    image_size: int = param(256, min=64, max=2048, help="side of a procedural scene; sizes vary around it "
                            "(ImageNet scenes: long side 0.85..1.25x it)")
    voc_image_size: int = param(0, min=0, max=2048, help="VOC scenes' size (long side 1.15..1.4x it); 0 = image_size")
    voc07_trainval: int = param(120, min=2, max=100000, help="VOC 2007 trainval images")
    voc07_test: int = param(120, min=1, max=100000, help="VOC 2007 test images")
    voc11_trainval: int = param(150, min=2, max=100000, help="procedural VOC 2011 images (photos on top)")
    nyu_images: int = param(24, min=2, max=10000, help="NYUv2 rooms rendered at 640x480")
    nyu_train: int = param(16, min=1, max=10000, help="of nyu_images, how many go to trainNdxs")
    aberration: bool = param(True, help="synthetic lateral chromatic aberration on procedural scenes")
    aberration_scale: float = param(0.98, min=0.9, max=1.0, help="green channel scale about the centre")
    photos: bool = param(True, help="add the photographs shipped in installed packages (val and VOC 2011)")
    junk: bool = param(True, help="add the real train tar's traps: PNG, CMYK, grayscale, truncated, tiny")
    jpeg_quality: int = param(90, min=50, max=100, help="JPEG quality of every written image")

    @property
    def voc_size(self) -> int:
        return self.voc_image_size or self.image_size

    def __post_init__(self) -> None:
        if 0 < self.voc_image_size < 64:
            raise ValueError(f"voc_image_size={self.voc_image_size}: 0 (= image_size) or at least 64")
        if self.nyu_train >= self.nyu_images:
            raise ValueError(
                f"nyu_train={self.nyu_train} must be below nyu_images={self.nyu_images} (testNdxs would be empty)")
