"""Fault injection (issue 18): kills, failed runs, write failures, junk and hostile input.

Each case runs on tiny data in a few seconds. What must hold: a refused input names the archive and member
in one line and leaves data/raw byte for byte as it was; a killed run leaves no temporary tree that the
next run keeps, and no orphaned worker; a failed run leaves earlier outputs intact.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import jpeg_bytes, photo, write_md5sums
from PIL import Image

from ctxrepro.config import BaseParams
from ctxrepro.data import imagenet
from ctxrepro.data.download import RetryPolicy
from ctxrepro.data.fetch import fetch_dataset
from ctxrepro.data.resize import ResizeConfig
from ctxrepro.data.resize_run import run_shard
from ctxrepro.io import atomic_dir, remove_stale_temps
from ctxrepro.stage import StageContext, StageError
from stages.fetch import _fetch_one

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("test_faults")
CTX = StageContext(BaseParams(), "cpu", LOG)


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temps_of_dead_owners_are_removed_and_nothing_else(tmp_path):
    gone = dead_pid()
    stale = [tmp_path / f".raw.{gone}.k2j_x9.tmp", tmp_path / f".raw.{gone}.old.tmp"]
    kept = [tmp_path / f".raw.{os.getpid()}.abc.tmp",  # this process's own work
            tmp_path / f".raw.{os.getppid()}.abc.tmp",  # a live process's work
            tmp_path / ".raw.abc.tmp",  # no owner recorded: never guessed at
            tmp_path / f".rawx.{gone}.abc.tmp", tmp_path / "raw", tmp_path / f"raw.{gone}.abc.tmp"]
    for p in stale + kept:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "f").write_bytes(b"x")
    (tmp_path / f".raw.{gone}.file.tmp").write_bytes(b"half")
    assert remove_stale_temps(tmp_path, "raw") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)


def test_atomic_dir_keeps_a_symlinked_output_and_writes_beside_its_target(tmp_path):
    other = tmp_path / "other_disk" / "raw"
    other.mkdir(parents=True)
    (other / "old.txt").write_text("old")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw").symlink_to(other)
    with atomic_dir(tmp_path / "data" / "raw") as tmp:
        assert tmp.parent == other.parent  # the extraction lands on the target's disk
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "data" / "raw").is_symlink() and os.readlink(tmp_path / "data" / "raw") == str(other)
    assert sorted(p.name for p in other.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in other.parent.iterdir()) == ["raw"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_atomic_dir_after_a_kill_removes_the_dead_runs_tree(tmp_path):
    script = ("import os, sys, time\nfrom ctxrepro.io import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'part').write_bytes(b'x' * 1000)\n    print(tmp, flush=True)\n    time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "raw")], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    left = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert left.is_dir() and left.name.startswith(f".raw.{child.pid}.")
    with atomic_dir(tmp_path / "raw") as tmp:
        (tmp / "whole").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_resize_workers_die_with_their_killed_parent(tmp_path):
    """A SIGKILLed stage cannot clean up: the kernel must take its pool workers down (prctl PDEATHSIG)."""
    script = ("import multiprocessing, os, time\nfrom concurrent.futures import ProcessPoolExecutor\n"
              "from ctxrepro.data.resize_run import _init_worker\n"
              "if __name__ == '__main__':\n"
              "    pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn'),\n"
              "                               initializer=_init_worker, initargs=(os.getpid(),))\n"
              "    pids = {pool.submit(os.getpid).result() for _ in range(8)}\n"
              "    print(' '.join(map(str, sorted(pids))), flush=True)\n"
              "    pool.submit(time.sleep, 60)\n    time.sleep(60)\n")
    (tmp_path / "stage.py").write_text(script)
    child = subprocess.Popen([sys.executable, str(tmp_path / "stage.py")], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers = [int(p) for p in child.stdout.readline().split()]
    assert workers and child.pid not in workers
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_running(p) for p in workers):
        time.sleep(0.1)
    assert not any(_running(p) for p in workers)


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# ------------------------------------------------------------------ fetch: hostile, broken, killed, full disk

def _tar(members: list[tuple[str, bytes, bytes, str]]) -> bytes:
    """members: (name, data, tar type, link name); written raw so hostile names survive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def _class_tar(extra: list | None = None) -> bytes:
    good = [(f"n01000000_{k}.JPEG", jpeg_bytes(photo(64, 48, k)), tarfile.REGTYPE, "") for k in range(3)]
    return _tar(good + (extra or []))


