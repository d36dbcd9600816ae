"""Rerunning the pipeline in the project's container image, through python-on-whales (issue 10).

The image (`Dockerfile`) is tagged `ctxrepro:<12 hex>`, a hash of the Dockerfile and requirements.lock, so a
changed pin always means a new image. `repro` runs `dvc repro` in it and `run_stage_in_container` one
`ctxrepro stage` (what `base.runtime: docker` asks for). Both mount the checkout at /repo and run as the
host user's uid:gid, so outputs land in the checkout owned by that user, and DVC on the host sees them.
The pipeline these commands rerun is the paper's (Doersch et al. 2015, sections 3-4); nothing here changes
what a stage computes, only where it runs.

Which docker client is used: `client_call` when given, else the `CTXREPRO_DOCKER` environment variable
(split like a shell would, e.g. "podman", "podman --runtime runc" or "sudo docker"), else `docker` on PATH.
Podman (issue 19) has no engine behind its client, takes GPUs as CDI devices rather than `--gpus`, and, run
rootless, needs `--userns keep-id` for files written through the mount to belong to the user; its own
settings (runtime, ulimits) come from the containers.conf that CONTAINERS_CONF names, read from the
environment this process passes on.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import typer
from python_on_whales import DockerClient
from python_on_whales.client_config import ClientNotFoundError
from python_on_whales.exceptions import DockerException
from python_on_whales.utils import run as run_client

IMAGE_NAME = "ctxrepro"
TAG_INPUTS = ("Dockerfile", "requirements.lock")
MOUNT = "/repo"
CLIENT_ENV = "CTXREPRO_DOCKER"
IN_CONTAINER_ENV = "CTXREPRO_IN_CONTAINER"
# Last on the inner command line so it wins over the user's --set: the stage must not start a container again.
RUNTIME_OVERRIDE = "base.runtime=local"
# Host variables a run needs to behave the same inside: GPU choice, cuBLAS determinism, thread counts,
# git identity (dvc exp commits), and what DVC tells a stage command it runs (dvclive reads DVC_EXP_*).
PASSTHROUGH_ENV = ("CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                   "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                   "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
LOCAL_HINT = ("To run without Docker: `make repro` (or `dvc repro`) for the whole pipeline, or `ctxrepro stage "
              "NAME` for one stage, with `base.runtime: local` in params.yaml.")
TOOLKIT_HINT = ("`--gpus all` needs the NVIDIA container toolkit on this host (install nvidia-container-toolkit "
                "and run `nvidia-ctk runtime configure --runtime=docker`, then restart the engine), "
                "or rerun with --no-gpus to stay on the CPU.")
PODMAN_TOOLKIT_HINT = ("podman takes the GPU as the CDI device nvidia.com/gpu=all, which needs the NVIDIA container "
                       "toolkit and its CDI spec on this host (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)"
                       ", or rerun with --no-gpus to stay on the CPU.")
CDI_GPUS = "nvidia.com/gpu=all"


class DockerError(RuntimeError):
    """Docker cannot do what was asked; the message says why and how to run without it."""


def image_tag(root: Path | str) -> str:
    """`ctxrepro:<12 hex>`: sha256 over each input's name and content digest, so moving text from one file
    to the other also changes the tag, and the checkout's location does not."""
    h = hashlib.sha256()
    for name in TAG_INPUTS:
        path = Path(root) / name
        if not path.is_file():
            raise DockerError(f"{path} not found: the image tag hashes {' and '.join(TAG_INPUTS)}; "
                              "run from the repository root")
        h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"{IMAGE_NAME}:{h.hexdigest()[:12]}"


def default_client_call() -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get(CLIENT_ENV, ""))) or ("docker",)


def is_podman(client_call: Sequence[str]) -> bool:
    """Whether the client is podman, also behind a wrapper such as `sudo podman --runtime runc`."""
    return any(Path(str(part)).name == "podman" for part in client_call)


