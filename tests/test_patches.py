"""Tests for ctxrepro.pretext.sampling: the grid sampler's invariants (section 3) and patch cutting."""

import pytest
import torch

from ctxrepro.pretext.sampling import batch_pairs, cut_patches, cut_patches_batch, grid_origin_range, sample_grid

# label of the second patch relative to the first: 0 1 2 / 3 . 4 / 5 6 7
LABEL_OF = {(-1, -1): 0, (-1, 0): 1, (-1, 1): 2, (0, -1): 3, (0, 1): 4, (1, -1): 5, (1, 0): 6,
            (1, 1): 7}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_boxes(height, width, seed, patch, gap, jitter, yoked=False):
    """Naive per-patch loop in the released code's style, with the documented draw order."""
    g, pitch = gen(seed), patch + gap
    max_oy = min(pitch - 1, height - patch - pitch)
    max_ox = min(pitch - 1, width - patch - pitch)
    oy = int(torch.randint(0, max_oy + 1, (1,), generator=g))
    ox = int(torch.randint(0, max_ox + 1, (1,), generator=g))
    rows, cols = (height - patch - oy) // pitch + 1, (width - patch - ox) // pitch + 1
    n = 1 if yoked else rows * cols
    jit = torch.randint(-jitter, jitter + 1, (n, 2), generator=g).tolist() if jitter else None
    boxes = []
    for r in range(rows):
        for c in range(cols):
            dy, dx = jit[0 if yoked else r * cols + c] if jit else (0, 0)
            y = min(max(oy + r * pitch + dy, 0), height - patch)
            x = min(max(ox + c * pitch + dx, 0), width - patch)
            boxes.append((y, x))
    return torch.tensor(boxes), rows, cols


def test_fixed_origin_2x2_exact_boxes_pairs_labels():
    # patch 4, gap 2: pitch 6; a 10x10 image leaves origin range [0, 0], so a 2x2 grid at 0 and 6
    boxes, pairs, labels = sample_grid(10, 10, gen(0), patch=4, gap=2, jitter=0)
    assert boxes.tolist() == [[0, 0], [0, 6], [6, 0], [6, 6]]
    # hand-derived for cells 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1), sorted by (first, label)
    assert pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 0], [1, 2], [1, 3],
                              [2, 0], [2, 1], [2, 3], [3, 0], [3, 1], [3, 2]]
    assert labels.tolist() == [4, 6, 7, 3, 5, 6, 1, 2, 4, 0, 1, 3]
    assert boxes.dtype == pairs.dtype == labels.dtype == torch.int64


def test_origin_range_hand_values():
    # pitch 6, patch 4: 20 px leaves room 10 -> capped at pitch-1 = 5; 10 px -> 0; 9 px -> none
    assert grid_origin_range(20, 4, 2) == 5
    assert grid_origin_range(10, 4, 2) == 0
    assert grid_origin_range(9, 4, 2) == -1
    assert grid_origin_range(16, 4, 2, min_cells=3) == 0
    # the paper's 96/48 grid: full range [0, 143] from 96 + 144 + 143 = 383 px on; 300 px -> 60
    assert grid_origin_range(383, 96, 48) == 143
    assert grid_origin_range(382, 96, 48) == 142
    assert grid_origin_range(300, 96, 48) == 60


def test_grid_without_jitter_matches_hand_layout():
    # 20x10, patch 4, gap 2: oy in [0,5]; oy<=4 gives 3 rows at oy, oy+6, oy+12; oy=5 gives 2 rows
    seen = set()
    for seed in range(60):
        boxes, _, _ = sample_grid(20, 10, gen(seed), patch=4, gap=2, jitter=0)
        oy = int(boxes[0, 0])
        seen.add(oy)
        expect = [[oy + 6 * r, 6 * c] for r in range(3 if oy <= 4 else 2) for c in range(2)]
        assert boxes.tolist() == expect
    assert seen == set(range(6))


