"""The image built and run for real (issue 19), and what podman as the client changes.

Tests marked `container` need an engine and the image of this checkout: `make test-container` installs
podman, makes a Debian bookworm base with debootstrap, builds the image and runs them with
CTXREPRO_CONTAINER_TESTS=required, which turns a missing engine or image into a failure instead of a skip.
The others drive the podman code paths through the stand-in client of tests/fixtures/fake_docker.
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

from ctxrepro import container as dk

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_DOCKER = Path(__file__).resolve().parent / "fixtures" / "fake_docker"
REQUIRED = os.environ.get("CTXREPRO_CONTAINER_TESTS") == "required"


# ---------------------------------------------------------------- podman through the stand-in client

@pytest.fixture
def podman(tmp_path, monkeypatch) -> tuple[tuple[str, str], Path]:
    """A client call whose program is named `podman` (the stand-in, imitating local podman) and its log."""
    link = tmp_path / "bin" / "podman"
    link.parent.mkdir()
    link.symlink_to(FAKE_DOCKER)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    monkeypatch.setenv("FAKE_DOCKER_MODE", "podman")
    for name in ("FAKE_DOCKER_RUN_EXIT", "FAKE_DOCKER_RUN_STDERR", dk.IN_CONTAINER_ENV):
        monkeypatch.delenv(name, raising=False)
    return (sys.executable, str(link)), log


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "Dockerfile").write_text("FROM python:3.11-slim-bookworm\n")
    (root / "requirements.lock").write_text("torch==2.14.1\n")
    return root


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_flags(argv: list[str], tag: str) -> list[tuple[str, str | None]]:
    i, pairs = 2, []
    while argv[i] != tag:
        if argv[i] in ("--rm", "--init"):
            pairs.append((argv[i], None))
            i += 1
        else:
            pairs.append((argv[i], argv[i + 1]))
            i += 2
    return pairs


def test_is_podman_sees_through_wrappers():
    assert dk.is_podman(["podman"]) and dk.is_podman(["sudo", "/usr/bin/podman", "--runtime", "runc"])
    assert not dk.is_podman(["docker"]) and not dk.is_podman(["sudo", "docker"])


def test_podman_engine_is_checked_with_info(repo, podman, monkeypatch):
    call, log = podman
    monkeypatch.setattr(dk, "host_has_gpu", lambda: False)
    dk.repro(repo, ["fetch"], client_call=call)
    assert [c[0] for c in calls(log)][:2] == ["version", "info"]
    monkeypatch.setenv("FAKE_DOCKER_MODE", "podman-broken")
    with pytest.raises(dk.DockerError, match=r"podman \(.*\) cannot run containers here \(Error: default OCI "
                                             r"runtime \"crun\" not found.*CONTAINERS_CONF.*make repro"):
        dk.repro(repo, ["fetch"], client_call=call)


@pytest.mark.parametrize("uid, gpus, expect_userns, expect_device", [
    (0, True, False, True), (0, False, False, False), (1000, False, True, False),
])
def test_podman_run_takes_gpus_as_cdi_and_keeps_ids_rootless(repo, podman, monkeypatch, uid, gpus,
                                                              expect_userns, expect_device):
    call, log = podman
    monkeypatch.setattr(dk.os, "getuid", lambda: uid)
    dk.repro(repo, gpus=gpus, client_call=call)
    runs = [c for c in calls(log) if c[:2] == ["container", "run"]]
    pairs = run_flags(runs[0], dk.image_tag(repo))
    assert not any(flag == "--gpus" for flag, _ in pairs), "podman has no --gpus"
    assert (("--device", "nvidia.com/gpu=all") in pairs) is expect_device
    assert (("--userns", "keep-id") in pairs) is expect_userns
    assert ("--user", f"{uid}:{os.getgid()}") in pairs


def test_podman_cdi_failure_is_explained(repo, podman, monkeypatch):
    call, _ = podman
    monkeypatch.setenv("FAKE_DOCKER_RUN_EXIT", "125")
    monkeypatch.setenv("FAKE_DOCKER_RUN_STDERR", "Error: setting up CDI devices: unresolvable CDI devices "
                                                 "nvidia.com/gpu=all")
    with pytest.raises(dk.DockerError, match="nvidia-ctk cdi generate.*--no-gpus"):
        dk.repro(repo, gpus=True, client_call=call)


def test_build_passes_the_optional_inputs(repo, podman, tmp_path):
    call, log = podman
    bundle, wheels, prefix = tmp_path / "ca.pem", tmp_path / "wheels", tmp_path / "cpython"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    wheels.mkdir()
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3.11").write_bytes(b"")
    dk.build(repo, base_image="localhost/bookworm:1", python_prefix=prefix, ca_bundle=bundle, wheels=wheels,
             network="host", client_call=call)
    argv = calls(log)[-1]
    assert argv[:2] == ["buildx", "build"]
    pairs = set(zip(argv, argv[1:]))
    assert ("--build-arg", "BASE_IMAGE=localhost/bookworm:1") in pairs
    assert ("--secret", f"id=ca,src={bundle}") in pairs
    assert ("--build-context", f"wheels={wheels}") in pairs
    assert ("--build-context", f"python-prefix={prefix}") in pairs
    assert ("--network", "host") in pairs


@pytest.mark.parametrize("what, message", [("ca_bundle", "CA bundle .* not found"),
                                           ("wheels", "wheel folder .* not found"),
                                           ("python_prefix", "bin/python3.11 not found")])
def test_build_inputs_are_checked_before_the_engine(repo, podman, tmp_path, what, message):
    call, log = podman
    with pytest.raises(dk.DockerError, match=message):
        dk.build(repo, client_call=call, **{what: tmp_path / "missing"})
    assert calls(log) == []


def test_pins_on_disk_picks_the_lock_pins_a_folder_holds(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "docker"))
    try:
        from pins_on_disk import pins_on_disk
    finally:
        sys.path.pop(0)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("six-1.17.0-py2.py3-none-any.whl",          # pinned, any platform
                 "PyYAML-6.0.4-py3-none-any.whl",             # name spelt differently from the lock's
                 "tqdm-4.69.0-py3-none-any.whl",              # another version than the pin
                 "numpy-2.4.6-cp27-cp27m-win32.whl",          # the pin, but for another interpreter
                 "not-a-wheel.whl"):
        (wheels / name).write_bytes(b"")
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.4.6\npyyaml==6.0.4\nsix==1.17.0\ntqdm==4.70.1\n")
    assert pins_on_disk(wheels, lock) == ["pyyaml==6.0.4", "six==1.17.0"]


# ---------------------------------------------------------------- the real engine and image

def _real_client_call() -> list[str]:
    return list(dk.default_client_call())


@pytest.fixture(scope="module")
def image() -> str:
    """The tag of this checkout's image; a skip (a failure under make test-container) without engine or image."""
    def unavailable(reason: str):
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)

    client = dk.make_client(_real_client_call())
    try:
        dk.ensure_engine(client)
    except dk.DockerError as e:
        unavailable(str(e))
    tag = dk.image_tag(REPO_ROOT)
    if not client.image.exists(tag):
        unavailable(f"{tag} is not built: run `make test-container`")
    return tag


