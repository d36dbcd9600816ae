"""Purity-coverage of discovered clusters (paper section 4.5.1, Figure 9), as issue 9 fixes it.

- Purity of a set: over all categories c, the largest fraction of the set's images whose labels hold c.
- Sets are sorted by purity, descending, stably (equal purities keep their given order).
- For k = 1..K: P_k = mean purity of the first k sets; C_k = |union of the first k sets| / N, N = the
  number of images in the labels file (the evaluated data set).
- AUC = sum_k P_k (C_k - C_{k-1}), C_0 = 0; `auc_at_0.5` is the same sum with C clipped at 0.5.

The command `ctxrepro eval purity-coverage --sets sets.json --labels labels.json [--out metrics.json]`
reads `sets.json` (a list of lists of image ids) and `labels.json` ({image id: [category, ...]}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import typer

from ctxrepro.io import atomic_write_json
from ctxrepro.metrics.inputs import EvalInputError
from ctxrepro.metrics.inputs import read_json as read_checked_json

CLIP = 0.5  # Figure 9: "In parentheses is the AUC up to a coverage of .5"


class PurityError(EvalInputError):
    """Input the evaluation cannot use; the message names the set and the image id."""


def set_purity(members: Sequence[str], labels: Mapping[str, Sequence[str]]) -> float:
    """The largest fraction of `members` whose labels contain one category (0 if none has any label)."""
    counts: dict[str, int] = {}
    for image in members:
        for category in set(labels[image]):
            counts[category] = counts.get(category, 0) + 1
    return max(counts.values(), default=0) / len(members)


def check_inputs(sets: Sequence[Sequence[str]], labels: Mapping[str, Sequence[str]]) -> None:
    """Every set non-empty, every member labelled; errors name the set index and the id."""
    for k, members in enumerate(sets):
        if not isinstance(members, (list, tuple)):
            raise PurityError(f"set {k} is a {type(members).__name__}, expected a list of image ids")
        if not members:
            raise PurityError(f"set {k} is empty")
        for image in members:
            if image not in labels:
                raise PurityError(f"set {k}: image id {image!r} is not in the labels")
    for image, cats in labels.items():
        if not isinstance(cats, (list, tuple)):
            raise PurityError(f"labels[{image!r}] is a {type(cats).__name__}, expected a list of categories")


def purity_coverage(sets: Sequence[Sequence[str]], labels: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """{"auc", "auc_at_0.5", "curve": [[C_k, P_k], ...]} for `sets` over the data set `labels` (module doc)."""
    check_inputs(sets, labels)
    if not labels:
        raise PurityError("the labels hold no image: coverage needs the evaluated data set's images")
    n = len(labels)
    purity = [set_purity(s, labels) for s in sets]
    order = sorted(range(len(sets)), key=lambda k: -purity[k])  # sorted() is stable
    covered: set[str] = set()
    curve, auc, auc_clip = [], 0.0, 0.0
    total, prev = 0.0, 0.0
    for k, j in enumerate(order, start=1):
        total += purity[j]
        covered.update(sets[j])
        p_k, c_k = total / k, len(covered) / n
        auc += p_k * (c_k - prev)
        auc_clip += p_k * (min(c_k, CLIP) - min(prev, CLIP))
        curve.append([c_k, p_k])
        prev = c_k
    return {"auc": auc, "auc_at_0.5": auc_clip, "curve": curve}


def chance_reference(labels: Mapping[str, Sequence[str]], n_sets: int, set_size: int, seed: int,
                     draws: int = 10) -> dict[str, float]:
    """Mean AUCs of `n_sets` sets of `set_size` images drawn uniformly without replacement from the labelled
    images (`draws` seeded draws): what the same selection budget scores with no mining at all."""
    import numpy as np

    ids = sorted(labels)
    if n_sets == 0 or set_size > len(ids):
        return {"auc": 0.0, "auc_at_0.5": 0.0}
    aucs, halves = [], []
    for rng in (np.random.default_rng([seed, d]) for d in range(draws)):
        sets = [[ids[i] for i in rng.choice(len(ids), set_size, replace=False)] for _ in range(n_sets)]
        out = purity_coverage(sets, labels)
        aucs.append(out["auc"])
        halves.append(out["auc_at_0.5"])
    return {"auc": float(np.mean(aucs)), "auc_at_0.5": float(np.mean(halves))}


def evaluate_files(sets_path: Path, labels_path: Path) -> dict[str, Any]:
    """purity_coverage of a sets file against a labels file, with errors that name the file."""
    sets = read_checked_json(sets_path, "sets file", PurityError)
    labels = read_checked_json(labels_path, "labels file", PurityError)
    if not isinstance(sets, list):
        raise PurityError(f"{sets_path}: expected a list of sets (lists of image ids)")
    if not isinstance(labels, dict):
        raise PurityError(f"{labels_path}: expected an object mapping image ids to lists of categories")
    try:
        return purity_coverage(sets, labels)
    except PurityError as e:
        raise PurityError(f"{sets_path} against {labels_path}: {e}") from e


def purity_command(
    sets: Path = typer.Option(..., "--sets", help="JSON list of sets, each a list of image ids"),
    labels: Path = typer.Option(..., "--labels", help="JSON object: every image id of the data set -> categories"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the metrics JSON here (default: print it)"),
) -> None:
    """Purity-coverage AUC of image sets (paper section 4.5.1, Figure 9)."""
    try:
        result = evaluate_files(sets, labels)
    except EvalInputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if out is None:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        atomic_write_json(out, result)
        typer.echo(f"auc {result['auc']:.4f} (at 0.5: {result['auc_at_0.5']:.4f}) over {len(result['curve'])} "
                   f"sets -> {out}")
