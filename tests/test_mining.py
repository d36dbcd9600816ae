"""Visual data mining (paper section 4.5): geometric verification by hand, constellation sampling, the
greedy cluster cover of section 4.5.1 on a constructed problem, the memory-bounded search against a
brute-force reference, a planted-object collection, and the `mine` stage end to end on the tiny world."""

import json
import logging

import cv2
import numpy as np
import pytest
import torch

from ctxrepro.mining.constellations import (GridLayout, SearchConfig, geometric_verify, mine, rank_constellations,
                                            sample_constellations, select_clusters, verify_batch)
from ctxrepro.mining.search import BankSpec, FeatureBank, build_bank, grid_geometry, image_grids, search
from ctxrepro.pretext.model import build_model

LOG = logging.getLogger("test_mining")


def square(x0, y0, a):
    """Centres TL, TR, BL, BR of an axis-aligned square of side a, top-left centre at (x0, y0); y down."""
    return np.array([[x0, y0], [x0 + a, y0], [x0, y0 + a], [x0 + a, y0 + a]], dtype=float)


# ---------------------------------------------------------------- geometric verification (issue 9's rule)

def test_perfect_square_verifies_with_zero_error():
    ok, err = geometric_verify(square(10, 10, 10), [10, 10, 10, 10])
    assert ok and err == 0.0


@pytest.mark.parametrize("spacing, sides, expected_error, ok", [
    # spacing 20, patches 10: s* = 20 clamped to 4/3 * 10 = 40/3; each centre is 10/3 off its corner on
    # both axes: 4 * 2 * (10/3)^2 / (40/3)^2 = (800/9) / (1600/9) = 0.5
    (20, 10, 0.5, True),
    # spacing 22: off by (22 - 40/3) / 2 = 13/3: 8 * (13/3)^2 / (1600/9) = 1352/1600
    (22, 10, 1352 / 1600, True),
    # spacing 24: off by 16/3: 8 * 256/9 / (1600/9) = 2048/1600 > 1: just past the upper limit
    (24, 10, 2048 / 1600, False),
    # spacing 4, patches 10: s* = 4 clamped up to 20/3; off by 4/3: 8 * 16/9 / (400/9) = 0.32
    (4, 10, 0.32, True),
])
def test_square_at_the_side_limits(spacing, sides, expected_error, ok):
    got_ok, err = geometric_verify(square(50, 50, spacing), [sides] * 4)
    assert err == pytest.approx(expected_error) and got_ok is ok


@pytest.mark.parametrize("order", [(3, 1, 2, 0), (0, 2, 1, 3), (2, 3, 0, 1)])
def test_shuffled_order_fails(order):
    # 180-degree swap, transpose, vertical flip: s* = 0 in all three (hand: the signed sums cancel), clamped
    # to 20/3 about the centre (15, 15). Swap TL/BR: TL and BR centres are 25/3 off per axis, TR and BL 5/3:
    # (2 * 2 * 625/9 + 2 * 2 * 25/9) / (400/9) = 2600/400 = 6.5. The transpose and the flip give the same.
    ok, err = geometric_verify(square(10, 10, 10)[list(order)], [10] * 4)
    assert not ok and err == pytest.approx(6.5)


def test_rescaled_square():
    base = geometric_verify(square(10, 10, 10) + [[0.3, -0.4], [0, 0.2], [0.5, 0], [-0.1, 0.1]], [10, 9, 11, 10])
    scaled = geometric_verify(3 * (square(10, 10, 10) + [[0.3, -0.4], [0, 0.2], [0.5, 0], [-0.1, 0.1]]),
                              [30, 27, 33, 30])
    assert scaled[0] == base[0] and scaled[1] == pytest.approx(base[1])  # the error is scale-free
    # the square scaled by 3 while the matched patches stay 10 px: s = 40/3, off by (30 - 40/3)/2 = 25/3:
    # 8 * 625/9 / (1600/9) = 3.125
    ok, err = geometric_verify(square(10, 10, 30), [10] * 4)
    assert not ok and err == pytest.approx(3.125)


