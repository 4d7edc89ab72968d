import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/toys.py is shared by test modules

# One intra-op thread: the tests are many small tensor ops, which run fastest (and never
# oversubscribe a shared machine) single-threaded. PPL_LM_THREADS overrides.
THREADS = int(os.environ.get("PPL_LM_THREADS", "1"))
torch.set_num_threads(THREADS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test module starts at the suite's thread count (one), and a test that changes it (the
    CLI's --threads) cannot slow the modules after it: on a shared 2-core machine a second
    intra-op thread makes small tensor ops several times slower."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded real model, loaded once per test session (integration tests only).

    In float32 on every machine: these tests' tolerances are float32 round-off, and ``"auto"``
    would pick bfloat16 on some CPUs only (bfloat16: tests/test_bf16.py)."""
    import ppl_lm

    return ppl_lm.load_lm(dtype="float32")


@pytest.fixture(scope="module")
def soft():
    """The toy soft-reward problem on the Markov LM, with its exact posterior:
    ``(lm, model, args, exact)``."""
    import ppl_lm
    from toys import markov_lm, soft_reward

    lm = markov_lm()
    model, args = soft_reward(lm)
    return lm, model, args, ppl_lm.infer(model, *args, method="exact")
