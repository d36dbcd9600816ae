"""Every file a stage reads under data/ or models/ is covered by one of its dvc.yaml deps (issue 22), or else
`dvc repro X` on a fresh checkout would not build it and a change of it would never rerun X.

Each stage instance runs in a clone of the tree, in dvc.yaml's order, with Python's audit hook on (`open`,
`os.listdir`, `os.scandir`) in every process it starts (a sitecustomize module on PYTHONPATH reaches spawned
workers too). The instances' deps and outs come from dvc.yaml as DVC renders it. Reads that C libraries make
without Python's `open` are not seen: HDF5 (the NYUv2 .mat, under data/raw/nyuv2) and OpenCV's imread.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, clone_tree, repo_env, run_in
from test_pipeline import SHRINK, _write_params

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("data", "models")
# A second run of some instances, to cover a params choice that reads other files (the paper profile's).
EXTRA = {"aberration": ["--set", "aberration.source=images"]}

SITECUSTOMIZE = """import os, sys
_LOG = os.environ.get("CTXREPRO_AUDIT_LOG")
if _LOG:
    _fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            tag = "w" if (any(c in mode for c in "wax+") if mode else (flags or 0) & _WRITES) else "r"
        elif event in ("os.listdir", "os.scandir"):
            path, tag = args[0] if args[0] is not None else ".", "l"
        elif event in ("os.rename", "os.link"):  # os.replace raises os.rename: a temporary renamed into place
            path, tag = args[1], "w"
        elif event == "os.mkdir":
            path, tag = args[0], "w"
        else:
            return
        if isinstance(path, int) or path is None:
            return
        os.write(_fd, f"{tag} {os.path.abspath(os.fsdecode(path))}\\n".encode())

    sys.addaudithook(_hook)
"""

RENDER = """import json
import networkx as nx
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
with Repo(".") as repo:
    order = reversed(list(nx.topological_sort(repo.index.graph)))
    print(json.dumps([{"name": s.addressing, "cmd": s.cmd,
                       "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                       "outs": [o.def_path for o in s.outs]} for s in order]))
"""


def _under(rel: str, paths) -> bool:
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in paths)


def _uncovered(log: Path, repo: Path, deps: list[str], outs: list[str]) -> list[str]:
    """Paths under data/ or models/ read (or listed) without a dep or out covering them, in log order.

    Not inputs: a read of what this run wrote, renamed, linked or made before (a temporary, a scratch file, a
    folder renamed into place, and what is under them); a listing of a folder that holds a dep or an out
    (looking for stale temporaries, or for the dep itself) or that this run writes into (its scratch)."""
    written, reads, listed = [], [], []
    covered = [*deps, *outs]
    for line in log.read_text().splitlines() if log.is_file() else []:
        tag, path = line.split(" ", 1)
        try:
            rel = Path(path).resolve().relative_to(repo.resolve()).as_posix()
        except ValueError:
            continue
        if rel.split("/")[0] not in CHECKED:
            continue
        if tag == "w":
            written.append(rel)
        elif not _under(rel, covered) and tag == "r" and not _under(rel, written):
            reads.append(rel)
        elif not _under(rel, covered) and tag == "l":
            listed.append(rel)
    holders = [*covered, *written]
    listed = [rel for rel in listed if not any(p.startswith(rel + "/") for p in holders) and not _under(rel, written)]
    return list(dict.fromkeys(reads + listed))


@pytest.mark.slow
def test_every_stage_reads_only_what_its_deps_declare(tmp_path):
    repo = clone_tree(ROOT, tmp_path)
    _write_params(repo, SHRINK)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook/sitecustomize.py").write_text(SITECUSTOMIZE)
    stages = json.loads(run_in([str(BIN / "python"), "-c", RENDER], repo).stdout)
    env = repo_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "hook"), env.get("PYTHONPATH")]))
    failures, ran = {}, []
    for stage in stages:
        base = stage["name"].split("@")[0]
        for extra in ([[]] + ([EXTRA[base]] if base in EXTRA else [])):
            args = shlex.split(stage["cmd"]) + extra
            assert args[:2] == ["ctxrepro", "stage"], stage["cmd"]
            log = tmp_path / "logs" / f"{stage['name']}{len(extra)}.log"
            log.parent.mkdir(exist_ok=True)
            result = subprocess.run([str(BIN / "ctxrepro"), *args[1:]], cwd=repo, capture_output=True, text=True,
                                    env={**env, "CTXREPRO_AUDIT_LOG": str(log)})
            assert result.returncode == 0, (stage["name"], extra, result.stderr[-3000:])
            assert log.is_file() and log.stat().st_size, f"{stage['name']}: the audit hook logged nothing"
            bad = _uncovered(log, repo, stage["deps"], stage["outs"])
            if bad:
                failures[" ".join([stage["name"], *extra])] = bad[:8]
            ran.append(stage["name"])
    assert len(set(ran)) >= 30 and "report" in ran and "aberration" in ran, ran
    assert not failures, "reads not covered by the instance's dvc.yaml deps:\n" + json.dumps(failures, indent=1)


def test_the_audit_rule_flags_undeclared_reads_and_allows_own_files(tmp_path):
    """The coverage rule on a hand-written log: what is flagged and what is not."""
    repo = tmp_path / "r"
    a = lambda rel: f"{repo / rel}"  # noqa: E731
    (tmp_path / "log").write_text("\n".join([
        f"r {a('data/raw/voc2007/x.jpg')}",          # under a dep
        f"r {a('data/resized/manifest.csv')}",       # not declared: flagged
        f"w {a('data/.tmp/a.npy')}", f"r {a('data/.tmp/a.npy')}",  # its own scratch file
        f"r {a('data/cache/b.npy')}",                # read before anything wrote it: flagged
        f"l {a('data/scratch')}",                    # its scratch folder, written into below
        f"w {a('data/scratch')}", f"w {a('data/scratch/c.npy')}", f"r {a('data/scratch/d/e.npy')}",
        f"w {a('data/cache/b.npy')}",
        f"l {a('data')}",                            # the folder holding an out
        f"l {a('models/pretrain')}",                 # not declared: flagged
        f"r {a('models/pretrain_state/v/last.pt')}",  # its own (persist) out
        f"r {a('params.yaml')}",                     # outside data/ and models/
        f"r {tmp_path / 'elsewhere.txt'}",           # outside the repository
        f"r {a('data/resized/manifest.csv')}",       # reported once
    ]) + "\n")
    repo.mkdir()
    assert _uncovered(tmp_path / "log", repo, ["data/raw/voc2007"], ["models/pretrain_state/v", "data/out"]) == [
        "data/resized/manifest.csv", "data/cache/b.npy", "models/pretrain"]