def _train_tar(inner: bytes, outer_extra: list | None = None) -> bytes:
    return _tar([("n01000000.tar", inner, tarfile.REGTYPE, "")] + (outer_extra or []))


def _cut(data: bytes, index: int, into: int = 0) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return data[:tf.getmembers()[index].offset + into]


def _hostile_cases() -> dict[str, tuple[bytes, str, str | None]]:
    """case -> (train tar, archive named in the error, member named in the error)."""
    reg, sym, lnk, chr_ = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE
    outer, inner = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_train.tar:n01000000.tar"
    two = _tar([("n01000000.tar", _class_tar(), reg, ""), ("n02000000.tar", _class_tar(), reg, "")])
    return {
        "traversal": (_train_tar(_class_tar([("../../evil.JPEG", b"x", reg, "")])), inner, "../../evil.JPEG"),
        "absolute": (_train_tar(_class_tar([("/tmp/evil.JPEG", b"x", reg, "")])), inner, "/tmp/evil.JPEG"),
        "link out": (_train_tar(_class_tar([("l.JPEG", b"", sym, "/etc/passwd")])), inner, "l.JPEG"),
        "hard link": (_train_tar(_class_tar([("h.JPEG", b"", lnk, "/etc/passwd")])), inner, "h.JPEG"),
        "device": (_train_tar(_class_tar([("d.JPEG", b"", chr_, "")])), inner, "d.JPEG"),
        "outer link": (_train_tar(_class_tar(), [("n02000000.tar", b"", sym, "/etc")]), outer, "n02000000.tar"),
        "cut at boundary": (_cut(two, 1), outer, "n01000000.tar"),
        # inside n02000000.tar: its stream reader fails on its first read (member None: "at its start")
        "cut mid-member": (_cut(two, 1, 512 + 700), outer + ":n02000000.tar", None),
    }


