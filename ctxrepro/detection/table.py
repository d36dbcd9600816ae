"""Table 1 of the paper (VOC 2007 test AP, section 4.3) beside our detect runs, as markdown.

The paper rows are copied from Table 1 (per-class AP in %, the devkit's class order, then mAP over the 20
classes). Our rows come from `metrics/detect/<variant>-<init>.json`; each names the paper row it reproduces. Columns
are the classes we evaluated; "mAP (shown)" averages exactly those columns for paper and ours alike, so the
two are comparable even when the tiny world has only 8 classes. "mAP (20)" is the paper's own figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ctxrepro.data.voc import VOC_CLASSES
from ctxrepro.io import atomic_write_text

# Table 1 (paper), ConvNet rows: 20 per-class APs in VOC_CLASSES order, then the 20-class mAP.
PAPER_TABLE1: dict[str, tuple[float, ...]] = {
    "Scratch-R-CNN": (49.9, 60.6, 24.7, 23.7, 20.3, 52.5, 64.8, 32.9, 20.4, 43.5, 34.2, 29.9, 49.0, 60.4, 47.5,
                      28.0, 42.3, 28.6, 51.2, 50.0, 40.7),
    "Scratch-Ours": (52.6, 60.5, 23.8, 24.3, 18.1, 50.6, 65.9, 29.2, 19.5, 43.5, 35.2, 27.6, 46.5, 59.4, 46.5,
                     25.6, 42.4, 23.5, 50.0, 50.6, 39.8),
    "Ours-projection": (58.4, 62.8, 33.5, 27.7, 24.4, 58.5, 68.5, 41.2, 26.3, 49.5, 42.6, 37.3, 55.7, 62.5, 49.4,
                        29.0, 47.5, 28.4, 54.7, 56.8, 45.7),
    "Ours-color-dropping": (60.5, 66.5, 29.6, 28.5, 26.3, 56.1, 70.4, 44.8, 24.6, 45.5, 45.4, 35.1, 52.2, 60.2,
                            50.0, 28.1, 46.7, 42.6, 54.8, 58.6, 46.3),
    "ImageNet-R-CNN": (64.2, 69.7, 50.0, 41.9, 32.0, 62.6, 71.0, 60.7, 32.7, 58.5, 46.5, 56.1, 60.6, 66.8, 54.2,
                       31.5, 52.8, 48.9, 57.9, 64.7, 54.2),
    "K-means-rescale": (55.7, 60.9, 27.9, 30.9, 12.0, 59.1, 63.7, 47.0, 21.4, 45.2, 55.8, 40.3, 67.5, 61.2, 48.3,
                        21.9, 32.8, 46.9, 61.6, 51.7, 45.6),
    "Ours-rescale": (61.9, 63.3, 35.8, 32.6, 17.2, 68.0, 67.9, 54.8, 29.6, 52.4, 62.9, 51.3, 67.1, 64.3, 50.5,
                     24.4, 43.7, 54.9, 67.1, 52.7, 51.1),
    "ImageNet-rescale": (64.0, 69.6, 53.2, 44.4, 24.9, 65.7, 69.6, 69.2, 28.9, 63.6, 62.8, 63.9, 73.3, 64.6, 55.8,
                         25.7, 50.5, 55.4, 69.3, 56.4, 56.5),
    "VGG-K-means-rescale": (56.1, 58.6, 23.3, 25.7, 12.8, 57.8, 61.2, 45.2, 21.4, 47.1, 39.5, 35.6, 60.1, 61.4,
                            44.9, 17.3, 37.7, 33.2, 57.9, 51.2, 42.4),
    "VGG-Ours-rescale": (71.1, 72.4, 54.1, 48.2, 29.9, 75.2, 78.0, 71.9, 38.3, 60.5, 62.3, 68.1, 74.3, 74.2, 64.8,
                         32.6, 56.5, 66.4, 74.0, 60.3, 61.7),
    "VGG-ImageNet-rescale": (76.6, 79.6, 68.5, 57.4, 40.8, 79.9, 78.4, 85.4, 41.7, 77.0, 69.3, 80.1, 78.6, 74.6,
                             70.1, 37.5, 66.0, 67.5, 77.4, 64.9, 68.6),
}
INIT_ORDER = ("scratch_alexnet", "scratch", "ours", "imagenet_alexnet", "imagenet", "kmeans_rescale", "ours_rescale",
              "imagenet_rescale")
RCNN_STYLE = "Fast R-CNN training, R-CNN-style rows (no box regression)"
RCNN = "R-CNN: warped windows, fc7 SVMs (no box regression)"


def paper_row(init: str, tower: str, color: str) -> str | None:
    """The Table 1 row an initialisation reproduces (None: the paper has no such row, e.g. VGG from scratch,
    or the rescale network on the colour-projection pretraining)."""
    if tower in ("vgg16", "tv_vgg16"):  # tv_vgg16: torchvision's VGG-16 (the VGG-ImageNet-rescale checkpoint's tower)
        return {"ours_rescale": "VGG-Ours-rescale", "kmeans_rescale": "VGG-K-means-rescale",
                "imagenet_rescale": "VGG-ImageNet-rescale"}.get(init)
    if init == "ours":  # the R-CNN rows: projection or colour dropping, BN folded, no rescale
        return "Ours-projection" if color == "projection" else "Ours-color-dropping"
    if init == "ours_rescale" and color == "projection":  # the paper's rescale row used colour dropping
        return None
    # imagenet (torchvision's conv layers under Figure 6's head) is no paper row: ImageNet-R-CNN keeps AlexNet's
    # own fc6 and fc7 (imagenet_alexnet)
    return {"scratch": "Scratch-Ours", "imagenet_alexnet": "ImageNet-R-CNN", "scratch_alexnet": "Scratch-R-CNN",
            "ours_rescale": "Ours-rescale",
            "kmeans_rescale": "K-means-rescale", "imagenet_rescale": "ImageNet-rescale"}.get(init)


def protocol(network: str, box_regression: bool, name: str = "fast_rcnn") -> str:
    """How a row was fine-tuned and tested (`name`: detect.protocol's value), as REPORT.md labels it."""
    if name == "rcnn":
        return RCNN
    if network == "figure6" and not box_regression:
        return RCNN_STYLE  # a documented substitution for R-CNN's SVMs on fc7
    shape = "CaffeNet-shaped, k-means + rescale" if network == "caffenet" else "Figure 6 network"
    return f"Fast R-CNN ({'with' if box_regression else 'no'} box regression), {shape}"


def row_order(name: str) -> tuple[int, str]:
    """metrics/detect/<variant>-<init> files in INIT_ORDER of their init, then by name."""
    init = name.rsplit("-", 1)[-1]
    return (INIT_ORDER.index(init) if init in INIT_ORDER else len(INIT_ORDER), name)


@dataclass(frozen=True)
class OurRow:
    init: str
    ap: dict[str, float | None]  # class -> AP in [0, 1]
    paper_row: str | None
    profile: str


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def table1_markdown(ours: Sequence[OurRow], classes: Sequence[str]) -> str:
    """Paper rows, then ours (each beside the paper row it reproduces); AP in %."""
    cols = [VOC_CLASSES.index(c) for c in classes]
    profiles = sorted({r.profile or "unnamed" for r in ours})
    head = ["method", "source", *classes, "mAP (shown)", "mAP (20)"]
    lines = [f"VOC 2007 test, detection AP (%): paper Table 1 beside ours (profile: {', '.join(profiles) or '-'}).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wanted = [r.paper_row for r in ours if r.paper_row]
    for name, row in PAPER_TABLE1.items():
        if wanted and name not in wanted:
            continue
        shown = [row[i] for i in cols]
        lines.append("| " + " | ".join([name, "paper", *map(_fmt, shown), _fmt(_mean(shown)), _fmt(row[-1])]) + " |")
    for r in ours:
        shown = [None if r.ap.get(c) is None else 100 * r.ap[c] for c in classes]
        label = f"{r.init} (as {r.paper_row})" if r.paper_row else r.init
        lines.append("| " + " | ".join([label, f"ours, {r.profile or 'unnamed'}", *map(_fmt, shown),
                                        _fmt(_mean(shown)), "-"]) + " |")
    lines += ["", "mAP (shown) averages the columns shown; mAP (20) is the paper's over all 20 classes. Tiny-world "
              "numbers come from synthetic scenes and a scaled-down schedule: compare rows within a profile, "
              "not with the paper's values."]
    return "\n".join(lines) + "\n"


def row_from_metrics(path: Path) -> tuple[OurRow, tuple[str, ...]]:
    """Our row and its evaluated classes from one metrics/detect/<row>.json."""
    try:
        m = json.loads(Path(path).read_text())
        return OurRow(m.get("row", m["init"]), m["ap"], m.get("paper_row"), m.get("profile_note", "")), tuple(m["ap"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a detect metrics file ({e})") from e


def write_table1(metrics_dir: Path, out: Path) -> str:
    """Table 1 from every metrics/detect/<row>.json (in INIT_ORDER of their init); returns the text."""
    paths = sorted(Path(metrics_dir).glob("*.json"), key=lambda p: row_order(p.stem))
    if not paths:
        raise FileNotFoundError(f"{metrics_dir}: no detect metrics (run `dvc repro detect`)")
    rows, classes = zip(*(row_from_metrics(p) for p in paths))
    shared = [c for c in VOC_CLASSES if all(c in cs for cs in classes)]
    text = table1_markdown(rows, shared)
    atomic_write_text(out, text)
    return text
