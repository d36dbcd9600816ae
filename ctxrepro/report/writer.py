"""REPORT.md: every table and number of the paper beside ours, with provenance, figures and what changed.

The `report` stage (last in dvc.yaml) and `ctxrepro report` both call `write_report`. It reads the stages'
metrics files (never re-typed numbers), the code commit each of them recorded (`ctxrepro.stage`), and the
params profile (`ctxrepro.profiles.current_profile`); draws the DVC plots as PNGs under plots/report
(`ctxrepro.report.plots`, since `dvc plots show` needs a CDN); links the stages' montage figures; and renders `dvc metrics diff
<against> --json` as a "what changed" table. Tables: `ctxrepro.report.tables`; paper values:
`ctxrepro.report.paper_numbers`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import typer

from ctxrepro.io import atomic_dir, atomic_write_text
from ctxrepro.profiles import current_profile
from ctxrepro.report import sections as S
from ctxrepro.report import tables as T
from ctxrepro.report.plots import PLOTS as REPORT_PLOTS
from ctxrepro.report.plots import render_plots
from ctxrepro.report.probes import probes_section
from ctxrepro.stage import git_commit

REPORT = Path("REPORT.md")
PLOTS = Path("plots/report")
SELF_METRICS = "metrics/report.json"  # the report's own metrics: stale while it runs, left out of the diff
PROVENANCE = "provenance."  # each metrics file's code commit (ctxrepro.stage.stamp_metrics): not a result
# Figures drawn by the stages themselves, in the paper's order: (glob under the repo root, what it shows)
MONTAGES = (("plots/nn/montage.png", "Figure 4: nearest neighbours (section 4.1)"),
            ("plots/aberration/figure5.png", "Figure 5: absolute (x, y) from chromatic aberration (section 4.2)"),
            ("plots/mine/clusters_*.png", "Figure 7: mined clusters (section 4.5)"),
            ("plots/mine/purity_coverage.png", "Figure 9: purity-coverage, as the mine stage drew it"),
            ("plots/normals/*/examples.png", "Surface normals on NYUv2 test images (section 4.4)"),
            ("plots/pretext_eval/confusion.png", "Pretext confusion matrix, as pretext_eval drew it (section 4.6)"))


@dataclass(frozen=True)
class MetricsDiff:
    """`dvc metrics diff` against a revision: status ok | no_revision | disabled | failed, a message, rows
    (file, metric, old, new, change), sorted, and dvc's warnings (it exits 0 when it cannot load a revision's
    metrics, so "nothing changed" may only mean "nothing could be read")."""

    status: str
    message: str
    rows: tuple[tuple[str, str, Any, Any, Any], ...] = ()
    warnings: tuple[str, ...] = ()


def _dvc() -> str | None:
    beside = Path(sys.executable).parent / "dvc"  # the venv's dvc, also when PATH lacks the venv
    return str(beside) if beside.exists() else shutil.which("dvc")


def _git_ok(root: Path, *args: str) -> bool:
    try:
        subprocess.run(["git", *args], cwd=root, capture_output=True, check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def parse_diff(data: dict) -> tuple[tuple[str, str, Any, Any, Any], ...]:
    """`dvc metrics diff --json` ({file: {metric: {old, new, diff}}}) as sorted rows, the report's own left out."""
    rows = []
    for file, changes in sorted(data.items()):
        if file == SELF_METRICS or not isinstance(changes, dict):
            continue
        for key, change in sorted(changes.items()):
            if key.startswith(PROVENANCE):  # a new commit is not a changed result
                continue
            c = change if isinstance(change, dict) else {}
            rows.append((file, key, c.get("old"), c.get("new"), c.get("diff")))
    return tuple(rows)


