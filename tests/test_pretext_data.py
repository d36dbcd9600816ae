"""Tests for ctxrepro.pretext.data: step-seeded batches, packing, offsets, decoding, held-out plans."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_jpeg

from ctxrepro.pretext.data import (DATA, BatchSpec, StepBatches, Visit, finish_batch, heldout_plans, load_kinds,
                                   load_plan, load_table, make_loader, plan_step, read_manifest, usable)
from ctxrepro.pretext.sampling import sample_grid
from ctxrepro.seeds import derive_seed, generator

SPEC = BatchSpec(patch=24, gap=12, jitter=2, grids_per_image=2, max_patches=40)
# (split, height, width): varied sizes; 40x40 is too small for a 2x2 grid of 24 px patches (needs 60)
SIZES = [("train", 128, 128), ("train", 96, 160), ("train", 160, 112), ("train", 128, 96), ("train", 40, 40),
         ("train", 112, 144), ("val", 128, 128), ("val", 100, 140), ("val", 144, 96)]


def write_dataset(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """A data/resized-like tree: patterned RGB JPEGs and manifest.csv (columns of the resize stage)."""
    rng = np.random.default_rng(seed)
    resized = root / "data" / "resized"
    rows = []
    for k, (split, h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) * 127 // (h + w)], 0)
        img = np.clip(base + rng.integers(-20, 21, (3, h, w)), 0, 255).astype(np.uint8)
        rel = f"{split}/img_{k:03d}.jpg"
        (resized / split).mkdir(parents=True, exist_ok=True)
        (resized / rel).write_bytes(encode_jpeg(torch.from_numpy(img), quality=95).numpy().tobytes())
        kind = "photo" if k % 3 == 0 else "procedural"
        rows.append({"split": split, "path": rel, "source": f"world/{kind}/{k}.JPEG", "orig_width": w,
                     "orig_height": h, "width": w, "height": h})
    with (resized / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["split"], r["path"])))
    return resized / "manifest.csv"


@pytest.fixture
def manifest(tmp_path):
    return write_dataset(tmp_path)


@pytest.fixture
def table(manifest):
    return usable(load_table(manifest, "train"), SPEC)[0]


def test_derive_seed_is_a_stable_function_of_the_keys():
    assert derive_seed(0, DATA, 0, 5) == derive_seed(0, DATA, 0, 5)
    seeds = {derive_seed(0, DATA, r, s) for r in range(3) for s in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2 ** 63 for s in seeds)
    # independent reference: the same two 32-bit words of numpy's SeedSequence
    words = np.random.SeedSequence([7, 1, 2, 3]).generate_state(2, dtype=np.uint32)
    assert derive_seed(7, 1, 2, 3) == (int(words[0]) << 31) ^ int(words[1])


def test_load_table_sorted_with_sizes_and_kinds(manifest, tmp_path):
    index = tmp_path / "world_index.json"
    index.write_text(json.dumps({f"world/{k}/{i}.JPEG": {"kind": k} for i in range(9)
                                 for k in ("photo", "procedural")}))
    t = load_table(manifest, "train", load_kinds(index))
    names = [p.decode() for p in t.paths]
    assert names == sorted(names) and len(names) == 6
    assert t.group_names == ("photo", "procedural")
    # image k is a photo when k % 3 == 0 (write_dataset); train images are k = 0..5
    assert [t.group_names[g] for g in t.groups] == ["photo", "procedural", "procedural", "photo",
                                                    "procedural", "procedural"]
    assert t.heights.tolist() == [128, 96, 160, 128, 40, 112] and t.widths.tolist()[:2] == [128, 160]


def test_manifest_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_manifest(missing, "train")
    bad = tmp_path / "bad.csv"
    bad.write_text("split,path\ntrain,a.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv.*missing column"):
        read_manifest(bad, "train")


def test_streamed_table_equals_the_row_by_row_reading(tmp_path):
    """load_table streams into arrays; it must give what sorting read_manifest's rows by hand gives, with
    splits interleaved, unsorted rows, non-ASCII names, unknown sources and a column order of its own."""
    rng = np.random.default_rng(3)
    rows = [{"split": ["train", "val"][k % 2], "path": f"train/{'é' if k % 5 == 0 else 'n'}{rng.integers(1e6)}_{k}.JPEG",
             "source": f"world/{['photo', 'procedural', 'x'][k % 3]}/{k}.JPEG", "orig_width": "9",
             "orig_height": "9", "width": str(100 + k), "height": str(300 - k)} for k in range(60)]
    cols = ["height", "source", "path", "split", "orig_width", "width", "orig_height"]
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        writer.writerows(rows)
    kinds = {r["source"]: r["source"].split("/")[1] for r in rows if "/x/" not in r["source"]}
    t = load_table(path, "train", kinds)
    expected = read_manifest(path, "train")
    assert [p.decode() for p in t.paths] == [r["path"] for r in expected]
    assert t.heights.tolist() == [int(r["height"]) for r in expected]
    assert t.widths.tolist() == [int(r["width"]) for r in expected]
    assert t.group_names == ("photo", "procedural", "unknown")
    assert [t.group_names[g] for g in t.groups] == [kinds.get(r["source"], "unknown") for r in expected]
    path.write_text("split,path,source,orig_width,orig_height,width,height\ntrain,a.jpg,s,1,1,x,2\n")
    with pytest.raises(ValueError, match=r"manifest.csv:2: a width/height is not an integer"):
        load_table(path, "train")


def test_usable_drops_and_counts_images_too_small_for_a_grid(manifest):
    full = load_table(manifest, "train")
    kept, small = usable(full, SPEC)
    assert small == 1 and len(kept) == 5 and 40 not in kept.heights.tolist()


def test_shards_are_disjoint_and_cover(table):
    shards = [table.shard(r, 3) for r in range(3)]
    paths = [set(s.paths.tolist()) for s in shards]
    assert sum(len(p) for p in paths) == len(table)
    assert set().union(*paths) == set(table.paths.tolist())
    assert not (paths[0] & paths[1]) and not (paths[1] & paths[2]) and not (paths[0] & paths[2])


def test_step_batch_is_deterministic_and_step_dependent(table):
    ds = StepBatches(table, SPEC, seed=3, rank=0, steps=10)
    a, b, c = ds[4], ds[4], ds[5]
    for key in ("patches", "pairs", "labels", "pair_image", "images"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["images"], c["images"]) or not torch.equal(a["patches"], c["patches"])
    other_rank = StepBatches(table, SPEC, seed=3, rank=1, steps=10)[4]
    assert not torch.equal(a["patches"], other_rank["patches"]) if a["patches"].shape == \
        other_rank["patches"].shape else True


def test_batch_patches_pairs_and_offsets_match_an_independent_rebuild(table):
    """Replays the step's plan per pair in Python and cuts with plain slicing of an independent decode."""
    ds = StepBatches(table, SPEC, seed=1, rank=0, steps=3)
    batch = ds[2]
    plan = plan_step(table, SPEC, generator(1, DATA, 0, 2))
    offset, pair_row = 0, 0
    for image_pos, (i, _, grids) in enumerate(plan):
        image = decode_image(str(table.path(i)))
        for boxes, pairs, labels in grids:
            for k, (y, x) in enumerate(boxes.tolist()):
                assert torch.equal(batch["patches"][offset + k], image[:, y:y + 24, x:x + 24])
            for (p, q), lab in zip(pairs.tolist(), labels.tolist()):
                assert batch["pairs"][pair_row].tolist() == [offset + p, offset + q]
                assert int(batch["labels"][pair_row]) == lab
                assert int(batch["pair_image"][pair_row]) == image_pos
                pair_row += 1
            offset += len(boxes)
    assert offset == len(batch["patches"]) and pair_row == len(batch["labels"])
    assert batch["images"].tolist() == [v.image for v in plan]


