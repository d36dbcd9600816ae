"""The collapse monitor: live ReLU units and weight norms per layer while pretraining.

Section 3 added batch norm because the network otherwise stalled into "uniform prediction": the
ReLUs behind fc layers without normalisation (fc8 here) die while the weight norms grow. A step
that is too large (momentum 0.999 on lr 1e-5 with the summed loss: 1000x the released solver's,
docs/METHOD.md) drives exactly that. Every `log_every` steps the engine reads, for the last training
batch, the share of live activations (> 0) after each monitored ReLU, and the L2 norm of every
weight; a run whose share falls below `min_live_fraction` in any layer is stopped, naming it.

A forward hook keeps the count as a device tensor (no synchronisation per step); `read()` is the
only place that moves numbers to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The ReLUs after fc6 (tower), fc7 and fc8 (pair head): ContextNet's module names (pretext.model), and
# the layer each is reported as.
WATCHED = {"relu6": "fc6", "relu7": "fc7", "relu8": "fc8"}


def live_fraction(activation: Tensor) -> Tensor:
    """Share of the activations that are positive (a ReLU's live outputs), as a float32 scalar tensor."""
    return (activation.detach() > 0).float().mean()


class Monitor:
    """Hooks on the watched ReLUs of `model`; `read()` gives live shares and weight norms per layer."""

    def __init__(self, model: nn.Module, watched: dict[str, str] = WATCHED):
        self.model = model
        self._live: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        self.names = [n for n in modules if n.rsplit(".", 1)[-1] in watched]
        self.layers = {n: watched[n.rsplit(".", 1)[-1]] for n in self.names}
        if not self.names:
            raise ValueError(f"collapse monitor: the model has none of the layers {sorted(watched)}")
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            if module.training:
                self._live[name] = live_fraction(output)
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def weight_norms(self) -> dict[str, Tensor]:
        """L2 norm of each conv / linear weight, keyed by its module's short name (conv1, fc8, ...)."""
        return {name.rsplit(".", 1)[-1]: m.weight.detach().float().norm()
                for name, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def read(self, reduce=None) -> dict[str, float]:
        """{"live_<layer>": share, "wnorm_<layer>": norm}; `reduce` (e.g. a mean over ranks) sees one vector.

        Live shares are those of the last training forward pass; before any, they are absent.
        """
        keys = [f"live_{self.layers[n]}" for n in self.names if n in self._live]
        values = [self._live[n] for n in self.names if n in self._live]
        norms = self.weight_norms()
        keys += [f"wnorm_{n}" for n in norms]
        vector = torch.stack(values + list(norms.values()))
        if reduce is not None:
            vector = reduce(vector)
        return dict(zip(keys, vector.double().cpu().tolist()))


def collapsed(stats: dict[str, float], min_live_fraction: float) -> str | None:
    """Why the run must stop: the first watched layer whose live share is under `min_live_fraction` (0: off)."""
    if min_live_fraction <= 0:
        return None
    for key, value in stats.items():
        if key.startswith("live_") and value < min_live_fraction:
            return (f"only {value:.2%} of {key[len('live_'):]}'s ReLU outputs are live (< min_live_fraction "
                    f"{min_live_fraction:g}): lower the lr or the momentum")
    return None


def summary(stats: dict[str, float]) -> str:
    """One console line: live shares, then weight norms."""
    live = " ".join(f"{k[5:]} {v:.3f}" for k, v in stats.items() if k.startswith("live_"))
    norms = " ".join(f"{k[6:]} {v:.3g}" for k, v in stats.items() if k.startswith("wnorm_"))
    return f"live ReLU share: {live}; weight norms: {norms}"
