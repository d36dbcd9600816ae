"""Offline PNGs of the pipeline's DVC plots, for REPORT.md (issue 10: `dvc plots show` loads vega from a CDN).

Four figures, each from the file the owning stage writes: the pretraining curves (dvclive TSVs, plus the
detection fine-tuning loss CSVs), the pretext confusion matrix (section 4.6), per-class detection AP beside
the paper's Table 1 row (section 4.3), and purity-coverage (Figure 9). Drawn with matplotlib's object API on
the Agg canvas (no pyplot state, no display); each file is written atomically. A figure whose input is
missing is skipped with the reason, which the report prints.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np

from ctxrepro.data.voc import VOC_CLASSES
from ctxrepro.io import atomic_write_bytes
from ctxrepro.report import paper_numbers as P
from ctxrepro.report.tables import RunData
from ctxrepro.viz import plot_confusion

PRETRAIN_CURVES = Path(f"dvclive/pretrain/{P.MAIN_VARIANT}/plots/metrics/train")  # Live("dvclive/pretrain/<variant>")
DETECT_PLOTS = Path("plots/detect")  # <init>/loss.csv
CONFUSION = Path("plots/pretext_eval/confusion.csv")
PURITY = Path("plots/mine/purity_coverage.csv")
# Figure 2's labels 0..7, named by where the second patch lies relative to the first (docs/METHOD.md)
POSITIONS = ("0 UL", "1 U", "2 UR", "3 L", "4 R", "5 DL", "6 D", "7 DR")


class PlotInputError(ValueError):
    """An input file that exists but cannot be plotted; the message names it."""


class MissingInput(Exception):
    """The stage that writes a figure's input has not run; the message names the file."""


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_table(path: Path, delimiter: str = ",") -> dict[str, list[str]]:
    """A CSV/TSV with a header as {column: values}; a ragged or empty file is an error naming it."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows:
        raise PlotInputError(f"{path}: empty file")
    head, body = rows[0], rows[1:]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != len(head)]
    if bad:
        raise PlotInputError(f"{path}: line {bad[0]} has a different number of fields than the header")
    return {name: [r[i] for r in body] for i, name in enumerate(head)}


def _floats(table: dict[str, list[str]], column: str, path: Path) -> np.ndarray:
    if column not in table:
        raise PlotInputError(f"{path}: no column {column!r} (columns: {', '.join(table)})")
    try:
        return np.array([float(v) for v in table[column]], dtype=np.float64)
    except ValueError as e:
        raise PlotInputError(f"{path}: column {column!r}: {e}") from e


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def training_curves(root: Path, run: RunData, out: Path) -> None:
    """Pretext loss and accuracy against step (dvclive), and each detect run's fine-tuning loss."""
    curves = root / PRETRAIN_CURVES
    loss_tsv, acc_tsv = curves / "loss.tsv", curves / "accuracy.tsv"
    if not loss_tsv.is_file() or not acc_tsv.is_file():
        raise MissingInput(f"{PRETRAIN_CURVES}/loss.tsv and accuracy.tsv (written by the pretrain stage)")
    detect = sorted((root / DETECT_PLOTS).glob("*/loss.csv")) if (root / DETECT_PLOTS).is_dir() else []
    fig = _figure(12 if detect else 8, 3.6)
    axes = fig.subplots(1, 3 if detect else 2)
    for ax, path, name in ((axes[0], loss_tsv, "loss"), (axes[1], acc_tsv, "accuracy")):
        table = read_table(path, "\t")
        ax.plot(_floats(table, "step", path), _floats(table, name, path), label="train")
        ax.set_xlabel("step")
        ax.set_title(f"pretext {name} (pretrain)", fontsize=10)
    chance = (run.get(f"pretrain/{P.MAIN_VARIANT}") or {}).get("chance")
    if _is_num(chance):
        axes[1].axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.3f}")
    held = (run.get(f"pretrain/{P.MAIN_VARIANT}") or {}).get("heldout_accuracy")
    if _is_num(held):
        axes[1].axhline(held, color="tab:green", linestyle=":", label=f"held-out {held:.3f}")
    axes[1].legend(fontsize=8)
    if detect:
        for path in detect:
            table = read_table(path)
            axes[2].plot(_floats(table, "iteration", path), _floats(table, "loss", path), label=path.parent.name)
        axes[2].set_xlabel("iteration")
        axes[2].set_title("detection fine-tuning loss (detect)", fontsize=10)
        axes[2].legend(fontsize=8)
    _save(fig, out)


def read_confusion(path: Path) -> np.ndarray:
    """8 x 8 counts [actual, predicted] from the (actual, predicted) rows pretext_eval records (section 4.6)."""
    table = read_table(path)
    actual, predicted = _floats(table, "actual", path), _floats(table, "predicted", path)
    labels = np.concatenate([actual, predicted])
    if np.any((labels < 0) | (labels > 7) | (labels != np.round(labels))):
        raise PlotInputError(f"{path}: labels must be integers 0..7 (Figure 2's positions)")
    counts = np.zeros((8, 8), dtype=np.int64)
    np.add.at(counts, (actual.astype(np.int64), predicted.astype(np.int64)), 1)
    return counts


