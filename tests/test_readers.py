"""Real-format readers on small files written in the published formats: VOC XML, NYU HDF5 / .mat, FAIR pklz."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile

import h5py
import numpy as np
import pytest
from helpers import tar_bytes
from scipy.io import savemat

from ctxrepro.data import nyu
from ctxrepro.data.imagenet import iter_class_images, iter_class_tars
from ctxrepro.data.voc import VOC_CLASSES, BndBox, load_split, parse_annotation, read_class_image_set, read_image_set

# As the VOC2007 devkit writes it: tabs, a nested <annotation> inside <source>, no <occluded>.
VOC2007_XML = """<annotation>
\t<folder>VOC2007</folder>
\t<filename>000005.jpg</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>PASCAL VOC2007</annotation>
\t\t<image>flickr</image>
\t\t<flickrid>325991873</flickrid>
\t</source>
\t<owner>
\t\t<flickrid>archintent louisville</flickrid>
\t\t<name>?</name>
\t</owner>
\t<size>
\t\t<width>500</width>
\t\t<height>375</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
\t<object>
\t\t<name>chair</name>
\t\t<pose>Rear</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>0</difficult>
\t\t<bndbox>
\t\t\t<xmin>263</xmin>
\t\t\t<ymin>211</ymin>
\t\t\t<xmax>324</xmax>
\t\t\t<ymax>339</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>chair</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>1</truncated>
\t\t<difficult>1</difficult>
\t\t<bndbox>
\t\t\t<xmin>5</xmin>
\t\t\t<ymin>244</ymin>
\t\t\t<xmax>67</xmax>
\t\t\t<ymax>374</ymax>
\t\t</bndbox>
\t</object>
</annotation>
"""

# A later year: <occluded>, a person with <part> boxes, an object without <difficult>, float-written pixels.
VOC2011_XML = """<annotation>
\t<filename>2008_000008.jpg</filename>
\t<folder>VOC2011</folder>
\t<object>
\t\t<name>person</name>
\t\t<bndbox><xmax>283.0</xmax><xmin>158</xmin><ymax>497</ymax><ymin>35</ymin></bndbox>
\t\t<difficult>0</difficult>
\t\t<occluded>1</occluded>
\t\t<part><bndbox><xmax>1</xmax><xmin>1</xmin><ymax>1</ymax><ymin>1</ymin></bndbox><name>head</name></part>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t</object>
\t<object>
\t\t<name>horse</name>
\t\t<bndbox><xmax>471</xmax><xmin>53</xmin><ymax>420</ymax><ymin>87</ymin></bndbox>
\t\t<occluded>0</occluded>
\t</object>
\t<segmented>0</segmented>
\t<size><depth>3</depth><height>442</height><width>500</width></size>
</annotation>
"""


def test_voc2007_annotation_parsed_as_the_devkit_reads_it(tmp_path):
    (tmp_path / "000005.xml").write_text(VOC2007_XML)
    ann = parse_annotation(tmp_path / "000005.xml")
    assert (ann.filename, ann.width, ann.height, ann.depth) == ("000005.jpg", 500, 375, 3)
    assert [(o.name, o.pose, o.truncated, o.difficult, o.occluded) for o in ann.objects] == [
        ("chair", "Rear", False, False, None), ("chair", "Unspecified", True, True, None)]
    assert ann.objects[0].bndbox == BndBox(263, 211, 324, 339)
    assert ann.objects[1].bndbox == BndBox(5, 244, 67, 374)


def test_voc2011_annotation_with_occluded_parts_and_defaults():
    ann = parse_annotation("2008_000008.xml", text=VOC2011_XML)
    person, horse = ann.objects
    assert person.bndbox == BndBox(158, 35, 283, 497)  # the object's own box, not the head part's
    assert (person.occluded, person.difficult, person.truncated) == (True, False, False)
    assert (horse.pose, horse.difficult, horse.truncated, horse.occluded) == ("Unspecified", False, False, False)
    assert (ann.width, ann.height) == (500, 442)


def test_voc_bad_values_name_file_and_field():
    cases = {"<xmin>abc</xmin>": "<xmin> is 'abc', not a number", "": "missing <xmin>",
             "<xmin>263.5</xmin>": "<xmin> is '263.5', expected a whole pixel"}
    for replacement, message in cases.items():
        with pytest.raises(ValueError, match=r"000005\.xml object 'chair': " + message):
            parse_annotation("000005.xml", text=VOC2007_XML.replace("<xmin>263</xmin>", replacement))
    with pytest.raises(ValueError, match=r"000005\.xml: not valid XML"):
        parse_annotation("000005.xml", text=VOC2007_XML[:-20])


def test_voc_split_loading_and_class_lists(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations" / "000005.xml").write_text(VOC2007_XML)
    (root / "Annotations" / "000007.xml").write_text(VOC2007_XML.replace("000005", "000007"))
    (root / "ImageSets/Main/trainval.txt").write_text("000007\n000005\n")
    (root / "ImageSets/Main/chair_trainval.txt").write_text("000007 -1\n000005  1\n000009  0\n")
    samples = load_split(root, "trainval")
    assert [s.image_id for s in samples] == ["000007", "000005"]  # the split file's order
    assert samples[1].image == root / "JPEGImages" / "000005.jpg"
    assert samples[0].annotation.filename == "000007.jpg"
    assert read_class_image_set(root, "chair", "trainval") == {"000007": -1, "000005": 1, "000009": 0}
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    with pytest.raises(FileNotFoundError, match="no image set 'test'"):
        read_image_set(root, "test")
    (root / "ImageSets/Main/val.txt").write_text("000042\n")
    with pytest.raises(FileNotFoundError, match="000042.xml: listed in ImageSets/Main/val.txt"):
        load_split(root, "val")


@pytest.fixture
def labeled_mat(tmp_path):
    """A 3-image nyu_depth_v2_labeled.mat: h5py sees MATLAB's shapes reversed, as in the real file."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 480, 640, 3), dtype=np.uint8)  # N, H, W, C as the reader returns
    depths = rng.uniform(0.5, 10.0, (3, 480, 640)).astype(np.float32)
    raw = np.where(rng.random((3, 480, 640)) < 0.2, 0.0, depths).astype(np.float32)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images.transpose(0, 3, 2, 1))  # (3, 3, 640, 480)
        f.create_dataset("depths", data=depths.transpose(0, 2, 1))  # (3, 640, 480)
        f.create_dataset("rawDepths", data=raw.transpose(0, 2, 1))
    return path, images, depths, raw


