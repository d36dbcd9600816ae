"""Params profiles: `profiles/<name>.yaml` copied over `params.yaml`, so `dvc params diff` shows a switch."""

from __future__ import annotations

from pathlib import Path

from ctxrepro.io import atomic_write_bytes

PROFILES = ("tiny", "smoke", "paper")


class ProfileError(ValueError):
    pass


def current_profile(root: Path) -> str:
    """The profile params.yaml equals byte for byte, or 'custom'."""
    params = (root / "params.yaml").read_bytes() if (root / "params.yaml").exists() else b""
    for name in PROFILES:
        path = root / "profiles" / f"{name}.yaml"
        if path.exists() and path.read_bytes() == params:
            return name
    return "custom"


def switch_profile(root: Path, name: str, force: bool = False) -> str:
    """Copy profiles/<name>.yaml over params.yaml; refuse to drop local edits unless `force`."""
    if name not in PROFILES:
        raise ProfileError(f"unknown profile '{name}'; choose one of {', '.join(PROFILES)}")
    source = root / "profiles" / f"{name}.yaml"
    if not source.is_file():
        raise ProfileError(f"{source} not found: run from the repository root")
    previous = current_profile(root)
    if previous == "custom" and (root / "params.yaml").exists() and not force:
        raise ProfileError("params.yaml has edits that match no profile; commit or copy them, or pass --force")
    atomic_write_bytes(root / "params.yaml", source.read_bytes())
    return previous
