"""The surface-normal stage (paper section 4.4, Table 2): codebook, decoding, targets, data, training, outputs,
and the stage end to end on a tiny world."""

from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import replace

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from torch import nn

from ctxrepro.checkpoint import load_checkpoint
from ctxrepro.normals.data import DepthGroundTruth, FairGroundTruth, coarse_targets, ground_truth, open_nyu
from ctxrepro.normals.grid import CellGrid
from ctxrepro.normals.model import (IGNORE, TrainSet, TrainSettings, _batch, assign_codes, build_net, decode,
                                    full_resolution, kmeans_codebook, load_vocab, predict_coarse, train_normals,
                                    trunk_output, upsample_normals)
from ctxrepro.normals.report import combined_table, npz_writer, table2_markdown

LOG = logging.getLogger("test_normals")
A, B = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------- codebook, decoding

def test_decode_is_the_renormalised_probability_weighted_mean():
    book = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    probs = torch.tensor([0.75, 0.25, 0.0]).view(1, 3, 1, 1)
    got = decode(probs, book)[0, :, 0, 0].numpy()
    np.testing.assert_allclose(got, _unit([0.25, 0.0, -0.75]), atol=1e-6)
    onehot = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    np.testing.assert_allclose(decode(onehot, book)[0, :, 0, 0].numpy(), [0.0, 1.0, 0.0], atol=1e-7)


def test_decode_falls_back_to_the_likeliest_codeword_when_the_mean_vanishes():
    book = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    probs = torch.tensor([0.45, 0.45, 0.1]).view(1, 3, 1, 1)  # mean (0.1, 0, 0): still decodable
    np.testing.assert_allclose(decode(probs, book)[0, :, 0, 0].numpy(), [1.0, 0.0, 0.0], atol=1e-6)
    probs = torch.tensor([0.5, 0.5, 0.0]).view(1, 3, 1, 1)  # opposite codewords cancel exactly
    np.testing.assert_allclose(decode(probs, book)[0, :, 0, 0].numpy(), [0.0, 0.0, 1.0])


def test_assign_codes_picks_the_largest_dot_product_and_ignores_invalid():
    book = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    normals = torch.tensor([[0.1, 0.2, -0.97], [0.8, 0.0, -0.6], [0.0, -0.9, -0.44], [1.0, 0.0, 0.0]])
    valid = torch.tensor([True, True, True, False])
    assert assign_codes(normals, valid, book).tolist() == [0, 1, 2, IGNORE]


def test_kmeans_codebook_recovers_well_separated_directions():
    rng = np.random.default_rng(1)
    centres = _unit([[0.0, 0.0, -1.0], [0.0, -1.0, -0.2], [0.9, 0.1, -0.4]])
    points = _unit(np.repeat(centres, 200, axis=0) + rng.normal(0.0, 0.02, (600, 3)))
    book = kmeans_codebook(points, 3, iters=10, seed=5)
    np.testing.assert_allclose(np.linalg.norm(book, axis=1), 1.0)
    best = np.degrees(np.arccos(np.clip(centres @ book.T, -1, 1))).min(axis=1)
    assert best.max() < 1.0  # every true direction has a codeword within a degree
    np.testing.assert_array_equal(book, kmeans_codebook(points, 3, iters=10, seed=5))
    with pytest.raises(ValueError, match="at least k=4"):
        kmeans_codebook(points[:3], 4, iters=1, seed=0)


def test_kmeans_reseeds_an_empty_cluster():
    # 5 copies of 2 directions: with 3 clusters one starts as a duplicate and must be re-seeded, not NaN
    points = np.array([A] * 5 + [B] * 5 + [_unit([1.0, 1.0, 0.0])])
    book = kmeans_codebook(points, 3, iters=5, seed=0)
    assert np.isfinite(book).all()
    np.testing.assert_allclose(np.linalg.norm(book, axis=1), 1.0)


