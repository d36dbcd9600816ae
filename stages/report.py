"""Write REPORT.md: every table and number of the paper beside ours, offline plots, what changed (issue 10)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ctxrepro.config import param
from ctxrepro.io import atomic_write_json
from ctxrepro.report.writer import write_report
from ctxrepro.stage import StageContext

METRICS = Path("metrics/report.json")


@dataclass(frozen=True)
class Params:
    against: str = param("HEAD~1", help="revision for `dvc metrics diff` in the what-changed section; '' = skip")
    max_diff_rows: int = param(200, min=1, help="rows of the what-changed table at most")
    diff_timeout: float = param(300.0, min=1.0, help="seconds `dvc metrics diff` may take")


def run(params: Params, ctx: StageContext) -> None:
    summary = write_report(ctx.root, params.against, params.max_diff_rows, params.diff_timeout, log=ctx.log)
    ctx.log.info("REPORT.md: profile %s, %d metrics files, %d figures, not run: %s; what changed: %s",
                 summary["profile"], summary["metrics_files"], summary["figures"],
                 ", ".join(summary["not_run"]) or "none", summary["diff_status"])
    # numbers only: the commit and the stage names are in REPORT.md, and strings would churn `dvc metrics diff`
    keys = ("metrics_files", "metrics_unreadable", "stages_not_run", "figures", "diff_rows")
    atomic_write_json(ctx.root / METRICS, {k: summary[k] for k in keys})