def test_batch_matches_scalar_and_brute_force_fit():
    rng = np.random.default_rng(3)
    centers = square(0, 0, 20)[None] + rng.normal(0, 6, (200, 4, 2))
    sides = rng.uniform(12, 30, (200, 4))
    ok, err = verify_batch(centers, sides)
    assert 20 < ok.sum() < 190  # the cases exercise both verdicts
    for i in range(0, 200, 37):
        assert geometric_verify(centers[i], sides[i]) == (bool(ok[i]), pytest.approx(err[i]))
        # independent check: brute-force least squares over a fine grid of allowed sides (for any side the
        # best centre is the mean, since the corner signs sum to zero), then the ratio
        m = sides[i].mean()
        grid = np.linspace(2 / 3 * m, 4 / 3 * m, 4001)
        signs = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]])
        corners = centers[i].mean(axis=0) + grid[:, None, None] / 2 * signs
        sse = np.square(centers[i] - corners).sum(axis=(1, 2))
        s_best = grid[np.argmin(sse)]
        assert err[i] == pytest.approx(sse.min() / s_best ** 2, rel=2e-3)


def test_verify_rejects_bad_input():
    with pytest.raises(ValueError, match="sides"):
        geometric_verify(square(0, 0, 1), [1, 1, 0, 1])
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 2\)"):
        geometric_verify(np.zeros((3, 2)), [1, 1, 1])


# ---------------------------------------------------------------- constellations, ranking, cluster cover

def test_constellations_are_adjacent_2x2_and_spread_over_images():
    layouts = [GridLayout((0,), (3,), (3,)), GridLayout((0, 12), (4, 2), (3, 2)), GridLayout((), (), ())]
    # image 0, step 1: top-left cells 0, 1, 3, 4 of its 3x3 grid
    all_rows = sample_constellations(layouts, 100, 1, np.random.default_rng(0))
    img0 = sorted(map(tuple, all_rows[all_rows[:, 0] == 0].tolist()))
    assert img0 == [(0, 0, 1, 3, 4), (0, 1, 2, 4, 5), (0, 3, 4, 6, 7), (0, 4, 5, 7, 8)]
    # image 1: 3 x 2 positions on its 4x3 grid, 1 on its 2x2 grid (offset 12): (12, 13, 14, 15)
    img1 = set(map(tuple, all_rows[all_rows[:, 0] == 1].tolist()))
    assert len(img1) == 7 and (1, 12, 13, 14, 15) in img1 and (1, 7, 8, 10, 11) in img1
    assert len(all_rows) == 11  # every valid position once; image 2 has none
    few = sample_constellations(layouts, 6, 1, np.random.default_rng(0))
    assert np.bincount(few[:, 0], minlength=3).tolist() == [3, 3, 0]  # round-robin: one each per round
    wide = sample_constellations(layouts, 100, 2, np.random.default_rng(0))
    assert sorted(map(tuple, wide.tolist())) == [(0, 0, 2, 6, 8), (1, 0, 2, 6, 8), (1, 3, 5, 9, 11)]


def test_ranking_by_verified_count_then_strength():
    verified = np.array([[1, 0, 1], [1, 1, 1], [1, 0, 1], [0, 0, 0]], bool)
    scores = np.array([[3, 2, 1], [1, 1, 1], [3, 9, 2], [9, 9, 9]], float)
    # 1 has 3 verified; 0 and 2 have 2 each, 2 stronger (3 + 2 > 3 + 1); 3 has none
    assert rank_constellations(verified, scores).tolist() == [1, 2, 0, 3]


def test_cluster_cover_on_a_constructed_problem():
    members = [np.array(m, dtype=np.int64) for m in ([0, 1, 2], [0, 1], [2, 3], [4], [1, 2], [], [3, 4])]
    # Level 1: 0 (new 0,1,2), 1 adds nothing, 2 (new 3), 3 (new 4), 4 and 6 add nothing; image 5 is in no
    # cluster. Level 2: 1 (0 and 1 once), 4 skipped (1 and 2 now twice), 6 (3, 4 once). Level 3: 4.
    sel = select_clusters(members, range(7), 6, 100)
    assert sel.clusters == (0, 2, 3, 1, 6, 4) and sel.levels == (1, 1, 1, 2, 2, 3)
    assert sel.coverage.tolist() == [2, 3, 3, 2, 2, 0]
    assert select_clusters(members, range(7), 6, 4).clusters == (0, 2, 3, 1)
    # rank order decides. Ranking 6, 4, 0, 2, 3, 1: level 1 picks 6 (new 3, 4), 4 (new 1, 2), 0 (new 0);
    # 2, 3 and 1 add nothing. Level 2 picks 2 (3 once), 3 (4 once), 1 (0 once).
    sel = select_clusters(members, [6, 4, 0, 2, 3, 1], 6, 100)
    assert sel.clusters == (6, 4, 0, 2, 3, 1) and sel.levels == (1, 1, 1, 2, 2, 2)