def test_load_vocab_reads_the_benchmark_layout(tmp_path):
    vocab = np.array([[0.0, 0.0, -2.0], [3.0, 0.0, 0.0]])  # unnormalised on purpose
    struct = np.empty((1, 1), dtype=[("normals", object)])
    struct[0, 0]["normals"] = vocab
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = struct
    scipy.io.savemat(tmp_path / "vocab40.mat", {"vocabs": cell})
    np.testing.assert_allclose(load_vocab(tmp_path / "vocab40.mat"), [[0, 0, -1], [1, 0, 0]])
    scipy.io.savemat(tmp_path / "bad.mat", {"other": np.zeros(3)})
    with pytest.raises(ValueError, match="vocabs"):
        load_vocab(tmp_path / "bad.mat")


def test_upsampling_is_bilinear_at_cell_centres_then_renormalised():
    coarse = torch.tensor(np.stack([A, B], axis=-1)[None, :, None, :], dtype=torch.float64)  # (1, 3, 1, 2)
    grid = CellGrid(np.array([0.5]), np.array([1.0, 3.0]), (1.0, 2.0), (1, 4))  # cells centred at x = 1 and 3
    up = upsample_normals(coarse, grid)[0, :, 0].numpy().T
    # pixel centres x = 0.5, 1.5, 2.5, 3.5 sit at cell positions -0.25, 0.25, 0.75, 1.25 (clamped to 0 and 1)
    np.testing.assert_allclose(up, _unit([A, 0.75 * A + 0.25 * B, 0.25 * A + 0.75 * B, B]), atol=1e-12)
    stored = full_resolution(np.stack([A, B])[None].astype(np.float32), replace(grid, ys=np.array([1.0]),
                                                                                size=(2, 4)), np.float16)
    assert stored.dtype == np.float16 and stored.shape == (2, 4, 3)
    np.testing.assert_allclose(stored[1, 1], up[1], atol=1e-3)


# ------------------------------------------------------------------------------------------- targets

def test_coarse_targets_average_valid_normals_per_cell():
    normals = np.zeros((4, 4, 3), np.float32)
    normals[:, :2], normals[:, 2:] = A, B
    valid = np.ones((4, 4), bool)
    halves = CellGrid(np.array([2.0]), np.array([1.0, 3.0]), (4.0, 2.0), (4, 4))  # windows: columns 0-1, 2-3
    grid, ok = coarse_targets(normals, valid, halves, min_valid=0.5)
    assert ok.all()
    np.testing.assert_allclose(grid[0], [A, B], atol=1e-6)
    whole = CellGrid(np.array([2.0]), np.array([2.0]), (4.0, 4.0), (4, 4))  # one cell over both halves
    grid, ok = coarse_targets(normals, valid, whole, min_valid=0.5)
    np.testing.assert_allclose(grid[0, 0], _unit(A + B), atol=1e-6)
    valid[:, 1:] = False  # left cell: 1 of 2 columns valid (50%), right cell: none
    grid, ok = coarse_targets(normals, valid, halves, min_valid=0.5)
    assert ok.tolist() == [[True, False]] and (grid[0, 1] == 0).all()
    _, ok = coarse_targets(normals, valid, halves, min_valid=0.51)
    assert not ok.any()


def test_coarse_targets_drop_cells_whose_normals_cancel():
    normals = np.zeros((2, 2, 3), np.float32)
    normals[:, 0], normals[:, 1] = A, -A
    whole = CellGrid(np.array([1.0]), np.array([1.0]), (2.0, 2.0), (2, 2))
    _, ok = coarse_targets(normals, np.ones((2, 2), bool), whole, min_valid=0.5)
    assert not ok.any()


