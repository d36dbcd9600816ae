"""The linear_probe stage end to end on a synthetic root: tiny ImageNet layout, VOC devkit, a pretrain export."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrepro.analysis import linear_heads as H
from ctxrepro.analysis import linear_probe as L
from ctxrepro.config import BaseParams
from ctxrepro.pretext.model import build_model
from ctxrepro.stage import StageContext
from stages import linear_probe as S

CLASSES = ("bus", "car")
WNIDS = {"bus": "n04487081", "car": "n02814533"}


def _image(path, vertical, seed):
    """Stripes, vertical or horizontal, plus noise: colour means are subtracted by the preprocessing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:60, :80]
    stripes = 255.0 * (((xx if vertical else yy) // 4) % 2)
    arr = np.clip(stripes[..., None] + rng.normal(0, 30, (60, 80, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _imagenet(root):
    rows, index = [], {}
    for split, n in (("train", 6), ("val", 4)):
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                wnid = WNIDS[cls]
                source = f"imagenet/train/{wnid}/{wnid}_{i}.JPEG" if split == "train" else \
                    f"imagenet/val/ILSVRC2012_val_{c * n + i + 1:08d}.JPEG"
                path = f"{split}/{wnid}_{i}.jpg" if split == "train" else f"val/{c}_{i}.jpg"
                _image(root / "data/resized" / path, bool(c), len(rows))
                rows.append([split, path, source, 80, 60, 80, 60])
                index[source] = {"kind": "procedural", "category": cls, "junk": None}
    with (root / "data/resized/manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["split", "path", "source", "orig_width", "orig_height", "width", "height"]] + rows)
    (root / "data/raw").mkdir(parents=True, exist_ok=True)
    (root / "data/raw/world_index.json").write_text(json.dumps(index))


def _voc(root):
    devkit = root / S.VOC07
    (devkit / "ImageSets/Main").mkdir(parents=True)
    (devkit / "Annotations").mkdir()
    for split, n in (("trainval", 12), ("test", 8)):
        ids = [f"{split}{i:03d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            cls = CLASSES[i % 2]
            _image(devkit / "JPEGImages" / f"{image_id}.jpg", bool(i % 2), 100 + i)
            (devkit / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename><size><width>80</width><height>60</height>"
                f"<depth>3</depth></size><object><name>{cls}</name><difficult>0</difficult><bndbox><xmin>1</xmin>"
                f"<ymin>1</ymin><xmax>80</xmax><ymax>60</ymax></bndbox></object></annotation>")
        (devkit / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _export(root):
    torch.manual_seed(0)
    model = build_model("small", 32)
    config = {"tower": "small", "patch": 32, "sample_patch": 48, "gap": 24, "jitter": 5, "color": "projection"}
    (root / S.MODELS).mkdir(parents=True)
    torch.save({"config": config, "model": model.state_dict(), "step": 7}, root / S.MODELS / "color_dropping.pt")
    return L.weights_digest(model)


def _swap_val_labels(root):
    """The negative control: every val image's label in the world index swapped (bus <-> car), the pixels kept."""
    path = root / "data/raw/world_index.json"
    index = json.loads(path.read_text())
    for source, entry in index.items():
        if source.startswith("imagenet/val/"):
            entry["category"] = CLASSES[1 - CLASSES.index(entry["category"])]
    path.write_text(json.dumps(index))


def _params(**kw) -> S.Params:
    return S.Params(network="color_dropping", dims=256, input_side=64, resize=72, batch=4, workers=0,
                    voc_classes=CLASSES, sgd=H.SgdConfig(batch=8, iterations=30, lr=0.05, lr_step=20),
                    svm=H.SvmConfig(costs=(0.1, 1.0)), **kw)


@pytest.mark.slow
def test_stage_writes_metrics_and_plots_and_changes_no_weight(tmp_path, caplog):
    """Vertical vs horizontal stripes: some layer separates them on val (top-1 1.0), and the same run with val's
    labels swapped must score exactly 1 - that on every layer (2 classes, the same heads: the state resumes),
    an expectation independent of the trunk. Mutations caught (each checked by hand): O.top1 not advancing `row`
    (val's second batch of 4 scored against the first batch's labels: 0.5), val's labels sorted (a consistent
    relabelling of val alone: 0.0), top-1 scored on the training images (1.0 too, but the swapped run does not
    mirror it), the VOC07 cache key without the pooling grids (a dims change would reuse stale features)."""
    _imagenet(tmp_path)
    _voc(tmp_path)
    digest = _export(tmp_path)
    ctx = StageContext(BaseParams(), "cpu", logging.getLogger("test"), root=tmp_path)
    S.run(_params(), ctx)
    m = json.loads((tmp_path / "metrics/linear_probe/color_dropping.json").read_text())
    assert set(m["imagenet_top1"]) == set(L.LAYERS) == set(m["voc07_map"])
    assert m["imagenet_classes"] == 2 and m["imagenet_train_images"] == 12 and m["imagenet_val_images"] == 8
    assert m["imagenet_passes"] == 30 * 8 / 12 and m["imagenet_iterations"] == 30
    assert m["dims"] == {k: c * L.grid_side(c, s, 256) ** 2 for k, (c, s) in
                         L.LayerTaps(build_model("small", 32).tower, 32, 64, 256).shapes(64).items()}
    assert max(m["imagenet_top1"].values()) == 1.0 and max(m["voc07_map"].values()) == pytest.approx(1.0)
    assert m["weights_sha256"] == digest and m["features_per_second"] > 0 and m["imagenet_images_per_second"] > 0
    assert (tmp_path / "plots/linear_probe/color_dropping.png").is_file()
    assert len(list((tmp_path / S.STATE / "color_dropping").glob("*/last.pt"))) == 1
    _swap_val_labels(tmp_path)
    with caplog.at_level("INFO"):
        S.run(_params(), ctx)  # resumes at the end: the same heads, scored against the swapped labels
    assert "resuming state" in caplog.text and "voc07 trainval: cached features" in caplog.text
    swapped = json.loads((tmp_path / "metrics/linear_probe/color_dropping.json").read_text())
    assert swapped["voc07_ap"] == m["voc07_ap"]  # the cached VOC07 features give the same SVMs
    caplog.clear()
    with caplog.at_level("INFO"):  # other pooling: neither the heads nor the cached features are reused
        S.run(dataclasses.replace(_params(), dims=128, layers=("conv1",)), ctx)
    assert "cached features" not in caplog.text and "no state for this configuration" in caplog.text
    for layer, top1 in m["imagenet_top1"].items():
        assert swapped["imagenet_top1"][layer] == pytest.approx(1.0 - top1), layer
    random = S.Params(network="random", dims=256, input_side=64, resize=72, batch=8, workers=0, voc_classes=CLASSES,
                      layers=("conv1",), sgd=H.SgdConfig(batch=8, iterations=5), svm=H.SvmConfig(costs=(1.0,)))
    S.run(random, ctx)
    r = json.loads((tmp_path / "metrics/linear_probe/random.json").read_text())
    assert list(r["imagenet_top1"]) == ["conv1"] and r["weights_sha256"] != digest