# ---------------------------------------------------------------- feature bank and search

def test_grid_geometry_in_original_pixels():
    spec = BankSpec(patch=20, net_size=20, scales=(1.0, 0.5), grid_step=2)
    g1, g2 = image_grids(100, 60, spec)
    # scale 1: rows (60-20)//10+1 = 5, cols 9, no slack; scale 0.5: 50x30 -> 2 x 4
    assert (g1.rows, g1.cols, g1.x0, g1.y0) == (5, 9, 0, 0)
    assert (g2.width, g2.height, g2.rows, g2.cols) == (50, 30, 2, 4)
    boxes, centers, sides = grid_geometry(100, 60, [g2], 20, 10)
    assert boxes.tolist() == [[0, 0], [0, 10], [0, 20], [0, 30], [10, 0], [10, 10], [10, 20], [10, 30]]
    assert centers[:4].tolist() == [[20, 20], [40, 20], [60, 20], [80, 20]] and centers[4, 1] == 40
    assert sides.tolist() == [40.0] * 8
    # a slack of 5 px is split: 105 wide at scale 1 -> cols 9, x0 = (85 - 80) // 2 = 2
    assert image_grids(105, 60, spec)[0].x0 == 2


@pytest.mark.parametrize("color", ["drop", "drop_uniform"])
def test_drop_views_match_trainings_order(color):
    """Training: keep channel k, noise in the others, RMS 50 at 48 px, then area-resize to 32 px. The
    mining shortcut resizes once and scales by the expected RMS: the kept channel must agree."""
    import torch.nn.functional as F

    from ctxrepro.mining.search import drop_views
    from ctxrepro.pretext.color import PatchAugment, normalize_rms

    g = torch.Generator().manual_seed(0)
    x = torch.rand((5, 3, 48, 48), generator=g) * 255
    x = x - x.mean(dim=(2, 3), keepdim=True)
    cfg = PatchAugment.for_patch(48, color=color, downsample_prob=0.0)
    views = drop_views(x, cfg, 32, g).view(3, 5, 3, 32, 32)
    for k in range(3):
        ref = torch.zeros_like(x)
        ref[:, k] = x[:, k]
        std = x[:, k].square().mean(dim=(1, 2)).sqrt()
        noise = (torch.randn((5, 2, 48, 48), generator=g) * 0.01 * std[:, None, None, None] if color == "drop"
                 else torch.rand((5, 2, 48, 48), generator=g) - 0.5)
        ref[:, [c for c in range(3) if c != k]] = noise
        ref = F.interpolate(normalize_rms(ref, 50.0), size=(32, 32), mode="area")
        assert torch.allclose(views[k][:, k], ref[:, k], rtol=1e-3, atol=1e-3)
        # the other channels are noise with training's spread, in the view's scale
        small = F.interpolate(x, size=(32, 32), mode="area")[:, k]
        scale = (views[k][:, k] * small).sum(dim=(1, 2)) / small.square().sum(dim=(1, 2))
        spread = 0.01 * std if color == "drop" else torch.full_like(std, 12 ** -0.5)
        noise_std = views[k][:, [c for c in range(3) if c != k]].std(dim=(1, 2, 3))
        assert torch.allclose(noise_std, spread * scale, rtol=0.1)


def random_bank(rng, n=7, p=5, d=6):
    feats = rng.normal(size=(n, p, d))
    feats /= np.linalg.norm(feats, axis=2, keepdims=True)
    valid = np.ones((n, p), bool)
    valid[2, 3:] = False  # image 2 has only 3 patches
    valid[5] = False  # image 5 failed to decode
    return FeatureBank(tuple(f"im{i}" for i in range(n)), feats.astype(np.float16), valid,
                       rng.uniform(0, 100, (n, p, 2)).astype(np.float32), np.full((n, p), 10, np.float32),
                       [GridLayout((0,), (1,), (p,))] * n)