def test_flipped_batches_mirror_images_and_negate_x():
    images = np.zeros((1, 4, 8, 3), np.uint8)
    images[0, :, 0] = 255  # a bright left column
    normals = np.zeros((1, 1, 2, 3), np.float32)
    normals[0, 0, 0] = _unit([0.6, 0.0, -0.8])  # left cell faces right
    normals[0, 0, 1] = [0.0, 0.0, -1.0]
    mirrored = np.zeros_like(normals)  # the targets of the mirrored image, as load_train computes them
    mirrored[0, 0, 0], mirrored[0, 0, 1] = [0.0, 0.0, -1.0], _unit([-0.6, 0.0, -0.8])
    data = TrainSet(images, normals, np.ones((1, 1, 2), bool), mirrored, np.ones((1, 1, 2), bool))
    book = torch.tensor(_unit([[0.6, 0.0, -0.8], [-0.6, 0.0, -0.8], [0.0, 0.0, -1.0]]), dtype=torch.float32)
    x, codes = _batch(data, torch.tensor([0]), torch.tensor([False]), book, "cpu")
    assert codes.tolist() == [[[0, 2]]] and x[0, :, :, 0].min() == 255
    x, codes = _batch(data, torch.tensor([0]), torch.tensor([True]), book, "cpu")
    # mirrored: the facing-right cell is now on the right and faces left (codeword 1)
    assert codes.tolist() == [[[2, 1]]] and x[0, :, :, 7].min() == 255 and x[0, :, :, 0].max() == 0


# --------------------------------------------------------------------------------------- NYU files

def _write_matlab_layout(path, n: int) -> np.ndarray:
    """A labeled .mat as MATLAB v7.3 stores it: h5py sees (N, 3, 640, 480) and (N, 640, 480)."""
    images = np.zeros((n, 480, 640, 3), np.uint8)
    for i in range(n):
        images[i, 5, 100] = (10 + i, 20, 30)  # row 5, column 100 of image i
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        depth = np.full((n, 480, 640), 2.0, np.float32)
        depth[:, 7, 300] = 3.5
        f["depths"] = depth.transpose(0, 2, 1)
        f["rawDepths"] = depth.transpose(0, 2, 1)
    return images


def test_open_nyu_swaps_matlab_axes_and_makes_splits_zero_based(tmp_path):
    images = _write_matlab_layout(tmp_path / "nyu_depth_v2_labeled.mat", 3)
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1.0], [3.0]]), "testNdxs": np.array([[2.0]])})
    nyu, train, test = open_nyu(tmp_path)
    assert train.tolist() == [0, 2] and test.tolist() == [1]
    np.testing.assert_array_equal(nyu.image(1), images[1])
    assert nyu.image(2)[5, 100].tolist() == [12, 20, 30]
    assert nyu.raw_depth(0).shape == (480, 640) and nyu.raw_depth(0)[7, 300] == 3.5
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1.0]]), "testNdxs": np.array([[4.0]])})
    with pytest.raises(ValueError, match="index 4 .*beyond the 3 images"):
        open_nyu(tmp_path)


def test_open_nyu_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nyu_depth_v2_labeled.mat not found"):
        open_nyu(tmp_path)


def test_ground_truth_source_selection(tmp_path):
    from ctxrepro.data.nyu import NyuLabeled
    from ctxrepro.normals.depth import PlaneFit, normals_from_depth

    _write_matlab_layout(tmp_path / "nyu_depth_v2_labeled.mat", 2)
    nyu = NyuLabeled(tmp_path / "nyu_depth_v2_labeled.mat")
    fit = PlaneFit(window=5, step=1, min_points=9)
    gt, name = ground_truth(tmp_path, "depth", nyu, fit)
    assert name == "depth" and isinstance(gt, DepthGroundTruth)
    normals, valid = gt(0)
    want, want_valid = normals_from_depth(nyu.raw_depth(0), fit=fit)
    np.testing.assert_array_equal(normals, want)
    np.testing.assert_array_equal(valid, want_valid)
    with pytest.raises(FileNotFoundError, match="all_normals.pklz not found"):
        ground_truth(tmp_path, "fair", nyu, fit)
    with pytest.raises(ValueError, match="'auto' is not one of"):  # no fall-back from FAIR to depth
        ground_truth(tmp_path, "auto", nyu, fit)