def _run(program: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`program` of this interpreter's environment, which is also first on PATH (DVC runs `ctxrepro stage`)."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    result = subprocess.run([str(bindir / program), *args], cwd=cwd, capture_output=True, text=True, env=env,
                            timeout=1800)
    assert result.returncode == 0, f"{program} {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _ctxrepro(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return _run("ctxrepro", args, cwd, env)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of this checkout's files (tracked and not ignored) as its own git repository: runs write here."""
    root = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, root / name)
    git = ["git", "-c", "user.name=ctxrepro-test", "-c", "user.email=test@ctxrepro.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + args, cwd=root, check=True)
    return root


def _fetch_result(root: Path) -> tuple[dict, dict]:
    """metrics/fetch.json without its wall-clock `seconds`, and the hash of data/raw in dvc.lock (the metrics
    file is an out there too, with the seconds in its hash)."""
    metrics = json.loads((root / "metrics" / "fetch.json").read_text())
    seconds = metrics.pop("seconds")
    assert seconds >= 0
    # the code's commit: the host's git sees the checkout's HEAD; the image may have no git (then null)
    provenance = metrics.pop("provenance")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert provenance["commit"] in (head, None) and provenance["code_clean"] in (provenance["commit"] == head, None)
    outs = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["fetch"]["outs"]
    raw = [(out["md5"], out["nfiles"]) for out in outs if out["path"] == "data/raw"]
    assert len(raw) == 1 and raw[0][1] > 0
    return metrics, raw[0]


@pytest.mark.container
@pytest.mark.slow
def test_build_gives_the_hashed_tag_of_a_cuda_python311_image(image):
    out = _ctxrepro(["docker", "build"], REPO_ROOT).stdout.strip().splitlines()
    assert out[-1] == image == dk.image_tag(REPO_ROOT)
    probe = ("import sys, torch, torchvision; print(sys.version_info[:2], torch.__version__, torch.version.cuda, "
             "torchvision.__version__)")
    result = subprocess.run([*_real_client_call(), "run", "--rm", image, "python", "-c", probe], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    version, torch_version, cuda, vision_version = result.stdout.split(")")[0] + ")", *result.stdout.split()[2:]
    assert version == "(3, 11)" and cuda == "13.0", "the lock's CUDA 13.0 torch on Python 3.11"
    assert torch_version.split("+")[0] == "2.14.1" and vision_version.split("+")[0] == "0.29.1"


@pytest.mark.container
@pytest.mark.slow
def test_repro_fetch_in_the_container_writes_what_the_host_writes(image, checkout):
    _run("dvc", ["repro", "--force", "fetch"], checkout)
    host = _fetch_result(checkout)
    (checkout / "metrics" / "fetch.json").unlink()
    _ctxrepro(["docker", "repro", "--force", "--no-gpus", "fetch"], checkout)
    assert _fetch_result(checkout) == host, "same data/raw tree (dvc.lock md5) and metrics as the host run"
    assert (checkout / "metrics" / "fetch.json").stat().st_uid == os.getuid(), "outputs belong to the user"


@pytest.mark.container
@pytest.mark.slow
def test_base_runtime_docker_reruns_the_stage_in_the_container(image, checkout, tmp_path):
    # The client, wrapped to record its calls, so the test sees that the engine ran the stage.
    log = tmp_path / "podman_calls"
    wrapper = tmp_path / "bin" / Path(_real_client_call()[0]).name
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {shutil.which(_real_client_call()[0])} "$@"\n')
    wrapper.chmod(0o755)
    (checkout / "metrics" / "fetch.json").unlink(missing_ok=True)
    call = " ".join([str(wrapper), *_real_client_call()[1:]])
    result = _ctxrepro(["stage", "fetch", "--set", "base.runtime=docker", "--set", "base.device=cpu"], checkout,
                       env={dk.CLIENT_ENV: call})
    runs = [line for line in log.read_text().splitlines() if line.startswith("container run")]
    assert len(runs) == 1 and image in runs[0]
    assert runs[0].endswith("ctxrepro stage fetch --params params.yaml --set base.runtime=docker --set "
                            "base.device=cpu --set base.runtime=local")
    assert "stage fetch, commit" in result.stderr + result.stdout, "the stage's own log, from the container"
    metrics = json.loads((checkout / "metrics" / "fetch.json").read_text())
    assert metrics["datasets"]["imagenet"]["images"] == 895, "the tiny world's 895 ImageNet images"


@pytest.mark.container
def test_a_broken_engine_gives_a_clear_error(tmp_path):
    if shutil.which(_real_client_call()[0]) is None:
        pytest.fail("no container client installed") if REQUIRED else pytest.skip("no container client")
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path / "missing.conf"), "DOCKER_HOST": "unix:///nonexistent"}
    result = subprocess.run([str(Path(sys.executable).parent / "ctxrepro"), "docker", "repro", "fetch"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot" in result.stderr and "make repro" in result.stderr and "base.runtime: local" in result.stderr
