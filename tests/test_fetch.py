"""fetch_dataset from local sources: tar of tars, merged VOC tars, extracted trees, verification, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import tar_bytes, write_md5sums
from PIL import Image

from ctxrepro.data import fetch
from ctxrepro.data.extract import BrokenArchiveError, UnsafeArchiveError
from ctxrepro.data.fetch import fetch_dataset, plan_sources
from ctxrepro.data.imagenet import list_train_images, list_val_images
from ctxrepro.data.registry import Archive, Checksum, ChecksumError, Expected, archives_for

LOG = logging.getLogger("test_fetch")



def image_bytes(mode: str, fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (6, 9, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(), mode=None if mode != "CMYK" else "CMYK").save(buf, fmt)
    return buf.getvalue()


def imagenet_folder(folder: Path, md5sums: bool = True) -> dict[str, bytes]:
    """A small ILSVRC2012 train tar of tars and val tar under their real names; returns path -> bytes."""
    classes = {
        "n01440764": {"n01440764_10026.JPEG": image_bytes("RGB", "JPEG", 0),
                      "n01440764_2.JPEG": image_bytes("CMYK", "JPEG", 1)},  # CMYK junk passes untouched
        "n02105855": {"n02105855_2933.JPEG": image_bytes("RGB", "PNG", 2)},  # the PNG named .JPEG
        "n15075141": {"n15075141_7.JPEG": image_bytes("L", "JPEG", 3)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    train = tar_bytes({f"{w}.tar": tar_bytes(imgs) for w, imgs in classes.items()})
    val_imgs = {f"ILSVRC2012_val_{i:08d}.JPEG": image_bytes("RGB", "JPEG", 10 + i) for i in (1, 2)}
    val = tar_bytes(val_imgs)
    (folder / "ILSVRC2012_img_train.tar").write_bytes(train)
    (folder / "ILSVRC2012_img_val.tar").write_bytes(val)
    if md5sums:
        (folder / "MD5SUMS").write_text(f"{hashlib.md5(train).hexdigest()}  ILSVRC2012_img_train.tar\n"
                                        f"{hashlib.md5(val).hexdigest()}  ILSVRC2012_img_val.tar\n")
    expected = {f"train/{w}/{n}": b for w, imgs in classes.items() for n, b in imgs.items()}
    expected.update({f"val/{n}": b for n, b in val_imgs.items()})
    return expected


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_imagenet_tar_of_tars_streamed_into_layout(tmp_path):
    expected = imagenet_folder(tmp_path / "src")
    dest = tmp_path / "data/raw/imagenet"
    report = fetch_dataset("imagenet", str(tmp_path / "src"), dest, tmp_path / "data/downloads", log=LOG)
    assert tree(dest) == expected  # byte for byte: the PNG and CMYK files pass through untouched
    assert (report.images, report.files, report.images_expected) == (6, 6, None)
    assert report.verified == {"ILSVRC2012_img_train.tar": str(tmp_path / "src/MD5SUMS"),
                               "ILSVRC2012_img_val.tar": str(tmp_path / "src/MD5SUMS")}
    assert report.archives == ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    assert any("ILSVRC2012_devkit_t12.tar.gz" in w for w in report.warnings)
    assert [p.relative_to(dest).as_posix() for p in list_train_images(dest)] == sorted(
        k for k in expected if k.startswith("train/"))
    assert [p.name for p in list_val_images(dest)] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["imagenet"]  # no temp folder left
    # local sources are never copied to the cache; the resumable extraction's folder is gone once done
    assert list((tmp_path / "data/downloads").iterdir()) == []


def test_single_train_tar_without_md5sums_is_refused_before_reading(tmp_path):
    """A known name of another size, with nothing to vouch for it: an error naming the file, nothing placed."""
    imagenet_folder(tmp_path / "src", md5sums=False)
    with pytest.raises(ChecksumError, match=r"ILSVRC2012_img_train.tar .*40,960 bytes, but the published "
                                            r"ILSVRC2012_img_train.tar has 147,897,477,120"):
        fetch_dataset("imagenet", str(tmp_path / "src/ILSVRC2012_img_train.tar"), tmp_path / "out",
                      tmp_path / "dl", log=LOG)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "src"]


@pytest.mark.parametrize("outer,inner,bad", [
    ({"README.txt": b"x"}, None, "README.txt"),
    (None, {"sub/n01440764_1.JPEG": b"x"}, "sub/n01440764_1.JPEG"),
])
def test_tar_of_tars_with_unexpected_members_is_refused(tmp_path, outer, inner, bad):
    src = tmp_path / "src"
    src.mkdir()
    members = {"n01440764.tar": tar_bytes(inner or {"n01440764_1.JPEG": b"x"})}
    members.update(outer or {})
    (src / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(members))
    write_md5sums(src)
    with pytest.raises(UnsafeArchiveError) as err:
        fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", tmp_path / "dl", log=LOG)
    assert err.value.member == bad and "ILSVRC2012_img_train.tar" in str(err.value)
    assert list((tmp_path / "raw").iterdir()) == []


def voc2007_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    root = "VOCdevkit/VOC2007/"
    (folder / "VOCtrainval_06-Nov-2007.tar").write_bytes(tar_bytes({
        root + "JPEGImages/000005.jpg": b"a", root + "Annotations/000005.xml": b"<annotation/>",
        root + "ImageSets/Main/trainval.txt": b"000005\n"}))
    (folder / "VOCtest_06-Nov-2007.tar").write_bytes(tar_bytes({
        root + "JPEGImages/000001.jpg": b"b", root + "ImageSets/Main/test.txt": b"000001\n"}))
    write_md5sums(folder)


def test_voc2007_tars_merge_into_one_devkit_and_failure_keeps_old_output(tmp_path):
    voc2007_folder(tmp_path / "src")
    dest = tmp_path / "raw/voc2007"
    report = fetch_dataset("voc2007", str(tmp_path / "src"), dest, tmp_path / "dl", log=LOG)
    assert sorted(tree(dest)) == ["VOCdevkit/VOC2007/Annotations/000005.xml",
                                  "VOCdevkit/VOC2007/ImageSets/Main/test.txt",
                                  "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",
                                  "VOCdevkit/VOC2007/JPEGImages/000001.jpg", "VOCdevkit/VOC2007/JPEGImages/000005.jpg"]
    assert (report.files, report.images) == (5, 2)
    # A bad MD5SUMS makes the next fetch fail after extracting: the earlier output stays whole.
    before = tree(dest)
    write_md5sums(tmp_path / "src", wrong={"VOCtest_06-Nov-2007.tar": "a" * 32})
    with pytest.raises(ChecksumError, match=f"VOCtest_06-Nov-2007.tar.*expected {'a' * 32}"):
        fetch_dataset("voc2007", str(tmp_path / "src"), dest, tmp_path / "dl", log=LOG)
    assert tree(dest) == before and sorted(p.name for p in dest.parent.iterdir()) == ["voc2007"]


def test_extracted_tree_is_hard_linked_once(tmp_path):
    voc2007_folder(tmp_path / "archives")
    fetch_dataset("voc2007", str(tmp_path / "archives"), tmp_path / "first", tmp_path / "dl", log=LOG)
    report = fetch_dataset("voc2007", str(tmp_path / "first"), tmp_path / "second", tmp_path / "dl", log=LOG)
    assert tree(tmp_path / "second") == tree(tmp_path / "first")
    assert (report.linked, report.copied, report.files) == (5, 0, 5)
    assert report.archives == ["VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"]
    jpg = "VOCdevkit/VOC2007/JPEGImages/000001.jpg"
    assert (tmp_path / "second" / jpg).stat().st_ino == (tmp_path / "first" / jpg).stat().st_ino


def test_nyuv2_files_are_linked_and_counted(tmp_path):
    from scipy.io import savemat

    src = tmp_path / "src"
    src.mkdir()
    with h5py.File(src / "nyu_depth_v2_labeled.mat", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3, 640, 480), np.uint8))
        f.create_dataset("depths", data=np.zeros((2, 640, 480), np.float32))
        f.create_dataset("rawDepths", data=np.zeros((2, 640, 480), np.float32))
    savemat(src / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    write_md5sums(src)
    report = fetch_dataset("nyuv2", str(src), tmp_path / "nyuv2", tmp_path / "dl", log=LOG)
    assert sorted(p.name for p in (tmp_path / "nyuv2").iterdir()) == ["nyu_depth_v2_labeled.mat", "splits.mat"]
    assert (report.images, report.files, report.linked) == (2, 2, 2)
    assert any("nyuv2_surfacenormal_metadata.zip" in w for w in report.warnings)


def test_missing_sources_say_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="image-net.org.*ILSVRC2012_img_train.tar"):
        fetch_dataset("imagenet", str(tmp_path / "nowhere"), tmp_path / "o", tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_img_train.tar not found in .*empty.*login"):
        plan_sources("imagenet", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="registry's official URLs.*image-net.org"):
        plan_sources("imagenet", "official")
    voc2007_folder(tmp_path / "v")
    (tmp_path / "v/VOCtest_06-Nov-2007.tar").unlink()
    with pytest.raises(FileNotFoundError, match="VOCtest_06-Nov-2007.tar not found"):
        plan_sources("voc2007", str(tmp_path / "v"))
    (tmp_path / "v/VOCtrainval_06-Nov-2007.tar").rename(tmp_path / "v/VOC2007.tar")
    with pytest.raises(ValueError, match="VOC2007.tar is not one of its archives"):
        plan_sources("voc2007", str(tmp_path / "v/VOC2007.tar"))
    with pytest.raises(ValueError, match="unknown data set 'coco'"):
        plan_sources("coco", str(tmp_path))
    with pytest.raises(ValueError, match="generated by the fetch stage"):
        plan_sources("voc2011", "builtin")


def test_official_source_uses_registry_urls():
    plan = plan_sources("voc2007", "official")
    assert [loc.where for loc in plan] == [
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtrainval_06-Nov-2007.tar",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2007/VOCtest_06-Nov-2007.tar"]
    assert all(loc.expected.official for loc in plan)
    assert [a.name for a in archives_for("nyuv2") if a.required] == ["nyu_depth_v2_labeled.mat", "splits.mat"]


def test_real_archive_image_count_is_checked(tmp_path, monkeypatch):
    """Pretend a small tar is the published one (registry size and md5 equal to it): counts must match."""
    data = tar_bytes({"TrainVal/VOCdevkit/VOC2011/JPEGImages/a.jpg": b"1", "TrainVal/x.txt": b"2"})
    (tmp_path / "VOCtrainval_25-May-2011.tar").write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    for images, ok in ((1, True), (5, False)):
        fake = Archive("VOCtrainval_25-May-2011.tar", "voc2011", len(data), Checksum("md5", md5), None,
                       "extract", "TrainVal/VOCdevkit/VOC2011", images=images)
        monkeypatch.setattr(fetch, "archives_for", lambda name: (fake,))
        monkeypatch.setattr(fetch, "lookup", lambda name, file: fake)
        if ok:
            report = fetch_dataset("voc2011", str(tmp_path), tmp_path / "out", tmp_path / "dl", log=LOG)
            assert (report.images, report.images_expected, report.verified) == (1, 1, {fake.name: "registry"})
        else:
            with pytest.raises(ChecksumError, match="1 images extracted, but the real VOCtrainval_25-May-2011.tar"):
                fetch_dataset("voc2011", str(tmp_path), tmp_path / "out2", tmp_path / "dl", log=LOG)
            assert not (tmp_path / "out2").exists()


def _fake(size, md5, verified=True):
    return Archive("f.tar", "t", size, Checksum("md5", md5, verified) if md5 else None, None, "extract", "f")


@pytest.mark.parametrize("archive,listed,size,digest,outcome", [
    (_fake(10, "a" * 32), None, 10, "a" * 32, ("real", "registry")),
    (_fake(10, "a" * 32), None, 10, "b" * 32, "error"),  # real size, wrong md5
    (_fake(10, "a" * 32, False), None, 10, "b" * 32, ("real", "warn")),  # UNVERIFIED md5 only warns
    (_fake(10, "a" * 32), "c" * 32, 4, "c" * 32, ("stand-in", "MD5SUMS")),  # builtin: listed md5 rules
    (_fake(10, "a" * 32), "c" * 32, 4, "d" * 32, "error"),
    (_fake(10, "a" * 32), None, 4, "d" * 32, "error"),  # not the real size and nothing vouches for it
    (_fake(None, "a" * 32), None, 4, "a" * 32, ("real", "registry")),  # size unknown: the md5 decides
    (_fake(None, "a" * 32), None, 4, "d" * 32, "error"),
    (_fake(10, None), None, 10, "d" * 32, ("real", None)),  # splits.mat: nothing to check against
])
def test_verification_rules(archive, listed, size, digest, outcome):
    expected = Expected(archive, listed, "MD5SUMS" if listed else None)
    if outcome == "error":
        with pytest.raises(ChecksumError, match="f.tar.*(expected|published)"):
            expected.verify("f.tar", size, {"md5": digest})
        return
    verdict = expected.verify("f.tar", size, {"md5": digest})
    assert verdict.real == (outcome[0] == "real")
    if outcome[1] == "warn":
        assert verdict.checked_against is None and len(verdict.warnings) == 1
    else:
        assert verdict.checked_against == outcome[1] and verdict.warnings == ()


def _train_tar(classes: dict[str, dict[str, bytes]]) -> bytes:
    return tar_bytes({f"{w}.tar": tar_bytes(imgs) for w, imgs in classes.items()})


CLASSES = {f"n0{i}000000": {f"n0{i}000000_{k}.JPEG": bytes([i, k]) * 50 for k in (1, 2)} for i in (1, 2, 3, 4)}


def test_train_tar_cut_after_two_class_tars_is_refused_and_raw_kept(tmp_path):
    """Finding 1: a train tar cut exactly at a member boundary, even vouched for by an MD5SUMS, is no archive."""
    import tarfile

    data = _train_tar(CLASSES)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = tf.getmembers()[2].offset  # the header of the third class tar
    src, dest = tmp_path / "src", tmp_path / "raw/imagenet"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(data)
    write_md5sums(src)
    fetch_dataset("imagenet", str(src), dest, tmp_path / "dl", log=LOG)
    before = tree(dest)
    assert len(before) == 8
    (src / "ILSVRC2012_img_train.tar").write_bytes(data[:cut])
    write_md5sums(src)
    with pytest.raises(BrokenArchiveError, match=r"^cannot read ILSVRC2012_img_train.tar at member "
                                                 r"'n02000000.tar': the archive ends without its end-of-archive"):
        fetch_dataset("imagenet", str(src), dest, tmp_path / "dl", log=LOG)
    assert tree(dest) == before and sorted(p.name for p in dest.parent.iterdir()) == ["imagenet"]


def test_class_tar_cut_inside_names_the_class_tar_and_image(tmp_path):
    inner = tar_bytes(CLASSES["n01000000"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes({"n01000000.tar": inner[:512 + 50]}))
    write_md5sums(src)
    with pytest.raises(BrokenArchiveError) as err:
        fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", tmp_path / "dl", log=LOG)
    assert (err.value.archive, err.value.member) == ("ILSVRC2012_img_train.tar:n01000000.tar", "n01000000_1.JPEG")


@pytest.mark.parametrize("name,reason", [
    ("n01000000_9 copy é.JPEG", None),  # odd but safe: spaces and non-ASCII letters are kept
    ("n01000000_9-(1).JPEG", None),
    ("sub/n01000000_9.JPEG", "not a path with folders"),
    ("../n01000000_9.JPEG", "not a path with folders"),
    ("/n01000000_9.JPEG", "not a path with folders"),
    ("n01000000\x07_9.JPEG", "control character"),
    ("._n01000000_9.JPEG", "hidden file name"),
    ("n01000000_1.JPEG", "the same name twice"),  # a second copy of an image already in the class tar
])
def test_member_names_odd_but_safe_kept_unsafe_refused(tmp_path, name, reason):
    images = dict(CLASSES["n01000000"])
    src, dest = tmp_path / "src", tmp_path / "raw/imagenet"
    src.mkdir()
    inner = _concat_tars(tar_bytes(images), tar_bytes({name: b"extra"}))  # tarfile would normalise the name
    (src / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes({"n01000000.tar": inner}))
    write_md5sums(src)
    if reason is None:
        report = fetch_dataset("imagenet", str(src), dest, tmp_path / "dl", log=LOG)
        assert (dest / "train/n01000000" / name).read_bytes() == b"extra" and report.files == 3
        return
    with pytest.raises(UnsafeArchiveError, match=reason) as err:
        fetch_dataset("imagenet", str(src), dest, tmp_path / "dl", log=LOG)
    assert err.value.member == name and err.value.archive == "ILSVRC2012_img_train.tar:n01000000.tar"
    assert not dest.exists()


def _concat_tars(first: bytes, second: bytes) -> bytes:
    """Members of `first` then of `second`, in one tar (`first` without its end blocks and padding)."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(first)) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks begin
    return first[:end] + second