def test_batches_are_greedily_packed_up_to_max_patches(table):
    # a grid on these images holds at most 4x4 = 16 patches (160 px side: (160-24)//36 + 1 = 4)
    ds = StepBatches(table, SPEC, seed=0, rank=0, steps=30)
    for s in range(30):
        n = len(ds[s]["patches"])
        assert SPEC.max_patches - 16 < n <= SPEC.max_patches


def test_a_grid_larger_than_the_batch_is_a_clear_error(table):
    spec = BatchSpec(patch=24, gap=12, jitter=2, grids_per_image=1, max_patches=4)
    with pytest.raises(ValueError, match=r"img_\d+\.jpg has \d+ patches, more than max_patches=4"):
        plan_step(table, spec, generator(0, DATA, 0, 0))


def test_loader_order_and_content_do_not_depend_on_workers_or_start(table):
    ds = StepBatches(table, SPEC, seed=5, rank=0, steps=6)
    serial = [b for b in make_loader(ds, 0, workers=0, pin_memory=False)]
    parallel = [b for b in make_loader(ds, 2, workers=2, pin_memory=False)]
    assert [b["step"] for b in serial] == list(range(6)) and [b["step"] for b in parallel] == [2, 3, 4, 5]
    for a, b in zip(serial[2:], parallel):
        assert torch.equal(a["patches"], b["patches"]) and torch.equal(a["pairs"], b["pairs"])


