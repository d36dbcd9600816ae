"""`ctxrepro check`: estimates against what runs wrote, inputs found or named, exit codes, the per-stage check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ctxrepro.cli import app
from ctxrepro.preflight import check, estimate, inputs, networks, repo
from ctxrepro.preflight.check import PreflightError, stage_check
from ctxrepro.preflight.plan import counts, instances
from ctxrepro.preflight.sizes import Estimate
from ctxrepro.stage import resolve_params
from tests.helpers import clone_tree, repo_env

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
GB = 1e9
# The smoke run of 2026-12-05 (README.md "Development", bench/README.md): 13 GB under models/ and 6.3 GB in
# DVC's cache (cache.type reflink,copy on a file system without reflinks: every cached output copied).
SMOKE_MODELS, SMOKE_CACHE, SMOKE_PEAK = 13 * GB, 6.3 * GB, 19.9 * GB


@pytest.fixture(scope="module")
def tiny():
    return resolve_params(ROOT / "params.yaml")


def _lock_outs() -> dict[str, int]:
    stages = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    return {name: sum(o.get("size", 0) for o in s.get("outs", [])) for name, s in stages.items()}


def test_tiny_estimates_are_within_3x_of_each_output_dvc_lock_records_and_1_5x_in_all(tiny):
    """The committed tiny run is real data: dvc.lock's `size` of every out of every instance."""
    recorded, c = _lock_outs(), counts(tiny)
    est = {i.name: estimate.instance(tiny, c, i).outs for i in instances(tiny) if i.name in recorded}
    assert len(est) >= 25
    for name, bytes_ in est.items():
        if recorded[name] >= 1_000_000:
            assert recorded[name] / 3 <= bytes_ <= 3 * recorded[name], (name, bytes_, recorded[name])
    total, real = sum(est.values()), sum(recorded[n] for n in est)
    assert real / 1.5 <= total <= 1.5 * real, (total, real)


def test_smoke_estimate_is_within_1_5x_of_the_measured_smoke_run():
    p = resolve_params(ROOT / "profiles" / "smoke.yaml")
    c = counts(p)
    est = {i: estimate.instance(p, c, i) for i in instances(p)}
    models = sum(e.outs for i, e in est.items()
                 if i.stage in ("pretrain", "convert", "detect")) + sum(e.uncached for i, e in est.items()
                                                                         if i.stage == "normals")
    cache = sum(e.cached for e in est.values())
    assert SMOKE_MODELS / 1.5 <= models <= 1.5 * SMOKE_MODELS, models
    assert SMOKE_CACHE / 1.5 <= cache <= 1.5 * SMOKE_CACHE, cache
    peak = sum(e.lasting(True) for e in est.values()) + max(e.scratch for e in est.values())
    assert SMOKE_PEAK / 1.5 <= peak <= 1.5 * SMOKE_PEAK, peak


def test_tiny_pretext_export_is_its_float32_weights(tiny):
    """models/pretrain/<variant>.pt holds the weights and a little metadata: within 2% of 4 bytes a parameter."""
    recorded = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]["pretrain@vgg16"]["outs"]
    pt = next(o["size"] for o in recorded if o["path"].endswith(".pt"))
    counted = networks.FLOAT * networks.pretext_params("vgg16", 32, 4, 128)  # the tiny vgg16 variant
    assert 0.95 * pt <= counted <= pt


def test_kmeans_unfold_at_vgg16_conv1_2_is_the_issue_figure():
    """conv1_2 reads 64 channels with a 3x3 kernel at 227x227 (padding 1): 64*9*227*227 floats per image."""
    assert networks.widest_unfold("vgg16", 64, 227) == 64 * 9 * 227 * 227
    assert 64 * networks.widest_unfold("vgg16", 64, 227) * 4 == pytest.approx(7.6e9, rel=0.01)


def test_disk_counts_cache_copies_kept_files_and_scratch():
    e = Estimate(cached=10, uncached=5, kept=2, scratch=3)
    assert (e.disk(True), e.disk(False), e.lasting(True), e.outs) == (30, 20, 27, 15)


def test_disk_total_is_lasting_bytes_plus_the_largest_scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(repo, "free_bytes", lambda path: 100)
    running = {"a": Estimate(cached=10, scratch=7), "b": Estimate(uncached=20, kept=1, scratch=30)}
    need, short = check._disk(tmp_path, running, tmp_path / ".dvc" / "cache", copies=True)
    assert (need["outputs_bytes"], need["cache_copies_bytes"], need["scratch_peak_bytes"]) == (31, 10, 30)
    assert short == []
    monkeypatch.setattr(repo, "free_bytes", lambda path: 70)  # 31 + 10 + 30 = 71 > 70
    short = check._disk(tmp_path, running, tmp_path / ".dvc" / "cache", copies=True)[1]
    assert len(short) == 1 and short[0].startswith("disk: needs")
    monkeypatch.setattr(repo, "free_bytes", lambda path: 71)
    assert check._disk(tmp_path, running, tmp_path / ".dvc" / "cache", copies=True)[1] == []


@pytest.mark.parametrize("config, copies", [
    ("", True),  # DVC's default reflink,copy: copies where the file system has no reflinks
    ("[cache]\n    type = hardlink,symlink\n", False),
    ("[cache]\n    type = reflink\n", False),
    ("[cache]\n    type = copy\n", True),
])
def test_cache_type_decides_whether_outputs_are_copied(tmp_path, config, copies):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(config)
    folder, _, copied = repo.cache_setup(tmp_path)
    assert copied is copies and folder == tmp_path / ".dvc" / "cache"