@pytest.mark.parametrize("text", ["not a checksum line\n", f"{'a' * 31}  ILSVRC2012_img_train.tar\n"])
def test_malformed_md5sums_is_one_error_naming_the_file(tmp_path, text):
    imagenet_folder(tmp_path / "src")
    (tmp_path / "src/MD5SUMS").write_text(text)
    with pytest.raises(ChecksumError, match=r"src/MD5SUMS line 1: expected '<md5>  <file name>'"):
        fetch_dataset("imagenet", str(tmp_path / "src"), tmp_path / "raw", tmp_path / "dl", log=LOG)


def test_a_voc_archive_given_as_imagenet_is_refused_by_name(tmp_path):
    voc2007_folder(tmp_path / "src")
    with pytest.raises(ValueError, match=r"imagenet: VOCtest_06-Nov-2007.tar is not one of its archives"):
        fetch_dataset("imagenet", str(tmp_path / "src/VOCtest_06-Nov-2007.tar"), tmp_path / "raw", tmp_path / "dl")


def test_train_tar_extraction_resumes_per_class_tar_after_an_interruption(tmp_path, monkeypatch):
    """Finding 6: a kill at 90% need not rewrite 90% of 147 GB; done class tars are re-hashed, not rewritten."""
    from ctxrepro.data import imagenet

    src, dl = tmp_path / "src", tmp_path / "dl"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(_train_tar(CLASSES))
    write_md5sums(src)
    clean = fetch_dataset("imagenet", str(src), tmp_path / "clean", tmp_path / "dl0", log=LOG)
    written: list[str] = []
    real = imagenet.shutil.copyfileobj

    def copy(stream, out, length=0):
        if len(written) == 5:  # the first image of the third class tar
            raise KeyboardInterrupt  # what a kill looks like from inside, minus the clean-up it skips
        written.append(Path(out.name).name)
        return real(stream, out, length)

    monkeypatch.setattr(imagenet.shutil, "copyfileobj", copy)
    with pytest.raises(KeyboardInterrupt):
        fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", dl, log=LOG)
    journal = dl / ".ILSVRC2012_img_train.tar.extracting"
    assert sorted(json.loads((journal / "done.json").read_text())) == ["n01000000", "n02000000"]
    written.clear()
    report = fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", dl, log=LOG)
    assert written == ["n03000000_1.JPEG", "n03000000_2.JPEG", "n04000000_1.JPEG", "n04000000_2.JPEG"]
    assert tree(tmp_path / "raw/imagenet") == tree(tmp_path / "clean")
    assert (report.files, report.images, report.verified) == (clean.files, clean.images, clean.verified)
    assert not journal.exists()


