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
from ctxrepro.stage import STAGE_ORDER, available_stages, stage_help

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
        assert "--set" in result.output and "--shard" in result.output and "0/1" in result.output


def test_params_listing_shows_defaults_and_rules():
    result = runner.invoke(app, ["params", "base"])
    assert result.exit_code == 0
    assert "base.device (str; default 'auto'; one of auto|cpu|cuda)" in result.output
    bad = runner.invoke(app, ["params", "nosuch"])
    assert bad.exit_code == 2 and "unknown stage 'nosuch'" in bad.output


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
    result = runner.invoke(app, ["stage", "fetch", *args])
    assert result.exit_code == 2
    for w in words:
        assert w in result.output
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml", "profiles"]
