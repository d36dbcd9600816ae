"""Nearest-neighbour patch retrieval (section 4.1, Figure 4).

Section 4.1 samples random 96x96 patches, represents each by fc6 of ONE tower (fc7 and above removed),
and finds nearest neighbours by normalised correlation: each feature vector is mean-subtracted and
L2-normalised, and the score is a dot product. It compares three feature sources: our pretrained fc6,
the same architecture with random weights, and fc7 of an ImageNet-supervised AlexNet fed upsampled
patches.

Search is streamed, so memory stays bounded for any pool size: query features are held (a few
thousand at most), the pool is embedded chunk by chunk, each chunk scored against all queries with one
matrix product, and only a running top-k per query is kept (`TopK`). Candidates from a query's own
image are excluded ("candidate patches from other images").

Beyond the paper, a number: when every patch has a category label (the class of the ground-truth box
covering most of it, or background), precision@k of that label measures what Figure 4 shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrepro.pretext.export import Pretrained, network_input
from ctxrepro.pretext.model import build_model
from ctxrepro.pretext.precision import autocast
from ctxrepro.pretext.sampling import cut_patches
from ctxrepro.progress import track
from ctxrepro.seeds import derive_seed, generator
from ctxrepro.transfer.imagenet import (TORCHVISION, imagenet_normalize, parse_source, read_state_dict,
                                       source_state_dict)

BACKGROUND = "background"
NN_SEED, RANDOM_INIT, NN_COLOR = 61, 62, 63  # seed purposes (pretext.data: 1..5, pretext_eval: 51)

FeatureFn = Callable[[Tensor], Tensor]  # uint8 (P, 3, S, S) on the device -> (P, D) float


def normalise(features: Tensor) -> Tensor:
    """Section 4.1's normalised correlation, per row: subtract the row's mean, divide by its L2 norm
    (a constant row stays zero). Dot products of the results are correlation coefficients."""
    x = features.float() - features.float().mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class TopK:
    """A running top-k (highest score first) per query over streamed candidate chunks."""

    def __init__(self, n_queries: int, k: int):
        if k < 1:
            raise ValueError(f"TopK: k={k} must be >= 1")
        self.k = k
        self.scores = torch.full((n_queries, 0), float("-inf"))
        self.ids = torch.zeros((n_queries, 0), dtype=torch.int64)

    def update(self, scores: Tensor, ids: Tensor) -> None:
        """scores (Q, C) of candidates `ids` (C,); -inf marks an excluded candidate."""
        s = torch.cat([self.scores, scores.float().cpu()], dim=1)
        i = torch.cat([self.ids, ids.cpu().expand(len(s), -1)], dim=1)
        # stable sort: equal scores keep stream order, so results do not depend on the chunk size
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.scores, self.ids = s.gather(1, order), i.gather(1, order)


def score_chunk(top: TopK, queries: Tensor, query_image: Tensor, feats: Tensor, ids: Tensor,
                image: Tensor) -> None:
    """Score one chunk of normalised candidates against normalised queries (one matrix product) and
    update `top`; a candidate from its query's own image is excluded."""
    scores = queries @ feats.to(queries.device).T
    same = query_image.to(scores.device)[:, None] == image.to(scores.device)[None, :]
    top.update(scores.masked_fill(same, float("-inf")), ids)


def search(queries: Tensor, query_image: Tensor, chunks, k: int) -> TopK:
    """Top-k candidates by normalised correlation for normalised `queries` (Q, D); `chunks` yields
    (features (C, D) normalised, ids (C,), image (C,))."""
    top = TopK(len(queries), k)
    for feats, ids, image in chunks:
        score_chunk(top, queries, query_image, feats, ids, image)
    return top


def random_boxes(height: int, width: int, n: int, patch: int, g: torch.Generator) -> Tensor:
    """n (y, x) top-left corners uniform over every position of a `patch` px square in the image."""
    if height < patch or width < patch:
        return torch.zeros((0, 2), dtype=torch.int64)
    ys = torch.randint(0, height - patch + 1, (n,), generator=g)
    xs = torch.randint(0, width - patch + 1, (n,), generator=g)
    return torch.stack([ys, xs], dim=1)