@pytest.mark.parametrize("yoked", [False, True])
@pytest.mark.parametrize("size", [(300, 400), (250, 251), (500, 333), (240, 240)])
def test_boxes_equal_naive_reference(size, yoked):
    for seed in range(5):
        boxes, _, _ = sample_grid(*size, gen(seed), patch=96, gap=48, jitter=7, yoked=yoked)
        ref, _, _ = reference_boxes(*size, seed, 96, 48, 7, yoked=yoked)
        assert torch.equal(boxes, ref)


def test_every_neighbour_pair_in_both_orders_and_labels_match_geometry():
    for seed in range(10):
        h, w = 200 + 37 * seed, 600 - 29 * seed
        boxes, pairs, labels = sample_grid(h, w, gen(seed), patch=40, gap=20, jitter=7)
        _, rows, cols = reference_boxes(h, w, seed, 40, 20, 7)
        # ordered 8-neighbour pairs of a rows x cols grid, counted by hand
        n_expect = 2 * (rows * (cols - 1) + (rows - 1) * cols + 2 * (rows - 1) * (cols - 1))
        assert pairs.shape == (n_expect, 2) and labels.shape == (n_expect,)
        table = {tuple(p): int(l) for p, l in zip(pairs.tolist(), labels.tolist())}
        assert len(table) == n_expect  # no duplicates
        for (a, b), lab in table.items():
            assert table[(b, a)] == 7 - lab
            dy, dx = (boxes[b] - boxes[a]).tolist()
            # pitch 60 > 2 * jitter: the sign of the centre offset gives the grid direction
            sign = (int(dy > 20) - int(dy < -20), int(dx > 20) - int(dx < -20))
            assert LABEL_OF[sign] == lab
            assert max(abs(dy), abs(dx)) < 2 * 60  # neighbours only


def test_boxes_inside_and_jitter_bounded():
    for seed in range(20):
        boxes, _, _ = sample_grid(333, 517, gen(seed), patch=96, gap=48, jitter=7)
        assert (boxes >= 0).all()
        assert (boxes[:, 0] <= 333 - 96).all() and (boxes[:, 1] <= 517 - 96).all()
        _, rows, cols = reference_boxes(333, 517, seed, 96, 48, 7)
        cell = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"),
                           -1).reshape(-1, 2)
        off = boxes - 144 * cell  # = origin + jitter (up to clamping, which only shrinks it)
        spread = off.max(0).values - off.min(0).values
        assert (spread <= 14).all()


def test_jitter_reaches_its_bounds():
    offsets = []
    for seed in range(30):
        boxes, _, _ = sample_grid(1000, 1000, gen(seed), patch=20, gap=30, jitter=3)
        ref, _, _ = reference_boxes(1000, 1000, seed, 20, 30, 0)  # same origin, no jitter
        inside = ((ref >= 3) & (ref <= 1000 - 20 - 3)).all(1)  # away from clamping
        offsets.append((boxes - ref)[inside])
    offsets = torch.cat(offsets)
    assert offsets.min() == -3 and offsets.max() == 3
    assert set(offsets.flatten().tolist()) == set(range(-3, 4))


def test_yoked_offsets_all_equal():
    for seed in range(10):
        boxes, _, _ = sample_grid(1000, 1000, gen(seed), patch=20, gap=30, jitter=7, yoked=True)
        ref, _, _ = reference_boxes(1000, 1000, seed, 20, 30, 0)
        off = boxes - ref
        inside = ((ref >= 7) & (ref <= 1000 - 20 - 7)).all(1)  # away from clamping
        assert (off[inside] == off[inside][0]).all()


def test_too_small_gives_empty_with_shapes():
    # 2x2 needs patch + pitch = 96 + 144 = 240 px per axis
    for h, w in [(239, 500), (500, 239), (10, 10)]:
        boxes, pairs, labels = sample_grid(h, w, gen(0))
        assert boxes.shape == (0, 2) and pairs.shape == (0, 2) and labels.shape == (0,)
        assert boxes.dtype == pairs.dtype == labels.dtype == torch.int64
    boxes, pairs, _ = sample_grid(240, 240, gen(0))
    assert boxes.shape == (4, 2) and pairs.shape == (12, 2)


