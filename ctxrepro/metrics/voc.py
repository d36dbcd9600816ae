"""VOC 2007 detection AP exactly as the official devkit's VOCevaldet computes it (paper section 4.3, Table 1;
docs/DATA.md "VOC2007 detection AP").

Per class, over the whole image set:
- ground truth: every object of the class in `Annotations/<id>.xml` for the ids of
  `ImageSets/Main/<imageset>.txt`; npos = the number of non-difficult ones;
- detections: `<comp>_det_<imageset>_<class>.txt`, lines `<image_id> <score> <x1> <y1> <x2> <y2>` (1-based
  pixels), sorted by descending score with a stable sort, so equal scores keep file order (MATLAB's sort);
- each detection takes the ground-truth box of its image with the largest IoU, boxes in the +1 convention
  (width = x2 - x1 + 1), only boxes that intersect counted, the first box winning a tie; if that IoU is
  >= 0.5 (the devkit's rule, not py-faster-rcnn's >): a difficult box -> ignored (neither TP nor FP), a box
  not yet detected -> TP, a box already detected -> FP (a duplicate); otherwise FP;
- rec = cumsum(TP) / npos, prec = cumsum(TP) / (cumsum(TP) + cumsum(FP)); AP = the mean over
  t in MATLAB's 0:0.1:1 of max(prec(rec >= t)), 0 where no recall reaches t. The thresholds are the values
  MATLAB's colon operator produces (MathWorks solution 1-4FLI96: the first half as a + k*d, the second
  as b - k*d, the middle as (a + b) / 2), so the fourth one is 3 * 0.1 = 0.30000000000000004 and a recall
  of exactly 0.3 does not reach it. MATLAB's max skips NaN (the 0/0 precision of leading ignored
  detections), and a class with npos = 0 gets AP 0, as in the devkit.

`ctxrepro eval voc --devkit VOCdevkit/VOC2007 --imageset test --results DIR [--classes ...] [--out FILE]`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import typer

from ctxrepro.data.voc import SPLITS, VOC_CLASSES, parse_annotation
from ctxrepro.io import atomic_write_json
from ctxrepro.metrics.inputs import EvalInputError, read_bytes, read_text

MIN_OVERLAP = 0.5  # VOCopts.minoverlap


class VocEvalError(EvalInputError):
    """Input the evaluation cannot use; the message names the file (and line)."""


@dataclass(frozen=True)
class ClassGroundTruth:
    boxes: dict[str, np.ndarray]  # image id -> (n, 4) float64 x1 y1 x2 y2, 1-based inclusive
    difficult: dict[str, np.ndarray]  # image id -> (n,) bool
    npos: int


@dataclass(frozen=True)
class Detections:
    image_ids: list[str]
    scores: np.ndarray  # (n,) float64
    boxes: np.ndarray  # (n, 4) float64


@dataclass(frozen=True)
class ClassResult:
    ap: float
    npos: int
    detections: int
    tp: int
    fp: int


def load_ground_truth(devkit: Path, imageset: str, classes: Sequence[str]
                      ) -> tuple[tuple[str, ...], dict[str, ClassGroundTruth]]:
    """The image ids of the set and, per class, its boxes and difficult flags in annotation order."""
    listing = Path(devkit) / "ImageSets" / "Main" / f"{imageset}.txt"
    if not listing.exists():
        raise VocEvalError(f"{listing}: no image set {imageset!r} (splits: {', '.join(SPLITS)})")
    ids = tuple(line.split()[0] for line in read_text(listing, "image set", VocEvalError).splitlines() if line.strip())
    boxes = {c: {} for c in classes}
    diff = {c: {} for c in classes}
    for image_id in ids:
        xml = Path(devkit) / "Annotations" / f"{image_id}.xml"
        if not xml.exists():
            raise VocEvalError(f"{xml}: missing, but listed in ImageSets/Main/{imageset}.txt")
        try:
            ann = parse_annotation(xml, text=read_bytes(xml, "annotation", VocEvalError))
        except EvalInputError:
            raise
        except ValueError as e:
            raise VocEvalError(str(e)) from e
        for c in classes:
            objs = [o for o in ann.objects if o.name == c]
            boxes[c][image_id] = np.array([[o.bndbox.xmin, o.bndbox.ymin, o.bndbox.xmax, o.bndbox.ymax]
                                           for o in objs], dtype=np.float64).reshape(-1, 4)
            diff[c][image_id] = np.array([o.difficult for o in objs], dtype=bool)
    gt = {c: ClassGroundTruth(boxes[c], diff[c], int(sum((~d).sum() for d in diff[c].values()))) for c in classes}
    return ids, gt


def read_detections(path: Path, image_ids: set[str]) -> Detections:
    """A results file; a missing or unreadable file, a malformed line or an unknown image id is an error
    naming it. An empty file is no detections (AP 0): the command warns about it."""
    ids, rows = [], []
    for number, line in enumerate(read_text(path, "results file", VocEvalError, empty_ok=True).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path} line {number}"
        if len(fields) != 6:
            raise VocEvalError(f"{where}: expected '<image_id> <score> <x1> <y1> <x2> <y2>', got {line!r}")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise VocEvalError(f"{where}: score and box must be numbers, got {line!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise VocEvalError(f"{where}: score and box must be finite, got {line!r}")
        if fields[0] not in image_ids:
            raise VocEvalError(f"{where}: image id {fields[0]!r} is not in the image set")
        ids.append(fields[0])
        rows.append(values)
    arr = np.array(rows, dtype=np.float64).reshape(-1, 5)
    return Detections(ids, arr[:, 0], arr[:, 1:])


def best_overlaps(box: np.ndarray, gts: np.ndarray) -> tuple[float, int]:
    """(ovmax, jmax) of one detection against its image's boxes, as VOCevaldet's loop: IoU with the
    +1 convention over intersecting boxes only, first index on ties; (-inf, -1) when none intersects."""
    if len(gts) == 0:
        return -math.inf, -1
    iw = np.minimum(box[2], gts[:, 2]) - np.maximum(box[0], gts[:, 0]) + 1
    ih = np.minimum(box[3], gts[:, 3]) - np.maximum(box[1], gts[:, 1]) + 1
    ua = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (gts[:, 2] - gts[:, 0] + 1) * (gts[:, 3] - gts[:, 1] + 1)
          - iw * ih)
    hit = (iw > 0) & (ih > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = np.where(hit, iw * ih / np.where(hit, ua, 1.0), -np.inf)
    ov = np.where(np.isnan(ov), -np.inf, ov)  # MATLAB's `NaN > ovmax` is false: never the best
    j = int(np.argmax(ov))  # first maximum, as the devkit's strict `ov > ovmax`
    return float(ov[j]), j if hit[j] else -1


def match(gt: ClassGroundTruth, dets: Detections) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP flags (0/1) of the detections in descending-score order (stable)."""
    order = np.argsort(-dets.scores, kind="stable")
    detected = {i: np.zeros(len(b), dtype=bool) for i, b in gt.boxes.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, k in enumerate(order):
        image = dets.image_ids[k]
        ovmax, j = best_overlaps(dets.boxes[k], gt.boxes[image])
        if ovmax >= MIN_OVERLAP:
            if not gt.difficult[image][j]:
                if not detected[image][j]:
                    tp[d] = 1
                    detected[image][j] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    return tp, fp


def matlab_colon(a: float, d: float, b: float) -> list[float]:
    """a:d:b as MATLAB computes it (MathWorks' colonop: symmetric from both ends), for d > 0."""
    n = round((b - a) / d)
    tol = 2.0 * np.finfo(float).eps * max(abs(a), abs(b))
    if a + n * d - b > tol:
        n -= 1
    last = b if a + n * d - b > -tol else a + n * d
    out = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        out[k] = a + k * d
        out[n - k] = last - k * d
    if n % 2 == 0:
        out[n // 2] = (a + last) / 2
    return out


THRESHOLDS = matlab_colon(0.0, 0.1, 1.0)


def eleven_point_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOCevaldet's 11-point AP; max skips NaN like MATLAB's (NaN only if every candidate is NaN).

    The devkit accumulates ap + p/11, which can give 1.0000000000000002; summing exactly first (fsum)
    and dividing once keeps AP in [0, 1] and differs from it by at most a few ulps."""
    best = []
    for t in THRESHOLDS:
        p = prec[rec >= t]
        if p.size == 0:
            best.append(0.0)
        elif np.isnan(p).all():
            best.append(math.nan)
        else:
            best.append(float(np.nanmax(p)))
    return math.fsum(best) / len(THRESHOLDS)


def evaluate_class(gt: ClassGroundTruth, dets: Detections) -> ClassResult:
    tp, fp = match(gt, dets)
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp_c / gt.npos
        prec = tp_c / (fp_c + tp_c)
    return ClassResult(eleven_point_ap(rec, prec), gt.npos, len(tp), int(tp.sum()), int(fp.sum()))


def results_path(results: Path, comp: str, imageset: str, cls: str) -> Path:
    return Path(results) / f"{comp}_det_{imageset}_{cls}.txt"


def evaluate(devkit: Path, imageset: str, results: Path, classes: Sequence[str] = VOC_CLASSES,
             comp: str = "comp4") -> dict[str, ClassResult]:
    """AP per class for a folder of results files (module docstring)."""
    unknown = [c for c in classes if c not in VOC_CLASSES]
    if unknown:
        raise VocEvalError(f"unknown class(es) {unknown}; VOC classes: {', '.join(VOC_CLASSES)}")
    ids, gt = load_ground_truth(Path(devkit), imageset, classes)
    known = set(ids)
    return {c: evaluate_class(gt[c], read_detections(results_path(results, comp, imageset, c), known))
            for c in classes}


def summary(results: dict[str, ClassResult]) -> dict[str, object]:
    """{"ap": {class: AP}, "map": mean AP}; NaN (only from the devkit's all-ignored corner case) -> null."""
    aps = [r.ap for r in results.values()]
    mean = float(np.mean(aps)) if aps else math.nan
    clean = lambda v: None if math.isnan(v) else v  # noqa: E731 - JSON has no NaN
    return {"ap": {c: clean(r.ap) for c, r in results.items()}, "map": clean(mean)}


def format_table(results: dict[str, ClassResult]) -> str:
    lines = [f"{'class':<12} {'AP':>6} {'npos':>6} {'dets':>7} {'TP':>6} {'FP':>7}"]
    for c, r in results.items():
        lines.append(f"{c:<12} {100 * r.ap:6.1f} {r.npos:6d} {r.detections:7d} {r.tp:6d} {r.fp:7d}")
    mean = summary(results)["map"]
    lines.append(f"{'mAP':<12} {'nan' if mean is None else f'{100 * mean:6.1f}':>6}")
    return "\n".join(lines)


def parse_classes(values: Sequence[str] | None) -> tuple[str, ...]:
    """--classes given repeatedly and/or comma-separated; None -> all 20 VOC classes."""
    if not values:
        return VOC_CLASSES
    return tuple(c.strip() for v in values for c in v.split(",") if c.strip())


def voc_command(
    devkit: Path = typer.Option(..., "--devkit", help="the VOCdevkit/VOC2007 folder (Annotations, ImageSets/Main)"),
    imageset: str = typer.Option("test", "--imageset", help="ImageSets/Main/<imageset>.txt"),
    results: Path = typer.Option(..., "--results", help="folder of <comp>_det_<imageset>_<class>.txt files"),
    classes: Optional[List[str]] = typer.Option(None, "--classes",
                                                help="classes (repeat or comma-separate); default all 20"),
    out: Optional[Path] = typer.Option(None, "--out", help='write {"ap": {class: AP}, "map": mAP} JSON here'),
    comp: str = typer.Option("comp4", "--comp", help="results file prefix (the devkit's competition id)"),
) -> None:
    """VOC 2007 detection AP per class and mAP, exactly as the devkit's VOCevaldet (paper section 4.3)."""
    try:
        if not Path(results).is_dir():
            raise VocEvalError(f"{results}: --results must be a folder of results files")
        results_by_class = evaluate(devkit, imageset, results, parse_classes(classes), comp)
    except EvalInputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    for c, r in results_by_class.items():
        if r.npos == 0:
            typer.echo(f"warning: {c} has no non-difficult box in {imageset}: AP 0 (as the devkit)", err=True)
        if r.detections == 0:
            typer.echo(f"warning: {results_path(results, comp, imageset, c)} holds no detection: AP 0", err=True)
    typer.echo(format_table(results_by_class))
    if out is not None:
        atomic_write_json(out, summary(results_by_class))
        typer.echo(f"-> {out}")
    else:
        typer.echo(json.dumps(summary(results_by_class), sort_keys=True))
