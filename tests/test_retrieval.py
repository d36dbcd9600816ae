"""Tests for ctxrepro.analysis.retrieval and the nn stage (section 4.1, Figure 4): normalised correlation against a
hand example, streamed top-k against a full sort, patch labels, precision@k, the three feature sources."""

import csv
import functools
import json
import logging

import numpy as np
import pytest
import torch
import torchvision
from test_pretext_eval import write_model, write_voc

from ctxrepro.analysis import retrieval as R
from ctxrepro.analysis.pretext_eval import load_pretrained
from ctxrepro.config import BaseParams
from ctxrepro.stage import StageContext
from ctxrepro.transfer.imagenet import IMAGENET_MEAN, IMAGENET_STD


def test_normalise_is_mean_free_unit_length():
    out = R.normalise(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert torch.allclose(out[0], torch.tensor([-1.0, 0.0, 1.0]) / 2 ** 0.5)
    assert torch.equal(out[1], torch.zeros(3))  # a constant vector correlates with nothing


def test_ranking_by_normalised_correlation_hand_example():
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cands = torch.tensor([[4.0, 3.0, 2.0, 1.0],  # correlation -1
                          [1.0, 2.0, 3.0, 5.0],  # 6.5 / sqrt(5 * 8.75) = 0.98270
                          [110.0, 120.0, 130.0, 140.0],  # correlation 1, but from the query's own image
                          [2.0, 1.0, 4.0, 3.0]])  # 3 / 5 = 0.6
    image = torch.tensor([1, 1, 0, 2])
    ref = [np.corrcoef(q[0].numpy(), c.numpy())[0, 1] for c in cands]  # independent reference
    assert ref[1] == pytest.approx(6.5 / (5 * 8.75) ** 0.5) and ref[3] == pytest.approx(0.6)
    for chunk in (1, 2, 4):
        chunks = [(R.normalise(cands[i:i + chunk]), torch.arange(i, min(i + chunk, 4)), image[i:i + chunk])
                  for i in range(0, 4, chunk)]
        top = R.search(R.normalise(q), torch.tensor([0]), chunks, k=3)
        assert top.ids.tolist() == [[1, 3, 0]]
        assert top.scores[0].tolist() == pytest.approx([ref[1], ref[3], ref[0]], abs=1e-6)


def test_streamed_topk_equals_a_full_sort():
    g = torch.Generator().manual_seed(0)
    queries, pool = R.normalise(torch.randn(7, 16, generator=g)), R.normalise(torch.randn(50, 16, generator=g))
    q_image, p_image = torch.arange(7) % 3, torch.arange(50) % 5
    full = (queries @ pool.T).masked_fill(q_image[:, None] == p_image[None, :], float("-inf"))
    ref = full.topk(5, dim=1)
    chunks = [(pool[i:i + 8], torch.arange(i, min(i + 8, 50)), p_image[i:i + 8]) for i in range(0, 50, 8)]
    top = R.search(queries, q_image, chunks, k=5)
    assert torch.equal(top.ids, ref.indices) and torch.allclose(top.scores, ref.values)


def test_label_patches_takes_the_most_covering_box():
    objects = [(0, 0, 20, 20, 3), (5, 5, 10, 10, 7), (30, 30, 10, 10, 9)]
    boxes = torch.tensor([[0, 0], [15, 15], [5, 5], [28, 28], [30, 30]])
    # (0,0): box 3 covers 100%, box 7 25% -> 3; (15,15): box 3 covers 25% -> background;
    # (5,5): boxes 3 and 7 both cover 100% -> the first listed; (28,28): box 9 covers 8 x 8 = 64%; (30,30): 100%
    assert R.label_patches(boxes, 10, objects, 0.5).tolist() == [3, 0, 3, 9, 9]
    assert R.label_patches(boxes, 10, objects, 0.7).tolist() == [3, 0, 3, 0, 9]
    assert R.label_patches(boxes, 10, [], 0.5).tolist() == [0] * 5


def test_precision_at_k_and_label_base_rate_by_hand():
    prec = R.precision_at_k(torch.tensor([1, 0]), torch.tensor([[1, 1, 0], [0, 2, 0]]))
    assert prec.tolist() == pytest.approx([2 / 3, 2 / 3])
    # query 0 (image 0, label 1): other-image candidates 1, 2, 3 with labels 1, 0, 0 -> 1/3;
    # query 1 (image 1, label 0): candidates 0, 3 with labels 1, 0 -> 1/2
    base = R.label_base_rate(torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([1, 1, 0, 0]),
                             torch.tensor([0, 1, 1, 2]))
    assert base.tolist() == pytest.approx([1 / 3, 1 / 2])


def two_colour_images():
    """3 images, red-ish top half and blue-ish bottom half (a slightly different shade per image)."""
    images = []
    for i in range(3):
        im = torch.zeros((3, 40, 20), dtype=torch.uint8)
        im[:, :20] = torch.tensor([200 + 10 * i, 20, 30], dtype=torch.uint8)[:, None, None]
        im[:, 20:] = torch.tensor([20, 30 + 10 * i, 200], dtype=torch.uint8)[:, None, None]
        images.append(im)
    return images


def test_nearest_neighbours_finds_same_colour_patches_in_other_images():
    images = two_colour_images()
    mean_colour = {"mean": lambda p: p.float().mean(dim=(2, 3))}
    pool = R.PatchTable(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([[2, 2], [30, 2]] * 3),
                        torch.tensor([1, 0] * 3))
    queries = R.PatchTable(torch.tensor([0, 1]), torch.tensor([[5, 5], [25, 5]]), torch.tensor([1, 0]))
    results = [R.nearest_neighbours(queries, pool, images.__getitem__, 8, mean_colour, k=2, chunk=c, device="cpu")
               for c in (1, 100)]
    for tops in results:
        ids = tops["mean"].ids
        assert set(ids[0].tolist()) == {2, 4} and set(ids[1].tolist()) == {1, 5}  # same colour, other images
        assert R.precision_at_k(queries.labels, pool.labels[ids]).tolist() == [1.0, 1.0]
    assert torch.equal(results[0]["mean"].ids, results[1]["mean"].ids)
    with pytest.raises(ValueError, match="fewer than k"):
        R.nearest_neighbours(queries, pool, images.__getitem__, 8, mean_colour, k=5, chunk=4, device="cpu")


def test_pool_is_embedded_in_bounded_chunks():
    """Memory stays bounded: no feature call ever sees more than `chunk` patches, whatever the pool size."""
    images = two_colour_images()
    sizes = []

    def feature(p):
        sizes.append(len(p))
        return p.float().mean(dim=(2, 3))

    g = torch.Generator().manual_seed(0)
    pool = R.concat_tables([R.PatchTable(torch.full((40,), i), R.random_boxes(40, 20, 40, 8, g),
                                         torch.zeros(40, dtype=torch.int64)) for i in range(3)])
    queries = pool.take(torch.arange(0, 120, 12))
    R.nearest_neighbours(queries, pool, images.__getitem__, 8, {"f": feature}, k=3, chunk=16, device="cpu")
    assert max(sizes) == 16 and sum(sizes) == len(queries) + len(pool)


def test_random_network_shares_architecture_not_weights(tmp_path):
    write_model(tmp_path / "m.pt")
    pre = load_pretrained(tmp_path / "m.pt")
    rand, again = R.random_network(pre, seed=0), R.random_network(pre, seed=0)
    sd, rd = pre.model.state_dict(), rand.model.state_dict()
    assert sd.keys() == rd.keys() and all(sd[k].shape == rd[k].shape for k in sd)
    assert not torch.equal(sd["tower.conv1.weight"], rd["tower.conv1.weight"])
    assert torch.equal(rd["tower.conv1.weight"], again.model.state_dict()["tower.conv1.weight"])
    assert (rand.patch, rand.net_size, rand.color) == (pre.patch, pre.net_size, pre.color)
    feats = R.context_features(rand, "cpu", 0)(torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8))
    assert feats.shape == (3, rand.model.feature_dim) and (feats >= 0).all()  # fc6 after ReLU


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A torchvision AlexNet state dict with random weights (240 MB: written once per module)."""
    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.mark.slow
def test_imagenet_alexnet_fc7_from_a_weights_file(alexnet_file, tmp_path):
    path, net = alexnet_file
    model = R.load_imagenet_alexnet(path, "cpu")
    patches = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    feats = R.imagenet_features(model, 64)(patches)
    # reference: the full torchvision forward with a hook on fc7's ReLU (classifier[5])
    seen = []
    net.eval().classifier[5].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    x = torch.nn.functional.interpolate(patches.float() / 255, size=(64, 64), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        net((x - mean) / std)
    assert feats.shape == (2, 4096) and torch.allclose(feats, seen[0], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="imagenet_weights"):
        R.load_imagenet_alexnet(tmp_path / "none.pth", "cpu")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="AlexNet"):
        R.load_imagenet_alexnet(tmp_path / "other.pth", "cpu")


def label_by_hand(root, image: str, y: int, x: int, patch: int, min_overlap: float) -> str:
    """The class of the annotated box (read from the XML) covering the largest share of the patch, if that
    share reaches min_overlap (first box on ties), else background."""
    import xml.etree.ElementTree as ET

    xml = root / image.replace("JPEGImages", "Annotations").replace(".jpg", ".xml")
    best, name = 0.0, R.BACKGROUND
    for o in ET.parse(xml).getroot().iter("object"):
        b = {k: int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")}
        dy = min(y + patch, b["ymax"]) - max(y, b["ymin"] - 1)  # 1-based inclusive box -> 0-based half-open
        dx = min(x + patch, b["xmax"]) - max(x, b["xmin"] - 1)
        cover = max(dy, 0) * max(dx, 0) / patch ** 2
        if cover > best:
            best, name = cover, o.findtext("name")
    return name if best >= min_overlap else R.BACKGROUND


def imagenet_fc7_by_hand(net, root, image: str, y: int, x: int, patch: int, side: int) -> np.ndarray:
    """fc7 after ReLU of torchvision's full AlexNet forward (a hook on classifier[5]) on one patch."""
    from ctxrepro.pretext.export import read_rgb

    crop = read_rgb(root / image)[:, y:y + patch, x:x + patch].float()[None] / 255
    crop = torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    seen = []
    hook = net.eval().classifier[5].register_forward_hook(lambda m, i, o: seen.append(o[0].clone()))
    with torch.no_grad():
        net((crop - mean) / std)
    hook.remove()
    return seen[0].double().numpy()