def make_client(client_call: Sequence[str] | None = None) -> DockerClient:
    call = list(client_call or default_client_call())
    return DockerClient(client_call=call, client_type="podman" if is_podman(call) else "docker")


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def ensure_engine(client: DockerClient) -> None:
    """Fail fast, before any work, when there is no client or no engine behind it (as on CI)."""
    call = " ".join(client.client_config.client_call)
    podman = is_podman(client.client_config.client_call)
    try:
        version = client.version()
        if version.server is None and podman:
            # Local podman is its own engine: ask it whether its storage and OCI runtime answer.
            run_client(client.client_config.docker_cmd + ["info", "--format", "{{.Host.OCIRuntime.Name}}"])
    except ClientNotFoundError:
        raise DockerError(f"no docker client: '{call}' is not on PATH (set {CLIENT_ENV} to use another "
                          f"client). {LOCAL_HINT}") from None
    except DockerException as e:
        if podman:
            raise DockerError(f"podman ('{call}') cannot run containers here ({_first_line(e.stderr)}); its "
                              "settings come from the containers.conf named by CONTAINERS_CONF. "
                              f"{LOCAL_HINT}") from None
        raise DockerError(f"the docker client '{call}' cannot reach a Docker engine ({_first_line(e.stderr)}). "
                          f"{LOCAL_HINT}") from None
    if version.server is None and not podman:
        raise DockerError(f"the docker client '{call}' reports no Docker engine. {LOCAL_HINT}")


def host_has_gpu() -> bool:
    """True when `nvidia-smi -L` lists a GPU, i.e. the host has the driver that `--gpus all` hands in.

    Asked of nvidia-smi rather than torch: the host's own Python may have a CPU-only torch, or none.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        result = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and any(line.startswith("GPU ") for line in result.stdout.splitlines())


def container_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The container's environment: fixed entries plus the PASSTHROUGH_ENV names that are set on the host."""
    env = {
        # The host uid has no passwd entry in the image, so HOME would be '/', which it cannot write;
        # git, DVC and matplotlib all write under HOME.
        "HOME": "/tmp",
        # Run the mounted code (what DVC hashes as stage deps), not the copy installed in the image.
        "PYTHONPATH": MOUNT,
        "DVC_NO_ANALYTICS": "1",
        IN_CONTAINER_ENV: "1",
    }
    env.update({name: environ[name] for name in PASSTHROUGH_ENV if name in environ})
    if "DVC_ROOT" in environ:
        # Set when DVC runs a stage command; the stage's cwd, the mounted root, is the DVC root.
        env["DVC_ROOT"] = MOUNT
    return env


def run_options(root: Path | str, *, gpus: bool, environ: Mapping[str, str], podman: bool = False) -> dict:
    """Keyword arguments for python-on-whales' `docker.run` (`podman`: for the podman client)."""
    options = dict(
        volumes=[(str(Path(root).resolve()), MOUNT)],
        workdir=MOUNT,
        # Outputs written through the mount stay owned by the host user.
        user=f"{os.getuid()}:{os.getgid()}",
        # DataLoader workers pass batches through /dev/shm, which Docker caps at 64 MB by default.
        ipc="host",
        gpus="all" if gpus and not podman else None,
        envs=container_env(environ),
        # tini (catatonit under podman) as PID 1 reaps DataLoader workers and forwards Ctrl+C to dvc.
        init=True,
        remove=True,
    )
    if podman:
        options["devices"] = [CDI_GPUS] if gpus else []
        if os.getuid() != 0:
            # Rootless podman maps container uids to subordinate ids: keep-id maps the user onto itself.
            options["userns"] = "keep-id"
    return options


def _explain_failure(tag: str, command: Sequence[str], error: DockerException) -> str:
    stderr = (error.stderr or "").lower()
    if "could not select device driver" in stderr or "nvidia-container-cli" in stderr:
        return f"the container {tag} could not start with a GPU: {_first_line(error.stderr)}. {TOOLKIT_HINT}"
    if "cdi" in stderr and "nvidia.com/gpu" in stderr:
        return f"the container {tag} could not start with a GPU: {_first_line(error.stderr)}. {PODMAN_TOOLKIT_HINT}"
    return (f"`{shlex.join(command)}` failed in the container {tag} with exit status {error.return_code} "
            "(its output is above)")


