"""The proposals and detect stages end to end on a hand-made 10-image VOC devkit (paper section 4.3).

Test images hold one car each and their only proposal is that car's box, so whatever the network learns every
car detection is a true positive: AP(car) = 1 exactly; no test image has a bus, so AP(bus) = 0 (the devkit's
rule for npos = 0), and mAP = 0.5.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from ctxrepro.config import BaseParams
from ctxrepro.detection.boxes import iou
from ctxrepro.stage import StageContext, StageError
from ctxrepro.transfer.caffenet import CaffeNetSpec, build_caffenet, save_caffenet
from ctxrepro.transfer.trunk import TrunkSpec, build_trunk, save_checkpoint
from stages import detect, proposals

H, W = 64, 80
RED, BLUE = (200, 30, 20), (20, 40, 210)
# image id -> (split, [(class, 0-based x1 y1 x2 y2, difficult)])
IMAGES = {
    "000001": ("trainval", [("car", (5, 5, 34, 24), 0)]),
    "000002": ("trainval", [("car", (40, 30, 74, 59), 0), ("bus", (2, 2, 11, 11), 1)]),
    "000003": ("trainval", [("bus", (10, 20, 49, 54), 0)]),
    "000004": ("trainval", [("bus", (30, 4, 77, 33), 0), ("car", (3, 40, 22, 60), 0)]),
    "000005": ("trainval", [("car", (20, 10, 59, 39), 0)]),
    "000006": ("trainval", [("bus", (0, 0, 39, 29), 0)]),
    "000007": ("test", [("car", (8, 8, 37, 29), 0)]),
    "000008": ("test", [("car", (44, 20, 75, 50), 0)]),
    "000009": ("test", [("car", (10, 30, 45, 58), 0)]),
    "000010": ("test", [("car", (30, 5, 69, 34), 0)]),
}


def _xml(image_id: str, objects) -> str:
    objs = "".join(
        f"<object><name>{c}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2 + 1}</xmax><ymax>{y2 + 1}</ymax></bndbox>"
        f"</object>" for c, (x1, y1, x2, y2), d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def _train_proposals(objects, rng) -> np.ndarray:
    """Jittered copies of each object's box (foreground and background overlaps) and random boxes."""
    out = []
    for _, (x1, y1, x2, y2), _ in objects:
        for dx in (-12, -6, -2, 0, 3, 8, 15, 25):
            if x2 + dx >= 4 and x1 + dx <= W - 5:  # still a box inside the image
                out.append([max(0, x1 + dx), y1, min(W - 1, x2 + dx), y2])
    for _ in range(20):
        x1, y1 = rng.integers(0, W - 10), rng.integers(0, H - 10)
        out.append([x1, y1, rng.integers(x1 + 5, W), rng.integers(y1 + 5, H)])
    return np.array(out, dtype=float)


def _to_mat(boxes: np.ndarray) -> np.ndarray:
    """0-based [x1 y1 x2 y2] -> Fast R-CNN's 1-based [y1 x1 y2 x2]."""
    return (boxes[:, (1, 0, 3, 2)] + 1).astype(np.uint16)