@pytest.fixture()
def fetched(tmp_path):
    """A repo whose data/raw/imagenet came from a good train tar; returns (root, source folder)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(_train_tar(_class_tar()))
    write_md5sums(src)
    fetch_dataset("imagenet", str(src), tmp_path / "data/raw/imagenet", tmp_path / "data/downloads", log=LOG)
    return tmp_path, src


@pytest.mark.parametrize("case", list(_hostile_cases()))
def test_hostile_and_broken_archives_are_one_line_and_leave_raw_unchanged(fetched, case):
    root, src = fetched
    data, archive, member = _hostile_cases()[case]
    (src / "ILSVRC2012_img_train.tar").write_bytes(data)
    write_md5sums(src)  # vouched for: only the archive's own content can refuse it
    before = digests(root / "data")
    with pytest.raises(StageError) as err:
        _fetch_one("imagenet", src, root / "data/raw/imagenet", root / "data/downloads", RetryPolicy(), True, CTX)
    message = str(err.value)
    named = repr(member) if member is not None else "at its start"
    assert "\n" not in message and archive in message and named in message, message
    assert digests(root / "data") == before and sorted(os.listdir(root / "data/raw")) == ["imagenet"]


def test_md5_mismatch_is_one_line_and_leaves_raw_unchanged(fetched):
    root, src = fetched
    (src / "ILSVRC2012_img_train.tar").write_bytes(_train_tar(_class_tar([("n01000000_9.JPEG", b"y", tarfile.REGTYPE, "")])))
    before = digests(root / "data")  # MD5SUMS still lists the old tar's digest
    with pytest.raises(StageError, match=r"^fetch imagenet from .*ILSVRC2012_img_train.tar.*md5 mismatch") as err:
        _fetch_one("imagenet", src, root / "data/raw/imagenet", root / "data/downloads", RetryPolicy(), True, CTX)
    assert "\n" not in str(err.value) and digests(root / "data") == before


def test_write_failure_after_n_files_names_the_error_and_leaves_nothing_half_written(fetched, monkeypatch):
    root, src = fetched
    (src / "ILSVRC2012_img_train.tar").write_bytes(_train_tar(_class_tar([("n01000000_7.JPEG", b"z", tarfile.REGTYPE, "")])))
    write_md5sums(src)
    before = digests(root / "data")
    calls = {"n": 0}
    real = shutil.copyfileobj

    def full_disk(src_f, dst_f, length=0):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", dst_f.name)
        return real(src_f, dst_f, length)

    monkeypatch.setattr(imagenet.shutil, "copyfileobj", full_disk)
    with pytest.raises(StageError, match=r"No space left on device: '.*n01000000_2.JPEG'") as err:
        _fetch_one("imagenet", src, root / "data/raw/imagenet", root / "data/downloads", RetryPolicy(), True, CTX)
    assert "\n" not in str(err.value)
    after = digests(root / "data")
    resume = "downloads/.ILSVRC2012_img_train.tar.extracting/"
    assert {k: v for k, v in after.items() if not k.startswith(resume)} == before
    assert sorted(os.listdir(root / "data/raw")) == ["imagenet"]
    # kept to resume once space is freed, but no class tar is recorded as done: its files get rewritten
    assert not (root / "data" / resume / "done.json").exists()
    monkeypatch.undo()
    _fetch_one("imagenet", src, root / "data/raw/imagenet", root / "data/downloads", RetryPolicy(), True, CTX)
    assert (root / "data/raw/imagenet/train/n01000000/n01000000_7.JPEG").read_bytes() == b"z"
    assert len(os.listdir(root / "data/raw/imagenet/train/n01000000")) == 4
    assert os.listdir(root / "data/downloads") == []


@pytest.mark.slow
def test_sigkill_during_fetch_then_rerun_gives_the_clean_result(tmp_path):
    """Kill a local-tar fetch at random moments; the rerun must match a clean fetch and leave no temp tree."""
    src = tmp_path / "src"
    src.mkdir()
    inner = _tar([(f"n01000000_{k}.JPEG", bytes([k % 251]) * 20_000, tarfile.REGTYPE, "") for k in range(1500)])
    (src / "ILSVRC2012_img_train.tar").write_bytes(_train_tar(inner))
    write_md5sums(src)
    clean = tmp_path / "clean/raw/imagenet"
    fetch_dataset("imagenet", str(src), clean, tmp_path / "clean/dl", log=LOG)
    script = ("import sys\nfrom ctxrepro.data.fetch import fetch_dataset\nprint('start', flush=True)\n"
              "fetch_dataset('imagenet', sys.argv[1], sys.argv[2], sys.argv[3])\n")
    dest = tmp_path / "data/raw/imagenet"
    rng = random.Random(18)
    left = set()
    start = time.monotonic()
    fetch_dataset("imagenet", str(src), tmp_path / "timing/imagenet", tmp_path / "timing/dl", log=LOG)
    seconds = time.monotonic() - start
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", script, str(src), str(dest), str(tmp_path / "data/dl")],
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        time.sleep(rng.uniform(0.1, 0.9) * seconds)
        child.send_signal(signal.SIGKILL)
        child.wait()
        left |= {p.name for p in dest.parent.iterdir() if p.name.startswith(f".imagenet.{child.pid}.")}
    assert left  # at least one kill landed mid-extraction and left its temporary tree
    fetch_dataset("imagenet", str(src), dest, tmp_path / "data/dl", log=LOG)
    assert digests(dest) == digests(clean)
    assert sorted(os.listdir(dest.parent)) == ["imagenet"]  # the killed runs' temporary trees are gone


# ------------------------------------------------------------------ junk that real ImageNet copies hold

def _png(array, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _junk_members() -> tuple[dict[str, bytes], dict[str, str], set[str]]:
    """(class tar members, expected skip reason per junk name, names that must be written)."""
    good = jpeg_bytes(photo(300, 240, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    huge = bytearray(_jpeg(photo(64, 48, 2)))
    sof = huge.index(b"\xff\xc0")
    huge[sof + 5:sof + 9] = (40000).to_bytes(2, "big") * 2  # the header claims 40000 x 40000
    members = {
        "n01000000_1.JPEG": good,
        "n01000000_2.JPEG": _jpeg(Image.new("CMYK", (300, 260), (0, 255, 255, 0))),
        "n01000000_3.JPEG": _jpeg(photo(280, 250, 3).convert("L")),
        "n01000000_4 copy é.JPEG": jpeg_bytes(photo(290, 250, 4)),  # odd but safe name
        "n01000000_5.JPEG": _jpeg(photo(320, 240, 5), exif=exif.tobytes()),
        "n01000000_6.JPEG": _png(np.asarray(photo(300, 300, 6))),  # PNG named .JPEG
        "n01000000_7.JPEG": _png((np.arange(300 * 300, dtype=np.uint16).reshape(300, 300) * 7)),  # 16-bit PNG
        "n01000000_8.JPEG": good[: len(good) // 2],
        "n01000000_9.JPEG": b"",
        "n01000000_10.JPEG": b"<html>404 Not Found</html>\n",
        "n01000000_11.JPEG": _jpeg(photo(1, 1, 11)),
        "n01000000_12.JPEG": bytes(huge),
        "n01000000_13.png": _png(np.asarray(photo(300, 300, 13))),
    }
    reasons = {"n01000000_6.JPEG": "png_named_jpeg", "n01000000_7.JPEG": "png_named_jpeg",
               "n01000000_8.JPEG": "truncated", "n01000000_9.JPEG": "empty", "n01000000_10.JPEG": "corrupt",
               "n01000000_11.JPEG": "too_small", "n01000000_12.JPEG": "too_large",
               "n01000000_13.png": "not_jpeg_name"}
    return members, reasons, {n for n in members if n not in reasons}


def test_junk_images_through_fetch_then_resize_are_each_counted(tmp_path):
    members, reasons, good = _junk_members()
    src = tmp_path / "src"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(_tar([("n01000000.tar", _tar(
        [(n, b, tarfile.REGTYPE, "") for n, b in members.items()]), tarfile.REGTYPE, "")]))
    write_md5sums(src)
    report = fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", tmp_path / "dl", log=LOG)
    assert report.images == report.files == len(members)
    # max_upscale 4 as in the tiny profile (the paper's 0 would enlarge the 1x1 image like the released code)
    cfg = ResizeConfig(min_pixels=50_000, max_pixels=90_000, patch=48, gap=24, max_upscale=4.0)
    _, merged = run_shard(tmp_path / "raw", tmp_path / "out", ["train"], cfg, workers=1)
    with open(tmp_path / "out/skipped.csv", newline="") as f:
        skipped = {Path(r["source"]).name: r["reason"] for r in csv.DictReader(f)}
    assert skipped == reasons
    written = {p.name for p in (tmp_path / "out/train/n01000000").iterdir()}
    assert written == {n.rsplit(".", 1)[0] + ".jpg" for n in good}
    assert (merged["images_in"], merged["images_written"]) == (len(members), len(good))
    assert merged["converted_by_mode"] == {"CMYK": 1, "L": 1}


def test_resize_write_failure_names_the_path_and_a_rerun_completes(tmp_path, monkeypatch):
    """ENOSPC on the third image: one line naming it, no file under a final name that is not whole."""
    from ctxrepro.data import resize
    from stages import resize as resize_stage

    d = tmp_path / "data/raw/imagenet/train/n01000000"
    d.mkdir(parents=True)
    for k in range(5):
        (d / f"n01000000_{k}.JPEG").write_bytes(jpeg_bytes(photo(300, 240, k)))
    params = resize_stage.Params(workers=1, min_pixels=50_000, max_pixels=90_000, patch=48, gap=24,
                                 splits=("train",))
    ctx = StageContext(BaseParams(seed=7), "cpu", LOG, root=tmp_path)
    real, calls = resize.write_atomic, {"n": 0}

    def full_disk(path, data, tmp_dir):
        calls["n"] += 1
        if calls["n"] == 3:
            (Path(tmp_dir) / "half.jpg").write_bytes(data[: len(data) // 2])  # what a failed write leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, tmp_dir)

    monkeypatch.setattr(resize, "write_atomic", full_disk)
    with pytest.raises(StageError, match=r"^resize: .*No space left on device: '.*n01000000_2.jpg'$"):
        resize_stage.run(params, ctx)
    out = tmp_path / "data/resized/train/n01000000"
    assert sorted(p.name for p in out.iterdir()) == ["n01000000_0.jpg", "n01000000_1.jpg"]
    assert all(Image.open(p).size for p in out.iterdir())  # whole JPEGs only
    assert not (tmp_path / "metrics/resize.json").exists()
    monkeypatch.undo()
    resize_stage.run(params, ctx)
    assert len(list(out.iterdir())) == 5 and not any((tmp_path / "data/resized/.partial").rglob("*.jpg"))
