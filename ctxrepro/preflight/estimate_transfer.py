"""Disk and memory of the transfer stages: convert, proposals, detect and normals (section 4.3, 4.4)."""

from __future__ import annotations

from ctxrepro.preflight import networks as nets
from ctxrepro.preflight.plan import NYU_PX, Counts, row, variant
from ctxrepro.preflight.sizes import (BASE_MEMORY, DETECTION_BYTES, MB, PROPOSAL_BOXES, ROIDB_IMAGE, WORKER_MEMORY,
                                      Estimate, slots)
from ctxrepro.pretext.model import DEFAULT_WIDTH, TOWERS, conv_output
from ctxrepro.transfer.caffenet import CaffeNetSpec
from ctxrepro.transfer.trunk import TrunkSpec, body_layers

RESCALE_INITS = ("kmeans_rescale", "ours_rescale", "imagenet_rescale")


def _tower(p: dict, key: str) -> tuple[str, int, dict]:
    """(tower, width, pretrain variant) of a row: torchvision's network for the ImageNet rows."""
    from ctxrepro.transfer.imagenet import TOWER_OF, parse_source

    r, v = row(p, key), variant(p, row(p, key)["variant"])
    source = p["convert"]["imagenet_weights"]
    if r["init"] in ("imagenet", "imagenet_rescale") and source:
        arch = parse_source(source, v["tower"])
        if arch is not None:
            return TOWER_OF[arch], DEFAULT_WIDTH[TOWER_OF[arch]], v
    return v["tower"], v["width"] or DEFAULT_WIDTH[v["tower"]], v


def _figure6(p: dict, key: str) -> int:
    tower, width, v = _tower(p, key)
    cv = p["convert"]
    if tower == v["tower"]:
        conv6, kernel = nets.tower_fc6(tower, v["input_size"] or v["patch"], v["width"], v["fc_dim"])
        side = cv["input_side"]
    else:  # torchvision's tower: conv6 is its fc6 on the 224-px pool5; the input grows until pool6 fits
        body, pool5 = body_layers(tower, width)
        conv6, kernel = 4096, conv_output(TOWERS[tower](width), 224)[1]
        side = cv["input_side"]
        while conv_output([*body, ("pool5", pool5)], side)[1] < kernel + 2:
            side += 1
    return nets.figure6_params(TrunkSpec(tower=tower, width=width, conv6=conv6, conv6_kernel=kernel,
                                         conv6b=cv["conv6b"], fc7=cv["fc7"], classes=cv["classes"], input_side=side))


def _grid(p: dict, tower: str) -> int:
    from ctxrepro.transfer.imagenet import FAMILY

    grids = p["convert"]["roi_pool"]
    return grids.get(tower, grids.get(FAMILY.get(tower, ""), 6))


def network_bytes(p: dict, key: str) -> int:
    """float32 bytes of row `key`'s converted network: Figure 6's, or CaffeNet's shape for the rescale rows."""
    init = row(p, key)["init"]
    if init in ("imagenet_alexnet", "scratch_alexnet"):
        return nets.FLOAT * nets.alexnet_rcnn_params(p["convert"]["classes"])
    if init not in RESCALE_INITS:
        return nets.FLOAT * _figure6(p, key)
    tower, width, _ = _tower(p, key)
    cv = p["convert"]
    spec = CaffeNetSpec(tower=tower, width=width, roi_pool=_grid(p, tower), fc6=cv["fc6"], fc7=cv["fc7"],
                        classes=cv["classes"], input_side=cv["input_side"])
    return nets.FLOAT * nets.caffenet_params(spec)


