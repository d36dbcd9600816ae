"""The resize stage (paper section 3): pixel bounds and aspect, seeded draws, junk, resume after a real kill,
shards, and determinism across worker counts. Images are made here, a few hundred pixels each."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import jpeg_bytes, photo
from PIL import Image

from ctxrepro.config import BaseParams, ParamsError, parse_dataclass
from ctxrepro.data.resize import ResizeConfig, encode_jpeg, plan_size, resample, shard_of, target_size
from ctxrepro.data.resize_run import ResizeError, iter_tasks, run_shard
from ctxrepro.stage import StageContext
from stages import resize as stage

# The tiny profile: 48-px patches, 24-px gap (a 2x2 grid needs 120 px), 50K..90K pixels.
TINY = ResizeConfig(min_pixels=50_000, max_pixels=90_000, quality=95, patch=48, gap=24)
REPO = Path(__file__).resolve().parents[1]





# ---------------------------------------------------------------- sizes and draws (hand-checked values)

@pytest.mark.parametrize("w, h, pixels, want", [
    (500, 375, 187_500, (500, 375)),  # exactly its own size
    (400, 300, 300_000, (632, 474)),  # scale sqrt(2.5) = 1.58114: 632.46 x 474.34, rounded; 299,568 px
    # 447.21 x 335.41 rounds to 447 x 335 = 149,745 < 150K; +1 row (447x336, aspect 1.3304) is closer
    # to 4:3 than +1 column (448x335, 1.3373)
    (640, 480, 150_000, (447, 336)),
    # 774.60 x 580.95 rounds to 775 x 581 = 450,275 > 450K; -1 column (774x581, 1.3322) beats
    # -1 row (775x580, 1.3362)
    (640, 480, 450_000, (774, 581)),
    (4000, 200, 150_000, (1732, 87)),  # 20:1 panorama: 1732.05 x 86.60
])
def test_target_size_hand_values(w, h, pixels, want):
    assert target_size(w, h, pixels, 150_000, 450_000) == want


def test_target_size_bounds_and_aspect_on_many_sizes():
    rng = np.random.default_rng(0)
    lo, hi = 150_000, 450_000
    for _ in range(3000):
        w, h = (int(v) for v in rng.integers(16, 6000, 2))
        if max(w, h) / min(w, h) > 12:
            continue
        for pixels in (lo, hi, float(rng.uniform(lo, hi))):
            tw, th = target_size(w, h, pixels, lo, hi)
            assert lo <= tw * th <= hi, (w, h, pixels, tw, th)
            # each side is within 2.5 px of the exact real-valued size, so the aspect error is bounded
            assert abs(math.log(tw / th) - math.log(w / h)) <= 3 / tw + 3 / th, (w, h, pixels, tw, th)
            assert abs(tw * th - pixels) <= 2 * (tw + th), (w, h, pixels, tw, th)


@pytest.mark.parametrize("w, h, want", [
    (500, 375, (500, 375)),  # 187.5K px <= 450K: stored as it is (a visit may enlarge it, not the store)
    (40, 30, (40, 30)),  # never enlarged
    (1000, 750, (774, 581)),  # 750K px: 774.60 x 580.95 -> 775 x 581 = 450,275 > 450K; -1 column (as above)
])
def test_canonical_size_caps_pixels_and_never_enlarges(w, h, want):
    assert plan_size(w, h, ResizeConfig()) == want


def test_jpegs_keep_full_chroma():
    from PIL import JpegImagePlugin

    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_jpeg(rgb, 95))) as im:
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4 (4:2:0 would be 2)
        assert all((h, v) == (1, 1) for _, h, v, _ in im.layer)  # no channel subsampled


def test_shards_partition_the_images():
    keys = [f"val/ILSVRC2012_val_{i:08d}.JPEG" for i in range(3000)]
    owners = [shard_of(k, 4) for k in keys]
    counts = np.bincount(owners, minlength=4)
    assert counts.sum() == 3000 and set(owners) == {0, 1, 2, 3}
    assert np.all(np.abs(counts - 750) < 112)  # 4.7 binomial standard deviations
    assert [shard_of(k, 1) for k in keys[:10]] == [0] * 10


@pytest.mark.parametrize("size", [(266, 200), (160, 120)])  # shrink 1.5x (k = 2) and 2.5x (k = 3)
def test_resample_antialiases_when_shrinking(size):
    # A 1-px checkerboard holds only the highest frequency: a correct shrink turns it into flat grey
    # (mean 127.5, std 0); plain bilinear sampling aliases it into a visible pattern.
    y, x = np.mgrid[0:300, 0:400]
    board = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[..., None], 3, axis=2)
    out = resample(board, size)
    bilinear = cv2.resize(board, size, interpolation=cv2.INTER_LINEAR)
    assert out.shape == (size[1], size[0], 3)
    assert abs(out.mean() - 127.5) < 1.5 and out.std() < 15 and out.std() < 0.5 * bilinear.std()


@pytest.mark.parametrize("size", [(266, 200), (400, 300), (500, 375), (160, 120)])
def test_resample_keeps_flat_colour(size):
    flat = np.full((300, 400, 3), (77, 140, 201), np.uint8)
    assert np.array_equal(resample(flat, size), np.full((size[1], size[0], 3), (77, 140, 201), np.uint8))


def test_config_refuses_bad_ranges():
    with pytest.raises(ValueError, match="min_pixels < max_pixels"):
        ResizeConfig(min_pixels=90_000, max_pixels=50_000)
    with pytest.raises(ValueError, match="narrower"):
        ResizeConfig(min_pixels=100_000, max_pixels=100_100, patch=8, gap=4)
    with pytest.raises(ParamsError, match="min_pixels < max_pixels"):
        parse_dataclass(stage.Params, {"min_pixels": 5, "max_pixels": 4}, "resize")
    with pytest.raises(ParamsError, match="not allowed"):
        parse_dataclass(stage.Params, {"splits": ["test"]}, "resize")


# ---------------------------------------------------------------- a small tree with every junk kind

def make_tree(raw: Path) -> dict[str, str]:
    """Write data/raw/imagenet/{train,val}; returns the expected skip reason per source."""
    train, val = raw / "imagenet" / "train", raw / "imagenet" / "val"
    for d in (train / "n01", train / "n02", val):
        d.mkdir(parents=True, exist_ok=True)
    (train / "n01" / "a.JPEG").write_bytes(jpeg_bytes(photo(320, 240, 1)))  # enlarged (76.8K px)
    (train / "n01" / "big.JPEG").write_bytes(jpeg_bytes(photo(1600, 1200, 2)))  # shrunk, draft mode
    buf = io.BytesIO()
    Image.new("CMYK", (300, 260), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    (train / "n01" / "cmyk.JPEG").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    photo(280, 250, 3).convert("L").save(buf, format="JPEG", quality=90)
    (train / "n01" / "gray.JPEG").write_bytes(buf.getvalue())
    photo(300, 300, 4).save(train / "n01" / "png.JPEG", format="PNG")
    good = jpeg_bytes(photo(300, 220, 5))
    (train / "n02" / "cut.JPEG").write_bytes(good[: len(good) // 2])
    (train / "n02" / "noise.JPEG").write_bytes(np.random.default_rng(6).integers(0, 256, 999, np.uint8).tobytes())
    # 400 x 60: even at 90K pixels the short side is sqrt(90000 * 60 / 400) = 116 < 2 * 48 + 24 = 120
    (train / "n02" / "thin.JPEG").write_bytes(jpeg_bytes(photo(400, 60, 7)))
    (train / "n02" / "zero.JPEG").write_bytes(b"")
    (train / "n02" / "twin.JPEG").write_bytes(jpeg_bytes(photo(260, 260, 8)))
    (train / "n02" / "twin.jpg").write_bytes(jpeg_bytes(photo(260, 260, 9)))  # same output name
    (train / "n02" / "README.txt").write_text("not an image")
    for i in (1, 2):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg_bytes(photo(250 + 40 * i, 230, 10 + i)))
    return {"imagenet/train/n01/png.JPEG": "png_named_jpeg", "imagenet/train/n02/cut.JPEG": "truncated",
            "imagenet/train/n02/noise.JPEG": "corrupt", "imagenet/train/n02/thin.JPEG": "too_small",
            "imagenet/train/n02/zero.JPEG": "empty", "imagenet/train/n02/twin.jpg": "duplicate_name"}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree_bytes(root: Path, skip_parts: bool = False) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not (skip_parts and rel.startswith("parts/")):
            out[rel] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tree, and one reference run with 1 worker (shared by the tests that compare against it)."""
    root = tmp_path_factory.mktemp("world")
    expected = make_tree(root / "raw")
    mine, merged = run_shard(root / "raw", root / "ref", ("val", "train"), TINY, workers=1)
    return root, expected, mine, merged