@pytest.mark.slow
def test_nn_stage_labels_ranking_and_precision_match_an_independent_search(alexnet_file, tmp_path):
    """Labels from the XML, the ImageNet source's neighbours from a full search of our own (torchvision
    forward, numpy correlation, other images only), precision@k from those. Mutations caught (checked by
    hand): label_patches taking the least covering box, score_chunk letting a query match its own image,
    _write_matches recording the pool patch of another rank (ids reversed)."""
    from stages import nn as stage

    write_voc(tmp_path)
    (tmp_path / "models" / "pretrain").mkdir(parents=True)
    write_model(tmp_path / "models" / "pretrain" / "color_dropping.pt")
    params = stage.Params(n_queries=10, pool_per_image=2, k=3, chunk=7, imagenet_weights=str(alexnet_file[0]),
                          imagenet_input=64, show_queries=2, show_k=2, profile_note="test")
    ctx = StageContext(base=BaseParams(seed=0), device="cpu", log=logging.getLogger("test"), root=tmp_path)
    stage.run(params, ctx)
    m = json.loads((tmp_path / "metrics" / "nn.json").read_text())
    assert sorted(m["precision_at_k"]) == ["imagenet", "pretrained", "random"]
    assert m["n_queries"] == 10 and m["n_pool"] == 8 and m["k"] == 3 and m["notes"] == {}
    with (tmp_path / "results" / "nn" / "matches.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 10 * 3 and all(r["image"] != r["query_image"] for r in rows)
    patch = load_pretrained(tmp_path / "models" / "pretrain" / "color_dropping.pt").patch
    label = functools.cache(lambda im, y, x: label_by_hand(tmp_path, im, int(y), int(x), patch, 0.5))
    for r in rows:
        assert (r["query_label"], r["label"]) == (label(r["query_image"], r["query_y"], r["query_x"]),
                                                  label(r["image"], r["y"], r["x"]))
    pool = sorted({(r["image"], int(r["y"]), int(r["x"])) for r in rows})
    assert len(pool) == m["n_pool"]  # every pool patch is someone's neighbour here: the whole pool is known
    feats = {c: imagenet_fc7_by_hand(alexnet_file[1], tmp_path, *c, patch, 64) for c in pool}
    for q in range(10):
        mine = [r for r in rows if r["source"] == "imagenet" and int(r["query"]) == q]
        query = (mine[0]["query_image"], int(mine[0]["query_y"]), int(mine[0]["query_x"]))
        fq = imagenet_fc7_by_hand(alexnet_file[1], tmp_path, *query, patch, 64)
        scores = {c: np.corrcoef(fq, f)[0, 1] for c, f in feats.items() if c[0] != query[0]}
        expected = sorted(scores, key=scores.get, reverse=True)[:3]
        assert [(r["image"], int(r["y"]), int(r["x"])) for r in sorted(mine, key=lambda r: int(r["rank"]))] == expected
        assert [float(r["score"]) for r in mine] == pytest.approx([scores[c] for c in expected], abs=1e-4)
    for name, value in m["precision_at_k"].items():
        hits = [label(r["image"], r["y"], r["x"]) == label(r["query_image"], r["query_y"], r["query_x"])
                for r in rows if r["source"] == name]
        assert value == pytest.approx(np.mean(hits)), name
    assert (tmp_path / "plots" / "nn" / "montage.png").stat().st_size > 1000


def test_nn_stage_skips_the_imagenet_net_without_weights(tmp_path):
    from stages import nn as stage

    write_voc(tmp_path)
    (tmp_path / "models" / "pretrain").mkdir(parents=True)
    write_model(tmp_path / "models" / "pretrain" / "color_dropping.pt")
    ctx = StageContext(base=BaseParams(seed=0), device="cpu", log=logging.getLogger("test"), root=tmp_path)
    stage.run(stage.Params(n_queries=10, pool_per_image=6, k=3), ctx)
    m = json.loads((tmp_path / "metrics" / "nn.json").read_text())
    assert sorted(m["precision_at_k"]) == ["pretrained", "random"] and "skipped" in m["notes"]["imagenet"]
    assert "profile_note" not in m
