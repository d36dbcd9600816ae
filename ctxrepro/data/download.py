"""Resumable, verified HTTP(S) downloads with retries (docs/DATA.md "Archives"; the paper's data, section 3).

A file is downloaded to `<final>.part`, resumed with an HTTP Range request after an interruption
(restarting from zero when the server ignores Range), checked against its expected size and checksum,
and only then renamed to its final name. A file that fails its check stays `.part`: it is kept for
inspection and never exposed under the final name.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ctxrepro.data.registry import ChecksumError, Expected, HashingReader, Verdict

_log = logging.getLogger("ctxrepro.data.download")
USER_AGENT = "ctxrepro/0.1 (+https://github.com/; research reproduction)"
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")
# Network failures worth retrying; a failing disk write is not among them (it propagates).
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


class DownloadError(RuntimeError):
    """A download that could not complete; the message names the URL and the last error."""


class NotFoundError(DownloadError):
    """The server says the file does not exist (HTTP 404 or 410)."""


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` consecutive failures without progress end the download; waits double from `base_delay`."""

    attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 120.0
    timeout: float = 60.0  # seconds without data before a read fails

    def delay(self, failure: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** (failure - 1))


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    digests: dict[str, str] | None  # None: the file was already in the download cache, not re-hashed
    verdict: Verdict | None


class _Retry(Exception):
    """An attempt that ended early but may succeed when tried again."""


class ByteProgress:
    """Log lines with bytes done, rate (bytes/s) and ETA, at most every `every` seconds plus a last one."""

    def __init__(self, name: str, total: int | None, done: int, log: logging.Logger, every: float):
        self.name, self.total, self.done, self.log, self.every = name, total, done, log, every
        self.start_done, self.start = done, time.monotonic()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info(self.line(now))

    def line(self, now: float) -> str:
        rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
        text = f"{self.name}: {_mib(self.done)}"
        if self.total:
            text += f" / {_mib(self.total)} ({100 * self.done / self.total:.1f}%)"
        text += f", {_mib(rate)}/s"
        if self.total and rate > 0:
            text += f", eta {max(0.0, (self.total - self.done) / rate):.0f}s"
        return text

    def finish(self) -> None:
        self.log.info(self.line(time.monotonic()))


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _content_range(value: str | None, url: str) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header; None where the server sent '*'."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        raise DownloadError(f"{url}: unreadable Content-Range header {value!r}")
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return first, total


class _PartFile:
    """The `.part` file and a hash of exactly the bytes it holds, so a resume continues both."""

    def __init__(self, path: Path, algos: tuple[str, ...]):
        self.path, self.algos = path, algos
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, "rb") as f:
                self.hasher = HashingReader(f, algos)
                self.hasher.drain()
        else:
            self.restart()

    @property
    def size(self) -> int:
        return self.hasher.size

    def restart(self) -> None:
        self.path.write_bytes(b"")
        self.hasher = HashingReader(None, self.algos)

    def append_from(self, response, progress: ByteProgress) -> None:
        with open(self.path, "ab") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except _TRANSIENT as e:
                    raise _Retry(f"read failed after {self.size:,} bytes: {e!r}") from e
                if not chunk:
                    return
                out.write(chunk)
                self.hasher.update(chunk)
                progress.update(len(chunk))


