"""Data-dependent initialisation and rescaling (Kraehenbuehl et al. 2015, arXiv:1511.06856), as the paper's
Table 1 "rescale" and "K-means" rows use it (section 4.3; docs/METHOD.md "Transfer").

A network here is a flat, ordered list of (name, module) run one after the other (`ctxrepro.transfer.convert`
flattens the Figure 6 network into one). Weight layers are `nn.Conv2d` and `nn.Linear`.

- Within-layer (`init_layer`, `normalize_layer`): a new layer gets Gaussian weights, or k-means centres
  of its whitened input patches; then every output channel k is normalised over real data,
  W_k <- W_k / sigma_k and b_k <- (b_k - mu_k) / sigma_k + beta (beta = 0.1 by default), so its
  pre-activation has mean beta and standard deviation 1 on that data.
- Between-layer (`calibrate`): feed random Gaussian gradients into the top, measure for each weight layer
  r_k = sqrt(mean(dW_k^2) / mean(W_k^2)), and scale layer k by alpha_k = sqrt(r_k / t), with t the
  geometric mean of the r's; repeat (at most 10 times) until every r_k is within 1% of t. Biases also
  take the change of scale of their layer's input, so a network built of convolutions, ReLUs and max
  pools computes the same function before and after (the product of the alphas is 1).

The released implementation (philkr/magic_init) draws new top gradients every iteration; here one set of
`draws` Gaussian gradients is drawn once per calibration and reused, so an iteration measures the scale
mismatch and not the sampling noise of the draw (which alone can exceed 1% for a 21-way top layer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Layers = Sequence[tuple[str, nn.Module]]
WEIGHT_TYPES = (nn.Conv2d, nn.Linear)
DEAD_STD = 1e-8  # a channel with a smaller std over the data is constant: it cannot be normalised


@dataclass(frozen=True)
class RescaleConfig:
    """Within-layer and between-layer settings (magic_init's defaults where it has one)."""

    beta: float = 0.1  # magic_init: bias 0.1 after normalisation
    batch: int = 64  # crops per forward pass while collecting statistics
    kmeans_samples: int = 100_000  # input vectors gathered per layer for whitening + k-means
    kmeans_iters: int = 20  # Lloyd iterations
    whiten_eps: float = 1e-3  # added to the covariance eigenvalues, relative to their mean
    calib_iters: int = 10  # docs/METHOD.md: at most 10 rescalings
    calib_tol: float = 0.01  # docs/METHOD.md: stop when all ratios are within 1% of their geometric mean
    calib_draws: int = 4  # Gaussian top gradients averaged per ratio measurement


@dataclass
class Calibration:
    """What `calibrate` did: rescalings applied, whether it converged, and the last measured ratios."""

    iterations: int
    converged: bool
    spread: float  # max_k |r_k / t - 1| of the last measurement
    ratios: dict[str, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)  # the spread of every measurement


def weight_indices(layers: Layers) -> list[int]:
    return [i for i, (_, m) in enumerate(layers) if isinstance(m, WEIGHT_TYPES)]


def run_layers(layers: Layers, x: Tensor, stop: int) -> Tensor:
    """Output of layers[0..stop) (stop = len(layers): the whole network)."""
    for _, m in layers[:stop]:
        x = m(x)
    return x


def batches(x: Tensor, size: int) -> Iterator[Tensor]:
    for i in range(0, len(x), size):
        yield x[i:i + size]


class LayerInputs:
    """Every sample's input to layer `pos`, advanced bottom to top, so a bottom-to-top pass over the layers
    (BN folding, within-layer init, moments) runs each layer once per sample instead of once per layer
    above it. Held in CPU memory up to `max_bytes`; a larger map is not held, and its layer is reached from
    the samples themselves (position 0), as without the cache. `at` must be asked for weight layers (never
    an in-place ReLU, which would overwrite the held map) whose lower layers are final."""

    def __init__(self, layers: Layers, data: Tensor, batch: int, device: str | torch.device = "cpu",
                 max_bytes: int = 2 ** 31):
        self.layers, self.data, self.batch, self.device, self.max_bytes = layers, data, batch, device, max_bytes
        self.x, self.pos = data, 0

    @torch.no_grad()
    def at(self, index: int) -> tuple[Layers, int, Tensor]:
        """(layers, index, data) such that `run_layers(layers, data, index)` is layer `index`'s input."""
        if index < self.pos:
            self.x, self.pos = self.data, 0
        if index > self.pos:
            step = self.layers[self.pos:index]
            shape = run_layers(step, self.x[:1].to(self.device), len(step)).shape
            if len(self.x) * math.prod(shape) * 4 <= self.max_bytes:
                self.x = torch.cat([run_layers(step, xb.to(self.device), len(step)).float().cpu()
                                    for xb in batches(self.x, self.batch)])
                self.pos = index
        return self.layers[self.pos:], index - self.pos, self.x


def _channels_first(z: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C) -> (C, B*H*W)."""
    return z.transpose(0, 1).reshape(z.shape[1], -1)


@torch.no_grad()
def channel_moments(layers: Layers, index: int, data: Tensor, batch: int,
                    device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of layer `index`'s output over all of `data` (float64).

    Statistics pool the batch and spatial axes, as batch norm does for a convolution.
    """
    total = sq = None
    count = 0
    for xb in batches(data, batch):
        z = _channels_first(run_layers(layers, xb.to(device), index + 1).double())
        total = z.sum(1) if total is None else total + z.sum(1)
        sq = z.square().sum(1) if sq is None else sq + z.square().sum(1)
        count += z.shape[1]
    if count == 0:
        raise ValueError("channel_moments: no data")
    mean = total / count
    return mean.cpu(), (sq / count - mean.square()).clamp_min(0.0).cpu()


@torch.no_grad()
def normalize_layer(layer: nn.Module, mean: Tensor, var: Tensor, beta: float, eps: float = 0.0) -> int:
    """W_k /= sigma_k, b_k = (b_k - mu_k) / sigma_k + beta, sigma_k = sqrt(var_k + eps); returns the
    number of constant channels (std <= DEAD_STD), which keep their weights and get bias beta."""
    sigma = (var.double() + eps).sqrt()
    dead = sigma <= DEAD_STD
    scale = torch.where(dead, torch.ones_like(sigma), 1.0 / sigma)
    shift = torch.where(dead, torch.zeros_like(mean), -mean.double() * scale)
    w = layer.weight
    w.copy_((w.double() * scale.to(w.device).view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    b = layer.bias.double() * scale.to(w.device) + shift.to(w.device) + beta
    layer.bias.copy_(b.to(layer.bias.dtype))
    return int(dead.sum())


def conv_positions(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the output positions of `conv` on a height x width input (as F.unfold counts them)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def receptive_fields(x: Tensor, conv: nn.Conv2d, positions: Tensor) -> Tensor:
    """Rows `positions` of F.unfold(x).transpose(1, 2).reshape(B * L, D), the receptive fields (zero padding
    included) that `conv` sees at those output positions (b * L + l), gathered without unfolding the batch:
    memory is that of the rows kept, not the B * L * D of the whole unfold (7.6 GB for VGG-16 conv1_2 at
    227 px and batch 64)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"receptive_fields: padding {conv.padding!r} ({conv.padding_mode}) is not an explicit "
                         "zero padding")
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out_h, out_w = conv_positions(conv, h, w)
    positions = positions.to(x.device)
    b, spot = positions // (out_h * out_w), positions % (out_h * out_w)
    ys = (spot // out_w)[:, None] * sh - ph + torch.arange(kh, device=x.device) * dh  # (n, kh)
    xs = (spot % out_w)[:, None] * sw - pw + torch.arange(kw, device=x.device) * dw  # (n, kw)
    inside = ((ys >= 0) & (ys < h))[:, None, :, None] & ((xs >= 0) & (xs < w))[:, None, None, :]
    rows = x[b[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
             ys.clamp(0, h - 1)[:, None, :, None], xs.clamp(0, w - 1)[:, None, None, :]]  # (n, C, kh, kw)
    return torch.where(inside, rows, torch.zeros((), dtype=x.dtype, device=x.device)).reshape(len(positions), -1)


@torch.no_grad()
def gather_inputs(layers: Layers, index: int, data: Tensor, max_samples: int, batch: int,
                  gen: torch.Generator, device: str | torch.device = "cpu") -> Tensor:
    """Up to `max_samples` input vectors of weight layer `index` (rows of what it multiplies by W).

    For a convolution a vector is one receptive field (with its zero padding, as the layer sees it),
    drawn uniformly from every batch in equal shares; for a linear layer, one input row. Positions are drawn
    first and only their fields are gathered (`receptive_fields`), so memory beyond the layer's input is
    bounded by the rows kept; the draw is the one a whole unfold would be sampled with, so the rows are too.
    """
    layer = layers[index][1]
    n_batches = max(1, math.ceil(len(data) / batch))
    quota = math.ceil(max_samples / n_batches)
    rows = []
    for xb in batches(data, batch):
        x = run_layers(layers, xb.to(device), index)
        if isinstance(layer, nn.Conv2d):
            total = len(x) * math.prod(conv_positions(layer, x.shape[2], x.shape[3]))
            rows.append(receptive_fields(x, layer, torch.randperm(total, generator=gen)[:quota]).float().cpu())
        else:
            pick = torch.randperm(len(x), generator=gen)[:quota]
            rows.append(x[pick.to(x.device)].float().cpu())
    return torch.cat(rows)[:max_samples]


def whiten_basis(x: Tensor, components: int, eps: float) -> tuple[Tensor, Tensor]:
    """(V, s^-1/2) of the `components` largest principal directions of centred x (n, d), float64.

    z = (x - mean) V diag(s^-1/2) has unit variance along each kept direction; eps (relative to the
    mean eigenvalue) keeps near-null directions from being blown up.
    """
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / max(1, len(x) - 1)
    s, v = torch.linalg.eigh(cov)  # ascending
    s, v = s.flip(0)[:components], v.flip(1)[:, :components]
    s = s.clamp_min(0.0)
    inv = (s + eps * s.mean().clamp_min(1e-12)).rsqrt()
    return v, inv


def kmeans(z: Tensor, k: int, iters: int, gen: torch.Generator, chunk: int = 16384) -> Tensor:
    """Lloyd's k-means on rows of z (n, m): centres (k, m). Seeded by `gen`; starts from k distinct
    random rows; an emptied cluster is re-seeded with the row farthest from its centre."""
    n = len(z)
    if n < k:
        raise ValueError(f"kmeans: {n} samples cannot make {k} clusters")
    centres = z[torch.randperm(n, generator=gen)[:k].to(z.device)].clone()
    for _ in range(iters):
        assign = torch.empty(n, dtype=torch.long, device=z.device)
        dist = torch.empty(n, dtype=z.dtype, device=z.device)
        c2 = centres.square().sum(1)
        for i in range(0, n, chunk):
            d = c2[None] - 2 * z[i:i + chunk] @ centres.T  # ||z - c||^2 - ||z||^2
            dist[i:i + chunk], assign[i:i + chunk] = d.min(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=k).to(z.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        centres = sums / counts.clamp_min(1)[:, None]
        if len(empty):
            far = (dist + z.square().sum(1)).argsort(descending=True)[:len(empty)]
            centres[empty] = z[far]
    return centres


def kmeans_weights(x: Tensor, k: int, cfg: RescaleConfig, gen: torch.Generator) -> Tensor:
    """Filters (k, d) from k-means on whitened, unit-length inputs x (n, d) (Kraehenbuehl et al. 3.1):
    a filter responds with centre . z, z the whitened input. Scale is set later by normalisation."""
    v, inv = whiten_basis(x, min(k, x.shape[1]), cfg.whiten_eps)
    xc = x.double() - x.double().mean(0, keepdim=True)
    z = xc @ v * inv
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    centres = kmeans(z.float(), k, cfg.kmeans_iters, gen).double()
    return (centres * inv) @ v.T


@torch.no_grad()
def init_layer(layers: Layers, index: int, method: str, data: Tensor, cfg: RescaleConfig,
               gen: torch.Generator, device: str | torch.device = "cpu") -> str:
    """Fill weight layer `index` with "gaussian" N(0, 1) or "kmeans" filters (bias 0); returns the method
    used: k-means falls back to gaussian, as magic_init does, when fewer inputs than filters exist."""
    layer = layers[index][1]
    w = layer.weight
    layer.bias.zero_()
    if method == "kmeans":
        x = gather_inputs(layers, index, data, cfg.kmeans_samples, cfg.batch, gen, device)
        if len(x) >= w.shape[0]:
            w.copy_(kmeans_weights(x.to(device), w.shape[0], cfg, gen).reshape(w.shape).to(w.dtype))
            return "kmeans"
        method = "gaussian"
    if method != "gaussian":
        raise ValueError(f"init_layer: unknown method {method!r} (gaussian or kmeans)")
    w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w))
    return "gaussian"


def within_layer_init(layers: Layers, methods: dict[str, str], data: Tensor, cfg: RescaleConfig,
                      gen: torch.Generator, log: logging.Logger,
                      device: str | torch.device = "cpu") -> dict[str, dict]:
    """Initialise and normalise the weight layers named in `methods`, bottom to top (each one sees the
    already initialised layers below it). Returns {name: {"method", "dead"}}."""
    unknown = sorted(set(methods) - {layers[i][0] for i in weight_indices(layers)})
    if unknown:
        raise ValueError(f"within_layer_init: no weight layer named {unknown}")
    report, inputs = {}, LayerInputs(layers, data, cfg.batch, device)
    for i in weight_indices(layers):
        name = layers[i][0]
        if name not in methods:
            continue
        below, j, x = inputs.at(i)
        used = init_layer(below, j, methods[name], x, cfg, gen, device)
        mean, var = channel_moments(below, j, x, cfg.batch, device)
        dead = normalize_layer(layers[i][1], mean, var, cfg.beta)
        report[name] = {"method": used, "dead": dead}
        log.info("within-layer init %s: %s, %d constant channel(s)", name, used, dead)
    return report


def gradient_ratios(layers: Layers, x: Tensor, top_grads: Sequence[Tensor]) -> dict[str, float]:
    """r_k = sqrt(mean(dW_k^2) / mean(W_k^2)) with dW from backpropagating each top gradient (averaged
    over the draws in mean(dW^2))."""
    idx = weight_indices(layers)
    weights = [layers[i][1].weight for i in idx]
    out = run_layers(layers, x, len(layers))
    sq = [torch.zeros((), dtype=torch.float64, device=x.device) for _ in idx]
    for n, g in enumerate(top_grads):
        grads = torch.autograd.grad(out, weights, grad_outputs=g, retain_graph=n + 1 < len(top_grads))
        for j, dw in enumerate(grads):
            sq[j] += dw.double().square().mean()
    return {layers[i][0]: float((s / len(top_grads) / w.detach().double().square().mean()).sqrt())
            for i, s, w in zip(idx, sq, weights)}


def _spread(ratios: dict[str, float]) -> tuple[float, float]:
    logs = torch.tensor([math.log(r) for r in ratios.values()], dtype=torch.float64)
    target = float(logs.mean().exp())
    return target, max(abs(r / target - 1.0) for r in ratios.values())


@torch.no_grad()
def _input_scales(layers: Layers, x: Tensor) -> dict[str, float]:
    scales = {}
    for name, m in layers:
        if isinstance(m, WEIGHT_TYPES):
            scales[name] = float(x.abs().mean())
        x = m(x)
    return scales


@torch.no_grad()
def _rescale(layers: Layers, x: Tensor, ratios: dict[str, float], target: float,
             scales: dict[str, float]) -> None:
    """Scale layer k by sqrt(r_k / t); first give its bias the change of its input's mean |x|
    (exactly the product of the alphas below it when the layers between are homogeneous)."""
    for name, m in layers:
        if isinstance(m, WEIGHT_TYPES):
            now = float(x.abs().mean())
            if scales[name] > 0:
                m.bias.mul_(now / scales[name])
            scales[name] = now
            alpha = math.sqrt(ratios[name] / target)
            m.weight.mul_(alpha)
            m.bias.mul_(alpha)
        x = m(x)


def calibrate(layers: Layers, x: Tensor, cfg: RescaleConfig, gen: torch.Generator,
              log: logging.Logger) -> Calibration:
    """Between-layer scale adjustment on the fixed batch x (real crops), see the module docstring."""
    idx = weight_indices(layers)
    if not idx:
        raise ValueError("calibrate: the network has no weight layer")
    with torch.no_grad():
        shape = run_layers(layers, x[:1], len(layers)).shape[1:]
    top = [torch.randn((len(x), *shape), generator=gen).to(x.device) for _ in range(cfg.calib_draws)]
    scales = _input_scales(layers, x)
    history: list[float] = []
    for it in range(cfg.calib_iters + 1):
        ratios = gradient_ratios(layers, x, top)
        target, spread = _spread(ratios)
        history.append(spread)
        log.info("calibration %d: ratio spread %.4f (target %.3g)", it, spread, target)
        if spread < cfg.calib_tol or it == cfg.calib_iters:
            return Calibration(it, spread < cfg.calib_tol, spread, ratios, history)
        _rescale(layers, x, ratios, target, scales)
    raise AssertionError("unreachable")


def moment_summary(layers: Layers, names: Sequence[str], data: Tensor, batch: int,
                   device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Per named layer: the average, average |.| of the channel means and the mean/min/max channel std of
    its output (pre-activation) over `data`."""
    index = {n: i for i, (n, _) in enumerate(layers)}
    out, inputs = {}, LayerInputs(layers, data, batch, device)
    for name in sorted(names, key=index.get):
        mean, var = channel_moments(*inputs.at(index[name]), batch, device)
        std = var.sqrt()
        out[name] = {"mean": float(mean.mean()), "abs_mean": float(mean.abs().mean()),
                     "std_mean": float(std.mean()), "std_min": float(std.min()), "std_max": float(std.max())}
    return out
