"""Fault injection (issue 18): kills, failed runs, write failures, junk and hostile input.

Each case runs on tiny data in a few seconds. What must hold: a refused input names the archive and member
in one line and leaves data/raw byte for byte as it was; a killed run leaves no temporary tree that the
next run keeps, and no orphaned worker; a failed run leaves earlier outputs intact.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctxrepro.io import atomic_dir, remove_stale_temps, temp_prefix

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]


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
