"""The stage instances a profile defines and the data counts they work on, read from the raw params.

Instances are named as DVC names them (`pretrain@vgg16`): one per `pretrain.variants` key, per
`convert.rows` key (convert and detect), per `normals.rows` item and per `linear_probe.networks` item.
Counts come from the fetch sources: the builtin world's sizes (`fetch.world`) or the real data sets'
(the registry and the data sets' published splits).
"""

from __future__ import annotations

from dataclasses import dataclass

from ctxrepro.data.registry import ARCHIVES

# Real data sets' counts that the registry does not hold: the published splits.
VOC11_TRAINVAL = 11_540
NYU_TEST = 654  # 795 train / 654 test (splits.mat)
WORLD_PHOTOS = 10  # the package photos the world adds to ImageNet val and VOC 2011 (fetch.world.photos)
# Pixels per image. The world's scenes are image_size squared (VOC-like: long side ~1.275x, 4:3); real
# ImageNet averages about 400x350 px, VOC about 500x375, NYUv2 is 640x480.
IMAGENET_PX, VOC_PX, NYU_PX = 400 * 350, 500 * 375, 640 * 480


@dataclass(frozen=True)
class Instance:
    name: str  # as dvc status names it: "fetch", "pretrain@vgg16"
    stage: str
    key: str | None = None


def instances(p: dict) -> list[Instance]:
    """Every stage instance of dvc.yaml, in pipeline order, for the params `p` (all sections, raw)."""
    out = [Instance("fetch", "fetch"), Instance("resize", "resize")]
    out += [Instance(f"pretrain@{v}", "pretrain", v) for v in p["pretrain"]["variants"]]
    rows = list(p["convert"]["rows"])
    out += [Instance(f"convert@{r}", "convert", r) for r in rows]
    out.append(Instance("proposals", "proposals"))
    out += [Instance(f"detect@{r}", "detect", r) for r in rows]
    out += [Instance(f"normals@{r}", "normals", r) for r in p["normals"]["rows"]]
    out += [Instance(s, s) for s in ("mine", "pretext_eval", "nn", "aberration")]
    out += [Instance(f"linear_probe@{n}", "linear_probe", n) for n in p["linear_probe"]["networks"]]
    out.append(Instance("report", "report"))
    return out


def instance_of(stage: str, section: dict) -> Instance:
    """The instance a hand run of `stage` with this (resolved) section runs: its selector names it."""
    selector = {"pretrain": "variant", "convert": "row", "detect": "row", "normals": "init",
                "linear_probe": "network"}.get(stage)
    if selector is None:
        return Instance(stage, stage)
    key = str(section[selector])
    return Instance(f"{stage}@{key}", stage, key)


def variant(p: dict, name: str) -> dict:
    """The pretrain section with variant `name`'s overrides applied (what `pretrain@name` trains)."""
    section = {k: v for k, v in p["pretrain"].items() if k not in ("variant", "variants")}
    return {**section, **(p["pretrain"]["variants"].get(name) or {})}


def row(p: dict, key: str) -> dict:
    """A Table 1 row: {variant, init}, from convert.rows."""
    return p["convert"]["rows"][key]


def builtin(p: dict, dataset: str) -> bool:
    return p["fetch"][f"{dataset}_source"] == "builtin"


@dataclass(frozen=True)
class Counts:
    """Images per data set and split, and their mean pixels and JPEG bytes, for the active sources."""

    imagenet_train: int
    imagenet_val: int
    imagenet_px: int
    imagenet_jpeg: float  # bytes per source image
    voc07_trainval: int
    voc07_test: int
    voc11: int
    voc_px: int
    nyu: int
    nyu_test: int


# JPEG bytes per pixel of the world's scenes at quality 90 (4:2:0): bench/README.md's chroma table measured
# 10.4 KiB per 57.6K-px image.
WORLD_JPEG_BPP = 10.4 * 1024 / 57_600
_TRAIN_TAR = next(a for a in ARCHIVES if a.name == "ILSVRC2012_img_train.tar")


def _images(name: str) -> int:
    return next(a.images for a in ARCHIVES if a.name == name)


def counts(p: dict) -> Counts:
    w = p["fetch"]["world"]
    photos = WORLD_PHOTOS if w.get("photos", True) else 0
    if builtin(p, "imagenet"):
        inet = (w["imagenet_classes"] * w["imagenet_train_per_class"], w["imagenet_val"] + photos,
                w["image_size"] ** 2, w["image_size"] ** 2 * WORLD_JPEG_BPP)
    else:
        inet = (_TRAIN_TAR.images, _images("ILSVRC2012_img_val.tar"), IMAGENET_PX,
                _TRAIN_TAR.size / _TRAIN_TAR.images)
    if builtin(p, "voc2007"):
        side = (w["voc_image_size"] or w["image_size"]) * 1.275
        voc = (w["voc07_trainval"], w["voc07_test"], int(side * side * 0.75))
    else:
        voc = (_images("VOCtrainval_06-Nov-2007.tar"), _images("VOCtest_06-Nov-2007.tar"), VOC_PX)
    voc11 = w["voc11_trainval"] + photos if builtin(p, "voc2011") else VOC11_TRAINVAL
    nyu = (w["nyu_images"], w["nyu_images"] - w["nyu_train"]) if builtin(p, "nyuv2") else \
        (_images("nyu_depth_v2_labeled.mat"), NYU_TEST)
    return Counts(inet[0], inet[1], inet[2], inet[3], voc[0], voc[1], voc11, voc[2], nyu[0], nyu[1])
