"""Downloads against a real HTTP server on 127.0.0.1: resume, ignored Range, checksums, retries, refusal."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ctxrepro.data import download
from ctxrepro.data.download import ByteProgress, DownloadError, NotFoundError, RetryPolicy, download_file
from ctxrepro.data.extract import UnsafeArchiveError
from ctxrepro.data.fetch import fetch_dataset
from ctxrepro.data.registry import Archive, Checksum, ChecksumError, Expected

FAST = RetryPolicy(attempts=4, base_delay=0.01, timeout=10.0)


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before closing, first GET only
    fail_with: dict[str, list[int]] = field(default_factory=dict)  # path -> status codes to answer first
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state
        state.requests.append((self.path, self.headers.get("Range")))
        if state.fail_with.get(self.path):
            self.send_error(state.fail_with[self.path].pop(0))
            return
        if self.path not in state.files:
            self.send_error(404)
            return
        data, start = state.files[self.path], 0
        asked = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if asked and not state.ignore_range:
            start = int(asked.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = state.cut_once.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])  # HTTP/1.0: the connection closes after


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []
    monkeypatch.setattr(download.time, "sleep", waited.append)
    return waited


def payload(n: int = 300_000) -> bytes:
    return bytes((i * 7 + i // 256) % 251 for i in range(n))


def test_cut_transfer_resumes_with_range_to_the_right_md5(server, tmp_path, sleeps):
    state, base = server
    data = payload()
    state.files["/a.bin"] = data
    state.cut_once["/a.bin"] = 123_457
    got = download_file(base + "/a.bin", tmp_path / "a.bin", md5=hashlib.md5(data).hexdigest(), retry=FAST)
    assert state.requests == [("/a.bin", None), ("/a.bin", "bytes=123457-")]
    assert (tmp_path / "a.bin").read_bytes() == data
    assert got.digests["md5"] == hashlib.md5(data).hexdigest() and got.size == len(data)
    assert not (tmp_path / "a.bin.part").exists()
    assert sleeps == [0.01]  # the cut attempt made progress: the failure count restarts at 1


def test_part_from_an_earlier_run_is_resumed(server, tmp_path, sleeps):
    state, base = server
    data = payload()
    state.files["/a.bin"] = data
    (tmp_path / "a.bin.part").write_bytes(data[:1000])
    download_file(base + "/a.bin", tmp_path / "a.bin", md5=hashlib.md5(data).hexdigest(), retry=FAST)
    assert state.requests == [("/a.bin", "bytes=1000-")]
    assert (tmp_path / "a.bin").read_bytes() == data


def test_complete_part_answered_416_is_finished_without_data(server, tmp_path, sleeps):
    state, base = server
    data = payload(5000)
    state.files["/a.bin"] = data
    (tmp_path / "a.bin.part").write_bytes(data)
    download_file(base + "/a.bin", tmp_path / "a.bin", md5=hashlib.md5(data).hexdigest(), retry=FAST)
    assert state.requests == [("/a.bin", "bytes=5000-")]
    assert (tmp_path / "a.bin").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, sleeps):
    state, base = server
    data = payload()
    state.files["/a.bin"] = data
    state.ignore_range = True
    state.cut_once["/a.bin"] = 50_000
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes that must not survive")
    download_file(base + "/a.bin", tmp_path / "a.bin", md5=hashlib.md5(data).hexdigest(), retry=FAST)
    # 1: resume asked, answered 200 and cut; 2: resume asked again, answered 200 in full.
    assert state.requests == [("/a.bin", "bytes=33-"), ("/a.bin", "bytes=50000-")]
    assert (tmp_path / "a.bin").read_bytes() == data


def test_checksum_mismatch_names_file_expected_actual_and_keeps_part(server, tmp_path, sleeps):
    state, base = server
    data = payload(4000)
    state.files["/VOCtest_06-Nov-2007.tar"] = data
    with pytest.raises(ChecksumError) as err:
        download_file(base + "/VOCtest_06-Nov-2007.tar", tmp_path / "VOCtest_06-Nov-2007.tar", md5="0" * 32,
                      retry=FAST)
    text = str(err.value)
    assert "VOCtest_06-Nov-2007.tar" in text and "0" * 32 in text and hashlib.md5(data).hexdigest() in text
    assert (tmp_path / "VOCtest_06-Nov-2007.tar.part").read_bytes() == data
    assert not (tmp_path / "VOCtest_06-Nov-2007.tar").exists()


def _archive(size: int, md5: str, verified: bool) -> Archive:
    return Archive("x.bin", "test", size, Checksum("md5", md5, verified), None, "file", "x.bin")


def test_registry_size_and_md5_checked_unverified_only_warns(server, tmp_path, sleeps, caplog):
    state, base = server
    data = payload(4000)
    state.files["/x.bin"] = data
    with caplog.at_level(logging.WARNING):
        got = download_file(base + "/x.bin", tmp_path / "x.bin", expected=Expected(_archive(4000, "f" * 32, False)),
                            retry=FAST)
    assert got.verdict.real and got.verdict.checked_against is None
    assert any("UNVERIFIED" in w and "f" * 32 in w for w in got.verdict.warnings)
    assert "UNVERIFIED" in caplog.text
    assert (tmp_path / "x.bin").read_bytes() == data
    (tmp_path / "x.bin").unlink()
    with pytest.raises(ChecksumError, match="f{32}"):
        download_file(base + "/x.bin", tmp_path / "x.bin", expected=Expected(_archive(4000, "f" * 32, True)),
                      retry=FAST)
    with pytest.raises(ChecksumError, match="expected 4,001 bytes"):
        download_file(base + "/x.bin", tmp_path / "x.bin", retry=FAST,
                      expected=Expected(_archive(4001, hashlib.md5(data).hexdigest(), True), official=True))
    assert not (tmp_path / "x.bin").exists()


def test_503_is_retried_with_doubling_backoff(server, tmp_path, sleeps):
    state, base = server
    data = payload(2000)
    state.files["/a.bin"] = data
    state.fail_with["/a.bin"] = [503, 503]
    download_file(base + "/a.bin", tmp_path / "a.bin", md5=hashlib.md5(data).hexdigest(), retry=FAST)
    assert len(state.requests) == 3
    assert sleeps == [0.01, 0.02]


def test_attempts_run_out_and_404_is_not_retried(server, tmp_path, sleeps):
    state, base = server
    state.files["/a.bin"] = payload(10)
    state.fail_with["/a.bin"] = [503] * 10
    with pytest.raises(DownloadError, match=r"/a\.bin: gave up after 4 failed attempts"):
        download_file(base + "/a.bin", tmp_path / "a.bin", retry=FAST)
    assert sleeps == [0.01, 0.02, 0.04]
    with pytest.raises(NotFoundError, match="404"):
        download_file(base + "/missing.bin", tmp_path / "m.bin", retry=FAST)
    assert state.requests[-1] == ("/missing.bin", None) and len(state.requests) == 5


def _tar(members: dict[str, bytes], evil_symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if evil_symlink:
            info = tarfile.TarInfo(evil_symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "../../../../etc"
            tf.addfile(info)
    return buf.getvalue()


def test_hostile_archive_downloaded_then_refused_leaving_no_output(server, tmp_path, sleeps):
    state, base = server
    name = "VOCtrainval_25-May-2011.tar"
    evil = _tar({"TrainVal/VOCdevkit/VOC2011/JPEGImages/a.jpg": b"jpg"}, evil_symlink="TrainVal/escape")
    state.files["/mirror/" + name] = evil
    state.files["/mirror/MD5SUMS"] = f"{hashlib.md5(evil).hexdigest()}  {name}\n".encode()
    dest = tmp_path / "raw" / "voc2011"
    with pytest.raises(UnsafeArchiveError, match="TrainVal/escape"):
        fetch_dataset("voc2011", base + "/mirror/", dest, tmp_path / "downloads", retry=FAST)
    assert not dest.exists() and list((tmp_path / "raw").iterdir()) == []
    assert (tmp_path / "downloads" / name).read_bytes() == evil  # verified download, kept in the cache
    assert ("/mirror/MD5SUMS", None) in state.requests


def test_fetch_from_base_url_verifies_against_md5sums(server, tmp_path, sleeps):
    state, base = server
    name = "VOCtrainval_25-May-2011.tar"
    good = _tar({"TrainVal/VOCdevkit/VOC2011/JPEGImages/2008_000001.jpg": b"jpg1",
                 "TrainVal/VOCdevkit/VOC2011/ImageSets/Main/trainval.txt": b"2008_000001\n"})
    state.files["/m/" + name] = good
    state.files["/m/MD5SUMS"] = f"{'1' * 32}  {name}\n".encode()
    with pytest.raises(ChecksumError, match=f"expected {'1' * 32}.*MD5SUMS.*got {hashlib.md5(good).hexdigest()}"):
        fetch_dataset("voc2011", base + "/m", tmp_path / "voc2011", tmp_path / "dl", retry=FAST)
    state.files["/m/MD5SUMS"] = f"{hashlib.md5(good).hexdigest()} *{name}\n".encode()
    (tmp_path / "dl" / (name + ".part")).unlink()
    report = fetch_dataset("voc2011", base + "/m", tmp_path / "voc2011", tmp_path / "dl", retry=FAST)
    assert (tmp_path / "voc2011/TrainVal/VOCdevkit/VOC2011/JPEGImages/2008_000001.jpg").read_bytes() == b"jpg1"
    assert report.verified == {name: base + "/m/MD5SUMS"}
    assert (report.files, report.images, report.images_expected) == (2, 1, None)


def test_imagenet_base_url_skips_missing_optional_files_and_names_missing_required(server, tmp_path, sleeps):
    state, base = server
    train = _tar({"n01440764.tar": _tar({"n01440764_1.JPEG": b"jpeg"})})
    state.files["/in/ILSVRC2012_img_train.tar"] = train
    # Not the published size: an MD5SUMS beside it must vouch for it (without one it is refused, below).
    state.files["/in/MD5SUMS"] = f"{hashlib.md5(train).hexdigest()}  ILSVRC2012_img_train.tar\n".encode()
    report = fetch_dataset("imagenet", base + "/in/", tmp_path / "imagenet", tmp_path / "dl", retry=FAST)
    assert (tmp_path / "imagenet/train/n01440764/n01440764_1.JPEG").read_bytes() == b"jpeg"
    assert report.archives == ["ILSVRC2012_img_train.tar"] and report.images == 1
    assert sum("optional" in w for w in report.warnings) == 2  # val and devkit answered 404
    assert report.verified == {"ILSVRC2012_img_train.tar": base + "/in/MD5SUMS"}
    del state.files["/in/MD5SUMS"]
    with pytest.raises(ChecksumError, match=r"20,480 bytes, but the published ILSVRC2012_img_train.tar"):
        fetch_dataset("imagenet", base + "/in/", tmp_path / "imagenet", tmp_path / "dl3", retry=FAST)
    assert (tmp_path / "imagenet/train/n01440764/n01440764_1.JPEG").read_bytes() == b"jpeg"  # earlier output kept
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train.tar: HTTP 404.*image-net.org"):
        fetch_dataset("imagenet", base + "/elsewhere", tmp_path / "imagenet2", tmp_path / "dl2", retry=FAST)
    assert not (tmp_path / "imagenet2").exists()


def test_byte_progress_reports_rate_and_eta(monkeypatch):
    clock = iter([100.0, 102.0, 102.0])  # start, then the update two seconds later, then finish
    monkeypatch.setattr(download.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    log = logging.getLogger("test_byte_progress")
    monkeypatch.setattr(log, "info", lambda text: lines.append(text))
    mib = 1 << 20
    progress = ByteProgress("x.tar", total=4 * mib, done=1 * mib, log=log, every=1.0)
    progress.update(2 * mib)  # 2 MiB in 2 s since the (resumed) start: 1 MiB/s, 1 MiB left
    assert lines == ["x.tar: 3.0 MiB / 4.0 MiB (75.0%), 1.0 MiB/s, eta 1s"]
