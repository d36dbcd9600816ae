"""The archives a profile's protocol needs (ctxrepro.data.inputs), and fetch refusing to start without them:
the ILSVRC2012 devkit for the linear probes, the FAIR normals for Table 2, Fast R-CNN's boxes for proposals."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import yaml
from helpers import tar_bytes, write_md5sums

from ctxrepro.config import BaseParams, load_yaml
from ctxrepro.data.fetch import fetch_dataset, plan_sources
from ctxrepro.data.inputs import (DEVKIT, FAIR_NORMALS, SELECTIVE_SEARCH, Need, protocol_needs,
                                  required_inputs)
from ctxrepro.stage import StageContext, StageError
from stages import fetch as fetch_stage
from stages import proposals

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("test_inputs")


def _profile(name: str) -> dict:
    return load_yaml(ROOT / "profiles" / f"{name}.yaml")


def test_each_profile_needs_what_its_protocol_reads():
    for name in ("tiny", "smoke"):
        assert [n.archive for n in protocol_needs(_profile(name))] == [DEVKIT, FAIR_NORMALS]
    paper = protocol_needs(_profile("paper"))
    assert paper == (Need(DEVKIT, "imagenet", "linear_probe.networks (ImageNet validation labels)"),
                     Need(FAIR_NORMALS, "nyuv2", "normals.gt_source: fair and normals.codebook: vocab"),
                     Need(SELECTIVE_SEARCH, "voc2007", "proposals.source: mat"))
    data = copy.deepcopy(_profile("paper"))
    data["linear_probe"]["networks"] = []
    data["normals"].update(gt_source="depth", codebook="kmeans")
    data["proposals"]["source"] = "opencv"
    assert protocol_needs(data) == ()


def test_required_inputs_of_the_paper_profile_without_imagenet(tmp_path):
    """Nothing under data/external: every ImageNet archive is missing; the URL sources are learnt at download."""
    found = {(i.dataset, i.name): i for i in required_inputs(_profile("paper"), tmp_path)}
    assert sorted(found) == [("imagenet", "ILSVRC2012_devkit_t12.tar.gz"), ("imagenet", "ILSVRC2012_img_train.tar"),
                             ("nyuv2", "nyu_depth_v2_labeled.mat"), ("nyuv2", FAIR_NORMALS), ("nyuv2", "splits.mat"),
                             ("voc2007", "VOCtest_06-Nov-2007.tar"), ("voc2007", "VOCtrainval_06-Nov-2007.tar"),
                             ("voc2007", SELECTIVE_SEARCH), ("voc2011", "VOCtrainval_25-May-2011.tar")]
    devkit = found[("imagenet", DEVKIT)]
    assert devkit.present is False and devkit.where == str(tmp_path / "data/external/imagenet")
    assert devkit.line().startswith("ILSVRC2012_devkit_t12.tar.gz (imagenet, needed by linear_probe.networks")
    assert "https://image-net.org" in devkit.line() and "\n" not in devkit.line()
    assert found[("voc2007", SELECTIVE_SEARCH)].present is None  # official: downloaded from Fast R-CNN's URL
    (tmp_path / "data/external/imagenet").mkdir(parents=True)
    (tmp_path / "data/external/imagenet" / DEVKIT).write_bytes(b"x")
    assert {i.name: i.present for i in required_inputs(_profile("paper"), tmp_path)
            if i.dataset == "imagenet"} == {DEVKIT: True, "ILSVRC2012_img_train.tar": False}


def test_the_builtin_world_gives_all_but_fast_rcnn_boxes(tmp_path):
    data = copy.deepcopy(_profile("smoke"))
    found = {i.name: i for i in required_inputs(data, tmp_path)}
    assert all(i.present for i in found.values())
    assert found[DEVKIT].where == "the builtin world's labels (data/raw/world_index.json)"
    data["proposals"]["source"] = "mat"
    boxes = [i for i in required_inputs(data, tmp_path) if i.name == SELECTIVE_SEARCH]
    assert len(boxes) == 1 and boxes[0].present is False and "proposals.source: opencv" in boxes[0].line()


def _ctx(root: Path, params: dict) -> StageContext:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return StageContext(base=BaseParams(seed=0, device="cpu"), device="cpu", log=LOG, root=root,
                        params_path=Path("params.yaml"))


def test_fetch_stops_before_anything_without_the_devkit_when_probes_are_listed(tmp_path):
    """Issue 23: the devkit is required up front; the message is one line naming the archive and where to get it."""
    data = copy.deepcopy(_profile("tiny"))
    data["fetch"]["imagenet_source"] = "data/external/imagenet"
    (tmp_path / "data/external/imagenet").mkdir(parents=True)
    (tmp_path / "data/external/imagenet/ILSVRC2012_img_train.tar").write_bytes(b"x")
    params = fetch_stage.Params(imagenet_source="data/external/imagenet")
    with pytest.raises(StageError) as err:
        fetch_stage.run(params, _ctx(tmp_path, data))
    assert str(err.value) == (
        f"fetch: ILSVRC2012_devkit_t12.tar.gz (imagenet, needed by linear_probe.networks (ImageNet validation "
        f"labels)) is not in {tmp_path / 'data/external/imagenet'}: download ILSVRC2012_devkit_t12.tar.gz from "
        f"https://image-net.org (login; the ILSVRC2012 'Development kit (Task 1 & 2)') into the folder "
        f"fetch.imagenet_source names")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["external"]  # nothing fetched or generated
    data["linear_probe"]["networks"] = []  # no probes: the devkit is optional again
    assert fetch_stage._protocol_needs(params, _ctx(tmp_path, data)) == (
        Need(FAIR_NORMALS, "nyuv2", "normals.gt_source: fair and normals.codebook: vocab"),)


def test_fetch_stops_without_the_fair_normals_for_table2(tmp_path):
    data = copy.deepcopy(_profile("tiny"))
    (tmp_path / "nyu").mkdir()
    for name in ("nyu_depth_v2_labeled.mat", "splits.mat"):
        (tmp_path / "nyu" / name).write_bytes(b"x")
    params = fetch_stage.Params(nyuv2_source=str(tmp_path / "nyu"))
    with pytest.raises(StageError, match=r"^fetch: nyuv2_surfacenormal_metadata.zip \(nyuv2, needed by normals."
                                         r"gt_source: fair and normals.codebook: vocab\) is not in .*nyu: download "
                                         r"https://dl.fbaipublicfiles.com/.*nyuv2_surfacenormal_metadata.zip"):
        fetch_stage._protocol_needs(params, _ctx(tmp_path, data))


def test_a_needed_optional_archive_is_required_by_fetch_dataset(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes({"n01440764.tar": tar_bytes({"n01440764_1.JPEG": b"1"})}))
    write_md5sums(src)
    needs = {DEVKIT: "linear_probe.networks"}
    with pytest.raises(FileNotFoundError, match=r"imagenet: ILSVRC2012_devkit_t12.tar.gz \(needed by "
                                                r"linear_probe.networks\) not found in .*src"):
        fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", tmp_path / "dl", log=LOG, needs=needs)
    assert not (tmp_path / "raw/imagenet").exists()
    fetch_dataset("imagenet", str(src), tmp_path / "raw/imagenet", tmp_path / "dl", log=LOG)  # not needed: optional


def test_official_downloads_the_boxes_only_when_proposals_read_them():
    plain = [loc.archive.name for loc in plan_sources("voc2007", "official")]
    assert plain == ["VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"]
    plan = plan_sources("voc2007", "official", needs={SELECTIVE_SEARCH: "proposals.source: mat"})
    assert [(loc.archive.name, loc.where) for loc in plan][2] == (
        SELECTIVE_SEARCH, "https://dl.dropboxusercontent.com/s/orrt7o6bp6ae0tc/selective_search_data.tgz")
    assert plan[2].archive.checksum.hexdigest == "7078c1db87a7851b31966b96774cd9b9"  # Fast R-CNN's script


def test_fast_rcnn_boxes_are_placed_where_proposals_read_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    root = "VOCdevkit/VOC2007/"
    (src / "VOCtrainval_06-Nov-2007.tar").write_bytes(tar_bytes({root + "ImageSets/Main/trainval.txt": b"1\n"}))
    (src / "VOCtest_06-Nov-2007.tar").write_bytes(tar_bytes({root + "ImageSets/Main/test.txt": b"2\n"}))
    mats = {f"selective_search_data/voc_2007_{s}.mat": s.encode() for s in ("trainval", "test")}
    (src / SELECTIVE_SEARCH).write_bytes(tar_bytes(mats, "w:gz"))
    write_md5sums(src)
    dest = tmp_path / "data/raw/voc2007"
    report = fetch_dataset("voc2007", str(src), dest, tmp_path / "dl", log=LOG,
                           needs={SELECTIVE_SEARCH: "proposals.source: mat"})
    assert report.archives[-1] == SELECTIVE_SEARCH
    assert report.verified[SELECTIVE_SEARCH] == str(src / "MD5SUMS")
    for split in ("trainval", "test"):
        mat = tmp_path / proposals.MATS / f"voc_2007_{split}.mat"
        assert mat.read_bytes() == split.encode()


def test_probe_labels_come_from_the_devkit_unless_the_world_made_imagenet(tmp_path):
    """fetch always writes world_index.json (a declared dep); with VOC from the world and a real ImageNet it
    holds no ImageNet entry, and the validation labels are the devkit's."""
    import json

    import numpy as np
    from scipy.io import savemat

    from stages.linear_probe import DEVKIT as DEVKIT_DIR
    from stages.linear_probe import WORLD_INDEX, _val_wnids

    (tmp_path / WORLD_INDEX).parent.mkdir(parents=True)
    (tmp_path / WORLD_INDEX).write_text(json.dumps({"voc2007/VOCdevkit/VOC2007/JPEGImages/1.jpg": {"kind": "scene"}}))
    (tmp_path / DEVKIT_DIR).mkdir(parents=True)
    synsets = np.array([(1, "n01440764"), (2, "n02105855")], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    savemat(tmp_path / DEVKIT_DIR / "meta.mat", {"synsets": synsets})
    (tmp_path / DEVKIT_DIR / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n2\n")
    assert _val_wnids(tmp_path) == {"imagenet/val/ILSVRC2012_val_00000001.JPEG": "n02105855",
                                    "imagenet/val/ILSVRC2012_val_00000002.JPEG": "n01440764",
                                    "imagenet/val/ILSVRC2012_val_00000003.JPEG": "n02105855"}
    (tmp_path / WORLD_INDEX).write_text(json.dumps({
        "imagenet/train/n09999999/a.JPEG": {"kind": "scene", "category": "bus"},
        "imagenet/val/v1.JPEG": {"kind": "scene", "category": "bus"}}))
    assert _val_wnids(tmp_path) == {"imagenet/val/v1.JPEG": "n09999999"}  # the world's own labels
