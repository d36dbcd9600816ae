"""Tests for ctxrepro.analysis.pretext_eval and the pretext_eval stage (section 4.6): pair selection geometry,
in-box selection, confusion counts, accuracies, the checkpoint round trip and the stage's outputs."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretext_data import write_dataset

from ctxrepro.analysis import pretext_eval as E
from ctxrepro.config import BaseParams
from ctxrepro.data.voc import BndBox, VocObject
from ctxrepro.pretext.color import PatchAugment, projection_matrix
from ctxrepro.pretext.data import BatchSpec
from ctxrepro.pretext.engine import TrainConfig, export_weights
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.sampling import NEIGHBOUR_OFFSETS
from ctxrepro.stage import StageContext

PATCH, GAP, JITTER, NET = 24, 12, 2, 16
# (id, height, width, objects (name, xmin, ymin, xmax, ymax, truncated, difficult)), 1-based boxes
VOC_IMAGES = [
    ("000001", 96, 128, [("car", 11, 6, 90, 85, 0, 0), ("horse", 100, 10, 120, 40, 0, 0)]),
    ("000002", 100, 140, [("car", 1, 1, 70, 70, 1, 0)]),  # truncated: not eligible
    ("000003", 120, 100, [("horse", 21, 31, 90, 110, 0, 0), ("bus", 5, 5, 70, 70, 0, 1)]),  # bus difficult
    ("000004", 90, 120, []),
]


def write_voc(root: Path, images=VOC_IMAGES, split: str = "test") -> Path:
    """A VOCdevkit/VOC2007 tree in the devkit's format: Annotations, ImageSets/Main, JPEGImages."""
    year = root / "data" / "raw" / "voc2007" / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for image_id, h, w, objects in images:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([yy * 255 // h, xx * 255 // w, (yy * xx) % 255], 0)
        img = np.clip(base + rng.integers(-30, 31, (3, h, w)), 0, 255).astype(np.uint8)
        Image.fromarray(img.transpose(1, 2, 0)).save(year / "JPEGImages" / f"{image_id}.jpg", quality=95)
        objs = "".join(
            f"<object><name>{n}</name><pose>Left</pose><truncated>{t}</truncated><difficult>{d}</difficult>"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for n, x0, y0, x1, y1, t, d in objects)
        (year / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")
    (year / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i, *_ in images))
    return year


def write_model(path: Path, color: str = "projection", seed: int = 0) -> torch.nn.Module:
    """A pretrain export (engine.export_weights) of a random small tower: 24 px patches seen at 16 px."""
    torch.manual_seed(seed)
    model = build_model("small", NET)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a wrong rebuild would show
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    cfg = TrainConfig(data=BatchSpec(PATCH, GAP, JITTER), augment=PatchAugment.for_patch(PATCH, color=color),
                      tower="small", input_size=NET)
    export_weights(path, model, cfg, step=7)
    return model.eval()


def test_load_pretrained_rebuilds_the_exported_network(tmp_path):
    model = write_model(tmp_path / "pretrain.pt")
    pre = E.load_pretrained(tmp_path / "pretrain.pt")
    assert (pre.patch, pre.net_size, pre.gap, pre.jitter, pre.color, pre.step) == (PATCH, NET, GAP, JITTER,
                                                                                    "projection", 7)
    assert not pre.model.training
    x, pairs = torch.randn(4, 3, NET, NET), torch.tensor([[0, 1], [2, 3]])
    with torch.no_grad():
        assert torch.allclose(pre.model(x, pairs), model(x, pairs))
    with pytest.raises(FileNotFoundError, match="pretrain"):
        E.load_pretrained(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing config keys"):
        E.load_pretrained(tmp_path / "bad.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read as a pretrain export"):
        E.load_pretrained(tmp_path / "garbage.pt")
    blob = torch.load(tmp_path / "pretrain.pt", weights_only=True)
    torch.save({**blob, "model": {"tower.conv1.weight": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt: the weights do not fit a 'small' network"):
        E.load_pretrained(tmp_path / "wrong.pt")


def test_network_input_is_mean_free_projected_rms50_without_downsampling(tmp_path):
    write_model(tmp_path / "m.pt")
    pre = E.load_pretrained(tmp_path / "m.pt")
    pre = E.Pretrained(pre.model, PATCH, PATCH, GAP, JITTER, "projection", 0)  # no resize: check the 24 px input
    patches = torch.randint(0, 256, (5, 3, PATCH, PATCH), dtype=torch.uint8)
    x = E.network_input(patches, pre, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, PATCH, PATCH)
    assert torch.allclose(x.mean(dim=(2, 3)), torch.zeros(5, 3), atol=1e-3)
    assert torch.allclose(x.square().mean(dim=(1, 2, 3)).sqrt(), torch.full((5,), 50.0), atol=1e-3)
    green_magenta = torch.einsum("c,pchw->phw", torch.tensor([-1.0, 2.0, -1.0]), x)
    assert green_magenta.abs().max() < 1e-3  # section 3.1: projection removes the green-magenta axis
    assert torch.allclose(projection_matrix() @ torch.tensor([-1.0, 2.0, -1.0]), torch.zeros(3), atol=1e-6)


def check_geometry(boxes, pairs, labels, patch, gap, jitter):
    pitch = patch + gap
    offsets = torch.tensor(NEIGHBOUR_OFFSETS)[labels] * pitch
    diff = boxes[pairs[:, 1]] - boxes[pairs[:, 0]]
    assert ((diff - offsets).abs() <= 2 * jitter).all()  # jitter of each patch, clamping only shrinks it


def test_sample_pairs_draws_exactly_n_distinct_labelled_pairs():
    g = torch.Generator().manual_seed(0)
    boxes, pairs, labels = E.sample_pairs(150, 200, 40, g, PATCH, GAP, JITTER)
    assert len(pairs) == 40 and len(labels) == 40
    assert len({tuple(b) for b in boxes[pairs].flatten(1).tolist()}) == 40  # no pair twice
    assert sorted(set(pairs.flatten().tolist())) == list(range(len(boxes)))  # only used boxes kept
    assert (boxes >= 0).all() and (boxes[:, 0] <= 150 - PATCH).all() and (boxes[:, 1] <= 200 - PATCH).all()
    check_geometry(boxes, pairs, labels, PATCH, GAP, JITTER)
    again = E.sample_pairs(150, 200, 40, torch.Generator().manual_seed(0), PATCH, GAP, JITTER)
    assert all(torch.equal(a, b) for a, b in zip((boxes, pairs, labels), again))


def test_sample_pairs_keeps_all_when_the_grids_hold_fewer_and_nothing_when_too_small():
    # a 60 x 60 region holds exactly one 2x2 grid of 24 px patches with a 12 px gap: 12 ordered pairs
    boxes, pairs, labels = E.sample_pairs(60, 60, 100, torch.Generator().manual_seed(1), PATCH, GAP, 0,
                                          max_grids=3)
    assert len(pairs) == 36 and len(boxes) == 12  # 3 grids x 12 pairs, each grid its own 4 boxes
    assert sorted(torch.bincount(labels, minlength=8).tolist()) == [3] * 4 + [6] * 4  # diagonals once per grid
    assert len(E.sample_pairs(59, 60, 10, torch.Generator(), PATCH, GAP, 0)[1]) == 0


def test_select_regions_keeps_both_patches_inside_the_box():
    regions = [(0, 10, 20, 70, 90, "car"), (1, 0, 0, 60, 60, "horse"), (1, 5, 5, 40, 200, "bus")]
    sel = E.select_regions(regions, 16, seed=0, purpose=2, patch=PATCH, gap=GAP, jitter=JITTER)
    assert [s.group for s in sel] == ["car", "horse"]  # the 40 px tall bus holds no 2x2 grid
    for s, (_, y0, x0, h, w, _) in zip(sel, regions):
        assert (s.boxes[:, 0] >= y0).all() and (s.boxes[:, 0] <= y0 + h - PATCH).all()
        assert (s.boxes[:, 1] >= x0).all() and (s.boxes[:, 1] <= x0 + w - PATCH).all()
        assert len(s.pairs) == min(16, len(s.pairs)) and len(s.rows()) == len(s.pairs)
        check_geometry(s.boxes, s.pairs, s.labels, PATCH, GAP, JITTER)


def test_confusion_counts_by_hand():
    actual = np.array([0, 0, 1, 7, 7, 7])
    predicted = np.array([0, 1, 1, 7, 7, 0])
    c = E.confusion_counts(actual, predicted)
    expected = np.zeros((8, 8), np.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[7, 0] = 1
    expected[7, 7] = 2
    assert np.array_equal(c, expected)
    with pytest.raises(ValueError, match="outside"):
        E.confusion_counts(np.array([8]), np.array([0]))


def test_accuracy_and_per_group_by_hand():
    def sel(labels, group):
        n = len(labels)
        return E.Selection(0, torch.zeros((2 * n, 2), dtype=torch.int64), torch.arange(2 * n).view(n, 2),
                           torch.tensor(labels), group)

    sels = [sel([0, 1, 2], "car"), sel([3, 4], "horse"), sel([5], "car")]
    preds = [torch.tensor([0, 1, 0]), torch.tensor([0, 0]), torch.tensor([5])]
    assert E.accuracy(sels, preds) == (pytest.approx(0.5), 6)
    assert E.accuracy_by_group(sels, preds) == {"car": (pytest.approx(0.75), 4), "horse": (0.0, 2)}
    assert np.isnan(E.accuracy([], [])[0])


def obj(name, x0, y0, x1, y1, truncated=False, difficult=False, occluded=None):
    return VocObject(name, "Left", truncated, difficult, occluded, BndBox(x0, y0, x1, y1))


def test_eligible_boxes_section_4_6_rule():
    objects = [obj("car", 1, 1, 240, 300), obj("car", 1, 1, 239, 300), obj("bus", 11, 21, 260, 280, truncated=True),
               obj("horse", 11, 21, 260, 280, difficult=True), obj("sofa", 11, 21, 260, 280, occluded=True),
               obj("train", 11, 21, 260, 280, occluded=False)]
    # the first box is 240 x 300 (1-based inclusive) -> 0-based (y0=0, x0=0, h=300, w=240)
    assert E.eligible_boxes(objects, 240) == [(0, 0, 300, 240, "car"), (20, 10, 260, 250, "train")]


def test_predict_selections_matches_a_direct_forward_across_batches(tmp_path):
    model = write_model(tmp_path / "m.pt", color="projection")
    pre = E.load_pretrained(tmp_path / "m.pt")
    images = [torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8) for _ in range(3)]
    sels = E.select_images([(90, 120)] * 3, 10, seed=0, purpose=1, patch=PATCH, gap=GAP, jitter=JITTER)
    loads = []

    def load(i):
        loads.append(i)
        return images[i]

    preds = E.predict_selections(pre, sels, load, "cpu", seed=0, max_patches=12)
    assert loads == [0, 1, 2]  # each image decoded once
    for s, p in zip(sels, preds):
        # reference: crop by slicing, one forward per selection
        cut = torch.stack([images[s.image][:, y:y + PATCH, x:x + PATCH] for y, x in s.boxes.tolist()])
        with torch.no_grad():
            ref = model(E.network_input(cut, pre, torch.Generator()), s.pairs).argmax(1)
        assert torch.equal(p, ref)


def make_tree(root: Path) -> None:
    write_voc(root)
    write_dataset(root)
    (root / "models" / "pretrain").mkdir(parents=True)
    write_model(root / "models" / "pretrain" / "color_dropping.pt")


def geometric_label(y1: int, x1: int, y2: int, x2: int, pitch: int) -> int:
    """Figure 2's label of the second patch relative to the first, from the two corners alone: rows
    above / beside / below, columns left / same / right, numbered 0 1 2 / 3 . 4 / 5 6 7 (jitter < pitch / 2)."""
    row = (y2 - y1 > pitch / 2) - (y2 - y1 < -pitch / 2)
    col = (x2 - x1 > pitch / 2) - (x2 - x1 < -pitch / 2)
    return [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)].index((row, col))


def predictions_one_pair_at_a_time(root: Path, rows: list[dict]) -> list[int]:
    """Each recorded pair classified on its own: both patches sliced from the image at the recorded corners,
    through the exported network, without the stage's selection, packing or batching."""
    pre = E.load_pretrained(root / "models" / "pretrain" / "color_dropping.pt")
    out = []
    for r in rows:
        image = E.read_rgb(root / r["image"])
        y1, x1, y2, x2 = (int(r[k]) for k in ("y1", "x1", "y2", "x2"))
        cut = torch.stack([image[:, y1:y1 + PATCH, x1:x1 + PATCH], image[:, y2:y2 + PATCH, x2:x2 + PATCH]])
        x = E.network_input(cut, pre, torch.Generator().manual_seed(0))  # projection: no random draw
        with torch.no_grad():
            out.append(int(pre.model(x, torch.tensor([[0, 1]])).argmax(1)))
    return out


def test_pretext_eval_stage_outputs_match_independent_labels_and_predictions(tmp_path):
    """Every recorded pair's label follows from its two corners, its prediction from classifying that pair
    alone, and each accuracy from those. Mutations caught (checked by hand): Selection.rows giving (x, y)
    corners, predict_selections pairing patches in the wrong order (`pairs.flip(1)`), predictions assigned
    to the wrong selection (the split reversed)."""
    from stages import pretext_eval as stage

    make_tree(tmp_path)
    params = stage.Params(n_images=3, pairs_per_image=20, pairs_per_box=10, manifest_images=3, max_patches=64,
                          profile_note="test")
    ctx = StageContext(base=BaseParams(seed=0), device="cpu", log=logging.getLogger("test"), root=tmp_path)
    stage.run(params, ctx)
    m = json.loads((tmp_path / "metrics" / "pretext_eval.json").read_text())
    assert m["chance"] == 0.125 and m["n_images"] == 3 and m["n_pairs"] == 60 and m["min_box_side"] == 60
    # eligible boxes >= 60 px: car of 000001 (80 x 80) and horse of 000003 (70 x 80); not the truncated car,
    # the difficult bus or the 21 px wide horse
    assert m["n_boxes"] == 2 and sorted(m["accuracy_per_class"]) == ["car", "horse"]
    with (tmp_path / "results" / "pretext_eval" / "pairs.csv").open() as f:
        rows = list(csv.DictReader(f))
    labels = [geometric_label(*(int(r[k]) for k in ("y1", "x1", "y2", "x2")), PATCH + GAP) for r in rows]
    assert [int(r["label"]) for r in rows] == labels
    predicted = predictions_one_pair_at_a_time(tmp_path, rows)
    assert [int(r["predicted"]) for r in rows] == predicted
    right = np.array(labels) == np.array(predicted)
    for name, key in (("voc", "accuracy"), ("boxes", "accuracy_in_boxes"), ("train", "accuracy_train_images"),
                      ("heldout", "accuracy_heldout_images")):
        mine = [i for i, r in enumerate(rows) if r["set"] == name]
        assert mine and m[key] == pytest.approx(right[mine].mean(), abs=1e-6), name
    # in-box pairs lie inside their (0-based) boxes: car of 000001 and horse of 000003
    inside = {"car": (5, 10, 85, 90), "horse": (30, 20, 110, 90)}  # y0, x0, y1, x1 (exclusive)
    for r in (r for r in rows if r["set"] == "boxes"):
        y0, x0, y1, x1 = inside[r["group"]]
        for y, x in (("y1", "x1"), ("y2", "x2")):
            assert y0 <= int(r[y]) <= y1 - PATCH and x0 <= int(r[x]) <= x1 - PATCH, r
    conf = np.loadtxt(tmp_path / "plots" / "pretext_eval" / "confusion.csv", delimiter=",", skiprows=1, dtype=int)
    voc = [i for i, r in enumerate(rows) if r["set"] == "voc"]
    assert conf.tolist() == [[labels[i], predicted[i]] for i in voc]
    assert all(rows[i]["image"].startswith("data/raw/voc2007") for i in voc)
    assert (tmp_path / "plots" / "pretext_eval" / "confusion.png").stat().st_size > 1000
    first = (tmp_path / "results" / "pretext_eval" / "pairs.csv").read_bytes()
    stage.run(params, ctx)  # the selection is a function of the seed
    assert (tmp_path / "results" / "pretext_eval" / "pairs.csv").read_bytes() == first


def test_read_rgb_converts_grayscale_and_names_bad_files(tmp_path):
    Image.fromarray(np.full((5, 7), 80, np.uint8)).save(tmp_path / "g.png")
    img = E.read_rgb(tmp_path / "g.png")
    assert img.shape == (3, 5, 7) and img.dtype == torch.uint8 and (img == 80).all()
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="bad.jpg"):
        E.read_rgb(tmp_path / "bad.jpg")


def test_pretext_eval_stage_without_eligible_boxes_reports_null(tmp_path):
    from stages import pretext_eval as stage

    make_tree(tmp_path)
    params = stage.Params(n_images=2, pairs_per_image=8, min_box_side=1000, manifest_images=2)
    stage.run(params, StageContext(base=BaseParams(seed=0), device="cpu", log=logging.getLogger("t"), root=tmp_path))
    m = json.loads((tmp_path / "metrics" / "pretext_eval.json").read_text())
    assert m["accuracy_in_boxes"] is None and m["n_boxes"] == 0 and m["accuracy_per_class"] == {}
    assert m["n_pairs"] == 16 and m["min_box_side"] == 1000
