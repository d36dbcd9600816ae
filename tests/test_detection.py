"""Fast R-CNN pieces against hand-computed values: IoU, box targets, flips, RoI sampling, the loss, NMS, results
lines and the Table 1 markdown (ctxrepro.detection; paper section 4.3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctxrepro.detection import boxes as B
from ctxrepro.detection import table
from ctxrepro.detection.infer import nms_per_class, results_lines
from ctxrepro.detection.model import FastRCNN, Output, box_targets, multitask_loss, unnormalise
from ctxrepro.detection.sampling import SamplingConfig, sample_rois
from ctxrepro.detection.train import SolverConfig, set_lr
from ctxrepro.transfer.trunk import TrunkSpec, build_trunk

# ---- boxes -------------------------------------------------------------------------------------------------

def test_iou_uses_the_plus_one_convention():
    a = np.array([[0, 0, 9, 9]])  # 10 x 10 pixels
    b = np.array([[5, 0, 14, 9], [0, 0, 19, 9], [10, 0, 19, 9], [9, 9, 9, 9]])
    # 50/150; 100/200; touching edge -> 0; a single shared pixel -> 1/100
    np.testing.assert_allclose(B.iou(a, b), [[1 / 3, 0.5, 0.0, 0.01]])


def test_encode_hand_values_and_decode_round_trip():
    roi = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # centre (5, 5), size 10
    gt = torch.tensor([[2.0, 0.0, 11.0, 19.0]])  # centre (7, 10), size 10 x 20
    np.testing.assert_allclose(B.encode(roi, gt).numpy(), [[0.2, 0.5, 0.0, np.log(2.0)]], atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen, dtype=torch.float64) * 100
    rois = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=gen, dtype=torch.float64) * 80], 1)
    xy2 = torch.rand(50, 2, generator=gen, dtype=torch.float64) * 100
    gts = torch.cat([xy2, xy2 + 1 + torch.rand(50, 2, generator=gen, dtype=torch.float64) * 80], 1)
    np.testing.assert_allclose(B.decode(rois, B.encode(rois, gts)).numpy(), gts.numpy(), atol=1e-9)
    # through the regressor's normalisation too
    norm = box_targets(B.encode(rois, gts))
    np.testing.assert_allclose(B.decode(rois, unnormalise(norm)).numpy(), gts.numpy(), atol=1e-9)


def test_decode_applies_each_class_block():
    roi = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]])  # class 0 unchanged, class 1 shifted 5 px
    np.testing.assert_allclose(B.decode(roi, deltas).numpy(), [[0, 0, 9, 9, 5, 0, 14, 9]])


def test_flip_and_clip():
    boxes = np.array([[0, 0, 4, 9], [3, 2, 19, 5]])
    np.testing.assert_array_equal(B.flip(boxes, 20), [[15, 0, 19, 9], [0, 2, 16, 5]])
    np.testing.assert_array_equal(B.flip(B.flip(boxes, 20), 20), boxes)
    clipped = B.clip(torch.tensor([[-3.0, -1.0, 25.0, 8.0]]), height=6, width=20)
    np.testing.assert_array_equal(clipped.numpy(), [[0, 0, 19, 5]])


# ---- RoI sampling ------------------------------------------------------------------------------------------

def _shifted(shifts) -> np.ndarray:
    """Boxes [s, 0, 99 + s, 99]: IoU (100 - s) / (100 + s) with [0, 0, 99, 99]."""
    return np.array([[s, 0, 99 + s, 99] for s in shifts], dtype=float)


GT = np.array([[0.0, 0.0, 99.0, 99.0]])
# IoU >= 0.5 for s <= 33, in [0.1, 0.5) for 34 <= s <= 81, below 0.1 for s >= 82
FG_SHIFTS, BG_SHIFTS, LOW_SHIFTS = range(1, 34), range(34, 82), range(82, 100)


def test_sampling_takes_a_quarter_foreground_and_fills_with_background():
    props = _shifted([*FG_SHIFTS, *BG_SHIFTS, *LOW_SHIFTS])
    s = sample_rois(props, GT, np.array([7]), SamplingConfig(), np.random.default_rng(0))
    assert len(s.rois) == 64
    np.testing.assert_array_equal(s.labels, [7] * 16 + [0] * 48)
    assert (s.overlaps[:16] >= 0.5).all() and ((s.overlaps[16:] >= 0.1) & (s.overlaps[16:] < 0.5)).all()
    assert len(np.unique(s.rois, axis=0)) == 64  # without replacement
    np.testing.assert_allclose(B.iou(s.rois, GT)[:, 0], s.overlaps)
    assert (s.gt_boxes == GT).all()


def test_sampling_when_candidates_run_out():
    # 2 foreground candidates (the ground truth itself and s = 1), 5 background: 7 RoIs, not 64
    s = sample_rois(_shifted([1, 40, 41, 42, 43, 44, 90]), GT, np.array([3]), SamplingConfig(),
                    np.random.default_rng(0))
    np.testing.assert_array_equal(s.labels, [3, 3, 0, 0, 0, 0, 0])
    assert [0, 0, 99, 99] in s.rois.tolist()  # ground-truth boxes are RoIs too (Fast R-CNN)
    # with a smaller batch the background fills only up to rois_per_image
    s = sample_rois(_shifted([*FG_SHIFTS, *BG_SHIFTS]), GT, np.array([3]),
                    SamplingConfig(rois_per_image=8, fg_fraction=0.5), np.random.default_rng(0))
    np.testing.assert_array_equal(s.labels, [3] * 4 + [0] * 4)


def test_sampling_thresholds_are_inclusive_below():
    gt = np.array([[0.0, 0.0, 19.0, 9.0], [40.0, 0.0, 139.0, 9.0]])  # 200 and 1000 pixels
    props = np.array([[0.0, 0.0, 9.0, 9.0],  # IoU exactly 0.5 with box 0 -> foreground
                      [40.0, 0.0, 49.0, 9.0]])  # IoU exactly 0.1 with box 1 -> background
    s = sample_rois(props, gt, np.array([5, 9]), SamplingConfig(), np.random.default_rng(0))
    by_roi = {tuple(r): (lab, ov) for r, lab, ov in zip(s.rois.tolist(), s.labels, s.overlaps)}
    assert by_roi[(0.0, 0.0, 9.0, 9.0)] == (5, 0.5)
    assert by_roi[(40.0, 0.0, 49.0, 9.0)] == (0, pytest.approx(0.1))


def test_sampling_is_seeded_and_handles_no_ground_truth():
    props = _shifted([*FG_SHIFTS, *BG_SHIFTS])
    a = sample_rois(props, GT, np.array([1]), SamplingConfig(), np.random.default_rng(5))
    b = sample_rois(props, GT, np.array([1]), SamplingConfig(), np.random.default_rng(5))
    np.testing.assert_array_equal(a.rois, b.rois)
    empty = sample_rois(props, np.zeros((0, 4)), np.zeros(0, dtype=np.int64), SamplingConfig(),
                        np.random.default_rng(0))
    assert len(empty.rois) == 0 and len(empty.labels) == 0
    assert SamplingConfig(rois_per_image=128).fg_per_image == 32


# ---- model and loss ----------------------------------------------------------------------------------------

def test_multitask_loss_hand_values():
    scores = torch.zeros(4, 3)  # uniform: cross-entropy log(3)
    deltas = torch.zeros(4, 12)
    deltas[0, 4:8] = torch.tensor([1.0, 0.0, 0.0, 0.25])  # RoI 0 is class 1: |d| 1 -> 0.5, 0.25 -> 0.03125
    deltas[1, 8:12] = 5.0  # RoI 1 is background: its deltas never count
    labels = torch.tensor([1, 0, 2, 0])
    targets = torch.zeros(4, 4)
    targets[2] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # RoI 2, class 2, predicted 0: smooth L1 of 3 = 2.5
    cls, box = multitask_loss(Output(scores, deltas), labels, targets)
    assert cls.item() == pytest.approx(np.log(3.0))
    assert box.item() == pytest.approx((0.5 + 0.03125 + 2.5) / 4)  # summed over coordinates, mean over RoIs
    cls2, box2 = multitask_loss(Output(scores, None), labels, targets)
    assert cls2.item() == pytest.approx(np.log(3.0)) and box2.item() == 0.0


def _tiny_model(box_regression: bool) -> FastRCNN:
    spec = TrunkSpec(tower="small", width=4, conv6=8, conv6_kernel=2, conv6b=8, fc7=16, input_side=64)
    trunk, head = build_trunk(spec, seed=0)
    return FastRCNN(trunk, head, dropout=0.5, box_regression=box_regression, seed=0).eval()


def test_model_shapes_and_roi_pooling_per_image():
    model = _tiny_model(True)
    assert (model.pool_side, model.spatial_scale) == (4, 1 / 8)  # 64 px: pool5 4x4; conv5 stride 8
    gen = torch.Generator().manual_seed(0)  # fixed images: the comparison below must not depend on test order
    images = [torch.rand(3, 48, 64, generator=gen) * 255, torch.rand(3, 40, 40, generator=gen) * 255]
    rois = [torch.tensor([[0.0, 0.0, 63.0, 47.0], [8.0, 8.0, 23.0, 23.0]]), torch.tensor([[0.0, 0.0, 39.0, 39.0]])]
    out = model(images, rois)
    assert out.scores.shape == (3, 21) and out.deltas.shape == (3, 84)
    with torch.no_grad():  # the second image's RoI does not depend on the first image
        alone = model([images[1]], [rois[1]])
    torch.testing.assert_close(out.scores[2:], alone.scores)
    assert model.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert _tiny_model(False)(images, rois).deltas is None


def test_solver_schedule():
    solver = SolverConfig(lr=0.01, lr_step=10, gamma=0.1, bias_lr_mult=2.0)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                           {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    assert set_lr(opt, solver, 9) == pytest.approx(0.01)
    assert set_lr(opt, solver, 25) == pytest.approx(0.0001)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0001, 0.0002])


# ---- NMS and results files ---------------------------------------------------------------------------------

def _scored(boxes: list, scores: list, cls: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(boxes)
    probs = torch.zeros(n, classes, dtype=torch.float64)
    probs[:, cls] = torch.tensor(scores, dtype=torch.float64)
    return probs, torch.tensor(boxes, dtype=torch.float64).repeat(1, classes)


def test_nms_suppresses_above_0_3_in_the_plus_one_convention():
    boxes = [[0, 0, 9, 9], [0, 0, 9, 10], [5, 0, 14, 9], [6, 0, 15, 9], [30, 30, 39, 39]]
    # vs box 0: 100/110 -> out; 50/150 = 0.333 -> out (0.286 without the +1: it would stay);
    # 40/160 = 0.25 -> kept; disjoint -> kept
    probs, bx = _scored(boxes, [0.9, 0.8, 0.7, 0.6, 0.5], cls=1)
    dets = nms_per_class(probs, bx, score_thresh=0.05, nms=0.3, max_per_class=100)
    assert list(dets) == [1]
    np.testing.assert_allclose(dets[1], [[0, 0, 9, 9, 0.9], [6, 0, 15, 9, 0.6], [30, 30, 39, 39, 0.5]])


def test_nms_is_per_class_thresholded_and_capped():
    probs = torch.tensor([[0.0, 0.6, 0.4], [0.0, 0.5, 0.04]], dtype=torch.float64)
    bx = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 9]], dtype=torch.float64).repeat(1, 3)
    dets = nms_per_class(probs, bx, score_thresh=0.05, nms=0.3, max_per_class=100)
    np.testing.assert_allclose(dets[1], [[0, 0, 9, 9, 0.6]])  # the identical 0.5 box is suppressed
    np.testing.assert_allclose(dets[2], [[0, 0, 9, 9, 0.4]])  # another class is not; 0.04 is below threshold
    many = [[20 * i, 0, 20 * i + 9, 9] for i in range(150)]  # disjoint boxes
    probs, bx = _scored(many, list(np.linspace(0.1, 0.9, 150)), cls=2)
    dets = nms_per_class(probs, bx, score_thresh=0.0, nms=0.3, max_per_class=100)
    assert len(dets[2]) == 100 and dets[2][:, 4].min() == pytest.approx(np.linspace(0.1, 0.9, 150)[50])
    assert (np.diff(dets[2][:, 4]) <= 0).all()


def test_results_lines_are_one_based_in_image_set_order():
    dets = {"000002": {1: np.array([[0.0, 4.0, 9.0, 19.5, 0.75]])}, "000001": {1: np.array([[1, 1, 2, 2, 0.5]])}}
    text = results_lines(dets, ["000001", "000002", "000003"], 1)
    assert text == "000001 0.500000 2.0 2.0 3.0 3.0\n000002 0.750000 1.0 5.0 10.0 20.5\n"
    assert results_lines(dets, ["000001"], 2) == ""


# ---- Table 1 -----------------------------------------------------------------------------------------------

def test_paper_rows_and_markdown():
    assert table.paper_row("scratch", "alexnet", "none") == "Scratch-Ours"
    assert table.paper_row("ours", "small", "projection") == "Ours-projection"
    assert table.paper_row("ours", "alexnet", "none") == "Ours-color-dropping"
    assert table.paper_row("ours_rescale", "vgg16", "none") == "VGG-Ours-rescale"
    assert table.paper_row("scratch", "vgg16", "none") is None
    assert table.paper_row("imagenet_alexnet", "tv_alexnet", "torchvision") == "ImageNet-R-CNN"
    assert table.paper_row("scratch_alexnet", "tv_alexnet", "none") == "Scratch-R-CNN"
    assert table.paper_row("imagenet", "tv_alexnet", "torchvision") is None  # Figure 6's head: Table 2 only
    assert table.paper_row("imagenet_rescale", "alexnet", "none") == "ImageNet-rescale"
    assert table.paper_row("imagenet_rescale", "vgg16", "none") == "VGG-ImageNet-rescale"
    assert table.paper_row("imagenet_rescale", "tv_vgg16", "torchvision") == "VGG-ImageNet-rescale"
    assert table.paper_row("kmeans_rescale", "small", "none") == "K-means-rescale"
    assert table.paper_row("ours_rescale", "alexnet", "projection") is None  # the paper rescaled colour dropping
    assert table.protocol("figure6", False) == "Fast R-CNN training, R-CNN-style rows (no box regression)"
    assert table.protocol("caffenet", True) == "Fast R-CNN (with box regression), CaffeNet-shaped, k-means + rescale"
    assert table.protocol("figure6", False, "rcnn") == table.protocol("caffenet", False, "rcnn") == \
        "R-CNN: warped windows, fc7 SVMs (no box regression)"
    assert all(len(v) == 21 for v in table.PAPER_TABLE1.values())
    # the paper's mAP column is the mean of its 20 APs (to Table 1's rounding)
    for row in table.PAPER_TABLE1.values():
        assert np.mean(row[:20]) == pytest.approx(row[20], abs=0.06)
    rows = [table.OurRow("scratch", {"bus": 0.25, "train": 0.5}, "Scratch-Ours", "tiny"),
            table.OurRow("ours_rescale", {"bus": 0.5, "train": None}, "Ours-rescale", "tiny")]
    md = table.table1_markdown(rows, ["bus", "train"])
    lines = md.splitlines()
    assert "profile: tiny" in lines[0]
    assert "| Scratch-Ours | paper | 50.6 | 50.0 | 50.3 | 39.8 |" in lines  # (50.6 + 50.0) / 2
    assert "| Ours-rescale | paper | 68.0 | 67.1 | 67.5 | 51.1 |" in lines
    assert "| scratch (as Scratch-Ours) | ours, tiny | 25.0 | 50.0 | 37.5 | - |" in lines
    assert "| ours_rescale (as Ours-rescale) | ours, tiny | 50.0 | - | - | - |" in lines
    assert not any(line.startswith("| K-means-rescale") for line in lines)  # only the rows we reproduce


def test_write_table1_collects_every_init(tmp_path):
    for init, ap in (("ours_rescale", {"bus": 0.5, "car": 0.5, "train": 1.0}), ("scratch", {"bus": 0.25, "train": 0.5}),
                     ("zz_custom", {"bus": 0.0, "train": 0.0})):
        row = f"color_dropping-{init}"
        (tmp_path / f"{row}.json").write_text(json.dumps({"row": row, "init": init, "ap": ap, "map": 0.0,
                                                          "paper_row": table.paper_row(init, "small", "none"),
                                                          "profile_note": "tiny"}))
    text = table.write_table1(tmp_path, tmp_path / "out" / "table1.md")
    assert (tmp_path / "out" / "table1.md").read_text() == text
    ours = [line.split(" | ")[0] for line in text.splitlines() if "| ours, tiny |" in line]
    assert ours == ["| color_dropping-scratch (as Scratch-Ours)", "| color_dropping-ours_rescale (as Ours-rescale)",
                    "| color_dropping-zz_custom"]
    assert "| method | source | bus | train | mAP (shown) | mAP (20) |" in text  # car: not in every run
    with pytest.raises(FileNotFoundError, match="dvc repro detect"):
        table.write_table1(tmp_path / "none", tmp_path / "x.md")