def _kmeans_memory(p: dict, key: str) -> int:
    """The k-means init's peak: the batch's forward pass to the widest conv's input and its output (positions are
    sampled before their receptive fields are gathered, so only the kept rows are unfolded: bench/README.md
    "k-means convert memory"), or fc6's whitening (its inputs, covariance and eigenvectors in float64),
    whichever is larger (transfer/rescale.py). A 3x3 kernel's unfold is 9 times its input."""
    cv = p["convert"]
    tower, width, _ = _tower(p, key)
    unfold = 2 * cv["batch"] * nets.widest_unfold(tower, width, cv["input_side"]) // 9 * nets.FLOAT
    d = nets.fc6_inputs(tower, width, _grid(p, tower))
    crops = cv["fit_images"] * cv["crops_per_image"]
    whiten = 8 * (2 * min(crops, cv["kmeans_samples"]) * d + 2 * d * d)
    return max(unfold, whiten)


def convert(p: dict, c: Counts, key: str) -> Estimate:
    cv = p["convert"]
    weights = network_bytes(p, key)
    crops = (cv["fit_images"] + cv["heldout_images"]) * cv["crops_per_image"] * 3 * cv["input_side"] ** 2
    extra = _kmeans_memory(p, key) if row(p, key)["init"] == "kmeans_rescale" else 0
    return Estimate(cached=weights, memory=BASE_MEMORY + 3 * weights + crops * nets.FLOAT + extra)


def proposals(p: dict, c: Counts, key: str | None = None) -> Estimate:
    pr = p["proposals"]
    boxes = pr["max_boxes"] or PROPOSAL_BOXES
    images = c.voc07_trainval + c.voc07_test
    # float32 boxes (4) and a score per box per image; a .mat source is loaded whole, as float64 columns
    cache = images * boxes * 4 * nets.FLOAT
    loaded = images * boxes * 4 * 8 if pr["source"] == "mat" else 0
    return Estimate(cached=cache, memory=BASE_MEMORY + loaded + pr["workers"] * WORKER_MEMORY)


def _fc7_cache(p: dict, c: Counts, key: str) -> int:
    """float16 fc7 of every cached window of an R-CNN row (detection/rcnn: ground truth plus proposals per
    trainval image; the test proposals too under `cache: all`), kept in its state folder between runs."""
    r, init = p["detect"]["rcnn"], row(p, key)["init"]
    if p["detect"]["protocol"].get(init) != "rcnn" or r["cache"] == "none":
        return 0
    fc7 = 4096 if init.endswith("_alexnet") else p["convert"]["fc7"]
    boxes = r["max_proposals"] or PROPOSAL_BOXES
    windows = c.voc07_trainval * (boxes + 3) + (c.voc07_test * boxes if r["cache"] == "all" else 0)
    return windows * fc7 * 2


def detect(p: dict, c: Counts, key: str) -> Estimate:
    d = p["detect"]
    weights = network_bytes(p, key)
    state = weights * (1 + slots(d))  # a finished run keeps one state; a running one its previous too
    results = c.voc07_test * len(d["classes"]) * DETECTION_BYTES
    batch = d["images_per_batch"] * d["scale"] * d["max_size"] * 3 * nets.FLOAT
    memory = (BASE_MEMORY + ROIDB_IMAGE * (c.voc07_trainval + c.voc07_test) + 2 * state
              + d["workers"] * (WORKER_MEMORY + 2 * batch))
    return Estimate(cached=weights + results, uncached=state + _fc7_cache(p, c, key), scratch=2 * state,
                    memory=memory)


def normals(p: dict, c: Counts, key: str) -> Estimate:
    n = p["normals"]
    weights = network_bytes(p, key)
    state = weights * (1 + slots(n))
    predictions = c.nyu_test * NYU_PX * 3 * 2  # float16 unit normals at 480x640 (normals/report.py)
    # images decoded one by one to a scratch .npy (bench/README.md: +73..79 MB resident for 80..795 frames)
    scratch = (c.nyu - c.nyu_test) * NYU_PX * 3
    batch = n["batch"] * n["input_height"] * n["input_width"] * 3 * nets.FLOAT
    return Estimate(cached=predictions, uncached=state, scratch=state + scratch,
                    memory=BASE_MEMORY + 80 * MB + 2 * state + 2 * batch + predictions)
