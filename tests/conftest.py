import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/toys.py is shared by test modules

# One intra-op thread: the tests are many small tensor ops, which run fastest (and never
# oversubscribe a shared machine) single-threaded. PPL_LM_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PPL_LM_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model, loaded once per test session (integration tests only)."""
    import ppl_lm

    return ppl_lm.load_lm()
