"""The command line: help texts, params listing, profile switching, error exits that write nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctxrepro.cli import app
from ctxrepro.profiles import PROFILES, current_profile
from ctxrepro.config import ParamsError
from ctxrepro.stage import STAGE_ORDER, available_stages, run_stage, stage_help, stage_shards

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_top_level_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for word in ("stage", "params", "profile"):
        assert word in result.output


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "ctxrepro", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "stage" in result.stdout


def test_every_stage_has_help_with_option_defaults():
    stages = available_stages()
    assert stages[0] == "fetch"
    assert stages == [s for s in STAGE_ORDER if s in stages]
    listing = runner.invoke(app, ["stage", "--help"]).output
    for name in stages:
        assert name in listing
        result = runner.invoke(app, ["stage", name, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert stage_help(name) and stage_help(name).split()[0] in result.output
        assert "--params" in result.output and "params.yaml" in result.output
        assert "--set" in result.output
        # only a stage that splits its work offers --shard (resize); the rest would ignore it
        assert ("--shard" in result.output) == (name == "resize"), name
        assert stage_shards(name) == (name == "resize"), name


def test_params_listing_shows_defaults_and_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults only, and it says so
    result = runner.invoke(app, ["params", "base"])
    assert result.exit_code == 0
    assert "no such file; the code's defaults only" in result.output
    assert "base.device (str; default 'auto'; one of auto|cpu|cuda)  auto picks" in result.output
    bad = runner.invoke(app, ["params", "nosuch"])
    assert bad.exit_code == 2 and "unknown stage 'nosuch'" in bad.output


def test_params_listing_shows_the_params_files_values_beside_the_defaults(tmp_path):
    """Mutation caught: listing only the dataclass defaults (the old behaviour) or reading another file."""
    path = tmp_path / "mine.yaml"
    path.write_text("base: {seed: 7, device: auto}\nresize: {workers: 3, quality: 95}\n")
    out = runner.invoke(app, ["params", "resize", "--params", str(path)], terminal_width=300).output.splitlines()
    rows = {line.split(" (")[0]: line for line in out[1:]}
    assert f"{path}: 3 *" in rows["resize.workers"] and "default 4" in rows["resize.workers"]
    assert rows["resize.quality"].split("  ")[1] == f"{path}: 95"  # equal to the default: no mark
    assert f"{path}: 150000" in rows["resize.min_pixels"]  # a key the file leaves out takes the default
    base = runner.invoke(app, ["params", "base", "--params", str(path)]).output
    assert f"base.seed (int; default 0; >= 0, <= 2147483647)  {path}: 7 *" in base
    # the committed params.yaml: tiny-profile values, e.g. pretrain.patch 48 against the paper's default 96
    committed = runner.invoke(app, ["params", "pretrain", "--params", str(ROOT / "params.yaml")]).output
    assert "pretrain.patch (int; default 96" in committed and f"{ROOT / 'params.yaml'}: 48 *" in committed


def test_params_listing_refuses_a_bad_params_file_like_a_stage(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: {}\nresize: {workers: 0}\n")
    result = runner.invoke(app, ["params", "resize", "--params", str(path)])
    assert result.exit_code == 2 and "resize.workers" in result.output


def test_shard_is_refused_by_a_stage_that_does_not_split_its_work(tmp_path, monkeypatch):
    """The CLI has no --shard on such a stage, and run_stage refuses one before anything is written."""
    root = _copy_profiles(tmp_path)
    monkeypatch.chdir(root)
    assert runner.invoke(app, ["stage", "mine", "--shard", "1/2"]).exit_code == 2  # no such option
    with pytest.raises(ParamsError, match=r"--shard 1/2: stage mine does not split its work \(only resize does\)"):
        run_stage("mine", Path("params.yaml"), [], "1/2")
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml", "profiles"]


def _copy_profiles(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_committed_params_is_the_tiny_profile():
    assert current_profile(ROOT) == "tiny"


def test_profile_switch_round_trip(tmp_path, monkeypatch):
    root = _copy_profiles(tmp_path)
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["profile", "paper"])
    assert result.exit_code == 0, result.output
    assert (root / "params.yaml").read_bytes() == (root / "profiles" / "paper.yaml").read_bytes()
    assert runner.invoke(app, ["profile", "tiny"]).exit_code == 0
    assert current_profile(root) == "tiny"
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n# my edit\n")
    refused = runner.invoke(app, ["profile", "paper"])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert "# my edit" in (root / "params.yaml").read_text()
    assert runner.invoke(app, ["profile", "paper", "--force"]).exit_code == 0
    assert runner.invoke(app, ["profile", "huge"]).exit_code == 2


def test_every_profile_parses_for_every_stage():
    """Each profile holds every stage's section with every key, so DVC tracks all of them."""
    import dataclasses
    import importlib

    from ctxrepro.config import BaseParams, load_yaml, parse_dataclass

    for profile in PROFILES:
        data = load_yaml(ROOT / "profiles" / f"{profile}.yaml")
        parse_dataclass(BaseParams, data["base"], "base")
        for name in available_stages():
            cls = importlib.import_module(f"stages.{name}").Params
            parse_dataclass(cls, data[name], name)
            assert set(data[name]) == {f.name for f in dataclasses.fields(cls)}, (profile, name)


@pytest.mark.parametrize("args, words", [
    (["--set", "fetch.nosuch=1"], ["fetch", "nosuch"]),
    (["--set", "base.device=tpu"], ["base.device", "tpu"]),
    (["--set", "base.seed=-3"], ["base.seed", "-3"]),
    (["--shard", "2/2"], ["--shard"]),
])
def test_stage_param_errors_exit_nonzero_and_write_nothing(tmp_path, monkeypatch, args, words):
    root = _copy_profiles(tmp_path)
    monkeypatch.chdir(root)
    stage = "resize" if args[0] == "--shard" else "fetch"  # the one stage with --shard: a bad value
    result = runner.invoke(app, ["stage", stage, *args])
    assert result.exit_code == 2
    for w in words:
        assert w in result.output
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml", "profiles"]
