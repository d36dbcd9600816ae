"""Progress for long loops: a live bar with a rate on a terminal, plain log lines elsewhere (CI, DVC logs)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_log = logging.getLogger("ctxrepro.progress")


def _fmt_rate(n: float, seconds: float, unit: str) -> str:
    rate = n / seconds if seconds > 0 else 0.0
    return f"{rate:,.1f} {unit}/s"


def track(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    log: logging.Logger | None = None,
    every_seconds: float = 10.0,
    stream=None,
) -> Iterator[T]:
    """Yield from `iterable`, reporting count, rate (items/s) and, when `total` is known, an ETA.

    On a terminal the report is one line rewritten in place; otherwise it is a log line at most every
    `every_seconds` seconds plus a final one, so CI and `dvc repro` logs stay readable.
    """
    stream = stream if stream is not None else sys.stderr
    log = log or _log
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    start = last = time.monotonic()
    n = 0

    def line() -> str:
        elapsed = time.monotonic() - start
        text = f"{desc}: {n:,}" + (f"/{total:,}" if total else "") + f" {unit} [{_fmt_rate(n, elapsed, unit)}"
        if total and n:
            text += f", eta {max(0.0, elapsed / n * (total - n)):.0f}s"
        return text + f", {elapsed:.0f}s elapsed]"

    for item in iterable:
        yield item
        n += 1
        now = time.monotonic()
        if interactive and now - last >= 0.2:
            stream.write("\r" + line())
            stream.flush()
            last = now
        elif not interactive and now - last >= every_seconds:
            log.info(line())
            last = now
    if interactive:
        stream.write("\r" + line() + "\n")
        stream.flush()
    else:
        log.info(line())
