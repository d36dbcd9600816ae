"""Seeds for every random stream: derived from integer keys (base seed, purpose, rank, step), never from hash().

One rule for the whole pipeline (determinism is explicit): a stage asks for `generator(seed, PURPOSE,
...)` with its own purpose constant, so streams never overlap and a rerun draws the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (base seed, purpose, rank, step...), never from Python's hash()."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by `derive_seed(*keys)`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g