def brute_force(bank, cons, k):
    f = bank.feats.astype(np.float32)
    out = []
    for img, *pats in cons:
        sims = np.einsum("qd,npd->qnp", f[img, pats], f)
        sims[:, ~bank.valid] = -np.inf
        total = sims.max(axis=2).sum(axis=0)
        total[img] = -np.inf
        order = np.argsort(-total, kind="stable")[:k]
        out.append((order, total[order], sims.argmax(axis=2)[:, order].T))
    return out


def test_search_matches_brute_force_under_any_blocking():
    rng = np.random.default_rng(1)
    bank = random_bank(rng)
    cons = np.array([[0, 0, 1, 2, 3], [2, 0, 1, 2, 0], [6, 4, 3, 2, 1]])
    ref = brute_force(bank, cons, 4)
    for query_batch, block_mb in ((256, 256.0), (1, 1e-9)):  # 1e-9 MiB: one image per block
        got = search(bank, cons, 4, query_batch=query_batch, block_mb=block_mb)
        for c, (order, total, arg) in enumerate(ref):
            assert got.images[c].tolist() == order.tolist()
            assert got.scores[c] == pytest.approx(total, abs=1e-5)
            assert got.patches[c].tolist() == arg.tolist()
    assert 5 not in search(bank, cons, 10).images  # k capped at the 5 other images that hold features


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """20 noise images; a 64 px object in 6 of them and its quadrant-swapped copy in 3, grid-aligned."""
    d = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    obj = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
    scrambled = np.concatenate([np.concatenate([obj[32:, 32:], obj[32:, :32]], 1),
                                np.concatenate([obj[:32, 32:], obj[:32, :32]], 1)], 0)
    paths, where = [], {}
    for i in range(20):
        im = cv2.GaussianBlur(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), (0, 0), 2)
        if i < 9:
            y, x = (16 * rng.integers(0, 7, 2)).tolist()
            im[y:y + 64, x:x + 64] = obj if i < 6 else scrambled
            where[i] = (x, y)
        paths.append(d / f"{i:02d}.png")
        cv2.imwrite(str(paths[-1]), im)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return paths, where, d / "broken.jpg"


