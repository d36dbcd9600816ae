"""Small file makers shared by the data tests (images and archives made in the test, never committed)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent  # this venv's tools (dvc, ctxrepro)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image with mild noise: compresses like a photograph, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    """A tar holding `members` (name -> content) in the given order; uncompressed unless `mode` says ("w:gz")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_md5sums(folder: Path, wrong: dict[str, str] | None = None) -> None:
    """An MD5SUMS in `folder` listing every file there (what vouches for archives that are not the published
    ones); `wrong` overrides some names' digests."""
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != "MD5SUMS"}
    sums.update(wrong or {})
    (Path(folder) / "MD5SUMS").write_text("".join(f"{md5}  {name}\n" for name, md5 in sums.items()))


def repo_env(threads: int | None = 1) -> dict:
    """The environment of a tool run in a test repo: this venv's bin first, git identity, no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_in(args, cwd, check=True, threads: int | None = 1):
    result = subprocess.run(args, cwd=cwd, env=repo_env(threads), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def clone_tree(root: Path, tmp_path: Path) -> Path:
    """The working tree as git sees it (tracked and untracked-not-ignored files), in a fresh repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True,
                           check=True).stdout.decode().split("\0")
    repo = tmp_path / "repo"
    for rel in filter(None, files):
        src = root / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    run_in(["git", "init", "-q"], repo)
    run_in(["git", "add", "-A"], repo)
    run_in(["git", "commit", "-qm", "clone"], repo)  # as a clone has: dvclive needs a commit to start from
    return repo
