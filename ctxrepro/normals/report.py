"""Outputs of the surface-normal stage (paper section 4.4, Table 2): the test predictions as a compressed
array file, the pooled metrics, a Table-2-style markdown table beside the paper's rows, and a PNG of test
images with their ground truth, prediction and error.

Predictions file (`predictions.npz`, np.load-able): `normals` (N, 480, 640, 3) float16 unit normals, the
stored values being exactly what the metrics scored, and `index` (N,) int64, the 0-based NYUv2 image of each
row. The normals member is streamed into the zip one image at a time, so the paper's 654 test images
(1.2 GB as float16) never sit in memory at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ctxrepro.metrics.normals import angular_errors, pooled_metrics_spilled
from ctxrepro.normals.data import GroundTruth
from ctxrepro.normals.grid import CellGrid
from ctxrepro.normals.model import full_resolution
from ctxrepro.normals.table import PAPER_TABLE2
from ctxrepro.normals.table import TABLE2_COLUMNS as TABLE_KEYS


@contextlib.contextmanager
def npz_writer(path: Path, name: str, shape: tuple[int, ...], dtype,
               extras: dict[str, np.ndarray] | None = None) -> Iterator[Callable[[np.ndarray], None]]:
    """Stream one (N, ...) array member of an .npz, block of rows by block; complete or absent.

    Yields write_rows: call it with consecutive blocks whose rows add up to N. `extras` (small arrays)
    become further members once the streamed one is closed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    dtype = np.dtype(dtype)
    written = 0

    def write_rows(block: np.ndarray) -> None:
        nonlocal written
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.shape[1:] != shape[1:] or written + len(block) > shape[0]:
            raise ValueError(f"{path}: a block of shape {block.shape} does not fit {name} {shape} after {written} rows")
        member.write(block.tobytes())
        written += len(block)

    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(member, header)
                yield write_rows
            if written != shape[0]:
                raise ValueError(f"{path}: {name} got {written} of {shape[0]} rows")
            for key, array in (extras or {}).items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as extra:
                    np.lib.format.write_array(extra, np.asarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Example:
    """One test image for the figure: the image, ground truth with its mask, the stored prediction."""

    index: int
    image: np.ndarray
    gt: np.ndarray
    valid: np.ndarray
    pred: np.ndarray


@dataclass
class Evaluation:
    metrics: dict[str, float]
    examples: list[Example] = field(default_factory=list)


def evaluate_and_store(coarse: np.ndarray, indices: np.ndarray, gt: GroundTruth,
                       image_of: Callable[[int], np.ndarray], grid: CellGrid, pred_path: Path,
                       n_examples: int) -> Evaluation:
    """Upsample each test prediction to the frame from its cells' centres (`grid`), store it (float16), and
    score exactly the stored values against the ground truth, pooled over all valid pixels (one pass)."""
    size = grid.size
    examples: list[Example] = []
    pred_path.parent.mkdir(parents=True, exist_ok=True)  # the errors spill there before the first image

    def errors() -> Iterator[np.ndarray]:
        extras = {"index": np.asarray(indices, dtype=np.int64)}
        with npz_writer(pred_path, "normals", (len(indices), *size, 3), np.float16, extras) as write_rows:
            for k, i in enumerate(indices):
                pred = full_resolution(coarse[k], grid, np.float16)
                write_rows(pred[None])
                normals, valid = gt(int(i))
                if k < n_examples:
                    examples.append(Example(int(i), image_of(int(i)), normals, valid, pred))
                yield angular_errors(pred, normals, valid, image=int(i))

    return Evaluation(pooled_metrics_spilled(errors(), spill_dir=pred_path.parent), examples)


def table2_markdown(ours: list[tuple[str, dict[str, float]]], note: str = "") -> str:
    """Table 2 of the paper with our rows below it (mean/median lower is better; % within higher)."""
    lines = ["| NYUv2 normals | Mean | Median | 11.25° | 22.5° | 30° | RMSE |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, values in PAPER_TABLE2:
        lines.append(f"| {label} (paper) | " + " | ".join(f"{v:.1f}" for v in values) + " | – |")
    for label, m in ours:
        lines.append(f"| {label} | " + " | ".join(f"{m[k]:.1f}" for k in (*TABLE_KEYS, "rmse")) + " |")
    text = "\n".join(lines) + "\n"
    return text + (f"\n{note}\n" if note else "")


def combined_table(metrics_files: list[Path], note: str = "") -> str:
    """One Table 2 with a row per initialisation, from the stage's metrics/normals/<init>.json files
    (for a report: the foreach items of the stage cannot see each other's results)."""
    rows = [(f"{Path(p).stem} (this run)", json.loads(Path(p).read_text())) for p in sorted(metrics_files)]
    return table2_markdown(rows, note)


def normals_rgb(normals: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit normals as colours, (1 + n) / 2 per x, y, z -> R, G, B; pixels without ground truth grey."""
    rgb = np.clip((1.0 + normals.astype(np.float32)) * 127.5, 0, 255).astype(np.uint8)
    rgb[~valid] = 128
    return rgb


def error_rgb(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, vmax: float = 60.0) -> np.ndarray:
    """Angular error (0..vmax degrees, viridis) where the ground truth is valid; grey elsewhere."""
    from matplotlib import colormaps

    err = np.zeros(valid.shape)
    if valid.any():
        err[valid] = angular_errors(pred, gt, valid)
    rgb = (colormaps["viridis"](np.clip(err / vmax, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)
    rgb[~valid] = 128
    return rgb


def examples_png(path: Path, examples: list[Example], title: str, panel: tuple[int, int] = (180, 240)) -> None:
    """Rows of image | ground truth | prediction | error, each panel `panel` = (h, w) px."""
    import cv2

    from ctxrepro.viz import save_annotated

    h, w = panel
    pad = 4
    rows = []
    for ex in examples:
        panels = (ex.image, normals_rgb(ex.gt, ex.valid), normals_rgb(ex.pred, np.ones_like(ex.valid)),
                  error_rgb(ex.pred, ex.gt, ex.valid))
        small = [cv2.resize(p, (w, h), interpolation=cv2.INTER_AREA) for p in panels]
        gap = np.full((h, pad, 3), 255, np.uint8)
        rows.append(np.concatenate([x for p in small for x in (p, gap)][:-1], axis=1))
    sep = np.full((pad, rows[0].shape[1], 3), 255, np.uint8)
    canvas = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    names = ("image", "ground truth", "prediction", "error (0-60°)")
    labels = [(c * (w + pad) + w / 2, name) for c, name in enumerate(names)]
    save_annotated(path, canvas, title=title, labels=labels,
                   footer="normals as RGB = (1 + n) / 2; grey: no ground truth")