def _attempt(url: str, part: _PartFile, retry: RetryPolicy, log: logging.Logger, every: float) -> None:
    """One request: resume from the `.part` size; return when the body is complete, or raise _Retry."""
    start = part.size
    try:
        response = _open(url, start, retry.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            _, total = _content_range(e.headers.get("Content-Range"), url)
            if total == start:
                return  # the .part already holds the whole file
            log.warning("%s: range %d- refused (file is %s bytes): restarting from zero", url, start, total)
            part.restart()
            raise _Retry("range not satisfiable") from e
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        error = NotFoundError if e.code in (404, 410) else DownloadError
        raise error(f"{url}: HTTP {e.code} {e.reason}") from e
    except _TRANSIENT as e:
        raise _Retry(f"connection failed: {e!r}") from e
    with response:
        total = _expected_total(response, url, start, part, log)
        progress = ByteProgress(part.path.name.removesuffix(".part"), total, part.size, log, every)
        part.append_from(response, progress)
        progress.finish()
    if total is not None and part.size != total:
        if part.size > total:
            part.restart()
        raise _Retry(f"connection closed after {part.size:,} of {total:,} bytes")


def _expected_total(response, url: str, start: int, part: _PartFile, log: logging.Logger) -> int | None:
    """The full file size the response leads to; restarts the .part when the server ignored Range."""
    length = response.headers.get("Content-Length")
    if response.status == 206:
        first, total = _content_range(response.headers.get("Content-Range"), url)
        if first != start:
            part.restart()
            raise _Retry(f"server answered range {first}- to a request for {start}-")
        return total
    if start:
        log.warning("%s: server ignored the Range request (HTTP %d): restarting from zero", url, response.status)
        part.restart()
    return int(length) if length is not None else None


def download_file(url: str, final: Path, *, expected: Expected | None = None, md5: str | None = None,
                  retry: RetryPolicy = RetryPolicy(), log: logging.Logger | None = None,
                  progress_every: float = 10.0) -> Downloaded:
    """Download `url` to `final` through `final.part`, resuming and retrying; verify, then rename.

    `expected` (registry entry and MD5SUMS listing) or `md5` (a plain expected md5) is checked once the
    transfer is complete; a mismatch raises ChecksumError naming the file, expected and actual value,
    and leaves the `.part` in place. A `final` that already exists is returned as is: it only ever
    appears after passing its check.
    """
    log = log or _log
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"{url!r}: only http and https URLs are supported")
    final = Path(final)
    if final.exists():
        log.info("%s: already downloaded", final)
        return Downloaded(final, final.stat().st_size, None, None)
    algos = expected.algos() if expected is not None else ("md5",)
    part = _PartFile(final.with_name(final.name + ".part"), algos)
    if part.size:
        log.info("%s: resuming from %s", part.path, _mib(part.size))
    _transfer(url, part, retry, log, progress_every)
    digests = part.hasher.digests()
    where = f"{final.name} (from {url}; kept as {part.path}, delete it to download again)"
    if md5 is not None and digests["md5"] != md5.lower():
        raise ChecksumError(f"{where}: md5 mismatch: expected {md5.lower()}, got {digests['md5']}")
    verdict = expected.verify(where, part.size, digests) if expected is not None else None
    for warning in verdict.warnings if verdict else ():
        log.warning(warning)
    os.replace(part.path, final)
    return Downloaded(final, part.size, digests, verdict)


def _transfer(url: str, part: _PartFile, retry: RetryPolicy, log: logging.Logger, every: float) -> None:
    failures = 0
    while True:
        before = part.size
        try:
            _attempt(url, part, retry, log, every)
            return
        except _Retry as e:
            failures = 1 if part.size > before else failures + 1  # progress resets the count
            if failures >= retry.attempts:
                raise DownloadError(f"{url}: gave up after {failures} failed attempts in a row "
                                    f"({e}); the partial file {part.path} is kept for resuming") from e
            wait = retry.delay(failures)
            log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", url, e, wait, failures + 1, retry.attempts)
            time.sleep(wait)


def fetch_small(url: str, *, retry: RetryPolicy = RetryPolicy(), log: logging.Logger | None = None) -> bytes | None:
    """GET a small optional file (an MD5SUMS listing) into memory; None when the server refuses it (4xx)."""
    log = log or _log
    for failure in range(1, retry.attempts + 1):
        try:
            with _open(url, 0, retry.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                log.info("%s: HTTP %d, so no listing to verify against", url, e.code)
                return None
            error: Exception = e
        except _TRANSIENT as e:
            error = e
        if failure < retry.attempts:
            log.warning("%s: %r; retrying in %.1fs", url, error, retry.delay(failure))
            time.sleep(retry.delay(failure))
    raise DownloadError(f"{url}: gave up after {retry.attempts} attempts ({error!r})")