def metrics_diff(root: Path, against: str, timeout: float = 300.0) -> MetricsDiff:
    """Run `dvc metrics diff <against> --json` in root; every way it can fail becomes a status and a message."""
    if not against:
        return MetricsDiff("disabled", "no revision to compare against (report.against is empty)")
    if not _git_ok(root, "rev-parse", "--git-dir"):
        return MetricsDiff("no_revision", f"{root} is not a git repository, so there is no `{against}`")
    if not _git_ok(root, "rev-parse", "--verify", "--quiet", f"{against}^{{commit}}"):
        return MetricsDiff("no_revision", f"there is no revision `{against}` to compare against (a repository "
                                          f"with a single commit has no HEAD~1)")
    dvc = _dvc()
    if dvc is None:
        return MetricsDiff("failed", "dvc is not installed here, so metrics could not be compared")
    try:
        result = subprocess.run([dvc, "metrics", "diff", against, "--json"], cwd=root, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return MetricsDiff("failed", f"`dvc metrics diff {against}` did not finish in {timeout:g} s")
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return MetricsDiff("failed", f"`dvc metrics diff {against}` failed ({result.returncode}): {last}")
    try:
        data = json.loads(result.stdout or "{}")
    except ValueError as e:
        return MetricsDiff("failed", f"`dvc metrics diff {against} --json` printed no JSON: {e}")
    if not isinstance(data, dict):
        return MetricsDiff("failed", f"`dvc metrics diff {against} --json` printed a {type(data).__name__}, "
                                     f"not an object")
    warnings = tuple(line.strip() for line in result.stderr.splitlines()
                     if line.startswith("WARNING") or "failed to load" in line)
    return MetricsDiff("ok", f"`dvc metrics diff {against}` (workspace against {against})", parse_diff(data),
                       warnings)


def _value(x: Any) -> str:
    if x is None:
        return T.DASH
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def diff_section(diff: MetricsDiff, max_rows: int) -> list[str]:
    lines = ["## What changed", ""]
    if diff.status != "ok":
        return lines + [f"Not compared: {diff.message}."]
    if diff.warnings:
        lines += ["dvc warned, so some metrics may be missing from this comparison:", "",
                  *(f"- {w}" for w in diff.warnings), ""]
    if not diff.rows:
        return lines + [f"From {diff.message}: no metric changed."]
    lines += [f"From {diff.message}; `{T.DASH}` = absent in that revision.", ""]
    shown = diff.rows[:max_rows]
    lines += T.md_table(("metrics file", "metric", "old", "new", "change"),
                        [(f"`{f}`", f"`{k}`", _value(o), _value(n), _value(d)) for f, k, o, n, d in shown])
    if len(diff.rows) > len(shown):
        lines += ["", f"{len(diff.rows) - len(shown)} more changed metrics not shown (report.max_diff_rows)."]
    return lines


def header(run: T.RunData) -> list[str]:
    lines = ["# Reproduction report: Doersch, Gupta, Efros (ICCV 2015), context prediction", "",
             "Written by the `report` stage (`ctxrepro report`). Every reproduced number is read from the stages' "
             "metrics files; the paper's values (`ctxrepro/report/paper_numbers.py`) are printed beside them, never used "
             "to compute anything. `not run`: the stage's metrics file is missing.", "",
             f"- profile: `{run.profile}` (params.yaml against profiles/*.yaml)",
             f"- {T.code_line(run, T.STAGES)}: the commit each stage recorded in its metrics file when it ran (the "
             "`code` column below; a section names those of its stages), not the commit checked out now"]
    world = [T.DATASETS[d] for d, kind in sorted(run.sources.items()) if kind == "builtin" and d in T.DATASETS]
    if run.profile == "tiny" or world:
        lines += ["", f"> **Tiny world.** The numbers in this report come from the embedded tiny world "
                      f"(procedural scenes{': ' + ', '.join(world) if world else ''}) and a schedule scaled down for a "
                      f"2-core CPU (profile `{run.profile}`). They test the pipeline end to end; they cannot be "
                      f"compared with the paper's numbers. Each section says which data its numbers come from."]
    elif run.profile == "custom":
        lines += ["", "> **Custom profile.** params.yaml matches neither profile: compare with the paper only as far "
                      "as the params match profiles/paper.yaml (`dvc params diff`)."]
    return lines + ["", "## Provenance", ""] + T.data_sources(run) + [""] + T.stage_status(run)


def figures_section(root: Path, made: dict[str, str | None]) -> list[str]:
    lines = ["## Figures", "", "Drawn by the report from the DVC plot files (offline PNGs):", ""]
    for name, (caption, _) in REPORT_PLOTS.items():
        why = made.get(name, "not drawn")
        lines += [f"![{caption}]({PLOTS / name})", ""] if why is None else [f"- {caption}: {why}", ""]
    lines += ["Drawn by the stages (montages):", ""]
    for pattern, caption in MONTAGES:
        found = sorted(root.glob(pattern))
        links = ", ".join(f"[{p.relative_to(root)}]({p.relative_to(root)})" for p in found)
        lines.append(f"- {caption}: {links or T.NOT_RUN + ' (`' + pattern + '` missing)'}")
    return lines


def render(root: Path, run: T.RunData, diff: MetricsDiff, made: dict[str, str | None], max_diff_rows: int) -> str:
    """The whole REPORT.md text."""
    sections = [header(run), T.pretraining(run), T.table1(run), T.table2(run), S.section_4_6(run),
                S.section_4_2(run), S.figure_9(run), S.section_4_1(run), probes_section(root, run),
                figures_section(root, made),
                diff_section(diff, max_diff_rows)]
    return "\n\n".join("\n".join(s).rstrip() for s in sections) + "\n"


def write_report(root: Path, against: str = "HEAD~1", max_diff_rows: int = 200, diff_timeout: float = 300.0,
                 diff_fn: Callable[[Path, str, float], MetricsDiff] = metrics_diff,
                 log: logging.Logger | None = None) -> dict:
    """Write REPORT.md and plots/report/ under root (both complete or absent); return a summary for metrics."""
    log = log or logging.getLogger("ctxrepro.report.writer")
    run = T.load_run(root, current_profile(root), git_commit(root) or "unknown")
    for _, why in sorted(run.unreadable.items()):
        log.warning("report: %s", why)
    diff = diff_fn(root, against, diff_timeout)
    log.info("what changed: %s (%d rows)", diff.message, len(diff.rows))
    with atomic_dir(root / PLOTS) as tmp:
        made = render_plots(root, run, tmp)
    for name, why in made.items():
        if why is not None:
            log.info("report figure %s skipped: %s", name, why)
    atomic_write_text(root / REPORT, render(root, run, diff, made, max_diff_rows))
    missing = [s for s in T.STAGES if not T.stage_keys(run, s)]
    return {"profile": run.profile, "code_commits": T.code_commits(run), "metrics_files": len(run.metrics),
            "metrics_unreadable": len(run.unreadable), "stages_not_run": len(missing), "not_run": missing,
            "figures": sum(why is None for why in made.values()), "diff_status": diff.status,
            "diff_rows": len(diff.rows)}


def report_command(
    against: str = typer.Option("HEAD~1", "--against", help="revision for `dvc metrics diff` ('' = skip)"),
    root: Path = typer.Option(Path("."), "--root", help="repository root (REPORT.md and plots/report go there)"),
    max_diff_rows: int = typer.Option(200, "--max-diff-rows", min=1, help="rows of the what-changed table at most"),
) -> None:
    """Write REPORT.md: the paper's tables beside ours, offline PNG plots, and what changed since --against."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    summary = write_report(root.resolve(), against, max_diff_rows)
    typer.echo(f"wrote {root / REPORT} and {root / PLOTS}/ ({summary['figures']} figures; profile "
               f"{summary['profile']}; not run: {', '.join(summary['not_run']) or 'none'}; "
               f"what changed: {summary['diff_status']})")
