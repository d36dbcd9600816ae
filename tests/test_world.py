"""The tiny world read back with independent standard tools (tarfile, xml.etree, h5py, scipy.io, zipfile,
gzip, pickle, PIL), checked against the real data sets' layouts (docs/DATA.md) and hand-derived values."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import re
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from ctxrepro.config import ParamsError, parse_dataclass
from ctxrepro.world import ARCHIVES, CATEGORIES, INDEX, WNIDS, WorldSpec, generate
from ctxrepro.world import photos as photos_mod
from ctxrepro.world.scenes import _annotate, _compose, _Placement, chromatic_aberration
from ctxrepro.world.spec import NYU_CX, NYU_CY, NYU_FX, NYU_FY, VOC_CLASSES

SMALL = WorldSpec(imagenet_classes=3, imagenet_train_per_class=4, imagenet_val=4, image_size=96,
                  voc07_trainval=6, voc07_test=5, voc11_trainval=6, nyu_images=4, nyu_train=3)
SEED = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, generate(out, SMALL, SEED)


def _tar_members(path: Path) -> dict:
    with tarfile.open(path) as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}


def _voc(world, tar_name: str) -> dict:
    out, _ = world
    return _tar_members(out / tar_name)


def test_every_archive_is_written_and_md5sums_match(world):
    out, summary = world
    lines = (out / "MD5SUMS").read_text().splitlines()
    sums = {name: h for h, name in (re.fullmatch(r"([0-9a-f]{32})  (\S+)", line).groups() for line in lines)}
    assert set(sums) == set(ARCHIVES) | {INDEX}
    for name, h in sums.items():
        assert hashlib.md5((out / name).read_bytes()).hexdigest() == h == summary["md5"][name]


def test_imagenet_train_is_a_tar_of_per_class_tars(world):
    out, _ = world
    outer = _tar_members(out / "ILSVRC2012_img_train.tar")
    wnids = [WNIDS[c] for c in CATEGORIES[:3]]
    assert list(outer) == sorted(f"{w}.tar" for w in wnids)  # sorted by wnid, no directory entries
    index = json.loads((out / INDEX).read_text())
    total = 0
    for name, (info, data) in outer.items():
        wnid = name[:-4]
        assert info.uid == 0 and info.mtime == outer[next(iter(outer))][0].mtime
        with tarfile.open(fileobj=io.BytesIO(data)) as inner:
            names = inner.getnames()
        assert names and all(re.fullmatch(rf"{wnid}_\d+\.JPEG", n) for n in names)
        entries = [index[f"imagenet/train/{wnid}/{n}"] for n in names]
        assert {e["category"] for e in entries} == {next(c for c, w in WNIDS.items() if w == wnid)}
        assert sum(e["kind"] == "procedural" for e in entries) == SMALL.imagenet_train_per_class
        total += len(names)
    assert total == 3 * SMALL.imagenet_train_per_class + 5  # five junk files


def test_junk_files_are_what_they_claim(world):
    out, _ = world
    index = json.loads((out / INDEX).read_text())
    files = {}
    with tarfile.open(out / "ILSVRC2012_img_train.tar") as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for n in inner.getmembers():
                    files[f"imagenet/train/{m.name[:-4]}/{n.name}"] = inner.extractfile(n).read()
    junk = {e["junk"]: p for p, e in index.items() if e["kind"] == "junk"}
    assert set(junk) == {"png", "cmyk", "grayscale", "truncated", "too_small"}
    assert all(p.endswith(".JPEG") for p in junk.values())
    assert Image.open(io.BytesIO(files[junk["png"]])).format == "PNG"
    assert Image.open(io.BytesIO(files[junk["cmyk"]])).mode == "CMYK"
    assert Image.open(io.BytesIO(files[junk["grayscale"]])).mode == "L"
    assert Image.open(io.BytesIO(files[junk["too_small"]])).size == (40, 30)
    with pytest.raises(OSError):
        Image.open(io.BytesIO(files[junk["truncated"]])).load()
    good = next(p for p, e in index.items() if e["kind"] == "procedural" and p.startswith("imagenet/train"))
    im = Image.open(io.BytesIO(files[good]))
    assert (im.format, im.mode) == ("JPEG", "RGB")


def test_imagenet_val_is_flat_and_holds_the_photos(world):
    out, summary = world
    members = _tar_members(out / "ILSVRC2012_img_val.tar")
    n = SMALL.imagenet_val + summary["imagenet_val"]["photos"]
    assert list(members) == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, n + 1)]
    index = json.loads((out / INDEX).read_text())
    kinds = [index[f"imagenet/val/{name}"]["kind"] for name in members]
    assert kinds.count("photo") == summary["imagenet_val"]["photos"] == len(photos_mod.PHOTO_SOURCES)
    assert all(Image.open(io.BytesIO(d)).mode == "RGB" for _, d in members.values())


def _objects(root: ET.Element) -> list:
    return root.findall("object")


def _check_annotation(xml: bytes, image: bytes, image_id: str, year: int) -> list:
    root = ET.fromstring(xml)
    w, h = Image.open(io.BytesIO(image)).size
    assert root.findtext("folder") == f"VOC{year}" and root.findtext("filename") == f"{image_id}.jpg"
    assert root.find("source/database") is not None and root.findtext("segmented") == "0"
    assert (int(root.findtext("size/width")), int(root.findtext("size/height")), root.findtext("size/depth")) == (
        w, h, "3")
    for obj in _objects(root):
        assert obj.findtext("name") in VOC_CLASSES and obj.findtext("name") in CATEGORIES
        assert obj.findtext("pose") in ("Left", "Right", "Frontal", "Unspecified")
        assert obj.findtext("truncated") in ("0", "1") and obj.findtext("difficult") in ("0", "1")
        assert (obj.find("occluded") is None) == (year == 2007)  # VOC2007 has no <occluded>
        x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        assert 1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h  # 1-based, inside the image
    return [(o.findtext("name"), o.findtext("difficult") == "1") for o in _objects(root)]


def _check_image_sets(members: dict, root: str, splits: tuple, objects: dict) -> None:
    lists = {}
    for split in splits:
        text = members[f"{root}/ImageSets/Main/{split}.txt"][1].decode()
        lists[split] = text.split()
        assert lists[split] == sorted(lists[split])
        for cls in VOC_CLASSES:
            lines = members[f"{root}/ImageSets/Main/{cls}_{split}.txt"][1].decode().splitlines()
            assert [ln.split()[0] for ln in lines] == lists[split]
            for ln in lines:
                image_id, flag = re.fullmatch(r"(\S+) ( 1|-1| 0)", ln).groups()
                mine = [d for name, d in objects[image_id] if name == cls]
                expected = -1 if not mine else (0 if all(mine) else 1)
                assert int(flag) == expected
    if "trainval" in lists:
        assert not set(lists["train"]) & set(lists["val"])
        assert sorted(lists["train"] + lists["val"]) == lists["trainval"]


def _voc_objects(members: dict, root: str, year: int) -> dict:
    objects = {}
    for name, (_, data) in members.items():
        m = re.fullmatch(rf"{root}/Annotations/(.+)\.xml", name)
        if m:
            image = members[f"{root}/JPEGImages/{m.group(1)}.jpg"][1]
            objects[m.group(1)] = _check_annotation(data, image, m.group(1), year)
    return objects


def test_voc2007_layout_annotations_and_image_sets(world):
    root = "VOCdevkit/VOC2007"
    trainval, test = _voc(world, "VOCtrainval_06-Nov-2007.tar"), _voc(world, "VOCtest_06-Nov-2007.tar")
    assert all(n.startswith(root) or root.startswith(n.rstrip("/")) for n in [*trainval, *test])
    assert trainval["VOCdevkit"][0].isdir()  # directory entries, as the real tars have
    tv_objects, te_objects = _voc_objects(trainval, root, 2007), _voc_objects(test, root, 2007)
    ids = sorted([*tv_objects, *te_objects])
    assert ids == [f"{k:06d}" for k in range(1, SMALL.voc07_trainval + SMALL.voc07_test + 1)]
    assert len(tv_objects) == SMALL.voc07_trainval and not set(tv_objects) & set(te_objects)
    assert all(objs for objs in tv_objects.values())  # every procedural VOC image holds an object
    _check_image_sets(trainval, root, ("train", "val", "trainval"), tv_objects)
    _check_image_sets(test, root, ("test",), te_objects)
    assert f"{root}/ImageSets/Main/test.txt" not in trainval


def test_voc2011_layout_with_photos(world):
    _, summary = world
    root = "TrainVal/VOCdevkit/VOC2011"
    members = _voc(world, "VOCtrainval_25-May-2011.tar")
    objects = _voc_objects(members, root, 2011)
    assert len(objects) == SMALL.voc11_trainval + summary["voc2011"]["photos"]
    assert all(re.fullmatch(r"20(08|09|10|11)_\d{6}", i) for i in objects)
    assert sum(not objs for objs in objects.values()) >= summary["voc2011"]["photos"]
    _check_image_sets(members, root, ("train", "val", "trainval"), objects)


def test_world_index_lists_every_image_by_its_extracted_path(world):
    out, _ = world
    index = json.loads((out / INDEX).read_text())
    expected = set()
    with tarfile.open(out / "ILSVRC2012_img_train.tar") as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                expected |= {f"imagenet/train/{m.name[:-4]}/{n}" for n in inner.getnames()}
    expected |= {f"imagenet/val/{n}" for n in _tar_members(out / "ILSVRC2012_img_val.tar")}
    for tar_name, prefix in (("VOCtrainval_06-Nov-2007.tar", "voc2007"), ("VOCtest_06-Nov-2007.tar", "voc2007"),
                             ("VOCtrainval_25-May-2011.tar", "voc2011")):
        expected |= {f"{prefix}/{n}" for n in _tar_members(out / tar_name) if n.endswith(".jpg")}
    assert set(index) == expected
    for path, e in index.items():
        assert e["kind"] in ("procedural", "photo", "junk") and (e["junk"] is None) == (e["kind"] != "junk")
        assert e["category"] is None or e["category"] in CATEGORIES
        if e["kind"] == "photo":
            assert path.startswith(("imagenet/val/", "voc2011/"))  # never training data (docs/METHOD.md)


def _h5(world) -> h5py.File:
    out, _ = world
    return h5py.File(out / "nyu_depth_v2_labeled.mat", "r")


def test_nyu_mat_is_matlab_v73_with_the_real_names_and_axes(world):
    out, _ = world
    path = out / "nyu_depth_v2_labeled.mat"
    head = path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
    assert scipy.io.matlab.matfile_version(str(path)) == (2, 0)
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(str(path))  # scipy recognises v7.3 and sends you to an HDF5 reader
    n = SMALL.nyu_images
    with _h5(world) as f:
        assert (f["images"].shape, f["images"].dtype) == ((n, 3, 640, 480), np.uint8)
        for key in ("depths", "rawDepths"):
            assert (f[key].shape, f[key].dtype) == ((n, 640, 480), np.float32)
        assert (f["labels"].shape, f["labels"].dtype) == ((n, 640, 480), np.uint16)
        assert f["depths"].attrs["MATLAB_class"] == b"single"
        names = ["".join(chr(c) for c in f[ref][:, 0]) for ref in f["names"][0]]
        assert names[:3] == ["wall", "floor", "ceiling"]
        labels = np.swapaxes(f["labels"][:], 1, 2)  # -> (N, 480, 640)
    floor = labels == 2
    # the camera looks down: floor fills the bottom rows, not the top ones (checks both axes' direction)
    assert (floor[:, -20:].mean(axis=(1, 2)) > floor[:, :20].mean(axis=(1, 2))).all()


def test_nyu_raw_depth_has_holes_and_follows_depth(world):
    with _h5(world) as f:
        depth, raw = np.swapaxes(f["depths"][:], 1, 2), np.swapaxes(f["rawDepths"][:], 1, 2)
    assert depth.shape[1:] == (480, 640) and np.isfinite(depth).all() and (depth > 0.1).all()
    assert (raw[:, :, :8] == 0).all()  # the depth camera never covers the RGB frame's left border
    read = raw > 0
    assert 0.02 < 1 - read.mean() < 0.5
    # Kinect-like noise: sigma 1.4e-3 z^2, 1/1024 m steps, so a reading stays within 6 sigma + a step
    assert (np.abs(raw[read] - depth[read]) <= 6 * 1.4e-3 * depth[read] ** 2 + 1e-3).all()


def _normals_zip(world) -> tuple:
    out, _ = world
    with zipfile.ZipFile(out / "nyuv2_surfacenormal_metadata.zip") as zf:
        names = zf.namelist()
        data = pickle.loads(gzip.decompress(zf.read("surfacenormal_metadata/all_normals.pklz")))
        jsons = {s: json.loads(zf.read(f"surfacenormal_metadata/{s}_SN40.json")) for s in ("train", "test")}
        vocab = scipy.io.loadmat(io.BytesIO(zf.read("surfacenormal_metadata/vocab40.mat")))
    return names, data, jsons, vocab


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b)), a @ b)))


def test_normals_are_unit_and_agree_with_a_plane_fit_of_depth(world):
    """Back-project the depth of each wall and the floor with the NYU intrinsics (1-based pixel grid),
    fit a plane, and compare with the ground-truth normal: a wrong axis order, sign, pixel convention or
    intrinsic would tilt the fitted plane by far more than float32 rounding does."""
    _, data, _, _ = _normals_zip(world)
    normals, valid = data["all_normals"], data["all_valid_depth_masks"]
    assert normals.shape == (SMALL.nyu_images, 480, 640, 3) and normals.dtype == np.float32
    assert np.abs(np.linalg.norm(normals, axis=-1) - 1).max() < 1e-5
    with _h5(world) as f:
        depth = np.swapaxes(f["depths"][:], 1, 2)
        labels = np.swapaxes(f["labels"][:], 1, 2)
        assert (valid == (np.swapaxes(f["rawDepths"][:], 1, 2) > 0)).all()
    rows, cols = np.mgrid[0:480, 0:640]
    checked = 0
    for i in range(len(depth)):
        room = (labels[i] == 1) | (labels[i] == 2)  # walls and floor: one plane per distinct normal
        planes, which = np.unique(normals[i][room], axis=0, return_inverse=True)
        for k, gt in enumerate(planes):
            sel = np.zeros(room.shape, bool)
            sel[room] = which.ravel() == k
            if sel.sum() < 2000:
                continue
            z = depth[i][sel].astype(np.float64)
            pts = np.stack([(cols[sel] + 1 - NYU_CX) * z / NYU_FX, (rows[sel] + 1 - NYU_CY) * z / NYU_FY, z], 1)
            _, s, vt = np.linalg.svd(pts - pts.mean(0), full_matrices=False)
            fit = vt[2] * np.sign(-vt[2] @ pts.mean(0))  # orient toward the camera
            assert s[2] / np.sqrt(len(z)) < 1e-4  # planar up to float32 rounding of the depth
            assert _angle_deg(fit, gt.astype(np.float64)) < 1e-3  # degrees; a 1 px shift of cx gives ~0.07
            assert gt @ pts.mean(0) < 0  # the normal points toward the camera
            checked += 1
    assert checked >= 2 * len(depth)


def test_splits_jsons_and_codebook_agree(world):
    out, _ = world
    splits = scipy.io.loadmat(out / "splits.mat")
    train, test = splits["trainNdxs"], splits["testNdxs"]
    assert train.shape == (SMALL.nyu_train, 1) and test.shape == (SMALL.nyu_images - SMALL.nyu_train, 1)
    assert train.dtype == np.float64
    assert sorted([*train[:, 0], *test[:, 0]]) == list(range(1, SMALL.nyu_images + 1))  # 1-based, disjoint
    names, data, jsons, vocab = _normals_zip(world)
    assert "surfacenormal_metadata/" in names
    for split, ndx in (("train", train), ("test", test)):
        assert [int(r["img"].split("_")[0]) for r in jsons[split]] == ndx[:, 0].astype(int).tolist()
        assert all((r["height"], r["width"]) == (480, 640) for r in jsons[split])
    assert data["all_filenames"] == [f"{i:06d}" for i in range(1, SMALL.nyu_images + 1)]
    codebook = vocab["vocabs"][0][0]["normals"][0][0]
    assert codebook.shape == (40, 3) and np.allclose(np.linalg.norm(codebook, axis=1), 1)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = WorldSpec(imagenet_classes=2, imagenet_train_per_class=2, imagenet_val=2, image_size=64,
                     voc07_trainval=2, voc07_test=1, voc11_trainval=2, nyu_images=2, nyu_train=1, photos=False)
    a, b, c = (generate(tmp_path / name, spec, seed)["md5"] for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_boxes_and_flags_from_a_hand_placed_object():
    """A tvmonitor's frame spans its whole box width and its base reaches the bottom (objects.py)."""
    rng = np.random.default_rng(0)
    canvas = np.full((150, 200, 3), 128.0, np.float32)
    places = [_Placement("tvmonitor", 20, 30, 100, 80, False), _Placement("tvmonitor", -30, 60, 100, 80, False)]
    labels, counts = _compose(rng, canvas, places, 0, 200, 150)
    first, second = _annotate(places, labels, counts)
    assert (first.xmin, first.ymin, first.xmax, first.ymax) == (21, 31, 120, 110)
    assert not first.truncated and first.occluded and not first.difficult  # the second overlaps it
    assert (second.xmin, second.ymin, second.xmax) == (1, 61, 70) and second.truncated
    assert first.pose == second.pose == "Frontal"