def run_in_container(root: Path | str, command: Sequence[str], *, gpus: bool | None = None,
                     client_call: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Run `command` in the image of this checkout, streaming its output; `gpus=None` asks host_has_gpu()."""
    client = make_client(client_call)
    ensure_engine(client)
    tag = image_tag(root)
    use_gpus = host_has_gpu() if gpus is None else gpus
    options = run_options(root, gpus=use_gpus, environ=os.environ if environ is None else environ,
                          podman=is_podman(client.client_config.client_call))
    try:
        if not client.image.exists(tag):
            raise DockerError(f"the image {tag} is not built (its tag hashes Dockerfile and requirements.lock); "
                              f"run `ctxrepro docker build` first. {LOCAL_HINT}")
        for source, chunk in client.run(tag, list(command), stream=True, **options):
            out = sys.stderr if source == "stderr" else sys.stdout
            out.write(chunk.decode(errors="replace"))
            out.flush()
    except DockerException as e:
        raise DockerError(_explain_failure(tag, command, e)) from None


def build_inputs(*, base_image: str | None = None, python_prefix: Path | str | None = None,
                 ca_bundle: Path | str | None = None, wheels: Path | str | None = None,
                 network: str | None = None) -> dict:
    """The Dockerfile's optional build inputs as python-on-whales `build` keywords: the BASE_IMAGE build arg,
    a CPython install prefix as the build context `python-prefix`, the CA bundle as the build secret `ca`, a
    folder of wheels as the build context `wheels`, and the network the RUN steps use. Paths are checked
    here, so a typo stops before the engine is asked for anything."""
    inputs: dict = {"build_args": {}, "build_contexts": {}}
    if base_image:
        inputs["build_args"]["BASE_IMAGE"] = base_image
    if python_prefix:
        prefix = Path(python_prefix).resolve()
        if not (prefix / "bin" / "python3.11").is_file():
            raise DockerError(f"{prefix / 'bin' / 'python3.11'} not found: --python-prefix takes the install "
                              "prefix of a CPython 3.11 (sys.base_prefix), or leave it out")
        inputs["build_contexts"]["python-prefix"] = str(prefix)
    if ca_bundle:
        bundle = Path(ca_bundle).resolve()
        if not bundle.is_file():
            raise DockerError(f"CA bundle {ca_bundle} not found: give a PEM file of certificates for pip to trust "
                              "(e.g. /etc/ssl/certs/ca-certificates.crt), or leave --ca-bundle out")
        inputs["secrets"] = [f"id=ca,src={bundle}"]
    if wheels:
        folder = Path(wheels).resolve()
        if not folder.is_dir():
            raise DockerError(f"wheel folder {wheels} not found: give a folder of .whl files for pip to use "
                              "before the index, or leave --wheels out")
        inputs["build_contexts"]["wheels"] = str(folder)
    if network:
        inputs["network"] = network
    return inputs


def build(root: Path | str, *, no_cache: bool = False, pull: bool = False, base_image: str | None = None,
          python_prefix: Path | str | None = None, ca_bundle: Path | str | None = None,
          wheels: Path | str | None = None, network: str | None = None,
          client_call: Sequence[str] | None = None) -> str:
    """Build the image from `root`/Dockerfile, tagged image_tag(root) and ctxrepro:latest; returns the tag.

    The tag hashes the recipe, not these inputs: another base image or wheel folder must give the same
    pinned environment (the lock pins every package, the Dockerfile the apt versions)."""
    root = Path(root).resolve()
    inputs = build_inputs(base_image=base_image, python_prefix=python_prefix, ca_bundle=ca_bundle, wheels=wheels,
                          network=network)
    client = make_client(client_call)
    ensure_engine(client)
    tag = image_tag(root)
    try:
        # stream_logs: show the build as it goes (a CUDA image takes minutes); load: put the result in the
        # engine's image store whichever buildx driver is active.
        for line in client.build(root, file=root / "Dockerfile", tags=[tag, f"{IMAGE_NAME}:latest"], load=True,
                                 pull=pull, cache=not no_cache, stream_logs=True, **inputs):
            sys.stderr.write(line)
            sys.stderr.flush()
    except DockerException as e:
        raise DockerError(f"building {tag} failed with exit status {e.return_code} (the build log is above)") from None
    return tag


def repro(root: Path | str, stages: Sequence[str] = (), *, force: bool = False, gpus: bool | None = None,
          client_call: Sequence[str] | None = None) -> None:
    """`dvc repro [--force] [stages]` in the container."""
    run_in_container(root, ["dvc", "repro", *(["--force"] if force else []), *stages], gpus=gpus,
                     client_call=client_call)


def stage_argv(stage: str, params: str, sets: Sequence[str], shard: str) -> list[str]:
    """The `ctxrepro stage` command line the container runs; RUNTIME_OVERRIDE comes last so it wins. --shard
    only when given: the stages that do not shard have no such option."""
    set_args = [arg for item in sets for arg in ("--set", item)]
    shard_args = ["--shard", shard] if shard != "0/1" else []
    return ["ctxrepro", "stage", stage, "--params", params, *set_args, *shard_args, "--set", RUNTIME_OVERRIDE]


def container_relpath(root: Path | str, path: Path | str) -> str:
    """`path` (relative paths are taken from `root`) as a path relative to the mount; the container sees
    nothing outside the checkout."""
    root = Path(root).resolve()
    full = (root / path).resolve()
    try:
        return full.relative_to(root).as_posix()
    except ValueError:
        raise DockerError(f"{path} is outside the repository {root}, the only directory the container sees; "
                          "put it inside the repository") from None


def run_stage_in_container(root: Path | str, stage: str, params_path: Path | str, sets: Sequence[str] = (),
                           shard: str = "0/1", *, gpus: bool | None = None,
                           client_call: Sequence[str] | None = None) -> None:
    """What `base.runtime: docker` does: rerun `ctxrepro stage <stage> ...` inside the container."""
    if os.environ.get(IN_CONTAINER_ENV) == "1":
        raise DockerError(f"base.runtime is docker, but stage {stage} already runs inside the ctxrepro container; "
                          f"pass --set {RUNTIME_OVERRIDE}")
    params = container_relpath(root, params_path)
    run_in_container(root, stage_argv(stage, params, sets, shard), gpus=gpus, client_call=client_call)


docker_app = typer.Typer(help="Build the project's image and run the pipeline in it (needs a Docker engine).",
                         no_args_is_help=True)
GPUS_OPT = typer.Option(None, "--gpus/--no-gpus",
                        help="pass --gpus all to docker (default: when `nvidia-smi -L` on this host lists a GPU)")


def _fail(error: DockerError) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(1)


@docker_app.command("build")
def build_cmd(no_cache: bool = typer.Option(False, "--no-cache", help="rebuild every layer"),
              pull: bool = typer.Option(False, "--pull", help="pull a newer base image first"),
              base_image: Optional[str] = typer.Option(
                  None, "--base-image", envvar="CTXREPRO_BASE_IMAGE",
                  help="a Debian bookworm image to build on (default: python:3.11-slim-bookworm)"),
              python_prefix: Optional[Path] = typer.Option(
                  None, "--python-prefix", envvar="CTXREPRO_PYTHON_PREFIX",
                  help="install prefix of a CPython >= 3.11.4 built on bookworm, for a base without one"),
              ca_bundle: Optional[Path] = typer.Option(
                  None, "--ca-bundle", envvar="CTXREPRO_CA_BUNDLE",
                  help="CA certificates pip trusts in the build (networks that intercept TLS)"),
              wheels: Optional[Path] = typer.Option(
                  None, "--wheels", envvar="CTXREPRO_WHEELS",
                  help="a folder of wheels pip uses before downloading (a local package mirror)"),
              network: Optional[str] = typer.Option(
                  None, "--network", envvar="CTXREPRO_BUILD_NETWORK",
                  help="network of the build's RUN steps, e.g. host")) -> None:
    """Build the image, tagged ctxrepro:<hash of Dockerfile + requirements.lock>; run from the repository root."""
    try:
        tag = build(Path.cwd(), no_cache=no_cache, pull=pull, base_image=base_image, python_prefix=python_prefix,
                    ca_bundle=ca_bundle, wheels=wheels, network=network)
    except DockerError as e:
        _fail(e)
    typer.echo(tag)


@docker_app.command("repro")
def repro_cmd(stages: Optional[List[str]] = typer.Argument(None, help="stages to reproduce (default: all)"),
              force: bool = typer.Option(False, "--force", "-f", help="dvc repro --force"),
              gpus: Optional[bool] = GPUS_OPT) -> None:
    """Run `dvc repro [STAGES...]` in the image, this checkout mounted at /repo, as your uid:gid."""
    try:
        repro(Path.cwd(), list(stages or []), force=force, gpus=gpus)
    except DockerError as e:
        _fail(e)