def test_determinism_same_seed_and_different_seeds():
    a = sample_grid(400, 500, gen(7))
    b = sample_grid(400, 500, gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    others = [sample_grid(400, 500, gen(s))[0] for s in range(8, 12)]
    assert any(o.shape != a[0].shape or not torch.equal(o, a[0]) for o in others)


def test_center8_fixed_3x3():
    # patch 4, gap 2: 16 px leaves origin 0 for a 3x3 grid
    boxes, pairs, labels = sample_grid(16, 16, gen(0), patch=4, gap=2, jitter=0, mode="center8")
    assert boxes.tolist() == [[y, x] for y in (0, 6, 12) for x in (0, 6, 12)]
    assert pairs.tolist() == [[4, k] for k in (0, 1, 2, 3, 5, 6, 7, 8)]
    assert labels.tolist() == list(range(8))


def test_center8_blocks_unique_boxes_and_geometry():
    # 39x45 px gives 6 rows x 7 cols for every origin in [0, 5] -> 2x2 blocks, 7th column dropped
    patch, gap = 4, 2
    boxes, pairs, labels = sample_grid(39, 45, gen(3), patch=patch, gap=gap, jitter=0,
                                       mode="center8")
    assert boxes.shape == (36, 2) and pairs.shape == (32, 2)
    oy, ox = boxes[0].tolist()
    assert boxes.tolist() == [[oy + 6 * r, ox + 6 * c] for r in range(6) for c in range(6)]
    centres = pairs[:, 0].unique()
    assert centres.numel() == 4 and (pairs[:, 0].bincount()[centres] == 8).all()
    for (a, b), lab in zip(pairs.tolist(), labels.tolist()):
        dy, dx = ((boxes[b] - boxes[a]) // 6).tolist()
        assert LABEL_OF[(dy, dx)] == lab
    empty = sample_grid(15, 40, gen(0), patch=patch, gap=gap, mode="center8")
    assert empty[0].shape == (0, 2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        sample_grid(300, 300, gen(0), mode="ring")
    with pytest.raises(ValueError, match="jitter"):
        sample_grid(300, 300, gen(0), jitter=-1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cut_patches_equals_naive_slicing(dtype):
    image = torch.randint(0, 256, (3, 50, 70)).to(dtype)
    boxes = torch.tensor([[0, 0], [40, 60], [13, 27], [5, 44]])
    out = cut_patches(image, boxes, 10)
    assert out.shape == (4, 3, 10, 10) and out.dtype == dtype and out.is_contiguous()
    for i, (y, x) in enumerate(boxes.tolist()):
        assert torch.equal(out[i], image[:, y:y + 10, x:x + 10])


def test_cut_patches_rejects_out_of_bounds_and_handles_empty():
    image = torch.zeros(3, 20, 20)
    with pytest.raises(ValueError, match="outside"):
        cut_patches(image, torch.tensor([[11, 0]]), 10)
    with pytest.raises(ValueError, match="outside"):
        cut_patches(image, torch.tensor([[0, -1]]), 10)
    assert cut_patches(image, torch.zeros(0, 2, dtype=torch.int64), 10).shape == (0, 3, 10, 10)


def test_cut_batch_and_batch_pairs():
    ims = [torch.rand(3, 30, 40), torch.rand(3, 25, 25)]
    bxs = [torch.tensor([[0, 0], [10, 20], [20, 30]]), torch.tensor([[15, 15], [3, 4]])]
    out = cut_patches_batch(ims, bxs, 10)
    assert torch.equal(out, torch.cat([cut_patches(i, b, 10) for i, b in zip(ims, bxs)]))
    merged = batch_pairs([torch.tensor([[0, 1], [2, 0]]), torch.tensor([[1, 0]])], [3, 2])
    assert merged.tolist() == [[0, 1], [2, 0], [4, 3]]
    assert torch.equal(out[merged[2, 0]], ims[1][:, 3:13, 4:14])