def test_chromatic_aberration_moves_green_toward_the_centre():
    w2, m = 201, 5
    canvas = np.full((101, w2, 3), 100.0, np.float32)
    canvas[:, 180] = 250.0  # a bright vertical line 80 px right of the centre column 100
    out = chromatic_aberration(canvas, m, 0.98)
    assert out.shape == (91, 191, 3)
    prof = out[45] - 100.0
    centroid = lambda p: (np.arange(p.size) * p).sum() / p.sum()  # noqa: E731
    assert abs(centroid(prof[:, 0]) - (180 - m)) < 1e-6  # red untouched
    assert abs(centroid(prof[:, 1]) - (100 + 80 * 0.98 - m)) < 0.05  # green scaled by 0.98 about the centre
    assert out[..., 1].min() >= 100.0 - 1e-3  # no empty border anywhere


def test_photos_match_the_package_apis_and_missing_ones_are_counted(monkeypatch):
    from skimage import data

    found, skipped = photos_mod.load_photos()
    by_name = {p.name: p.image for p in found}
    assert np.array_equal(by_name["astronaut"], data.astronaut()) and not skipped
    monkeypatch.setattr(photos_mod, "PHOTO_SOURCES", (("nope", "no_such_package_xyz", "a.png", None),
                                                      ("astronaut", "skimage", "data/astronaut.png", None)))
    found, skipped = photos_mod.load_photos()
    assert [p.name for p in found] == ["astronaut"] and list(skipped) == ["nope"]


def test_spec_validation_names_the_key():
    with pytest.raises(ValueError, match="nyu_train"):
        WorldSpec(nyu_images=4, nyu_train=4)
    with pytest.raises(ParamsError, match="world.imagenet_classes"):
        parse_dataclass(WorldSpec, {"imagenet_classes": 9}, "world")


def test_voc_scenes_take_their_own_size_and_stay_within_vocs_500_px():
    from ctxrepro.world.scenes import imagenet_scene, voc_scene

    assert WorldSpec(image_size=400).voc_size == 400 and WorldSpec(image_size=400, voc_image_size=355).voc_size == 355
    with pytest.raises(ValueError, match="voc_image_size=10"):
        WorldSpec(voc_image_size=10)
    rng = np.random.default_rng(0)
    voc = [voc_scene(rng, 355, None).image.shape for _ in range(6)]
    imagenet = [imagenet_scene(rng, CATEGORIES[0], 400, None).image.shape for _ in range(6)]
    # long side = size * U(1.15, 1.4) for VOC, size * U(0.85, 1.25) for ImageNet (scenes.py), rounded
    assert all(408 <= max(h, w) <= 497 for h, w, _ in voc)
    assert all(340 <= max(h, w) <= 500 for h, w, _ in imagenet)