def test_planted_object_ranks_first_and_swapped_copies_fail(planted):
    paths, where, broken = planted
    torch.manual_seed(0)  # random weights: identical pixels still give identical features
    model = build_model("small", 32).eval()
    spec = BankSpec(patch=32, net_size=32, scales=(1.0,), grid_step=2, color="projection")
    # 9x9 grid per image, 7x7 constellations each: 980 in all, every one sampled
    res = mine(model, [*paths, broken], spec, SearchConfig(n_constellations=5000, top_k=8, query_batch=64),
               "cpu", seed=0, log=LOG)
    assert len(res.constellations) == 980 and str(broken) in res.bank.skipped
    top = res.ranking[:6]
    # the six constellations that sit exactly on an intact object, each verified in the 5 other intact
    # copies; the 3 swapped copies score as high (same four patches) but fail the geometry
    for j in top:
        img, tl = int(res.constellations[j, 0]), int(res.constellations[j, 1])
        assert img < 6 and (16 * (tl % 9), 16 * (tl // 9)) == where[img]
        assert set(res.candidates.images[j].tolist()) == set(range(9)) - {img}
        ok = res.verified[j]
        assert sorted(res.candidates.images[j][ok].tolist()) == sorted(set(range(6)) - {img})
        # quadrants turned 180 degrees, spacing = side = 32: s* = -32 clamps to 64/3 and every centre is
        # 16 + 32/3 = 80/3 off on both axes: 4 * 2 * (80/3)^2 / (64/3)^2 = 12.5
        assert np.allclose(res.errors[j][~ok], 12.5)
    assert sorted(int(res.constellations[j, 0]) for j in top) == list(range(6))
    assert res.verified[res.ranking[6:]].sum(axis=1).max() < 5


def test_bank_lists_unreadable_files(planted, tmp_path):
    paths, _, broken = planted
    spec = BankSpec(patch=32, net_size=32, scales=(1.0, 0.5), grid_step=2, color="drop", drop_views=True)
    torch.manual_seed(0)
    bank = build_bank(build_model("small", 32), [paths[0], broken], spec, "cpu", torch.Generator().manual_seed(0),
                      scratch=tmp_path)
    assert list(bank.skipped) == [str(broken)] and not bank.valid[1].any()
    assert bank.valid[0].sum() == 81 + 16  # 9x9 at scale 1, 4x4 at 0.5 (80 px: (80-32)//16+1)
    norms = np.linalg.norm(bank.feats[0][bank.valid[0]].astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)  # normalised correlation: unit vectors
    assert isinstance(bank.feats, np.memmap) and (tmp_path / "features.npy").is_file()


# ---------------------------------------------------------------- the stage, end to end on the tiny world

@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    """A repo root holding the tiny world's VOC 2007 and 2011 (fetched by the real fetch code) and a
    constructed pretrain export: a randomly initialised small tower, 48 px patches shrunk to 32 px."""
    from ctxrepro.data.fetch import fetch_dataset
    from ctxrepro.world import WorldSpec
    from ctxrepro.world import voc as world_voc
    from ctxrepro.world.archives import md5_file

    root = tmp_path_factory.mktemp("mine_world")
    src = root / "src"
    src.mkdir()
    spec = WorldSpec(voc07_trainval=12, voc07_test=12, voc11_trainval=16)
    world_voc.write_voc2007(src, spec, 0, spec.aberration_scale)
    world_voc.write_voc2011(src, spec, 0, spec.aberration_scale, [])
    (src / "MD5SUMS").write_text("".join(f"{md5_file(p)}  {p.name}\n" for p in sorted(src.glob("*.tar"))))
    for name in ("voc2007", "voc2011"):
        fetch_dataset(name, str(src), root / "data/raw" / name, root / "data/downloads", log=LOG)
    torch.manual_seed(0)
    model = build_model("small", 32)
    (root / "models" / "pretrain").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 0,
                "config": {"tower": "small", "patch": 32, "sample_patch": 48, "gap": 24, "jitter": 5,
                           "color": "drop"}}, root / "models/pretrain/color_dropping.pt")
    return root


def stage_params(**changes):
    from stages.mine import Params

    values = dict(scales=(1.0, 0.7), max_side=256, n_constellations=120, top_k=8, set_size=3, n_sets=20,
                  montage_clusters=6, montage_per_page=4, montage_matches=7, tile=32, html_thumbnails=5,
                  eval_constellations=150, workers=0, query_batch=32)
    values.update(changes)
    return Params(**values)


def run_stage(root, params):
    from ctxrepro.config import BaseParams
    from ctxrepro.stage import StageContext
    from stages.mine import run

    run(params, StageContext(base=BaseParams(seed=3), device="cpu", log=LOG, root=root))
    return json.loads((root / "metrics/mine.json").read_text())


def auc_by_hand(sets, labels):
    """Section 4.5.1 from its text: a set's purity is the share of its images that hold its most common
    category; walking down the sets by purity (ties in mined order), each step adds mean purity so far times
    the coverage it adds (share of the labelled images in some set so far); also with coverage capped at 0.5."""
    from collections import Counter

    purity = [max(Counter(c for i in s for c in set(labels[i])).values(), default=0) / len(s) for s in sets]
    order = sorted(range(len(sets)), key=lambda k: (-purity[k], k))
    seen, total, area, half, prev = set(), 0.0, 0.0, 0.0, 0.0
    for n, k in enumerate(order, start=1):
        total += purity[k]
        seen |= set(sets[k])
        cover = len(seen) / len(labels)
        area += total / n * (cover - prev)
        half += total / n * (min(cover, 0.5) - min(prev, 0.5))
        prev = cover
    return area, half


def voc07_labels_by_hand(root, classes):
    """The evaluation subset read straight from the XML files (independent of ctxrepro.data.voc)."""
    import xml.etree.ElementTree as ET

    devkit = root / "data/raw/voc2007/VOCdevkit/VOC2007"
    labels = {}
    for split in ("trainval", "test"):
        for image_id in (devkit / f"ImageSets/Main/{split}.txt").read_text().split():
            names = {o.findtext("name") for o in ET.parse(devkit / f"Annotations/{image_id}.xml").findall("object")}
            if names & set(classes):
                labels[image_id] = sorted(names & set(classes))
    return labels


