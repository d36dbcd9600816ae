"""Surface-normal accuracy on NYUv2 (paper section 4.4, Table 2; docs/DATA.md "NYUv2 surface normals").

The protocol of Fouhey et al. 2013 as Wang et al. 2015 and the FAIR benchmark use it:
- predicted and ground-truth normals are renormalised to unit length;
- per-pixel error = degrees(arccos(clip(dot, -1, 1))), computed in float64;
- errors are pooled over every valid pixel of every image (not a mean of per-image means);
- reported: mean, median, RMSE of the angular errors, and the percentage of pixels with error <= 11.25,
  22.5 and 30 degrees.

Memory stays bounded however many images there are: images are streamed one at a time, their errors are
computed once and spilled to an unnamed temporary file (8 bytes a pixel: 1.6 GB of disk for the
654 x 480 x 640 test set), and the exact median comes from a radix selection over the float64 errors' bit
patterns (non-negative IEEE doubles order like their bits read as unsigned integers). Each pass over the
spilled errors histograms the next 16 bits of the errors that share the order statistic's known high bits;
once that bucket holds at most `collect_limit` errors, one more pass collects them and `np.partition`
finishes. The memory bound is one image, two 65,536-bin histograms and `collect_limit` float64 values
(32 MiB by default); at most 6 passes read the spill file.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import typer

from ctxrepro.io import atomic_write_json
from ctxrepro.metrics.inputs import EvalInputError, load_npy

THRESHOLDS = (11.25, 22.5, 30.0)  # Fouhey et al. 2013; Table 2's columns
KEYS = ("mean", "median", "rmse", "within_11.25", "within_22.5", "within_30")
DIGIT_BITS = 16
COLLECT_LIMIT = 1 << 22  # errors held at once to finish the median (4 Mi float64 = 32 MiB)


class NormalsEvalError(EvalInputError):
    """Inputs the metric cannot score; the message names the array, shape or image at fault."""


def threshold_key(t: float) -> str:
    """'within_11.25', 'within_22.5', 'within_30' (no trailing '.0')."""
    return f"within_{t:g}"


def _unit(v: np.ndarray, name: str, image: int) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norm = np.sqrt(np.einsum("...i,...i->...", v, v))
    bad = ~(np.isfinite(norm) & (norm > 0))
    if bad.any():
        raise NormalsEvalError(f"{name}: image {image} has {int(bad.sum())} valid pixel(s) with a zero-length "
                               f"or non-finite normal, which cannot be renormalised")
    return v / norm[..., None]


def angular_errors(pred: np.ndarray, gt: np.ndarray, mask: Optional[np.ndarray] = None,
                   image: int = 0) -> np.ndarray:
    """Float64 angular errors in degrees at the valid pixels of one image.

    pred, gt: (H, W, 3) in any float dtype; mask: (H, W) bool, default where gt is non-zero.
    """
    gt = np.asarray(gt)
    if mask is None:
        mask = np.any(gt != 0, axis=-1)
    p = _unit(np.asarray(pred)[mask], "pred", image)
    g = _unit(gt[mask], "gt", image)
    dot = np.clip(np.einsum("ij,ij->i", p, g), -1.0, 1.0)
    # + 0.0 turns a -0.0 into +0.0, so that bit patterns order like the values (see module doc)
    return np.degrees(np.arccos(dot)) + 0.0


ErrorSource = Callable[[], Iterable[np.ndarray]]


@dataclass
class _Rank:
    """Radix-selection state of one order statistic: the known high bits and the rank among the errors
    that share them."""

    rank: int
    prefix: int = 0
    known: int = 0  # how many high bits of the answer are fixed
    bucket: int = 0  # errors sharing those bits
    value: Optional[float] = None

    def key(self) -> tuple[int, int]:
        return self.prefix, self.known


def _matching(bits: np.ndarray, prefix: int, known: int) -> np.ndarray:
    if known == 0:
        return bits
    return bits[(bits >> np.uint64(64 - known)) == np.uint64(prefix)]


def _histogram_pass(source: ErrorSource, keys: list[tuple[int, int]]) -> dict:
    hists = {k: np.zeros(1 << DIGIT_BITS, np.int64) for k in keys}
    for errors in source():
        bits = np.ascontiguousarray(errors, dtype=np.float64).view(np.uint64)
        for (prefix, known), hist in hists.items():
            shift = np.uint64(64 - known - DIGIT_BITS)
            digits = (_matching(bits, prefix, known) >> shift) & np.uint64((1 << DIGIT_BITS) - 1)
            hist += np.bincount(digits.astype(np.int64), minlength=1 << DIGIT_BITS)
    return hists


def _descend(r: _Rank, hist: np.ndarray) -> None:
    """Fix the next 16 bits of r's answer from the histogram of its bucket."""
    cum = np.cumsum(hist)
    digit = int(np.searchsorted(cum, r.rank, side="right"))
    r.rank -= int(cum[digit - 1]) if digit else 0
    r.bucket = int(hist[digit])
    r.prefix = (r.prefix << DIGIT_BITS) | digit
    r.known += DIGIT_BITS
    if r.known == 64:  # every bit known: the value itself
        r.value = float(np.array([r.prefix], np.uint64).view(np.float64)[0])


def _collect_pass(source: ErrorSource, ranks: list[_Rank]) -> None:
    groups: dict[tuple[int, int], list[np.ndarray]] = {r.key(): [] for r in ranks}
    for errors in source():
        bits = np.ascontiguousarray(errors, dtype=np.float64).view(np.uint64)
        for (prefix, known), parts in groups.items():
            parts.append(_matching(bits, prefix, known).copy())
    for r in ranks:
        values = np.concatenate(groups[r.key()]).view(np.float64)
        r.value = float(np.partition(values, r.rank)[r.rank])