def test_manifest_and_images(world):
    root, expected, _, _ = world
    rows = read_csv(root / "ref" / "manifest.csv")
    assert [r["source"] for r in rows] == [
        "imagenet/train/n01/a.JPEG", "imagenet/train/n01/big.JPEG", "imagenet/train/n01/cmyk.JPEG",
        "imagenet/train/n01/gray.JPEG", "imagenet/train/n02/twin.JPEG",
        "imagenet/val/ILSVRC2012_val_00000001.JPEG", "imagenet/val/ILSVRC2012_val_00000002.JPEG"]
    assert [(r["split"], r["path"]) for r in rows] == sorted((r["split"], r["path"]) for r in rows)
    for r in rows:
        src = Image.open(root / "raw" / r["source"])
        out = Image.open(root / "ref" / r["path"])
        w, h, ow, oh = int(r["width"]), int(r["height"]), int(r["orig_width"]), int(r["orig_height"])
        assert r["path"] == r["source"].removeprefix("imagenet/").rsplit(".", 1)[0] + ".jpg"
        assert (ow, oh) == src.size and (w, h) == out.size and out.mode == "RGB" and out.format == "JPEG"
        assert w * h <= 90_000 and w <= ow and h <= oh and ((w, h) == (ow, oh) or w * h > 89_000)
        assert abs(math.log(w / h) - math.log(ow / oh)) <= 3 / w + 3 / h
        assert (w, h) == plan_size(ow, oh, TINY)
    red = np.asarray(Image.open(root / "ref" / "train/n01/cmyk.jpg")).reshape(-1, 3).mean(0)
    assert np.abs(red - [255, 0, 0]).max() < 4  # CMYK pure red stays red after conversion


