"""Provenance: each metrics file records the commit its stage's code came from and whether that code was
clean (ctxrepro.stage), and REPORT.md names those commits per section (ctxrepro.report), not the checkout's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ctxrepro.report import tables as T
from ctxrepro.report.writer import parse_diff
from ctxrepro.stage import code_provenance, run_stage, spec_paths, stage_spec, stamp_metrics

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=ctxrepro-test", "-c", "user.email=test@ctxrepro.invalid"]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path):
    """A checkout with two code deps (a file and a folder), a data dep git ignores, and unrelated code."""
    root = tmp_path / "repo"
    for name, text in {"pkg/a.py": "A = 1\n", "pkg/sub/b.py": "B = 2\n", "other.py": "C = 3\n",
                       ".gitignore": "/data\n", "data/raw/x.bin": "data\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "one")
    return root


DEPS = ["data/raw", "pkg/a.py", "pkg/sub", "models/${key}.pt"]


def test_clean_checkout_records_head_and_only_the_code_deps_count(repo):
    head = _git(repo, "rev-parse", "HEAD")
    assert code_provenance(repo, DEPS) == {"commit": head, "code_clean": True, "changed": []}
    # negative control: a change outside the stage's deps, or to its (ignored) data, leaves it clean
    (repo / "other.py").write_text("C = 4\n")
    (repo / "data/raw/x.bin").write_text("new data\n")
    assert code_provenance(repo, DEPS)["code_clean"] is True


def test_other_stages_tracked_outputs_are_results_not_code(repo):
    """The report reads every metrics file, which git tracks: a rerun upstream rewrites them, and that is no code
    change. Mutation caught: `code_provenance` counting git-tracked outputs of dvc.yaml's stages as code (the smoke
    run's report then said code_clean false, listing every metrics file)."""
    (repo / "metrics/pretrain").mkdir(parents=True)
    (repo / "metrics/pretrain/v.json").write_text("{}\n")
    (repo / "dvc.yaml").write_text("stages:\n  pretrain:\n    foreach: [v]\n    do:\n      cmd: x\n"
                                   "      metrics:\n        - metrics/pretrain/${item}.json:\n            cache: false\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "two")
    deps = ["metrics/pretrain", "pkg/a.py"]
    (repo / "metrics/pretrain/v.json").write_text('{"loss": 1}\n')
    assert code_provenance(repo, deps) == {"commit": _git(repo, "rev-parse", "HEAD"), "code_clean": True, "changed": []}
    (repo / "pkg/a.py").write_text("A = 10\n")  # positive control: the code dep still counts
    assert code_provenance(repo, deps)["changed"] == ["pkg/a.py"]


@pytest.mark.parametrize("change, changed", [
    (lambda r: (r / "pkg/a.py").write_text("A = 10\n"), ["pkg/a.py"]),
    (lambda r: (r / "pkg/sub/new.py").write_text("N = 0\n"), ["pkg/sub/new.py"]),
    (lambda r: (r / "pkg/sub/b.py").unlink(), ["pkg/sub/b.py"]),
])
def test_a_changed_code_dep_is_named(repo, change, changed):
    change(repo)
    record = code_provenance(repo, DEPS)
    assert record["commit"] == _git(repo, "rev-parse", "HEAD")
    assert record["code_clean"] is False and record["changed"] == changed


def test_outside_git_every_field_is_null(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "pkg").mkdir()
    assert code_provenance(tmp_path, ["pkg"]) == {"commit": None, "code_clean": None, "changed": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))  # no git binary at all (a bare container)
    assert code_provenance(tmp_path, ["pkg"]) == {"commit": None, "code_clean": None, "changed": None}


