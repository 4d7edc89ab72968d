"""Avoid the letter e: a lipogram, the benchmark task.

π(x | c) ∝ π(x)·1[no token of x contains "e" or "E"]. A token-level, prefix-closed hard
condition (``ppl_lm.token_constraint`` with ``rewards.forbid_chars``). Very hard for
importance sampling from π (most English words contain an e, so almost no sample of a few
dozen tokens passes), easy for SMC: it proposes only allowed tokens and corrects the weights
exactly, so every particle stays admissible.
"""

import sys

import pyro

import ppl_lm
from ppl_lm import rewards

description = "Lipogram: no letter e or E anywhere (token-level, prefix-closed; the benchmark task)."
context = "Once upon a time, in a small village,"
methods = {"smc": {"num_particles": 64}, "importance": {"num_samples": 512}}


def build(lm, chars: str = "eE", max_new_tokens: int = 32):
    """The prompted LM conditioned on never using any of ``chars``."""
    mask = rewards.forbid_chars(lm, chars)  # computed once: a scan of the vocabulary

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ppl_lm.token_constraint("no_e", x, mask)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
