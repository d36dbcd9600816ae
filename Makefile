# The two commands of the README. Both create .venv on a fresh machine and install pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test test-fast smoke test-container print-container-vars bench lock clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ctxrepro check
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Tests marked `container` need a container engine and the built image: `make test-container` runs them.
test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not container" --durations=15

test-fast: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow and not container"

# The smoke profile's `dvc repro` (the paper's shapes, a few steps each) in a fresh copy of the tree; make test runs it too.
smoke: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m smoke

# The image built and run for real with podman on a Debian bookworm base made with debootstrap
# (.ci/container-setup; apt, as root). PYTHON_PREFIX: a CPython >= 3.11.4 built on bookworm (Debian's is
# 3.11.2); WHEEL_DIRS: folders of local wheels the build uses before the index; CA_BUNDLE: the certificates
# pip trusts in the build (a TLS-intercepting network).
# Both are derived from this machine unless given: PYTHON_PREFIX is $(PYTHON)'s sys.base_prefix unless that
# is Debian's own /usr (too old: the build then says so), WHEEL_DIRS the CI machines' wheel folders that exist.
BASE_IMAGE := localhost/ctxrepro-base:bookworm
PYTHON_PREFIX ?= $(shell $(PYTHON) -c 'import sys; p = sys.base_prefix; print("" if p == "/usr" else p)' 2>/dev/null)
WHEEL_DIRS ?= $(wildcard /opt/pypi/files /opt/pypi-more/files)
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
CONTAINER_ENV := PATH="$(CURDIR)/$(BIN):$$PATH" CTXREPRO_DOCKER=podman \
	CONTAINERS_CONF="$(CURDIR)/.cache/containers.conf" CTXREPRO_BASE_IMAGE=$(BASE_IMAGE) \
	CTXREPRO_WHEELS="$(CURDIR)/.cache/wheels" $(if $(wildcard $(CA_BUNDLE)),CTXREPRO_CA_BUNDLE=$(CA_BUNDLE)) \
	$(if $(PYTHON_PREFIX),CTXREPRO_PYTHON_PREFIX="$(PYTHON_PREFIX)")

test-container: install
	BASE_IMAGE=$(BASE_IMAGE) CTXREPRO_WHEEL_DIRS="$(WHEEL_DIRS)" .ci/container-setup
	$(CONTAINER_ENV) $(BIN)/ctxrepro docker build
	$(CONTAINER_ENV) CTXREPRO_CONTAINER_TESTS=required $(BIN)/python -m pytest -q -m container

# What test-container will use, one NAME=value a line (tests/test_makefile.py checks the derivation).
print-container-vars:
	@echo PYTHON_PREFIX=$(PYTHON_PREFIX)
	@echo WHEEL_DIRS=$(WHEEL_DIRS)

# Re-pin after changing dependencies in pyproject.toml.
lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^ctxrepro' > requirements.lock

clean:
	rm -rf $(VENV)