def test_stamp_adds_provenance_to_this_runs_metrics_files_only(tmp_path):
    spec = {"metrics": [{"metrics/s/${key}.json": {"cache": False}}, "metrics/t.json"]}
    old, new, other = tmp_path / "metrics/s/old.json", tmp_path / "metrics/s/new.json", tmp_path / "metrics/t.json"
    old.parent.mkdir(parents=True)
    old.write_text('{"x": 1}')
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    since = time.time() - 60
    new.write_text('{"x": 2}')
    other.write_text("[1, 2]")  # not an object: left as it is
    record = {"commit": "c" * 40, "code_clean": True, "changed": []}
    assert stamp_metrics(tmp_path, spec, since, record) == [new]
    assert json.loads(new.read_text()) == {"x": 2, "provenance": record}
    assert old.read_text() == '{"x": 1}' and other.read_text() == "[1, 2]"


def test_stage_spec_reads_dvc_yaml_including_foreach_templates():
    pretrain = stage_spec(ROOT, "pretrain")
    assert "stages/pretrain.py" in spec_paths(pretrain["deps"])
    assert spec_paths(pretrain["metrics"]) == ["metrics/pretrain/${key}.json"]
    assert stage_spec(ROOT, "no_such_stage") == {}


@pytest.mark.slow
def test_a_stage_run_stamps_its_metrics_with_the_commit_and_cleanliness(tmp_path, monkeypatch):
    """`ctxrepro stage report` in a git checkout holding the report stage's code deps: clean, then with one
    of them edited (the stages' code is imported from this tree; the copy is what git looks at)."""
    root = tmp_path / "repo"
    spec = stage_spec(ROOT, "report")
    for rel in ["dvc.yaml", "params.yaml", *[d for d in spec_paths(spec["deps"]) if (ROOT / d).is_file()]]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "code")
    monkeypatch.chdir(root)
    run_stage("report", Path("params.yaml"), ["report.against="])
    stamped = json.loads((root / "metrics/report.json").read_text())["provenance"]
    assert stamped == {"commit": _git(root, "rev-parse", "HEAD"), "code_clean": True, "changed": []}
    with (root / "stages/report.py").open("a") as f:
        f.write("# an edit\n")
    run_stage("report", Path("params.yaml"), ["report.against="])
    stamped = json.loads((root / "metrics/report.json").read_text())["provenance"]
    assert stamped["code_clean"] is False and stamped["changed"] == ["stages/report.py"]


def _run(metrics: dict) -> T.RunData:
    return T.RunData(metrics, {}, "tiny", "0" * 40)


def test_report_sections_name_the_metrics_commits_not_the_checkout():
    a, b = "a" * 40, "b" * 40
    run = _run({"pretrain/color_dropping": {"provenance": {"commit": a, "code_clean": True, "changed": []}},
                "nn": {"provenance": {"commit": b, "code_clean": False, "changed": ["stages/nn.py"]}},
                "mine": {"provenance": {"commit": None, "code_clean": None, "changed": None}},
                "aberration": {}})
    assert T.code_line(run, ("pretrain",)) == f"code `{a[:12]}`"
    assert T.code_line(run, ("pretrain", "nn")) == f"code `{a[:12]}`; `{b[:12]}` with uncommitted code changes"
    assert T.code_line(run, ("mine",)) == "code commit unknown (ran outside git)"
    assert T.code_line(run, ("aberration",)) == "code commit not recorded"
    assert T.code_line(run, ("detect",)) == "code not run"
    assert "0" * 12 not in "\n".join(T.pretraining(run) + T.stage_status(run))
    assert f"`{a[:12]}`" in "\n".join(T.pretraining(run))
    assert T.code_commits(run) == [a, b]


def test_what_changed_leaves_out_provenance_but_keeps_results():
    data = {"metrics/nn.json": {"provenance.commit": {"old": "a", "new": "b"},
                                "precision_at_k": {"old": 0.1, "new": 0.2, "diff": 0.1}}}
    assert parse_diff(data) == (("metrics/nn.json", "precision_at_k", 0.1, 0.2, 0.1),)
