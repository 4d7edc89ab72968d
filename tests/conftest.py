import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/toys.py is shared by test modules

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model, loaded once per test session (integration tests only)."""
    import ppl_lm

    return ppl_lm.load_lm()