def label_patches(boxes: Tensor, patch: int, objects: list[tuple[int, int, int, int, int]],
                  min_overlap: float) -> Tensor:
    """Per patch, the label of the object box (y0, x0, height, width, label >= 1) that covers the largest
    part of it, if that part is at least `min_overlap` of the patch; else 0 (background)."""
    labels = torch.zeros(len(boxes), dtype=torch.int64)
    if not objects or len(boxes) == 0:
        return labels
    obj = torch.tensor(objects, dtype=torch.int64)  # (O, 5)
    py0, px0 = boxes[:, 0:1], boxes[:, 1:2]
    iy = (torch.minimum(py0 + patch, obj[:, 0] + obj[:, 2]) - torch.maximum(py0, obj[:, 0])).clamp_min(0)
    ix = (torch.minimum(px0 + patch, obj[:, 1] + obj[:, 3]) - torch.maximum(px0, obj[:, 1])).clamp_min(0)
    cover = (iy * ix).double() / (patch * patch)  # (P, O)
    best, which = cover.max(dim=1)  # ties: the first object listed
    hit = best >= min_overlap
    labels[hit] = obj[which[hit], 4]
    return labels


def precision_at_k(query_labels: Tensor, match_labels: Tensor) -> Tensor:
    """Per query, the fraction of its k matches (Q, k) that share its label (float64 (Q,))."""
    return (match_labels == query_labels[:, None]).double().mean(dim=1)


def label_base_rate(query_labels: Tensor, query_image: Tensor, pool_labels: Tensor, pool_image: Tensor) -> Tensor:
    """Per query, the fraction of its eligible candidates (other images) sharing its label: the
    precision@k of a random ranking (float64 (Q,)). Counted per (image, label), never a Q x N matrix."""
    n_labels = int(torch.cat([query_labels, pool_labels]).max()) + 1
    n_images = int(torch.cat([query_image, pool_image]).max()) + 1
    counts = torch.bincount(pool_image * n_labels + pool_labels, minlength=n_images * n_labels)
    counts = counts.view(n_images, n_labels)
    same = counts.sum(dim=0)[query_labels] - counts[query_image, query_labels]
    eligible = (len(pool_labels) - counts.sum(dim=1)[query_image]).clamp_min(1)
    return same.double() / eligible.double()


def context_features(pre: Pretrained, device: str, seed: int, amp: str = "none") -> FeatureFn:
    """fc6 of one tower of a context network (after its batch norm and ReLU, as the Caffe blob), float32;
    the tower runs under `amp` autocast (ctxrepro.pretext.precision)."""
    g = generator(seed, NN_COLOR, device=device)

    @torch.no_grad()
    def fn(patches: Tensor) -> Tensor:
        x = network_input(patches, pre, g)
        with autocast(x.device, amp):
            return pre.model.embed(x).float()

    return fn


def random_network(pre: Pretrained, seed: int) -> Pretrained:
    """The same architecture and input handling as `pre`, with the pretraining's Xavier init from a seed.

    Eval-mode batch norm then holds its initial statistics (mean 0, variance 1): an identity, as in a net
    that never saw data.
    """
    torch.manual_seed(derive_seed(seed, RANDOM_INIT))
    model = build_model(pre.model.tower_name, pre.net_size, pre.model.width, pre.model.fc_dim).eval()
    device = next(pre.model.parameters()).device
    return Pretrained(model.to(device), pre.patch, pre.net_size, pre.gap, pre.jitter, pre.color, 0)


def load_imagenet_alexnet(source: Path | str, device: str) -> nn.Module:
    """torchvision's AlexNet with ImageNet weights: "torchvision" = its published AlexNet_Weights.IMAGENET1K_V1
    through the weights API (downloaded once into $TORCH_HOME), "random:alexnet" = its architecture randomly
    initialised (the smoke profile), else a state dict file."""
    from torchvision.models import alexnet

    arch = parse_source(str(source), "alexnet") if isinstance(source, str) else None
    if arch is not None:
        if arch != "alexnet":
            raise ValueError(f"ImageNet weights {source!r}: Figure 4's ImageNet column is AlexNet")
        state, _ = source_state_dict(source, arch)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights {path} not found (a torchvision AlexNet state dict, e.g. "
                                    f"alexnet-owt-7be5be79.pth, or {TORCHVISION!r}); leave nn.imagenet_weights "
                                    f"empty to skip")
        state = read_state_dict(path)
    model = alexnet(weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source}: not a torchvision AlexNet state dict ({e})") from e
    return model.to(device).eval()