def make_world(root: Path) -> None:
    devkit = root / detect.VOC07
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (devkit / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    mats = {"trainval": ([], []), "test": ([], [])}
    for image_id, (split, objects) in IMAGES.items():
        img = np.full((H, W, 3), 128, np.uint8) + rng.integers(0, 16, (H, W, 3), dtype=np.uint8)
        for c, (x1, y1, x2, y2), _ in objects:
            img[y1:y2 + 1, x1:x2 + 1] = RED if c == "car" else BLUE
        Image.fromarray(img).save(devkit / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (devkit / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects))
        boxes = np.array([objects[0][1]], float) if split == "test" else _train_proposals(objects, rng)
        mats[split][0].append(image_id)
        mats[split][1].append(_to_mat(boxes))
    for split, (ids, boxes) in mats.items():
        (devkit / "ImageSets/Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
        names = np.empty((len(ids), 1), dtype=object)
        cell = np.empty((1, len(ids)), dtype=object)
        for k, (i, b) in enumerate(zip(ids, boxes)):
            names[k, 0], cell[0, k] = i, b
        (root / proposals.MATS).mkdir(parents=True, exist_ok=True)
        savemat(root / proposals.MATS / f"voc_2007_{split}.mat", {"boxes": cell, "images": names})
    spec = TrunkSpec(tower="small", width=4, conv6=16, conv6_kernel=2, conv6b=8, fc7=16, input_side=64)
    trunk, head = build_trunk(spec, seed=0)
    source = {"variant": "color_dropping", "config": {"color": "drop"}}
    save_checkpoint(root / detect.TRUNKS / "color_dropping-scratch.pt", trunk, head, "scratch", [], source, {})
    net = build_caffenet(CaffeNetSpec(tower="small", width=4, roi_pool=3, fc6=16, fc7=16, input_side=64), seed=0)
    save_caffenet(root / detect.TRUNKS / "color_dropping-kmeans_rescale.pt", net, "kmeans_rescale", [], source, {})


def _ctx(root: Path) -> StageContext:
    return StageContext(base=BaseParams(seed=0, device="cpu"), device="cpu", log=logging.getLogger("test"),
                        root=root)


def _detect_params(**kw) -> detect.Params:
    """Fast R-CNN on every row (the R-CNN protocol's test sets `protocol` itself)."""
    base = dict(row="color_dropping-scratch", classes=("car", "bus"), scale=64, max_size=100, iterations=3,
                rois_per_image=16, score_thresh=0.0, lr=0.01, log_every=1, workers=1, profile_note="unit test",
                protocol={i: "fast_rcnn" for i in detect.Params().protocol})
    return detect.Params(**{**base, **kw})


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


@pytest.fixture()
def world(tmp_path) -> Path:
    make_world(tmp_path)
    proposals.run(proposals.Params(source="mat", workers=1), _ctx(tmp_path))
    return tmp_path


def test_detect_stage_hand_checkable_outputs(world):
    detect.run(_detect_params(), _ctx(world))
    m = json.loads((world / "metrics/detect/color_dropping-scratch.json").read_text())
    assert m["ap"] == {"car": 1.0, "bus": 0.0} and m["map"] == 0.5
    assert (m["row"], m["variant"], m["init"], m["network"], m["paper_row"], m["train_images"], m["test_images"]) == \
        ("color_dropping-scratch", "color_dropping", "scratch", "figure6", "Scratch-Ours", 6, 4)
    assert not m["box_regression"] and m["protocol"] == "Fast R-CNN training, R-CNN-style rows (no box regression)"
    assert m["detections"] == 4 * 20  # one proposal per test image, every class scores above 0
    results = world / "results/detect/color_dropping-scratch"
    files = sorted(results.glob("comp4_det_test_*.txt"))
    assert len(files) == 20
    car = _lines(results / "comp4_det_test_car.txt")
    assert [r[0] for r in car] == ["000007", "000008", "000009", "000010"]
    for row in car:  # without box regression a detection is its proposal, written 1-based
        x1, y1, x2, y2 = IMAGES[row[0]][1][0][1]
        assert [float(v) for v in row[2:]] == [x1 + 1, y1 + 1, x2 + 1, y2 + 1]
        assert 0.0 < float(row[1]) < 1.0
    assert (world / "plots/detect/color_dropping-scratch/ap.csv").read_text() == "class,ap\ncar,1.0\nbus,0.0\n"
    assert len((world / "plots/detect/color_dropping-scratch/loss.csv").read_text().splitlines()) == 1 + 3
    table = (results / "table1.md").read_text()
    assert "| color_dropping-scratch (as Scratch-Ours) | ours, unit test | 100.0 | 0.0 | 50.0 | - |" in table
    assert "| Scratch-Ours | paper | 65.9 | 50.6 |" in table
    saved = torch.load(world / "models/detect/color_dropping-scratch.pt", weights_only=True)
    assert saved["init"] == "scratch" and "fc8.weight" in saved["model"] and "bbox_pred.weight" not in saved["model"]
    [path] = (world / "models/detect_state/color_dropping-scratch").glob("*/last.pt")  # its config's folder
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 3 and state["config"]["iterations"] == 3  # the resume state
    first = {f.name: f.read_bytes() for f in files}
    detect.run(_detect_params(), _ctx(world))  # same seed, same outputs (resumed at its end: no training)
    assert {f.name: f.read_bytes() for f in sorted(results.glob("comp4_det_test_*.txt"))} == first


def test_detect_stage_rcnn_protocol_end_to_end(world):
    # one proposal per test image, on its car: every car detection is a true positive whatever the SVMs learn
    rcnn = detect.RcnnParams(pad=4, batch=8, iterations=3, feature_batch=16, cache="all",
                             svm=detect.SvmConfig(retrain_limit=5))
    params = _detect_params(protocol=detect.Params().protocol, rcnn=rcnn)
    detect.run(params, _ctx(world))
    m = json.loads((world / "metrics/detect/color_dropping-scratch.json").read_text())
    assert m["ap"] == {"car": 1.0, "bus": 0.0} and m["map"] == 0.5
    assert (m["detect_protocol"], m["protocol"], m["box_regression"], m["iterations"]) == \
        ("rcnn", "R-CNN: warped windows, fc7 SVMs (no box regression)", False, 3)
    assert m["detections"] == 4 * 2  # one proposal per test image, scored by the car and bus SVMs
    svm = m["svm"]
    assert svm["settings"]["C"] == 0.001 and svm["settings"]["bias_mult"] == 10.0 and svm["settings"]["epochs"] == 1
    assert m["hard_negatives"] == sum(c["hard_negatives"] for c in svm["per_class"].values())
    assert svm["per_class"]["car"]["positives"] == 4 and svm["per_class"]["bus"]["positives"] == 3  # not difficult
    assert m["windows"]["side"] == 64 and m["windows"]["pad"] == 4
    state = world / "models/detect_state/color_dropping-scratch"
    assert len(list((state / "fc7/trainval").glob("*.npy"))) == 6 and len(list((state / "fc7/test").glob("*.npy"))) == 4
    assert len((world / "plots/detect/color_dropping-scratch/loss.csv").read_text().splitlines()) == 1 + 3
    results = world / "results/detect/color_dropping-scratch"
    first = {f.name: f.read_bytes() for f in sorted(results.glob("comp4_det_test_*.txt"))}
    for row in _lines(results / "comp4_det_test_car.txt"):
        x1, y1, x2, y2 = IMAGES[row[0]][1][0][1]
        assert [float(v) for v in row[2:]] == [x1 + 1, y1 + 1, x2 + 1, y2 + 1]
    from ctxrepro.detection.roidb import load_roidb

    train_db = load_roidb(world / detect.VOC07, "trainval", world / detect.PROPOSALS)
    assert m["windows"]["features_computed"] == sum(len(e.gt_boxes) + len(e.proposals) for e in train_db) + 4
    detect.run(params, _ctx(world))  # resumed at its end, features read back from the cache: same files
    assert {f.name: f.read_bytes() for f in sorted(results.glob("comp4_det_test_*.txt"))} == first
    again = json.loads((world / "metrics/detect/color_dropping-scratch.json").read_text())
    assert again["windows"]["features_computed"] == 0 and again["map"] == m["map"]


def test_detect_stage_with_box_regression_keeps_boxes_in_the_image(world):
    # give the test images the training-style proposals: many overlapping boxes, so NMS and the cap matter
    rng = np.random.default_rng(1)
    cache = world / proposals.OUT
    for image_id, (split, objects) in IMAGES.items():
        if split == "test":
            np.savez(cache / f"{image_id}.npz", boxes=_train_proposals(objects, rng), key=np.array("edited"))
    detect.run(_detect_params(box_regression={"figure6": True, "caffenet": True}, max_per_class=2, iterations=4),
               _ctx(world))
    m = json.loads((world / "metrics/detect/color_dropping-scratch.json").read_text())
    assert set(m["ap"]) == {"car", "bus"} and 0.0 <= m["map"] <= 1.0
    assert m["train_loss_box"] > 0.0 and m["box_regression"]
    for f in sorted((world / "results/detect/color_dropping-scratch").glob("comp4_det_test_*.txt")):
        rows = _lines(f)
        per_image = {}
        for r in rows:
            x1, y1, x2, y2 = map(float, r[2:])
            assert 1.0 <= x1 <= x2 <= W and 1.0 <= y1 <= y2 <= H, (f.name, r)
            per_image.setdefault(r[0], []).append([x1, y1, x2, y2])
        for boxes in per_image.values():
            assert len(boxes) <= 2
            ov = iou(np.array(boxes) - 1, np.array(boxes) - 1)
            assert (ov[~np.eye(len(boxes), dtype=bool)] <= 0.3 + 1e-9).all()  # NMS at 0.3 within a class


def test_detect_stage_fine_tunes_the_caffenet_rows_with_box_regression(world):
    detect.run(_detect_params(row="color_dropping-kmeans_rescale", iterations=2), _ctx(world))
    m = json.loads((world / "metrics/detect/color_dropping-kmeans_rescale.json").read_text())
    assert (m["init"], m["network"], m["paper_row"], m["box_regression"]) == \
        ("kmeans_rescale", "caffenet", "K-means-rescale", True)
    assert m["protocol"] == "Fast R-CNN (with box regression), CaffeNet-shaped, k-means + rescale"
    assert m["train_loss_box"] > 0.0 and m["frozen"] == ["conv1"]  # fast-rcnn's CaffeNet train.prototxt
    saved = torch.load(world / "models/detect/color_dropping-kmeans_rescale.pt", weights_only=True)
    assert saved["network"] == "caffenet" and "fc6.weight" in saved["model"] and "bbox_pred.weight" in saved["model"]
    start = torch.load(world / detect.TRUNKS / "color_dropping-kmeans_rescale.pt", weights_only=True)["net"]
    assert torch.equal(saved["model"]["trunk.body.conv1.weight"], start["body.conv1.weight"])
    assert not torch.equal(saved["model"]["trunk.body.conv2.weight"], start["body.conv2.weight"])


def test_detect_params_name_each_network():
    with pytest.raises(ValueError, match=r"box_regression: give true/false for each of figure6, caffenet"):
        _detect_params(box_regression={"figure6": False})
    with pytest.raises(ValueError, match=r"protocol: give one of rcnn, fast_rcnn for each init"):
        _detect_params(protocol={"scratch": "rcnn"})
    with pytest.raises(ValueError, match=r"protocol: give one of rcnn, fast_rcnn"):
        _detect_params(protocol={i: "svm" for i in detect.Params().protocol})


def test_proposals_stage_opencv_and_detect_errors(tmp_path):
    make_world(tmp_path)
    ctx = _ctx(tmp_path)
    with pytest.raises(StageError, match="dvc repro proposals"):
        detect.run(_detect_params(), ctx)
    proposals.run(proposals.Params(workers=2), ctx)
    m = json.loads((tmp_path / "metrics/proposals.json").read_text())
    assert (m["images"], m["computed"], m["reused"]) == (10, 10, 0)
    assert set(m["recall"]) == {"trainval", "test"} and 0.0 <= m["recall"]["test"]["0.5"] <= 1.0
    index = json.loads((tmp_path / proposals.OUT / proposals.INDEX).read_text())
    assert sorted(index["boxes"]) == sorted(IMAGES) and index["settings"]["mode"] == "fast"
    proposals.run(proposals.Params(workers=2), ctx)
    m = json.loads((tmp_path / "metrics/proposals.json").read_text())
    assert (m["computed"], m["reused"]) == (0, 10)
    with pytest.raises(StageError, match="models/convert/color_dropping-ours.pt"):
        detect.run(_detect_params(row="color_dropping-ours"), ctx)
    for mat in (tmp_path / proposals.MATS).iterdir():  # proposals.source=mat without the fetched .mat files
        mat.unlink()
    with pytest.raises(StageError, match="voc_2007_trainval.mat: no selective search .mat file; fetch places "
                                         "Fast R-CNN's selective_search_data.tgz"):
        proposals.run(proposals.Params(source="mat"), ctx)