@pytest.mark.slow
def test_mine_stage_end_to_end_on_the_tiny_world(world_root):
    """The stage's AUCs equal a hand computation on its sets and the labels read from the XML. Mutations caught
    (checked by hand): sets ranked by ascending purity in ctxrepro.metrics.purity, purity counted over labels
    instead of images, coverage over the sets' images instead of the whole evaluated set."""
    params = stage_params(set_size=2, eval_constellations=400)  # enough verified clusters for 9 sets
    metrics = run_stage(world_root, params)
    for key in ("auc", "auc_at_0.5", "n_constellations", "n_verified", "n_clusters_selected"):
        assert key in metrics
    assert metrics["images"] == 16 and metrics["n_constellations"] == 120 and metrics["top_k"] == 8
    assert 0.0 <= metrics["auc_at_0.5"] <= min(0.5, metrics["auc"]) + 1e-12 and metrics["auc"] <= 1.0
    data = world_root / "data/mine"
    labels = json.loads((data / "labels.json").read_text())
    assert labels == voc07_labels_by_hand(world_root, params.eval_classes) and metrics["eval_images"] == len(labels)
    sets = json.loads((data / "sets.json").read_text())
    assert 0 < len(sets) == metrics["n_clusters_selected"] <= params.n_sets  # never vacuous: 9 sets here
    assert all(len(s) == params.set_size == len(set(s)) and set(s) <= set(labels) for s in sets)
    # the stage's numbers, derived again from the hand-read labels by section 4.5.1's text (not the code's)
    auc, auc_half = auc_by_hand(sets, voc07_labels_by_hand(world_root, params.eval_classes))
    assert metrics["auc"] == pytest.approx(auc) and metrics["auc_at_0.5"] == pytest.approx(auc_half)
    ranking = json.loads((data / "ranking.json").read_text())["ranking"]
    assert len(ranking) == 120 and sum(r["verified"] for r in ranking) == metrics["n_verified"]
    assert [r["verified"] for r in ranking] == sorted((r["verified"] for r in ranking), reverse=True)
    page = (world_root / "reports/mine.html").read_text()
    assert page.count("<tr><td>") == 120 and page.count('src="data:image/jpeg;base64,') == 5
    from PIL import Image

    pngs = sorted((world_root / "plots/mine").glob("clusters_*.png"))
    assert pngs and all(Image.open(p).size[0] > 9 * params.tile for p in pngs)
    assert (world_root / "plots/mine/purity_coverage.csv").read_text().startswith("coverage,purity\n")
    # same seed, same outputs
    second = run_stage(world_root, params)
    assert {k: v for k, v in second.items() if k != "seconds"} == {k: v for k, v in metrics.items() if k != "seconds"}
    assert json.loads((data / "ranking.json").read_text())["ranking"] == ranking


@pytest.mark.slow
def test_mine_stage_on_a_folder_without_evaluation(world_root, tmp_path):
    import shutil

    folder = world_root / "folder_src"
    shutil.copytree(world_root / "data/raw/voc2011/TrainVal/VOCdevkit/VOC2011/JPEGImages", folder / "a")
    (folder / "b").mkdir()
    (folder / "b/notes.txt").write_text("not an image")
    (folder / "b/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    metrics = run_stage(world_root, stage_params(source="folder", folder="folder_src", evaluate=False,
                                                 n_constellations=40))
    assert metrics["source"] == "folder" and "auc" not in metrics
    assert metrics["images"] == 16 and metrics["images_skipped"] == 1 and metrics["n_constellations"] == 40
    record = json.loads((world_root / "data/mine/ranking.json").read_text())
    assert list(record["skipped"]) == ["b/bad.png"] and record["ranking"][0]["image"].startswith("a/")


def test_mine_stage_says_what_is_missing(tmp_path):
    from ctxrepro.stage import StageError

    with pytest.raises(StageError, match=r"models/pretrain/color_dropping.pt not found: run `dvc repro pretrain`"):
        run_stage(tmp_path, stage_params())