def test_nyu_labeled_axes_and_dtypes(labeled_mat):
    path, images, depths, raw = labeled_mat
    with h5py.File(path, "r") as f:
        stored = f["images"][1]
    with nyu.NyuLabeled(path) as reader:
        assert len(reader) == 3
        img = reader.image(1)
        assert img.shape == (480, 640, 3) and img.dtype == np.uint8
        assert img[5, 100, 2] == stored[2, 100, 5]  # channel, x, y in the file
        np.testing.assert_array_equal(img, images[1])
        d, r = reader.depth(2), reader.raw_depth(-1)
        assert d.shape == (480, 640) and d.dtype == np.float32
        np.testing.assert_array_equal(d, depths[2])
        np.testing.assert_array_equal(r, raw[2])
        with pytest.raises(IndexError, match="image 3 out of range"):
            reader.image(3)
    assert nyu.count_images(path) == 3


def test_nyu_reader_reopens_after_fork(labeled_mat, monkeypatch):
    path = labeled_mat[0]
    reader = nyu.NyuLabeled(path)
    first = reader._h5()
    child_pid = os.getpid() + 1
    monkeypatch.setattr(nyu.os, "getpid", lambda: child_pid)  # as seen in a forked worker
    assert reader._h5() is not first
    np.testing.assert_array_equal(reader.image(0), labeled_mat[1][0])
    first.close()


def test_nyu_wrong_file_is_named(tmp_path):
    with h5py.File(tmp_path / "x.mat", "w") as f:
        f.create_dataset("images", data=np.zeros((1, 3, 640, 480), np.uint8))
    with pytest.raises(KeyError, match=r"x\.mat: no dataset depths, rawDepths"):
        nyu.NyuLabeled(tmp_path / "x.mat")


def test_splits_mat_to_zero_based(tmp_path):
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [3], [4]], np.float64),
                                      "testNdxs": np.array([[2], [5]], np.float64)})
    train, test = nyu.read_splits(tmp_path / "splits.mat")
    assert train.tolist() == [0, 2, 3] and test.tolist() == [1, 4] and train.dtype == np.int64
    savemat(tmp_path / "bad.mat", {"trainNdxs": np.array([[0]]), "testNdxs": np.array([[2]])})
    with pytest.raises(ValueError, match="trainNdxs holds 0"):
        nyu.read_splits(tmp_path / "bad.mat")
    savemat(tmp_path / "nokey.mat", {"trainNdxs": np.array([[1]])})
    with pytest.raises(KeyError, match="no variable 'testNdxs'"):
        nyu.read_splits(tmp_path / "nokey.mat")


def _normals(n: int = 2) -> dict:
    normals = np.zeros((n, 480, 640, 3), np.float32)
    normals[1, 7, 9] = (0.0, 0.6, 0.8)
    return {"all_normals": normals, "all_valid_depth_masks": np.ones((n, 480, 640), bool),
            "all_filenames": [f"img_{i}.png" for i in range(n)]}


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_fair_normals_pklz_and_zip(tmp_path, protocol):
    pklz = tmp_path / "all_normals.pklz"
    with gzip.open(pklz, "wb", compresslevel=1) as f:
        pickle.dump(_normals(), f, protocol=protocol)
    got = nyu.load_normals(pklz)
    assert got["all_normals"].shape == (2, 480, 640, 3)
    assert got["all_normals"][1, 7, 9].tolist() == pytest.approx([0.0, 0.6, 0.8])
    assert got["all_filenames"].tolist() == ["img_0.png", "img_1.png"]
    with zipfile.ZipFile(tmp_path / "n.zip", "w") as zf:
        zf.write(pklz, nyu.NORMALS_MEMBER)
    np.testing.assert_array_equal(nyu.load_normals(tmp_path / "n.zip")["all_normals"], got["all_normals"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_normals_pickle_may_only_build_arrays(tmp_path):
    pklz = tmp_path / "all_normals.pklz"
    with gzip.open(pklz, "wb") as f:
        pickle.dump({"all_normals": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        nyu.load_normals(pklz)


def test_class_tars_and_their_images_stream_in_archive_order():
    outer = tar_bytes({"n02000000.tar": tar_bytes({"n02000000_5.JPEG": b"five", "n02000000_1.JPEG": b"one"}),
                  "./n01000000.tar": tar_bytes({"./n01000000_3.JPEG": b"three"})})
    got = [(w, n, s.read(), size) for w, label, cls in iter_class_tars(io.BytesIO(outer), "t.tar")
           for n, s, size in iter_class_images(cls, label)]
    assert got == [("n02000000", "n02000000_5.JPEG", b"five", 4), ("n02000000", "n02000000_1.JPEG", b"one", 3),
                   ("n01000000", "n01000000_3.JPEG", b"three", 5)]
