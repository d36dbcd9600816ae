"""Fault injection, round two (issue 27): `ctxrepro eval` never crashes.

Every unusable input of `eval voc`, `eval normals` and `eval purity-coverage` is exit 2 and one line naming
the file (and the line, for text). Without the checked reader, non-UTF-8 bytes were UnicodeDecodeError
tracebacks, a zero-byte .npy was rc 1 and "Aborted!", a folder was "not found", a truncated .npy a raw
mmap error, and `eval voc` exited 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctxrepro.cli import app

pytestmark = pytest.mark.faults

ANNOTATION = ("<annotation><filename>{id}.jpg</filename><size><width>100</width><height>100</height>"
              "<depth>3</depth></size><object><name>car</name><difficult>0</difficult><truncated>0</truncated>"
              "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object></annotation>")


def _voc(tmp: Path) -> list[str]:
    """A one-image devkit with one car, and a results folder with one perfect car detection."""
    devkit = tmp / "VOC2007"
    (devkit / "Annotations").mkdir(parents=True)
    (devkit / "ImageSets" / "Main").mkdir(parents=True)
    (devkit / "Annotations" / "000001.xml").write_text(ANNOTATION.format(id="000001"))
    (devkit / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    (tmp / "results").mkdir()
    (tmp / "results" / "comp4_det_test_car.txt").write_text("000001 0.9 1 1 10 10\n")
    return ["eval", "voc", "--devkit", str(devkit), "--results", str(tmp / "results"), "--classes", "car"]


def _purity(tmp: Path) -> list[str]:
    (tmp / "sets.json").write_text('[["a", "b"]]')
    (tmp / "labels.json").write_text('{"a": ["x"], "b": ["y"]}')
    return ["eval", "purity-coverage", "--sets", str(tmp / "sets.json"), "--labels", str(tmp / "labels.json")]


def _normals(tmp: Path) -> list[str]:
    up = np.zeros((2, 3, 4, 3), dtype=np.float32)
    up[..., 2] = 1
    np.save(tmp / "pred.npy", up)
    np.save(tmp / "gt.npy", up)
    return ["eval", "normals", "--pred", str(tmp / "pred.npy"), "--gt", str(tmp / "gt.npy")]


def _cut_npy(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the header promises 2*3*4*3 float32 = 288 bytes; 278 remain


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


RESULTS = "results/comp4_det_test_car.txt"
# case -> (command, file to damage, damage, what the one line must say after the file's path)
CASES = {
    "voc-results-not-utf8": (_voc, RESULTS, lambda p: p.write_bytes(b"000001 0.9 1 1 10 10\n\xff\xfe 0.5\n"),
                             " line 2: results file is not UTF-8 text (byte 0xff at offset 21)"),
    "voc-imageset-not-utf8": (_voc, "VOC2007/ImageSets/Main/test.txt", lambda p: p.write_bytes(b"00\xe90001\n"),
                              " line 1: image set is not UTF-8 text (byte 0xe9 at offset 2)"),
    "voc-results-is-a-folder": (_voc, RESULTS, _folder, ": results file is a folder, expected a file"),
    "voc-imageset-empty": (_voc, "VOC2007/ImageSets/Main/test.txt", lambda p: p.write_bytes(b""),
                           ": image set is empty (0 bytes)"),
    "purity-not-utf8": (_purity, "labels.json", lambda p: p.write_bytes(b'{"a": ["x"],\n "b": ["\x80"]}'),
                        " line 2: labels file is not UTF-8 text (byte 0x80 at offset 21)"),
    "purity-empty": (_purity, "sets.json", lambda p: p.write_bytes(b""), ": sets file is empty (0 bytes)"),
    "purity-folder": (_purity, "sets.json", _folder, ": sets file is a folder, expected a file"),
    "purity-bad-json": (_purity, "sets.json", lambda p: p.write_text('[\n["a",]]'),
                        " line 2: sets file is not valid JSON (Expecting value, column 6)"),
    "normals-zero-bytes": (_normals, "pred.npy", lambda p: p.write_bytes(b""),
                           ": --pred array is empty (0 bytes), expected a .npy array"),
    "normals-truncated": (_normals, "gt.npy", _cut_npy,
                          ": --gt array is truncated: its header promises 288 bytes of float32 data (2, 3, 4, 3), "
                          "the file holds 278"),
    "normals-no-element": (_normals, "pred.npy", lambda p: np.save(p, np.zeros((0, 3, 4, 3), np.float32)),
                           ": --pred array holds no element (shape (0, 3, 4, 3))"),
    "normals-folder": (_normals, "gt.npy", _folder, ": --gt array is a folder, expected a .npy file"),
    "normals-not-npy": (_normals, "pred.npy", lambda p: p.write_bytes(b"P6\n3 4\n255\n"),
                        ": --pred array is not a NumPy .npy array file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_eval_input_is_exit_2_and_one_line_naming_the_file(tmp_path, case):
    command, name, damage, says = CASES[case]
    args = command(tmp_path)
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output  # the undamaged inputs evaluate
    damage(tmp_path / name)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"error: {tmp_path / name}{says}") and res.stderr.count("\n") == 1, res.stderr


def test_an_empty_results_file_warns_and_scores_ap_0(tmp_path):
    args = _voc(tmp_path)
    (tmp_path / RESULTS).write_bytes(b"")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"warning: {tmp_path / RESULTS} holds no detection: AP 0\n" in res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {"ap": {"car": 0.0}, "map": 0.0}


def test_results_given_as_a_file_is_exit_2(tmp_path):
    args = _voc(tmp_path)
    args[args.index("--results") + 1] = str(tmp_path / RESULTS)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert res.stderr == f"error: {tmp_path / RESULTS}: --results must be a folder of results files\n"
