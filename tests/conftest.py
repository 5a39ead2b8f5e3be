import os

import pyro
import pytest
import torch

# Small problems: one thread per test process beats oversubscribing the machine's cores.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_and_restore():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def float64():
    """Run the test in float64 (restored afterwards by the autouse fixture)."""
    torch.set_default_dtype(torch.float64)
    yield