def test_junk_is_counted_and_listed(world):
    root, expected, mine, merged = world
    skipped = read_csv(root / "ref" / "skipped.csv")
    assert {r["source"]: r["reason"] for r in skipped} == expected
    assert all(r["detail"] for r in skipped)
    assert merged["images_in"] == 13 and merged["images_written"] == 7 and merged["images_skipped"] == 6
    assert merged["images_converted"] == 2 and merged["converted_by_mode"] == {"CMYK": 1, "L": 1}
    assert {k: v for k, v in merged["skipped_by_reason"].items() if v} == {
        "png_named_jpeg": 1, "truncated": 1, "corrupt": 1, "too_small": 1, "empty": 1, "duplicate_name": 1}
    assert mine["images_reused"] == 0
    assert not (root / "ref" / ".partial").exists()


@pytest.mark.parametrize("max_upscale, kept", [(0.0, True), (4.0, False)])
def test_thumbnails_are_kept_for_enlarged_visits_unless_max_upscale(tmp_path, max_upscale, kept):
    # 40 x 30 = 1,200 px: a visit must grow it sqrt(50K / 1.2K) = 6.5x .. sqrt(90K / 1.2K) = 8.7x, as the
    # released code does (short side >= 30 * 6.45 = 193 >= 120); max_upscale 4 skips it as too small.
    d = tmp_path / "raw" / "imagenet" / "train" / "n01"
    d.mkdir(parents=True)
    (d / "thumb.JPEG").write_bytes(jpeg_bytes(photo(40, 30)))
    cfg = ResizeConfig(min_pixels=50_000, max_pixels=90_000, patch=48, gap=24, max_upscale=max_upscale)
    _, merged = run_shard(tmp_path / "raw", tmp_path / "out", ["train"], cfg, workers=1)
    assert merged["images_written"] == int(kept) and merged["skipped_by_reason"]["too_small"] == int(not kept)
    if kept:
        assert Image.open(tmp_path / "out" / "train" / "n01" / "thumb.jpg").size == (40, 30)  # stored as is


