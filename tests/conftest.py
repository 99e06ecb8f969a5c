from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    # Without a GPU the fused WeightedFusion kernels run in Triton's interpreter
    # (tests/test_fusion_triton.py). Triton reads this when triton.language is first imported,
    # which some test modules and doctests do: set it before any of them is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("dilconv", max_examples=15, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dilconv"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (small models on 2 shared cores run faster so)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
