"""End to end: `dvc repro` of the whole pipeline in a temporary clone, then `dvc metrics diff` across commits.

Sizes are shrunk through params overrides so the run takes a few minutes on 2 cores; the code paths are the
ones the full tiny profile and real data take.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctxrepro.config import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Smaller than the tiny profile, to keep `make test` short; every stage still runs on real files.
SHRINK = [
    "fetch.world.imagenet_train_per_class=12",
    "fetch.world.imagenet_val=10",
    "fetch.world.voc07_trainval=12",
    "fetch.world.voc07_test=12",
    "fetch.world.voc11_trainval=12",
    "fetch.world.nyu_images=4",
    "fetch.world.nyu_train=2",
]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    return env


def _run(args, cwd, check=True):
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _clone(tmp_path: Path) -> Path:
    """The working tree as git sees it (tracked and untracked-not-ignored files), in a fresh repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    repo = tmp_path / "repo"
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    _run(["git", "init", "-q"], repo)
    return repo


def _write_params(repo: Path, sets: list[str]) -> None:
    data = apply_overrides(yaml.safe_load((repo / "params.yaml").read_text()), sets)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_end_to_end_and_metrics_diff(tmp_path):
    repo = _clone(tmp_path)
    _write_params(repo, SHRINK)
    _run(["dvc", "repro"], repo)
    fetch = json.loads((repo / "metrics/fetch.json").read_text())
    assert fetch["datasets"]["imagenet"]["images"] == 8 * 12 + 5 + 10 + 10  # train + junk + val + photos
    assert (repo / "data/raw/voc2007/VOCdevkit/VOC2007/ImageSets/Main/test.txt").is_file()
    status = _run(["dvc", "status", "--json"], repo)
    assert json.loads(status.stdout) == {}, status.stdout  # everything up to date after repro

    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "first run"], repo)
    _write_params(repo, ["fetch.world.imagenet_val=14"])
    _run(["dvc", "repro"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "second run"], repo)
    diff = json.loads(_run(["dvc", "metrics", "diff", "HEAD~1", "--json"], repo).stdout)
    changed = diff["metrics/fetch.json"]
    assert changed["datasets.imagenet.images"] == {"old": 121, "new": 125, "diff": 4}
    params = json.loads(_run(["dvc", "params", "diff", "HEAD~1", "--json"], repo).stdout)
    assert params["params.yaml"]["fetch.world.imagenet_val"] == {"old": 10, "new": 14}