def imagenet_features(model: nn.Module, input_size: int, amp: str = "none") -> FeatureFn:
    """fc7 (after ReLU) of an ImageNet AlexNet on patches upsampled to `input_size` (section 4.1), float32;
    the network runs under `amp` autocast."""

    @torch.no_grad()
    def fn(patches: Tensor) -> Tensor:
        x = F.interpolate(patches.float() / 255.0, size=(input_size, input_size), mode="bilinear",
                          align_corners=False)
        with autocast(x.device, amp):
            h = model.avgpool(model.features(imagenet_normalize(x))).flatten(1)
            return model.classifier[:6](h).float()  # dropout (identity in eval), fc6, relu, dropout, fc7, relu

    return fn


@dataclass(frozen=True)
class PatchTable:
    """Patches as references into an image list: nothing is cut until it is embedded or drawn."""

    image: Tensor  # (N,) int64
    boxes: Tensor  # (N, 2) int64 (y, x) top-left
    labels: Tensor  # (N,) int64, 0 = background

    def __len__(self) -> int:
        return len(self.image)

    def take(self, index: Tensor) -> "PatchTable":
        return PatchTable(self.image[index], self.boxes[index], self.labels[index])


def concat_tables(tables: list[PatchTable]) -> PatchTable:
    if not tables:
        z = torch.zeros((0,), dtype=torch.int64)
        return PatchTable(z, torch.zeros((0, 2), dtype=torch.int64), z.clone())
    return PatchTable(torch.cat([t.image for t in tables]), torch.cat([t.boxes for t in tables]),
                      torch.cat([t.labels for t in tables]))


def embed_chunks(table: PatchTable, load_image: Callable[[int], Tensor], patch: int, sources: dict[str, FeatureFn],
                 chunk: int, device: str):
    """Yield (ids, image, {source: normalised features}) for consecutive chunks of `table`.

    The table should be ordered by image: each image is decoded once per run of its patches.
    """
    cached: tuple[int, Tensor] | None = None
    for start in range(0, len(table), chunk):
        ids = torch.arange(start, min(start + chunk, len(table)))
        part = table.take(ids)
        cuts = []
        for img in torch.unique_consecutive(part.image).tolist():
            if cached is None or cached[0] != img:
                cached = (img, load_image(img))
            cuts.append(cut_patches(cached[1], part.boxes[part.image == img], patch))
        patches = torch.cat(cuts).to(device)
        yield ids, part.image, {name: normalise(fn(patches)).cpu() for name, fn in sources.items()}


def nearest_neighbours(queries: PatchTable, pool: PatchTable, load_image: Callable[[int], Tensor], patch: int,
                       sources: dict[str, FeatureFn], k: int, chunk: int, device: str,
                       log: logging.Logger | None = None) -> dict[str, TopK]:
    """Top-k pool patches (from other images) of every query, per feature source, streamed in chunks."""
    q = {name: [] for name in sources}
    for _, _, feats in embed_chunks(queries, load_image, patch, sources, chunk, device):
        for name, f in feats.items():
            q[name].append(f)
    query_feats = {name: torch.cat(fs) for name, fs in q.items()}
    tops = {name: TopK(len(queries), k) for name in sources}
    n_chunks = (len(pool) + chunk - 1) // chunk
    stream = embed_chunks(pool, load_image, patch, sources, chunk, device)
    for ids, image, feats in track(stream, total=n_chunks, desc="nn pool", unit="chunk", log=log):
        for name, f in feats.items():
            score_chunk(tops[name], query_feats[name], queries.image, f, ids, image)
    for top in tops.values():
        if top.scores.shape[1] < k or torch.isinf(top.scores).any():
            raise ValueError(f"some query has fewer than k={k} candidate patches from other images; "
                             f"lower k or sample more pool patches")
    return tops