def test_device_decode_path_equals_worker_decode(table):
    worker = StepBatches(table, SPEC, seed=2, rank=0, steps=2)[1]
    raw = StepBatches(table, SPEC, seed=2, rank=0, steps=2, decode_in_worker=False)[1]
    assert "jpegs" in raw and "patches" not in raw
    done = finish_batch(raw, table, SPEC.patch, "cpu")
    for key in ("patches", "pairs", "labels", "pair_image", "images"):
        assert torch.equal(done[key], worker[key])


def test_corrupt_or_resized_images_are_errors_naming_the_file(manifest):
    t = usable(load_table(manifest, "val"), SPEC)[0]
    first = t.path(0)
    first.write_bytes(b"\xff\xd8 not a jpeg")
    size = (int(t.heights[0]), int(t.widths[0]))
    plan = [Visit(0, size, [sample_grid(*size, torch.Generator().manual_seed(0), 24, 12, 2)])]
    with pytest.raises(ValueError, match=str(first.name)):
        load_plan(t, plan, 24)
    second = t.path(1)
    second.write_bytes(encode_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8)).numpy().tobytes())
    size = (int(t.heights[1]), int(t.widths[1]))
    plan = [Visit(1, size, [sample_grid(*size, torch.Generator().manual_seed(0), 24, 12, 2)])]
    with pytest.raises(ValueError, match=rf"{second.name} is 64x64 but the manifest says"):
        load_plan(t, plan, 24)


def test_heldout_plans_fixed_complete_and_packed(manifest):
    t = usable(load_table(manifest, "val"), SPEC)[0]
    a = heldout_plans(t, SPEC, seed=0, n_images=3)
    b = heldout_plans(t, SPEC, seed=0, n_images=3)
    flat = lambda plans: [(i, box.tolist()) for p in plans for i, _, gs in p for box, _, _ in gs]  # noqa: E731
    assert flat(a) == flat(b)
    assert sorted({i for p in a for i, _, _ in p}) == [0, 1, 2]
    assert sum(len(gs) for p in a for _, _, gs in p) == 3 * SPEC.grids_per_image
    assert all(sum(len(bx) for _, _, gs in p for bx, _, _ in gs) <= SPEC.max_patches for p in a)
    assert len(heldout_plans(t, SPEC, seed=0, n_images=1)) == 1


def test_load_kinds_rejects_entries_without_kind(tmp_path):
    index = tmp_path / "world_index.json"
    index.write_text(json.dumps({"a.JPEG": {"label": 3}}))
    with pytest.raises(ValueError, match=r"world_index.json.*'a.JPEG'"):
        load_kinds(index)


# Per-visit scale (section 3): the train images hold 12.3K..17.9K pixels; each visit draws 8K..20K.
SCALED = BatchSpec(patch=24, gap=12, jitter=2, grids_per_image=2, max_patches=40, min_pixels=8000, max_pixels=20000)


