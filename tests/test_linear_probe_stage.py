"""The linear_probe stage end to end on a synthetic root: tiny ImageNet layout, VOC devkit, a pretrain export."""

from __future__ import annotations

import csv
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


@pytest.mark.slow
def test_stage_writes_metrics_and_plots_and_changes_no_weight(tmp_path):
    _imagenet(tmp_path)
    _voc(tmp_path)
    digest = _export(tmp_path)
    params = S.Params(network="color_dropping", dims=256, input_side=64, resize=72, batch=8, workers=0,
                      voc_classes=CLASSES, sgd=H.SgdConfig(batch=8, iterations=30, lr=0.05, lr_step=20),
                      svm=H.SvmConfig(costs=(0.1, 1.0)))
    ctx = StageContext(BaseParams(), "cpu", logging.getLogger("test"), root=tmp_path)
    S.run(params, ctx)
    m = json.loads((tmp_path / "metrics/linear_probe/color_dropping.json").read_text())
    assert set(m["imagenet_top1"]) == set(L.LAYERS) == set(m["voc07_map"])
    assert m["imagenet_classes"] == 2 and m["imagenet_train_images"] == 12 and m["imagenet_val_images"] == 8
    # vertical vs horizontal stripes: some layer separates them
    assert max(m["imagenet_top1"].values()) == 1.0 and max(m["voc07_map"].values()) == pytest.approx(1.0)
    assert m["weights_sha256"] == digest and m["features_per_second"] > 0
    assert (tmp_path / "plots/linear_probe/color_dropping.png").is_file()
    assert not (tmp_path / S.SCRATCH / "color_dropping").exists()  # features are not left behind
    random = S.Params(network="random", dims=256, input_side=64, resize=72, batch=8, workers=0, voc_classes=CLASSES,
                      layers=("conv1",), sgd=H.SgdConfig(batch=8, iterations=5), svm=H.SvmConfig(costs=(1.0,)))
    S.run(random, ctx)
    r = json.loads((tmp_path / "metrics/linear_probe/random.json").read_text())
    assert list(r["imagenet_top1"]) == ["conv1"] and r["weights_sha256"] != digest