def test_files_are_walked_in_output_path_order(tmp_path):
    top = tmp_path / "imagenet" / "train"
    for rel in ("a.JPEG", "a-b/x.JPEG", "a/x.JPEG", "a.b.JPEG", "B.JPEG"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(b"")
    paths = [t.path for t in iter_tasks(tmp_path, ["train"])]
    # string order, where '-' < '.' < '/' < 'B' < 'a'
    assert paths == ["train/B.jpg", "train/a-b/x.jpg", "train/a.b.jpg", "train/a.jpg", "train/a/x.jpg"]


def test_missing_split_names_the_folder(tmp_path):
    with pytest.raises(ResizeError, match="imagenet/val does not exist"):
        run_shard(tmp_path / "raw", tmp_path / "out", ["val"], TINY, workers=1)


def test_two_workers_give_identical_bytes(world, tmp_path):
    root, _, _, _ = world
    run_shard(root / "raw", tmp_path / "out", ("train", "val"), TINY, workers=2)
    assert tree_bytes(tmp_path / "out") == tree_bytes(root / "ref")


def test_shards_union_equals_whole_run(world, tmp_path):
    root, _, _, whole = world
    out = tmp_path / "out"
    for i in range(3):
        _, merged = run_shard(root / "raw", out, ("train", "val"), TINY, workers=1, shard=(i, 3))
        assert (merged is None) == (i < 2) and (out / "manifest.csv").exists() == (i == 2)
    assert merged == whole
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(
        f"{k}-{i}-of-3.{e}" for i in range(3) for k, e in (("counts", "json"), ("manifest", "csv"),
                                                           ("skipped", "csv")))
    assert tree_bytes(out, skip_parts=True) == tree_bytes(root / "ref", skip_parts=True)
    # an unsharded pass over the sharded output reuses every image and keeps only its own parts
    mine, merged = run_shard(root / "raw", out, ("train", "val"), TINY, workers=1)
    assert mine["images_reused"] == 7 and merged == whole
    assert tree_bytes(out) == tree_bytes(root / "ref")


def test_rerun_reuses_complete_images_and_repairs_damaged_ones(world, tmp_path):
    root, _, _, whole = world
    out = tmp_path / "out"
    shutil.copytree(root / "ref", out)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.jpg")}
    damaged = out / "val" / "ILSVRC2012_val_00000001.jpg"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # e.g. a crash before the page cache reached disk
    (out / ".partial" / "0-of-1").mkdir(parents=True)
    (out / ".partial" / "0-of-1" / "tmpab12.jpg").write_bytes(b"half an image")  # a killed write
    mine, merged = run_shard(root / "raw", out, ("train", "val"), TINY, workers=1)
    assert mine["images_reused"] == 6 and merged == whole
    assert tree_bytes(out) == tree_bytes(root / "ref")
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.jpg")}
    assert [p.name for p in before if before[p] != after[p]] == [damaged.name]


def test_resume_with_another_config_is_refused(world, tmp_path):
    root, _, _, _ = world
    shutil.copytree(root / "ref", tmp_path / "out")
    other = ResizeConfig(min_pixels=50_000, max_pixels=90_000, quality=80, patch=48, gap=24)
    with pytest.raises(ResizeError, match=r"differs in: quality"):
        run_shard(root / "raw", tmp_path / "out", ("train", "val"), other, workers=1)


# ---------------------------------------------------------------- the stage, and a real kill

def stage_params(workers: int) -> stage.Params:
    return stage.Params(workers=workers, min_pixels=50_000, max_pixels=90_000, quality=95, patch=48, gap=24,
                        splits=("train", "val"))


def stage_ctx(root: Path) -> StageContext:
    return StageContext(base=BaseParams(seed=7), device="cpu", log=logging.getLogger("test"), root=root)


def test_stage_writes_metrics(world, tmp_path):
    root, _, _, whole = world
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw").symlink_to(root / "raw")
    stage.run(stage_params(1), stage_ctx(tmp_path))
    metrics = json.loads((tmp_path / "metrics" / "resize.json").read_text())
    assert {k: metrics[k] for k in whole} == whole
    assert metrics["seconds"] > 0 and metrics["images_per_second"] > 0 and metrics["shard"] == "0/1"
    assert tree_bytes(tmp_path / "data" / "resized") == tree_bytes(root / "ref")


KILLED_RUN = """
import logging, sys
from pathlib import Path
from ctxrepro.config import BaseParams
from ctxrepro.stage import StageContext
from stages import resize
if __name__ == "__main__":
    params = resize.Params(workers=2, min_pixels=50000, max_pixels=90000, quality=95, patch=48, gap=24)
    resize.run(params, StageContext(BaseParams(seed=7), "cpu", logging.getLogger("killed"), root=Path.cwd()))
"""


def count_outputs(out: Path) -> int:
    return sum(1 for _ in out.glob("train/*/*.jpg")) if out.is_dir() else 0


@pytest.mark.slow
@pytest.mark.faults
def test_killed_run_resumes_to_identical_output(tmp_path):
    """SIGKILL the stage (all its processes) once some images exist, rerun, compare with a clean run."""
    for name, n in (("n01", 70), ("n02", 70)):
        d = tmp_path / "a" / "data" / "raw" / "imagenet" / "train" / name
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{name}_{i}.JPEG").write_bytes(jpeg_bytes(photo(480, 360, i), quality=85))
    val = tmp_path / "a" / "data" / "raw" / "imagenet" / "val"
    val.mkdir()
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")  # junk in the mix
    (tmp_path / "b" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data" / "raw").symlink_to(tmp_path / "a" / "data" / "raw")
    stage.run(stage_params(1), stage_ctx(tmp_path / "a"))  # the uninterrupted reference

    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path / "b", env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "b" / "data" / "resized"
    deadline = time.monotonic() + 60
    while count_outputs(out) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage process and its workers: the session we started
    assert proc.wait() == -signal.SIGKILL
    assert 10 <= count_outputs(out) < 140 and not (out / "manifest.csv").exists()
    assert (out / ".partial").is_dir()  # the kill left the run's temporary folder behind

    stage.run(stage_params(2), stage_ctx(tmp_path / "b"))
    assert tree_bytes(out) == tree_bytes(tmp_path / "a" / "data" / "resized")
    metrics = json.loads((tmp_path / "b" / "metrics" / "resize.json").read_text())
    assert metrics["images_reused"] >= 10 and metrics["images_written"] == 140


def test_png_in_a_class_folder_is_counted_under_a_reason(tmp_path):
    d = tmp_path / "raw" / "imagenet" / "train" / "n01"
    d.mkdir(parents=True)
    photo(300, 300, 1).save(d / "x.png", format="PNG")
    (d / "y.JPEG").write_bytes(jpeg_bytes(photo(300, 300, 2)))
    photo(300, 300, 3).save(d / "y.png", format="PNG")  # the same output name as y.JPEG, which sorts first
    _, merged = run_shard(tmp_path / "raw", tmp_path / "out", ["train"], TINY, workers=1)
    skipped = {r["source"]: r["reason"] for r in read_csv(tmp_path / "out" / "skipped.csv")}
    assert skipped == {"imagenet/train/n01/x.png": "not_jpeg_name", "imagenet/train/n01/y.png": "duplicate_name"}
    assert (merged["images_in"], merged["images_written"]) == (3, 1)
    assert merged["skipped_by_reason"]["not_jpeg_name"] == 1


def test_reuse_is_keyed_on_the_source_mtime(tmp_path):
    """A source whose pixels changed (same size) is resized again; untouched ones are reused."""
    d = tmp_path / "raw" / "imagenet" / "train" / "n01"
    d.mkdir(parents=True)
    for name, seed in (("a.JPEG", 1), ("b.JPEG", 2)):
        (d / name).write_bytes(jpeg_bytes(photo(300, 240, seed)))
    run_shard(tmp_path / "raw", tmp_path / "out", ["train"], TINY, workers=1)
    out = tmp_path / "out" / "train" / "n01"
    old = out.joinpath("a.jpg").read_bytes()
    (d / "a.JPEG").write_bytes(jpeg_bytes(photo(300, 240, 3)))  # new pixels, same size
    os.utime(d / "a.JPEG", ns=(1, os.stat(d / "b.JPEG").st_mtime_ns + 10**9))
    mine, _ = run_shard(tmp_path / "raw", tmp_path / "out", ["train"], TINY, workers=1)
    assert (mine["images_written"], mine["images_reused"]) == (2, 1)  # written counts reused ones too
    assert out.joinpath("a.jpg").read_bytes() != old
    fresh = tmp_path / "fresh"
    run_shard(tmp_path / "raw", fresh, ["train"], TINY, workers=1)
    assert out.joinpath("a.jpg").read_bytes() == (fresh / "train" / "n01" / "a.jpg").read_bytes()


def test_exif_orientation_is_not_applied(tmp_path):
    """Decided: pixels as stored (like torchvision's PIL loader); a 'rotate 90' tag does not swap the sides."""
    d = tmp_path / "raw" / "imagenet" / "train" / "n01"
    d.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    photo(400, 240, 1).save(d / "r.JPEG", format="JPEG", quality=90, exif=exif)
    run_shard(tmp_path / "raw", tmp_path / "out", ["train"], TINY, workers=1)
    w, h = Image.open(tmp_path / "out" / "train" / "n01" / "r.jpg").size
    assert w > h and "exif" not in Image.open(tmp_path / "out" / "train" / "n01" / "r.jpg").info