def test_resume_journal_of_another_or_changed_file_is_not_trusted(tmp_path):
    from ctxrepro.data.imagenet import extract_train_tar

    data = _train_tar(CLASSES)
    tar = tmp_path / "ILSVRC2012_img_train.tar"
    tar.write_bytes(data)
    journal = tmp_path / "journal"
    extract_train_tar(tar, tmp_path / "first", resume=journal)
    assert not journal.exists()
    # A journal left by a run on another file (other mtime) is discarded: everything is written again.
    journal.mkdir()
    (journal / "source.json").write_text(json.dumps({"name": tar.name, "size": len(data), "mtime_ns": 1}))
    (journal / "done.json").write_text(json.dumps({"n01000000": {"md5": "0" * 32, "files": 9, "bytes": 9,
                                                                 "images": 9}}))
    got = extract_train_tar(tar, tmp_path / "second", resume=journal)
    assert got.tally.files == 8 and tree(tmp_path / "second") == tree(tmp_path / "first")
    # Same name, size and mtime but other bytes for a journaled class tar: refused, journal discarded.
    st = tar.stat()
    journal.mkdir()
    (journal / "source.json").write_text(json.dumps({"name": tar.name, "size": st.st_size,
                                                     "mtime_ns": st.st_mtime_ns}))
    (journal / "done.json").write_text(json.dumps({"n01000000": {"md5": "0" * 32, "files": 2, "bytes": 200,
                                                                 "images": 2}}))
    with pytest.raises(ChecksumError, match=r"n01000000.tar: md5 .* differs from the copy extracted before"):
        extract_train_tar(tar, tmp_path / "third", resume=journal)
    assert not journal.exists()
