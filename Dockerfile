# ctxrepro runtime image. The pinned torch 2.14.1 / torchvision 0.29.1 wheels are CUDA 13.0 builds that
# carry their own CUDA runtime libraries (nvidia-* wheels in requirements.lock), so a slim Python 3.11 base
# is enough; the GPU driver comes from the host through the NVIDIA container toolkit (`--gpus all`).
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# git: DVC and the stages' provenance log need it; libgl/glib: OpenCV's contrib wheel imports them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* libglib2.0-0=2.74.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ctxrepro
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY ctxrepro ./ctxrepro
COPY stages ./stages
RUN pip install --no-deps . \
    && git config --system --add safe.directory '*' \
    && useradd --create-home --uid 1000 ctx

USER ctx
WORKDIR /repo
ENTRYPOINT ["ctxrepro"]
CMD ["--help"]
