"""DVC beyond `repro` (issue 10): a local-folder remote round trip, `push: false`, and `dvc exp run -S`.

Runs the venv's dvc on a two-stage toy pipeline in a temporary git repository (not ours, to stay fast), the
same commands the README documents for the real pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

MAKE_PY = """\
import yaml
scale = yaml.safe_load(open("params.yaml"))["make"]["scale"]
open("data.txt", "w").write("".join(f"{k * scale}\\n" for k in range(1, 5)))
# a large intermediate in the real pipeline: rebuilt by `dvc repro`, never pushed
open("scratch.bin", "wb").write(bytes(range(256)) * 4)
"""
SCORE_PY = """\
import json
values = [int(x) for x in open("data.txt").read().split()]
open("result.txt", "w").write(f"n={len(values)}\\n")
json.dump({"total": sum(values)}, open("metrics.json", "w"))
"""


def dvc_exe() -> str:
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.exists() else shutil.which("dvc")
    if found is None:
        pytest.skip("dvc is not installed")
    return found


def dvc_yaml(python: str) -> str:
    return f"""\
stages:
  make:
    cmd: {python} make.py
    deps: [make.py]
    params: [make.scale]
    outs:
      - data.txt
      - scratch.bin:
          push: false
  score:
    cmd: {python} score.py
    deps: [score.py, data.txt]
    outs: [result.txt]
    metrics:
      - metrics.json:
          cache: false
"""


class Repo:
    def __init__(self, root: Path, home: Path):
        self.root = root
        self.env = dict(os.environ)
        # Git identity through the environment and no global/system config: nothing outside the test counts.
        self.env.update({
            "GIT_AUTHOR_NAME": "ctxrepro test", "GIT_AUTHOR_EMAIL": "test@ctxrepro.invalid",
            "GIT_COMMITTER_NAME": "ctxrepro test", "GIT_COMMITTER_EMAIL": "test@ctxrepro.invalid",
            "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(home), "DVC_NO_ANALYTICS": "1",
            "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"), "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        })

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(argv), cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(dvc_exe(), *args, check=check)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def repo(tmp_path) -> Repo:
    root = tmp_path / "repo"
    root.mkdir()
    r = Repo(root, tmp_path / "home")
    (root / "make.py").write_text(MAKE_PY)
    (root / "score.py").write_text(SCORE_PY)
    (root / "params.yaml").write_text("make:\n  scale: 2\n")
    (root / "dvc.yaml").write_text(dvc_yaml(shlex.quote(sys.executable)))
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    r.dvc("repro")
    r.run("git", "add", "-A")
    r.run("git", "commit", "-q", "-m", "toy pipeline")
    return r


def test_push_pull_round_trip_and_push_false(repo, tmp_path):
    root, remote = repo.root, tmp_path / "remote"
    # scale 2: data 2,4,6,8 -> total 20
    assert json.loads((root / "metrics.json").read_text()) == {"total": 20}
    original = {name: (root / name).read_bytes() for name in ("data.txt", "result.txt", "scratch.bin")}
    repo.dvc("remote", "add", "-d", "local", str(remote))
    repo.dvc("push")

    # DVC 3 stores an object at files/md5/<first 2 hex>/<other 30>; exactly the two pushable outs are there.
    stored = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    expected = sorted(f"files/md5/{h[:2]}/{h[2:]}" for h in (md5(root / "data.txt"), md5(root / "result.txt")))
    assert stored == expected
    assert not (remote / "files" / "md5" / md5(root / "scratch.bin")[:2] / md5(root / "scratch.bin")[2:]).exists()

    shutil.rmtree(root / ".dvc" / "cache")
    for name in original:
        (root / name).unlink()
    # A plain pull fails on the out that was never pushed, naming it ...
    failed = repo.dvc("pull", check=False)
    assert failed.returncode != 0 and "scratch.bin" in failed.stdout + failed.stderr
    # ... `--allow-missing` takes everything the remote has, byte for byte ...
    repo.dvc("pull", "--allow-missing")
    for name in ("data.txt", "result.txt"):
        assert (root / name).read_bytes() == original[name]
    assert not (root / "scratch.bin").exists()
    # ... and `dvc repro` rebuilds the rest identically.
    repo.dvc("repro")
    assert (root / "scratch.bin").read_bytes() == original["scratch.bin"]


def _experiments(show: list) -> dict[str, dict]:
    found = {}
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for rev in group["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def test_exp_run_set_param_changes_param_and_metric(repo):
    root = repo.root
    repo.dvc("exp", "run", "-S", "make.scale=5", "-n", "scale5")
    # scale 5: data 5,10,15,20 -> total 50, applied to the workspace
    assert yaml.safe_load((root / "params.yaml").read_text()) == {"make": {"scale": 5}}
    assert json.loads((root / "metrics.json").read_text()) == {"total": 50}
    show = json.loads(repo.dvc("exp", "show", "--json").stdout)
    exp = _experiments(show)["scale5"]
    assert exp["params"]["params.yaml"]["data"] == {"make": {"scale": 5}}
    assert exp["metrics"]["metrics.json"]["data"] == {"total": 50}
    baseline = next(entry for entry in show if entry["rev"] != "workspace")
    assert baseline["data"]["metrics"]["metrics.json"]["data"] == {"total": 20}