def order_statistics(source: ErrorSource, n: int, ranks: Iterable[int],
                     collect_limit: int = COLLECT_LIMIT) -> list[float]:
    """The exact rank-k smallest errors (0-based) of the `n` errors that `source()` yields, image by image.

    `source` is called once per pass and must yield the same arrays each time.
    """
    states = [_Rank(int(k), bucket=n) for k in ranks]
    for r in states:
        if not 0 <= r.rank < n:
            raise ValueError(f"rank {r.rank} is outside 0..{n - 1}")
    while True:
        todo = [r for r in states if r.value is None]
        if not todo:
            return [r.value for r in states]
        ready = [r for r in todo if r.bucket <= collect_limit]
        if ready:
            _collect_pass(source, ready)
            continue
        hists = _histogram_pass(source, sorted({r.key() for r in todo}))
        for r in todo:
            _descend(r, hists[r.key()])


def pooled_metrics(source: ErrorSource, collect_limit: int = COLLECT_LIMIT) -> dict[str, float]:
    """The six Table 2 numbers over all errors `source()` yields (pooled over images).

    Raises NormalsEvalError when there is no valid pixel at all.
    """
    n, total, squares = 0, 0.0, 0.0
    within = dict.fromkeys(THRESHOLDS, 0)
    for errors in source():
        n += errors.size
        total += float(np.sum(errors, dtype=np.float64))
        squares += float(np.sum(errors * errors, dtype=np.float64))
        for t in THRESHOLDS:
            within[t] += int(np.count_nonzero(errors <= t))
    if n == 0:
        raise NormalsEvalError("the mask selects no valid pixel in any image: nothing to evaluate")
    lo, hi = order_statistics(source, n, ((n - 1) // 2, n // 2), collect_limit)
    out = {"mean": total / n, "median": (lo + hi) / 2.0, "rmse": math.sqrt(squares / n)}
    out.update({threshold_key(t): 100.0 * within[t] / n for t in THRESHOLDS})
    return out


def pooled_metrics_spilled(errors: Iterable[np.ndarray], spill_dir: Optional[Path] = None,
                           collect_limit: int = COLLECT_LIMIT) -> dict[str, float]:
    """`pooled_metrics` over a one-shot stream of per-image errors, each computed once.

    The errors go to an unnamed temporary file (in `spill_dir`, default the system's) as they arrive,
    8 bytes a pixel; the median's extra passes read them back image by image.
    """
    with tempfile.TemporaryFile(dir=spill_dir, prefix="normal-errors.") as f:
        sizes = []
        for e in errors:
            e = np.ascontiguousarray(e, dtype=np.float64)
            f.write(e.tobytes())
            sizes.append(e.size)

        def source() -> Iterator[np.ndarray]:
            f.seek(0)
            for n in sizes:
                yield np.frombuffer(f.read(8 * n), dtype=np.float64)

        return pooled_metrics(source, collect_limit)


def _check_arrays(pred: np.ndarray, gt: np.ndarray, mask: Optional[np.ndarray]) -> None:
    if pred.shape != gt.shape:
        raise NormalsEvalError(f"pred has shape {pred.shape} but gt has shape {gt.shape}; they must match")
    if pred.ndim != 4 or pred.shape[-1] != 3:
        raise NormalsEvalError(f"pred and gt have shape {pred.shape}; expected (N, H, W, 3)")
    for name, a in (("pred", pred), ("gt", gt)):
        if a.dtype.kind != "f":
            raise NormalsEvalError(f"{name} has dtype {a.dtype}; expected a float array")
    if mask is not None:
        if mask.shape != pred.shape[:3]:
            raise NormalsEvalError(f"mask has shape {mask.shape} but pred has shape {pred.shape}; "
                                   f"expected mask shape {pred.shape[:3]}")
        if mask.dtype != np.bool_:
            raise NormalsEvalError(f"mask has dtype {mask.dtype}; expected bool")


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, mask: Optional[np.ndarray] = None,
                    collect_limit: int = COLLECT_LIMIT) -> dict[str, float]:
    """Table 2 metrics of (N, H, W, 3) arrays (memory-mapped ones are read one image at a time)."""
    _check_arrays(pred, gt, mask)
    errors = (angular_errors(pred[i], gt[i], None if mask is None else mask[i], image=i)
              for i in range(pred.shape[0]))
    return pooled_metrics_spilled(errors, collect_limit=collect_limit)


def evaluate_files(pred: Path, gt: Path, mask: Optional[Path] = None) -> dict[str, float]:
    """Table 2 metrics of .npy files, memory-mapped so that only one image is in memory at a time."""
    p, g = load_npy(pred, "--pred array", NormalsEvalError), load_npy(gt, "--gt array", NormalsEvalError)
    m = None if mask is None else load_npy(mask, "--mask array", NormalsEvalError)
    return evaluate_arrays(p, g, m)


def normals_command(
    pred: Path = typer.Option(..., "--pred", help="predicted normals: float .npy of shape (N, H, W, 3)"),
    gt: Path = typer.Option(..., "--gt", help="ground-truth normals: float .npy of shape (N, H, W, 3)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="valid pixels: bool .npy (N, H, W); "
                                        "default: where gt is non-zero"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the metrics to this JSON file"),
) -> None:
    """Surface-normal accuracy (paper Table 2): mean, median, RMSE, % within 11.25/22.5/30 degrees."""
    try:
        metrics = evaluate_files(pred, gt, mask)
    except EvalInputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if out is not None:
        atomic_write_json(out, metrics)
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True))
