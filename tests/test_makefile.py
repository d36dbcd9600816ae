"""The Makefile's `test-container` works as typed: it derives the image's Python prefix and the local wheel
folders from the machine, as CI did by hand before (README "Running in Docker (or podman)")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_WHEEL_DIRS = ("/opt/pypi/files", "/opt/pypi-more/files")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _make(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON_PREFIX", "WHEEL_DIRS", "PYTHON", "MAKEFLAGS")}
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                          env=env).stdout


def _vars(*args: str) -> dict[str, str]:
    lines = _make("print-container-vars", *args).splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_prefix_is_the_interpreters_own_install_outside_debian():
    """Mutation caught: `PYTHON_PREFIX ?=` left empty again (or sys.prefix, the venv, instead of base_prefix)."""
    got = _vars(f"PYTHON={sys.executable}")["PYTHON_PREFIX"]
    # a venv's interpreter names the CPython it was made from, never the venv itself
    assert got == (sys.base_prefix if sys.base_prefix != "/usr" else "")
    if sys.prefix != sys.base_prefix:
        assert got != sys.prefix


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no Debian python3 on this machine")
def test_debians_python_gives_no_prefix_so_the_build_explains_why():
    """Mutation caught: the `/usr` exception dropped (the build would copy the whole system prefix)."""
    base = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert _vars("PYTHON=/usr/bin/python3")["PYTHON_PREFIX"] == ("" if base == "/usr" else base)


def test_wheel_dirs_are_the_ci_folders_that_exist_and_can_be_given():
    """Mutation caught: `WHEEL_DIRS ?=` empty, or a folder listed that is not on this machine."""
    present = [d for d in CI_WHEEL_DIRS if Path(d).is_dir()]
    assert _vars()["WHEEL_DIRS"].split() == present
    assert _vars("WHEEL_DIRS=/somewhere/else")["WHEEL_DIRS"] == "/somewhere/else"


def test_test_container_passes_the_derived_values_to_the_build(tmp_path):
    """`make -n test-container` (prints, runs nothing) hands both values to the setup and the build."""
    fake_prefix = tmp_path / "cpython"
    dry = _make("-n", "test-container", f"PYTHON_PREFIX={fake_prefix}", "WHEEL_DIRS=/w1 /w2")
    assert 'CTXREPRO_WHEEL_DIRS="/w1 /w2" .ci/container-setup' in dry
    build = [line for line in dry.splitlines() if "ctxrepro docker build" in line]
    assert len(build) == 1 and f'CTXREPRO_PYTHON_PREFIX="{fake_prefix}"' in build[0]
    derived = _vars(f"PYTHON={sys.executable}")["PYTHON_PREFIX"]
    plain = _make("-n", "test-container", f"PYTHON={sys.executable}")
    assert (f'CTXREPRO_PYTHON_PREFIX="{derived}"' in plain) == bool(derived)


def test_ci_runs_test_container_as_typed():
    """CI calls the target exactly as the README shows it, with no values of its own."""
    calls = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip().startswith("make ")]
    assert calls == ["make test", "make test-container"]