def pretext_confusion(root: Path, run: RunData, out: Path) -> None:
    """The confusion matrix of the VOC 2007 pairs, from the pairs pretext_eval recorded."""
    path = root / CONFUSION
    if not path.is_file():
        raise MissingInput(f"{CONFUSION} (written by the pretext_eval stage)")
    acc = (run.get("pretext_eval") or {}).get("accuracy")
    title = "pretext positions, VOC 2007 pairs" + (f": accuracy {acc:.3f}" if _is_num(acc) else "")
    plot_confusion(out, read_confusion(path), POSITIONS, f"{title} (chance 0.125)")


def detect_ap(root: Path, run: RunData, out: Path) -> None:
    """Per-class AP of every detect run (bars) and of the Table 1 row it reproduces (hollow markers)."""
    inits = run.inits("detect")
    if not inits:
        raise MissingInput("metrics/detect/*.json (written by the detect stage)")
    runs = {i: run.metrics[f"detect/{i}"] for i in inits}
    classes = [c for c in VOC_CLASSES if any(c in (m.get("ap") or {}) for m in runs.values())]
    fig = _figure(max(6.0, 0.5 * len(classes) * max(1, len(inits) / 2) + 2), 4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(inits)
    x = np.arange(len(classes))
    marked = False
    for k, (init, m) in enumerate(runs.items()):
        ap = m.get("ap") or {}
        ys = [100 * ap[c] if _is_num(ap.get(c)) else np.nan for c in classes]
        xs = x - 0.4 + width * (k + 0.5)
        ax.bar(xs, ys, width, label=f"{init} (ours, as {m.get('paper_row') or 'no paper row'})")
        row = m.get("paper_row")
        if row in P.PAPER_TABLE1:  # black marks over each bar: visible on top of it or inside it
            ax.scatter(xs, [P.PAPER_TABLE1[row][VOC_CLASSES.index(c)] for c in classes], marker="_",
                       s=max(40.0, 400 * width), linewidths=2, color="black",
                       label=None if marked else "paper, the Table 1 row of each bar")
            marked = True
    ax.set_xticks(x, classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.set_title("VOC 2007 test AP per class: ours (bars), the paper's Table 1 (black marks)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, out)


def purity_coverage(root: Path, run: RunData, out: Path) -> None:
    """Figure 9's curve from the mine stage, with our AUCs and the paper's in the legend."""
    path = root / PURITY
    if not path.is_file():
        raise MissingInput(f"{PURITY} (written by the mine stage with mine.evaluate: true)")
    table = read_table(path)
    coverage, purity = _floats(table, "coverage", path), _floats(table, "purity", path)
    m = run.get("mine") or {}
    fig = _figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if len(coverage):  # the first set's purity holds from coverage 0 (as mining.html draws it)
        coverage, purity = np.concatenate([[0.0], coverage]), np.concatenate([[purity[0]], purity])
    auc, half = m.get("auc"), m.get("auc_at_0.5")
    label = "ours" + (f", AUC {auc:.3f} ({half:.3f})" if _is_num(auc) and _is_num(half) else "")
    ax.plot(coverage, purity, drawstyle="steps-pre", label=label)
    f = P.FIGURE_9
    ax.plot([], [], " ", label=f"paper: ours AUC {f['auc'].value:.2f}, ECCV 2014 {f['baseline_auc'].value:.2f}")
    if _is_num(m.get("chance_auc")):
        ax.plot([], [], " ", label=f"random sets: AUC {m['chance_auc']:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage")
    ax.set_ylabel("purity")
    ax.set_title("Figure 9: purity vs coverage (VOC 2007 subset)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, out)


PLOTS: dict[str, tuple[str, Callable[[Path, RunData, Path], None]]] = {
    "training_curves.png": ("Training curves: pretext loss and accuracy; detection fine-tuning loss", training_curves),
    "pretext_confusion.png": ("Pretext confusion matrix on VOC 2007 pairs (section 4.6)", pretext_confusion),
    "detect_ap.png": ("Per-class AP beside Table 1 (section 4.3)", detect_ap),
    "purity_coverage.png": ("Purity-coverage (Figure 9, section 4.5.1)", purity_coverage),
}


def render_plots(root: Path, run: RunData, out_dir: Path) -> dict[str, str | None]:
    """Draw every figure into out_dir: {file name: None when drawn, else why it was skipped}."""
    made: dict[str, str | None] = {}
    for name, (_, draw) in PLOTS.items():
        try:
            draw(root, run, out_dir / name)
            made[name] = None
        except MissingInput as e:
            made[name] = f"not run: missing {e}"
        except (OSError, PlotInputError) as e:
            made[name] = f"unreadable input: {e}"
    return made