def test_cache_dir_is_relative_to_the_dvc_folder(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[cache]\n    dir = ../../elsewhere\n")
    assert repo.cache_setup(tmp_path)[0] == tmp_path / ".dvc" / "../../elsewhere"


def test_dvc_status_entries_are_flattened_to_reasons():
    entry = {"changed deps": {"params.yaml": {"pretrain.lr": "modified"}, "data/resized": "deleted"}}
    assert repo._flatten(entry) == ["changed deps: params.yaml: pretrain.lr: modified",
                                    "changed deps: data/resized: deleted"]
    assert repo._flatten("always changed") == ["always changed"]


def test_downstream_of_a_stale_instance_would_run(tmp_path):
    lock = {"stages": {"a": {"deps": [{"path": "src"}], "outs": [{"path": "data/x"}]},
                       "b": {"deps": [{"path": "data/x/part"}], "outs": [{"path": "data/y.pt"}]},
                       "c": {"deps": [{"path": "data/y.pt"}], "outs": []},
                       "d": {"deps": [{"path": "data/xy"}], "outs": []}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    runs = repo.would_run(tmp_path, ["a", "b", "c", "d"], {"a": ["changed deps: src: modified"]}, "")
    assert runs == {"a": ["changed deps: src: modified"], "b": ["after a (dep data/x/part)"],
                    "c": ["after b (dep data/y.pt)"]}
    assert set(repo.would_run(tmp_path, ["a", "d"], None, "no dvc")) == {"a", "d"}


def test_local_archives_are_checked_by_size_or_md5sums(tmp_path, tiny):
    p = {**tiny, "fetch": {**tiny["fetch"], "imagenet_source": str(tmp_path)}}
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"x" * 10)
    found = {i.name: i for i in inputs.archive_inputs(p, tmp_path, fetched=False)}
    train = found["ILSVRC2012_img_train.tar"]
    assert train.status == "wrong size" and train.problem and "147,897,477,120" in train.detail
    (tmp_path / "MD5SUMS").write_text("0" * 32 + "  ILSVRC2012_img_train.tar\n")
    found = {i.name: i for i in inputs.archive_inputs(p, tmp_path, fetched=False)}
    assert found["ILSVRC2012_img_train.tar"].status == "listed"
    assert found["ILSVRC2012_img_val.tar"].status == "missing"
    assert found["VOCtest_06-Nov-2007.tar"].status == "generated"  # the tiny profile's other sources


def _clone(tmp_path: Path, profile: str) -> Path:
    repo_dir = clone_tree(ROOT, tmp_path)
    subprocess.run([sys.executable, "-m", "ctxrepro", "profile", profile], cwd=repo_dir, env=repo_env(),
                   check=True, capture_output=True)
    return repo_dir


def _check(repo_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxrepro", "check", *args], cwd=repo_dir, env=repo_env(),
                          capture_output=True, text=True)


def test_tiny_profile_check_exits_0(tmp_path):
    """The tiny world is generated by fetch: nothing external is missing, and its ~0.4 GB fits."""
    done = _check(clone_tree(ROOT, tmp_path), "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["missing"] == [] and report["disk_free_bytes"] > 0
    assert report["stages"]["pretrain@vgg16"]["disk_bytes"] > 0
    assert all(s["memory_bytes"] > 0 for s in report["stages"].values())


def test_paper_profile_without_imagenet_exits_2_naming_each_missing_input(tmp_path):
    done = _check(_clone(tmp_path, "paper"))
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    problems = done.stdout.split("cannot run:")[1]
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        assert name in problems
    for name in ("VOCtest_06-Nov-2007.tar", "selective_search_data.tgz"):  # official URLs: downloadable
        assert name not in problems and name in done.stdout
    assert "disk: needs" in done.stdout
    assert re.search(r"dvc repro would run (\d+) of \1 stage instances", done.stdout)  # nothing has run


def test_stage_check_stops_a_stage_missing_its_input_before_it_writes(tmp_path, monkeypatch):
    repo_dir = _clone(tmp_path, "paper")
    metrics = (repo_dir / "metrics" / "proposals.json").read_bytes()  # the committed tiny run's
    monkeypatch.chdir(repo_dir)
    result = runner.invoke(app, ["stage", "proposals"])
    assert result.exit_code == 2 and "selective_search_data.tgz" in result.output  # fetch has not placed it
    assert not (repo_dir / "data").exists() and (repo_dir / "metrics" / "proposals.json").read_bytes() == metrics


def test_stage_check_refuses_a_disk_that_will_not_hold(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(repo, "free_bytes", lambda path: 1000)
    with pytest.raises(PreflightError, match="disk: pretrain@vgg16 needs"):
        stage_check(tmp_path, "pretrain", {**tiny, "pretrain": {**tiny["pretrain"], "variant": "vgg16"}})
    monkeypatch.setattr(repo, "free_bytes", lambda path: 10 ** 12)
    assert stage_check(tmp_path, "pretrain", tiny).name == "pretrain@color_dropping"


def test_a_late_stage_needs_what_fetch_placed_not_the_source(tmp_path, monkeypatch):
    """linear_probe reads the devkit and val images from data/raw: the fetch source no longer matters."""
    monkeypatch.setattr(repo, "free_bytes", lambda path: 10 ** 13)
    paper = resolve_params(ROOT / "profiles" / "paper.yaml")
    imagenet = tmp_path / "data" / "raw" / "imagenet"
    (imagenet / "val").mkdir(parents=True)
    with pytest.raises(PreflightError, match="ILSVRC2012_devkit_t12.tar.gz .*not in data/raw"):
        stage_check(tmp_path, "linear_probe", paper)
    (imagenet / "ILSVRC2012_devkit_t12").mkdir()
    assert stage_check(tmp_path, "linear_probe", paper).name == "linear_probe@color_dropping"
