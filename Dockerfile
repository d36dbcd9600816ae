# syntax=docker/dockerfile:1
# ctxrepro runtime image. Build and run it through `ctxrepro docker build` / `ctxrepro docker repro`: the tag
# is a hash of this file plus requirements.lock, so a changed pin always means a new image.
#
# Why not an nvidia/cuda base: the pinned torch==2.14.1 / torchvision==0.29.1 PyPI wheels are CUDA 13.0
# builds that load their own CUDA user-space libraries (cuda-toolkit, nvidia-cublas, nvidia-cudnn-cu13, ...
# all pinned in requirements.lock), so an nvidia/cuda:13.0 runtime base would add a second, unused copy of
# the same libraries, and none of its Ubuntu bases ships the Python 3.11 the project pins. The CUDA runtime
# therefore matches torch by construction, and the only thing taken from the host is the driver, which the
# NVIDIA container toolkit mounts in for `--gpus all`. The three NVIDIA_* variables below are the ones the
# nvidia/cuda images set: they make the toolkit mount the compute and nvidia-smi libraries, and refuse to
# start the container, with a message naming the requirement, on a host driver too old for CUDA 13.0.
#
# Build inputs (all optional; `ctxrepro docker build --help` sets them, README "Running in Docker"):
# - BASE_IMAGE: any Debian bookworm image. python:3.11-slim-bookworm ships Python 3.11; a bare bookworm
#   (CI's debootstrap base: registries are unreachable there) needs the `python-prefix` context below, since
#   Debian's own python3.11 is 3.11.2, older than the tarfile extraction filters (3.11.4) the fetch stage uses.
# - build context `python-prefix`: the install prefix of a CPython 3.11 (>= 3.11.4) built on bookworm, e.g. a pyenv
#   version folder; copied to /opt/python, without its site-packages.
# - build secret `ca`: a CA bundle for pip, for networks that intercept TLS (corporate proxies); pip then
#   verifies against it instead of its own certifi bundle.
# - build context `wheels`: a folder of wheels pip looks in before the index (pip --find-links), e.g. a local
#   mirror holding the multi-GB torch/CUDA wheels. Without it the stage below is empty and pip downloads all.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM scratch AS wheels

FROM scratch AS python-prefix

# Python 3.11 in a venv at /opt/venv, whichever of the three sources gives it: the `python-prefix` context, the
# base's own, or Debian's package. Debian's python3 refuses system-wide pip installs (PEP 668), and the venv
# puts all three on one path. The shared-library path of a copied prefix goes to ld.so.conf (its RUNPATH
# names the prefix it was built for); its runtime libraries come from apt.
FROM ${BASE_IMAGE} AS python
RUN --mount=type=bind,from=python-prefix,target=/tmp/python-prefix \
    python=python3.11; \
    if [ -x /tmp/python-prefix/bin/python3.11 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libssl3=3.0.* libffi8=3.4.* libsqlite3-0=3.40.* \
            liblzma5=5.4.* libbz2-1.0=1.0.* libreadline8=8.2-* zlib1g=1:1.2.* libuuid1=2.38.* \
        && rm -rf /var/lib/apt/lists/* \
        && mkdir -p /opt/python/bin \
        && cp -a /tmp/python-prefix/include /tmp/python-prefix/lib /opt/python/ \
        && cp -a /tmp/python-prefix/bin/python3.11 /opt/python/bin/ \
        && rm -rf /opt/python/lib/python3.11/site-packages/* \
        && echo /opt/python/lib > /etc/ld.so.conf.d/python.conf && ldconfig \
        && python=/opt/python/bin/python3.11; \
    elif ! command -v python3.11 > /dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11=3.11.* python3.11-venv=3.11.* \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && if ! "$python" -c "import tarfile; tarfile.data_filter"; then \
        echo "Python 3.11 >= 3.11.4 is needed (tarfile filters): give one as the python-prefix build context" >&2; \
        exit 1; \
    fi \
    && "$python" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM python AS wheel

# The project as a wheel, built apart so the final image holds neither setuptools' build tree nor a
# source copy (the mounted checkout is the source of truth at run time, see PYTHONPATH below).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ctxrepro ./ctxrepro
COPY stages ./stages
RUN --mount=type=secret,id=ca,target=/run/secrets/ca --mount=type=bind,from=wheels,target=/tmp/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip wheel --find-links /tmp/wheels --no-deps --wheel-dir /wheels .

FROM python

# PYTHONPATH=/repo: `dvc repro` in the container must run the code of the mounted checkout (the code DVC
# hashes as stage deps), not the copy installed below, which only provides the `ctxrepro` command and a
# working image without a mount. The image tag does not hash the code, so the installed copy may be older.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/repo \
    DVC_NO_ANALYTICS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

# git: DVC and the stages' provenance log need it; glib: OpenCV's contrib wheel links it.
# safe.directory '*': the mounted checkout and DVC's temporary experiment workspaces under it may be owned
# by a uid other than the container's (git 2.39 has no path-prefix patterns, so '/repo' alone would not
# cover .dvc/tmp/exps/*). The fixed user is for plain `docker run`; `ctxrepro docker` passes the host uid:gid.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* libglib2.0-0=2.74.* \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory '*' \
    && useradd --create-home --uid 1000 --user-group ctx

# Dependencies in their own layer: a code change rebuilds only the small project layer, not torch. The lock
# is COPYed, not bind-mounted: podman 4.3's builder keys its layer cache on COPY content but not on mounts.
# Pins whose wheel is in the `wheels` context are installed from it alone first (pip would otherwise prefer
# the index's copy of the same file), then pip fetches the rest.
COPY requirements.lock docker/pins_on_disk.py /opt/build/
RUN --mount=type=secret,id=ca,target=/run/secrets/ca --mount=type=bind,from=wheels,target=/tmp/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python /opt/build/pins_on_disk.py /tmp/wheels /opt/build/requirements.lock > /tmp/on_disk.txt \
    && if [ -s /tmp/on_disk.txt ]; then \
        pip install --no-deps --no-index --find-links /tmp/wheels -r /tmp/on_disk.txt; \
    fi \
    && pip install -r /opt/build/requirements.lock \
    && rm /tmp/on_disk.txt

RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/project \
    pip install --no-deps /tmp/project/ctxrepro-*.whl \
    && ctxrepro --help > /dev/null \
    && dvc --version

USER 1000:1000
WORKDIR /repo
CMD ["ctxrepro", "--help"]
