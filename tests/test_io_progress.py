"""Atomic outputs stay complete or absent; progress reports counts and rates in plain log lines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ctxrepro.io import _umask, atomic_dir, atomic_write_json, atomic_write_text
from ctxrepro.progress import track


def test_atomic_write_json_is_sorted_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m" / "x.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_track_logs_plain_lines_when_not_a_terminal(caplog):
    stream = io.StringIO()
    log = logging.getLogger("test.track")
    with caplog.at_level(logging.INFO, logger="test.track"):
        items = list(track(range(5), desc="images", unit="img", log=log, every_seconds=0.0, stream=stream))
    assert items == [0, 1, 2, 3, 4]
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6  # one per item (every_seconds=0) plus the final line
    assert lines[-1].startswith("images: 5/5 img [") and "img/s" in lines[-1]
    assert "eta" in lines[0]


def test_track_rewrites_one_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    assert list(track([1, 2, 3], desc="x", stream=stream)) == [1, 2, 3]
    assert stream.getvalue().startswith("\r") and stream.getvalue().endswith("\n")
    assert "x: 3/3 it" in stream.getvalue()
