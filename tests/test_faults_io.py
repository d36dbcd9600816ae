"""Fault injection, round two (issue 27): write and read failures as one line, dead runs' temporary files,
duplicate and over-long archive members, and params that name what they refer to.

Each case fails without its fix: a torch.save on a full disk raised torch's "unexpected pos" RuntimeError
through the CLI as two tracebacks; atomic_write never removed a killed run's temporary file; a duplicate
tar member silently replaced the first copy and a 300-byte name raised a raw ENAMETOOLONG; an unknown
`detect.row` passed params validation.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import ctxrepro.cli as cli
from ctxrepro.checkpoint import atomic_torch_save
from ctxrepro.data.extract import UnsafeArchiveError, extract_archive
from ctxrepro.data.imagenet import iter_class_images
from ctxrepro.io import atomic_write, atomic_write_bytes
from ctxrepro.stage import available_stages, check_params

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
FAILURES = {errno.ENOSPC: "No space left on device", errno.EACCES: "Permission denied",
            errno.EFBIG: "File too large", errno.EIO: "Input/output error"}


class FailingFile:
    """A writable file that fails with `code` once more than `limit` bytes were written (a disk filling up)."""

    def __init__(self, f, code: int, limit: int = 1000):
        self.f, self.code, self.limit, self.n = f, code, limit, 0

    def write(self, data) -> int:
        self.n += len(data)
        if self.n > self.limit:
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _save_failing(path: Path, code: int) -> None:
    state = {"w": torch.arange(10_000, dtype=torch.float32)}
    atomic_write(path, lambda f: torch.save(state, FailingFile(f, code)))


@pytest.mark.parametrize("code", sorted(FAILURES))
def test_a_failing_torch_save_is_one_oserror_naming_the_path_and_keeps_the_old_file(tmp_path, code):
    path = tmp_path / "last.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(OSError) as info:
        _save_failing(path, code)
    assert info.value.errno == code and info.value.filename == str(path)
    assert FAILURES[code] in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def _stage_app_raising(monkeypatch, error: Exception | None = None, path: Path | None = None, code: int = 0):
    def run_stage(*args, **kwargs):
        if error is not None:
            raise error
        _save_failing(path, code)

    monkeypatch.setattr(cli, "run_stage", run_stage)
    return CliRunner()


@pytest.mark.parametrize("code", sorted(FAILURES))
def test_a_stage_write_failure_is_one_line_exit_1_without_traceback(tmp_path, monkeypatch, code):
    path = tmp_path / "models" / "last.pt"
    runner = _stage_app_raising(monkeypatch, path=path, code=code)
    res = runner.invoke(cli.app, ["stage", "pretrain"])
    assert res.exit_code == 1
    assert res.stderr == f"error: {path}: cannot write: {FAILURES[code]} ({errno.errorcode[code]})\n"
    debug = runner.invoke(cli.app, ["--debug", "stage", "pretrain"])
    assert isinstance(debug.exception, OSError) and debug.exception.errno == code  # --debug lets it through


def test_a_read_failure_names_the_file_and_the_errno(monkeypatch):
    err = PermissionError(errno.EACCES, "Permission denied", "data/resized/manifest.csv")
    res = _stage_app_raising(monkeypatch, error=err).invoke(cli.app, ["stage", "pretrain"])
    assert res.exit_code == 1
    assert res.stderr == "error: data/resized/manifest.csv: Permission denied (EACCES)\n"
    monkeypatch.setenv("CTXREPRO_DEBUG", "1")
    res = _stage_app_raising(monkeypatch, error=err).invoke(cli.app, ["stage", "pretrain"])
    assert res.exception is err


def test_a_wrapped_read_failure_keeps_its_own_message_on_one_line(monkeypatch):
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "models/x.pt")
        except OSError as e:
            raise ValueError("checkpoint models/x.pt cannot be read; delete it to start afresh") from e
    except ValueError as wrapped:
        err = wrapped
    res = _stage_app_raising(monkeypatch, error=err).invoke(cli.app, ["stage", "pretrain"])
    assert res.exit_code == 1
    assert res.stderr == "error: checkpoint models/x.pt cannot be read; delete it to start afresh\n"


def test_file_size_limit_in_a_real_process_is_one_line_and_keeps_the_old_output(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write with EFBIG (Python ignores SIGXFSZ)."""
    (tmp_path / "sets.json").write_text('[["a", "b"]]')
    (tmp_path / "labels.json").write_text('{"a": ["x"], "b": ["x"]}')
    out = tmp_path / "m.json"
    out.write_text("old")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20)); "
            "from ctxrepro.cli import main; sys.argv = ['ctxrepro'] + sys.argv[1:]; main()")
    args = [sys.executable, "-c", code, "eval", "purity-coverage", "--sets", str(tmp_path / "sets.json"),
            "--labels", str(tmp_path / "labels.json"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1
    assert res.stderr == f"error: {out}: cannot write: File too large (EFBIG)\n"
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "m.json", "sets.json"]


def test_a_checkpoint_over_the_file_size_limit_is_the_kernels_efbig_naming_the_path(tmp_path):
    """The issue's case: torch.save hits EFBIG (errno 27) in a real process and raised "unexpected pos"."""
    path = tmp_path / "last.pt"
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    code = ("import resource, sys, torch; from pathlib import Path; from ctxrepro.checkpoint import atomic_torch_save; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))\n"
            "try:\n    atomic_torch_save({'w': torch.ones(100_000)}, Path(sys.argv[1]))\n"
            "except OSError as e:\n    print(e.errno, e.filename, e.strerror)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout == f"{errno.EFBIG} {path} cannot write: File too large\n", res.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_atomic_write_removes_temp_files_of_dead_runs_and_nothing_else(tmp_path):
    gone = dead_pid()
    stale = [f".last.pt.{gone}.k2j_x9ab.tmp", f".color_dropping-ours.pt.{gone}.zz09aa11.tmp"]
    kept = [f".last.pt.{os.getppid()}.abcdefgh.tmp",  # a live process's write
            ".last.pt.abcdefgh.tmp",  # no owner recorded: never guessed at
            f"last.pt.{gone}.abcdefgh.tmp", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"half")
    atomic_write_bytes(tmp_path / "last.pt", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["last.pt"])


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


LONG = "d/" + "x" * 300 + ".jpg"
ARCHIVE_CASES = {
    "tar-duplicate": ("a.tar", _tar([("d/a.jpg", b"first"), ("d/a.jpg", b"second")]), "d/a.jpg", "same name twice"),
    "zip-duplicate": ("a.zip", _zip([("d/a.jpg", b"first"), ("d/a.jpg", b"second")]), "d/a.jpg", "same name twice"),
    "tar-long-name": ("a.tar", _tar([(LONG, b"x")]), LONG, "a path component is 304 bytes long (at most 255)"),
    "zip-long-name": ("a.zip", _zip([(LONG, b"x")]), LONG, "a path component is 304 bytes long (at most 255)"),
}


@pytest.mark.parametrize("case", list(ARCHIVE_CASES))
def test_duplicate_and_overlong_members_are_refused_by_name(tmp_path, case):
    name, data, member, reason = ARCHIVE_CASES[case]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(tmp_path / name, tmp_path / "out")
    assert info.value.member == member and reason in str(info.value)
    assert str(info.value).count("\n") == 0 and f"of {name}:" in str(info.value)


def test_imagenet_class_tars_refuse_overlong_names():
    stream = io.BytesIO(_tar([("n01000000_1.JPEG", b"a"), ("n" + "1" * 299 + ".JPEG", b"b")]))
    with pytest.raises(UnsafeArchiveError, match=r"is 305 bytes long \(at most 255\)"):
        list(iter_class_images(stream, "train.tar:n01000000.tar"))


def _params(tmp_path: Path, **edits) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in edits.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


ROWS = ("color_dropping-scratch, projection-ours, color_dropping-ours, color_dropping-kmeans_rescale, "
        "color_dropping-ours_rescale, vgg16-kmeans_rescale, vgg16-ours_rescale")
PARAMS_CASES = {
    "detect-row": ("detect", {"detect__row": "bogus"},
                   f"detect.row: 'bogus' is not a `convert.rows` key: choose one of {ROWS}"),
    "normals-init": ("normals", {"normals__init": "bogus"},
                     f"normals.init: 'bogus' is not a `convert.rows` key: choose one of {ROWS}"),
    "convert-variant": ("convert", {"convert__rows__bogus-ours": {"variant": "bogus", "init": "ours"}},
                        "convert.rows.bogus-ours.variant: 'bogus' is not a `pretrain.variants` key: choose one of "
                        "color_dropping, projection, vgg16"),
    "huge-count": ("detect", {"detect__iterations": 99999999999999999999999},
                   "detect.iterations: 99999999999999999999999 is too large: a whole number in params is at most "
                   "2147483647 (2^31 - 1)"),
    "probe-network": ("linear_probe", {"linear_probe__network": "bogus"},
                      "linear_probe.network: 'bogus' is not in linear_probe.networks: choose one of color_dropping, "
                      "projection, vgg16, random"),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_params_name_the_key_and_its_allowed_values_exit_2(tmp_path, monkeypatch, case):
    stage, edits, message = PARAMS_CASES[case]
    params = _params(tmp_path, **edits)
    monkeypatch.chdir(tmp_path)  # nothing may be written: the stage must stop before it runs
    res = CliRunner().invoke(cli.app, ["stage", stage, "--params", str(params)])
    assert res.exit_code == 2, res.output
    assert res.stderr.count("\n") == 1 and message in res.stderr
    check = CliRunner().invoke(cli.app, ["check", "--params", str(params)])  # what `make repro` runs before DVC
    assert check.exit_code == 2 and message in check.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_every_profile_passes_the_params_check():
    """`ctxrepro check` parses every section first (then the inputs and the disk, which the paper profile lacks
    here): every shipped profile's sections and cross-references are valid."""
    for profile in sorted((ROOT / "profiles").glob("*.yaml")):
        assert check_params(profile) == available_stages(), profile