def test_fair_ground_truth_masks_and_checks_counts(tmp_path):
    import gzip
    import pickle

    normals = np.zeros((2, 480, 640, 3), np.float32)
    normals[..., 2] = -1.0
    normals[1, 0, 0] = 0.0  # no normal here, even though the mask says valid
    masks = np.ones((2, 480, 640), bool)
    masks[0, 1, 1] = False
    folder = tmp_path / "surfacenormal_metadata"
    folder.mkdir()
    with gzip.open(folder / "all_normals.pklz", "wb") as f:
        pickle.dump({"all_normals": normals, "all_valid_depth_masks": masks, "all_filenames": ["a", "b"]}, f)
    gt = FairGroundTruth(folder / "all_normals.pklz", 2)
    n, v = gt(1)
    assert n.dtype == np.float32 and not v[0, 0] and v.sum() == 480 * 640 - 1
    assert not gt(0)[1][1, 1]
    with pytest.raises(ValueError, match="do not match the 3 images"):
        FairGroundTruth(folder / "all_normals.pklz", 3)


# ------------------------------------------------------------------------------------ outputs

def test_npz_writer_streams_rows_and_is_complete_or_absent(tmp_path):
    path = tmp_path / "out" / "p.npz"
    rows = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    with npz_writer(path, "normals", rows.shape, np.float16, {"index": np.array([7, 9])}) as write:
        write(rows[:1])
        write(rows[1:])
    with np.load(path) as z:
        np.testing.assert_array_equal(z["normals"], rows.astype(np.float16))
        assert z["index"].tolist() == [7, 9]
    with pytest.raises(ValueError, match="got 1 of 2 rows"):
        with npz_writer(tmp_path / "short.npz", "normals", rows.shape, np.float16) as write:
            write(rows[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial file left behind
    assert zipfile.is_zipfile(path)


def test_table2_has_the_paper_rows_beside_ours():
    ours = {"mean": 40.04, "median": 30.0, "rmse": 45.55, "within_11.25": 20.0, "within_22.5": 40.0,
            "within_30": 50.0}
    text = table2_markdown([("ours (this run)", ours)], "note")
    lines = text.splitlines()
    assert "| Ours (paper) | 33.2 | 21.3 | 36.0 | 51.2 | 57.8 | – |" in lines
    assert "| Scratch (paper) | 38.6 | 26.5 | 33.1 | 46.8 | 52.5 | – |" in lines
    assert "| ours (this run) | 40.0 | 30.0 | 20.0 | 40.0 | 50.0 | 45.5 |" in lines
    assert lines[-1] == "note"


def test_combined_table_has_one_row_per_metrics_file(tmp_path):
    import json

    for init, mean in (("scratch", 30.0), ("ours", 25.0)):
        m = {"mean": mean, "median": 20.0, "rmse": 35.0, "within_11.25": 30.0, "within_22.5": 50.0,
             "within_30": 60.0, "steps": 10}
        (tmp_path / f"{init}.json").write_text(json.dumps(m))
    rows = [line for line in combined_table(sorted(tmp_path.glob("*.json"))).splitlines() if "this run" in line]
    assert rows == ["| ours (this run) | 25.0 | 20.0 | 30.0 | 50.0 | 60.0 | 35.0 |",
                    "| scratch (this run) | 30.0 | 20.0 | 30.0 | 50.0 | 60.0 | 35.0 |"]


# ----------------------------------------------------------------------------------- training

class _ToyTrunk(nn.Module):
    """A 4x-downsampling conv trunk: enough to learn normals coded by colour."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        return torch.relu(self.conv(x / 255.0))


def _toy_data(n: int, seed: int) -> tuple[TrainSet, np.ndarray]:
    """Images whose 4x4 blocks are red or blue; red blocks face left, blue ones the camera."""
    book = _unit([[-0.8, 0.0, -0.6], [0.0, 0.0, -1.0]])
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 4, 4))
    colours = np.array([[200, 30, 30], [30, 30, 200]], np.uint8)
    images = np.kron(colours[labels].transpose(0, 3, 1, 2), np.ones((1, 1, 4, 4), np.uint8)).transpose(0, 2, 3, 1)
    normals, valid = book[labels].astype(np.float32), np.ones((n, 4, 4), bool)
    mirrored = np.ascontiguousarray(normals[:, :, ::-1] * np.float32([-1, 1, 1]))  # the toy trunk is symmetric
    return TrainSet(np.ascontiguousarray(images), normals, valid, mirrored, valid.copy()), book


def test_training_learns_and_is_deterministic():
    data, book = _toy_data(8, seed=0)
    settings = TrainSettings(steps=60, batch=4, optimizer="adam", lr=0.02, weight_decay=0.0, flip=False,
                             seed=3, log_every=20)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        trunk = _ToyTrunk()
        channels, h, w = trunk_output(trunk, (16, 16), "cpu")
        assert (channels, h, w) == (8, 4, 4)
        net = build_net(trunk, channels, 8, len(book), seed=3)
        stats = train_normals(net, data, book, settings, "cpu", LOG)
        nets.append(net)
    assert stats["train_loss"] < 0.1 and stats["steps"] == 60
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    test, _ = _toy_data(2, seed=1)
    pred = predict_coarse(nets[0], test.images, book, batch=1, device="cpu")
    err = np.degrees(np.arccos(np.clip(np.einsum("...i,...i->...", pred, test.normals), -1, 1)))
    # every cell decodes nearer its own codeword than the other (53 degrees apart), most almost exactly
    assert err.max() < 26.0 and np.median(err) < 1.0


def test_build_net_head_init_depends_only_on_the_seed():
    a = build_net(_ToyTrunk(), 8, 4, 3, seed=1).head
    b = build_net(_ToyTrunk(), 8, 4, 3, seed=1).head
    c = build_net(_ToyTrunk(), 8, 4, 3, seed=2).head
    assert torch.equal(a[0].weight, b[0].weight) and not torch.equal(a[0].weight, c[0].weight)


def test_training_refuses_a_grid_mismatch():
    data, book = _toy_data(2, seed=0)
    bad = TrainSet(data.images, data.normals[:, :2], data.valid[:, :2], data.normals[:, :2], data.valid[:, :2])
    net = build_net(_ToyTrunk(), 8, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"output grid \(4, 4\) differs"):
        train_normals(net, bad, book, TrainSettings(steps=1, batch=1), "cpu", LOG)


# --------------------------------------------------------------------------------- stage, end to end

def _tiny_world(root, images: int, train: int) -> None:
    from ctxrepro.world.nyu import NORMALS_ZIP, write_nyu
    from ctxrepro.world.spec import WorldSpec

    nyu_dir = root / "data/raw/nyuv2"
    nyu_dir.mkdir(parents=True)
    write_nyu(nyu_dir, WorldSpec(nyu_images=images, nyu_train=train), seed=4)
    with zipfile.ZipFile(nyu_dir / NORMALS_ZIP) as zf:  # as fetch extracts it
        zf.extractall(nyu_dir)


def _tiny_trunk(root, init: str) -> None:
    from ctxrepro.transfer.trunk import TrunkSpec, build_trunk, save_checkpoint

    torch.manual_seed(0)
    spec = TrunkSpec(tower="small", width=8, conv6=32, conv6_kernel=2, conv6b=16, fc7=16, input_side=64)
    trunk, head = build_trunk(spec)
    trunk.input.scale.fill_(1.0 / 128)
    save_checkpoint(root / f"models/convert/{init}.pt", trunk, head, init, [], None, {})


@pytest.mark.slow
def test_stage_end_to_end_on_a_tiny_world(tmp_path):
    from ctxrepro.config import BaseParams
    from ctxrepro.data.nyu import load_normals, read_splits
    from ctxrepro.metrics.normals import KEYS, evaluate_arrays
    from ctxrepro.normals.depth import PlaneFit
    from ctxrepro.stage import StageContext, StageError
    from stages.normals import Params, run

    _tiny_world(tmp_path, images=5, train=3)
    _tiny_trunk(tmp_path, "scratch")
    ctx = StageContext(base=BaseParams(seed=0, device="cpu"), device="cpu", log=LOG, root=tmp_path)
    params = Params(init="scratch", input_height=96, input_width=128, head_channels=8, steps=3, batch=2,
                    optimizer="adam", kmeans_samples=50, examples=2, log_every=1)
    run(params, ctx)

    _, test = read_splits(tmp_path / "data/raw/nyuv2/splits.mat")
    with np.load(tmp_path / "data/normals/scratch/predictions.npz") as z:
        pred, index = z["normals"], z["index"]
    assert pred.shape == (2, 480, 640, 3) and pred.dtype == np.float16
    assert index.tolist() == test.tolist()
    np.testing.assert_allclose(np.linalg.norm(pred.astype(np.float64), axis=-1), 1.0, atol=2e-3)
    import json

    metrics = json.loads((tmp_path / "metrics/normals/scratch.json").read_text())
    gt = load_normals(tmp_path / "data/raw/nyuv2/surfacenormal_metadata/all_normals.pklz")
    again = evaluate_arrays(pred, gt["all_normals"][index], gt["all_valid_depth_masks"][index])
    assert {k: metrics[k] for k in KEYS} == again  # the stored predictions are what was scored
    assert metrics["test_images"] == 2 and metrics["train_images"] == 3 and metrics["steps"] == 3
    table = (tmp_path / "plots/normals/scratch/table2.md").read_text()
    assert "| scratch (this run) | " in table and "codebook `vocab` (40)" in table
    assert (tmp_path / "plots/normals/scratch/examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [path] = (tmp_path / "models/normals_state/scratch").glob("*/last.pt")  # the resume state, in its config's folder
    assert load_checkpoint(path)["step"] == 3
    assert not (tmp_path / "data/normals/.inputs").exists() or not any((tmp_path / "data/normals/.inputs").iterdir())

    assert (metrics["gt_source"], metrics["codebook"], metrics["codebook_size"]) == ("fair", "vocab", 40)

    # without the FAIR pickle, Table 2's protocol stops with the file named: no silent fall-back to depth
    (tmp_path / "data/raw/nyuv2/surfacenormal_metadata/all_normals.pklz").unlink()
    small = dict(init="scratch", input_height=96, input_width=128, head_channels=8, steps=1, batch=2, clusters=6,
                 kmeans_samples=50, examples=1, depth_fit=PlaneFit(window=9, step=4, min_points=6))
    with pytest.raises(StageError, match="all_normals.pklz not found: fetch nyuv2 with nyuv2_surfacenormal_metadata"):
        run(Params(**small), ctx)
    # asked for explicitly: ground truth from depth, codebook from k-means on training normals
    run(Params(**small, gt_source="depth", codebook="kmeans"), ctx)
    table = (tmp_path / "plots/normals/scratch/table2.md").read_text()
    assert "ground truth `depth`, codebook `kmeans` (6)" in table
    metrics = json.loads((tmp_path / "metrics/normals/scratch.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in KEYS)
    assert (metrics["gt_source"], metrics["codebook"], metrics["codebook_size"]) == ("depth", "kmeans", 6)


def test_stage_params_are_validated_with_the_key_named():
    from ctxrepro.config import ParamsError, parse_dataclass
    from stages.normals import Params

    p = parse_dataclass(Params, {"init": "scratch", "depth_fit": {"window": 9, "step": 4}}, "normals")
    assert p.init == "scratch" and p.depth_fit.window == 9 and p.input_size == (480, 640)
    with pytest.raises(ParamsError, match="init='../x'"):
        parse_dataclass(Params, {"init": "../x"}, "normals")
    with pytest.raises(ParamsError, match="odd"):
        parse_dataclass(Params, {"depth_fit": {"window": 4}}, "normals")
    with pytest.raises(ParamsError, match="normals.codebook"):
        parse_dataclass(Params, {"codebook": "random"}, "normals")
    for key in ("gt_source", "codebook"):  # Table 2's protocol is chosen, never a fall-back
        with pytest.raises(ParamsError, match=f"normals.{key}: 'auto' is not allowed"):
            parse_dataclass(Params, {key: "auto"}, "normals")