def test_the_same_image_visited_at_two_steps_gets_different_sizes(table):
    sizes: dict[int, set] = {}
    for step in range(12):
        for i, (h, w), grids in plan_step(table, SCALED, generator(0, DATA, 0, step)):
            assert abs(h * w - 14000) <= 6000 + h + w  # within [min, max] up to the rounding of the sides
            assert abs(w / h - table.widths[i] / table.heights[i]) <= 1.5 / min(h, w) * w / h  # aspect kept
            assert all(int(b[:, 0].max()) + 24 <= h and int(b[:, 1].max()) + 24 <= w for b, _, _ in grids)
            sizes.setdefault(i, set()).add((h, w))
    assert max(len(s) for s in sizes.values()) >= 3  # pixel counts are drawn per visit, not per image
    again = plan_step(table, SCALED, generator(0, DATA, 0, 5))  # ... from the step's generator
    assert [v.size for v in again] == [v.size for v in plan_step(table, SCALED, generator(0, DATA, 0, 5))]


def test_patches_are_cut_from_the_image_rescaled_to_the_visit_size(table):
    from PIL import Image

    batch = StepBatches(table, SCALED, seed=1, rank=0, steps=3)[2]
    plan = plan_step(table, SCALED, generator(1, DATA, 0, 2))
    offset = rescaled = 0
    for i, (h, w), grids in plan:
        rescaled += (h, w) != (int(table.heights[i]), int(table.widths[i]))
        # independent reference: PIL's antialiased bilinear resize of an independent decode
        ref = torch.from_numpy(np.array(Image.open(table.path(i)).convert("RGB").resize((w, h), Image.BILINEAR)))
        ref = ref.permute(2, 0, 1).float()
        for boxes, _, _ in grids:
            for k, (y, x) in enumerate(boxes.tolist()):
                diff = (batch["patches"][offset + k].float() - ref[:, y:y + 24, x:x + 24]).abs()
                assert float(diff.mean()) < 1.0 and float(diff.max()) <= 3
            offset += len(boxes)
    assert offset == len(batch["patches"]) and rescaled >= 1


def test_rescale_on_the_device_path_equals_the_worker_path(table):
    worker = StepBatches(table, SCALED, seed=2, rank=0, steps=2)[1]
    for mode in ({"cut_in_worker": False}, {"decode_in_worker": False}):
        raw = StepBatches(table, SCALED, seed=2, rank=0, steps=2, **mode)[1]
        assert "patches" not in raw and ("decoded" in raw or "jpegs" in raw)
        done = finish_batch(raw, table, SCALED.patch, "cpu")
        for key in ("patches", "pairs", "labels", "pair_image", "images"):
            assert torch.equal(done[key], worker[key]), (mode, key)


def test_heldout_plans_have_a_fixed_seeded_scale_per_image(manifest):
    t = usable(load_table(manifest, "val"), SCALED)[0]
    a, b = heldout_plans(t, SCALED, seed=0, n_images=3), heldout_plans(t, SCALED, seed=0, n_images=3)
    sizes = {i: size for p in a for i, size, _ in p}
    assert sizes == {i: size for p in b for i, size, _ in p}
    assert all(size != (int(t.heights[i]), int(t.widths[i])) for i, size in sizes.items())
    assert {i: size for p in heldout_plans(t, SCALED, seed=1, n_images=3) for i, size, _ in p} != sizes


def test_usable_judges_images_at_their_smallest_visit_size(manifest):
    full = load_table(manifest, "train")  # 40x40 holds no grid, but at 8000 pixels it is 89x89
    assert usable(full, SCALED)[1] == 0 and usable(full, SPEC)[1] == 1
    few = BatchSpec(patch=24, gap=12, jitter=2, min_pixels=3000, max_pixels=20000)  # 96x128 -> 47x63: none
    assert usable(full, few)[1] == len(full)
    with pytest.raises(ValueError, match="min_pixels"):
        BatchSpec(min_pixels=5, max_pixels=0)
