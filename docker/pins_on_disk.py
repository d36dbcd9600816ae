"""Print the pins of a lock file that a folder of wheels holds for this interpreter (the image build, issue 19).

pip, given both a local folder (--find-links) and an index with the same file, downloads the index's copy,
so the Dockerfile installs these pins from the folder alone first and lets pip fetch only the rest.
Only the standard library and pip's vendored `packaging` are used: this runs before anything is installed.

usage: python pins_on_disk.py WHEEL_FOLDER LOCK_FILE
"""

import sys
from pathlib import Path

from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from pip._vendor.packaging.version import InvalidVersion, Version


def wheels_on_disk(folder: Path) -> set[tuple[str, Version]]:
    """(canonical name, version) of each wheel in `folder` that installs on this interpreter and platform."""
    supported = set(sys_tags())
    found = set()
    for path in folder.glob("*.whl"):
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if tags & supported:
            found.add((name, version))
    return found


def pins_on_disk(folder: Path, lock: Path) -> list[str]:
    """The `name==version` lines of `lock` whose wheel is in `folder`, in the lock's order."""
    found = wheels_on_disk(folder)
    pins = []
    for line in lock.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        try:
            key = (canonicalize_name(name), Version(version))
        except InvalidVersion:
            continue
        if sep and key in found:
            pins.append(line.strip())
    return pins


if __name__ == "__main__":
    print("\n".join(pins_on_disk(Path(sys.argv[1]), Path(sys.argv[2]))))
