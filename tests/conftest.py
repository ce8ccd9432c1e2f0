"""Shared pytest setup: the device every test runs on, and tiny models.

On a machine with CUDA the suite checks the compiled Triton kernels; without one it runs the same
kernels in Triton's interpreter on the CPU. The interpreter is chosen by TRITON_INTERPRET, which
Triton reads when a kernel is *defined*, so it is set here, before any test module imports
`lofit_fast` (and through it `lofit_fast.kernels`). `import torch` does not import Triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The test models are tiny: on a small or shared CPU, extra threads cost far more than they save
    # (measured: the core tests took 5m54 with 2 threads under load, 39 s with one).
    torch.set_num_threads(1)

import pytest  # noqa: E402

from helpers import tiny_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when available (compiled kernels), else the CPU (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def make_tiny_model(device):
    """`make_tiny_model(model_type, **config_overrides)`: a seeded tiny causal LM on `device`, eval mode."""
    def make(model_type: str = "llama", **overrides):
        return tiny_model(model_type, **overrides).to(device)

    return make
