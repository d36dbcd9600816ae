"""Shared test setup.

Bit-identical comparisons need one reduction order. With several intra-op threads, torch's CPU kernels (MKL's
GEMM with its dynamic thread count, oneDNN) may split a reduction differently when the machine is loaded, so two
runs of the same seed differed in the last bit on a busy 2-core machine. Tests therefore run torch on one thread,
as the tiny profile's stages do (`base.threads: 1`); a test that needs more sets it itself.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
