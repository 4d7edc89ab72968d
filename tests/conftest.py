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


@pytest.fixture(scope="module")
def soft():
    """The toy soft-reward problem on the Markov LM, with its exact posterior:
    ``(lm, model, args, exact)``."""
    import ppl_lm
    from toys import markov_lm, soft_reward

    lm = markov_lm()
    model, args = soft_reward(lm)
    return lm, model, args, ppl_lm.infer(model, *args, method="exact")
