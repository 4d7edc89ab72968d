"""The text begins with the prime factorisation of N.

The model's argument is N itself: the prompt is "The prime factorisation of {N} is" and
π(x | N) ∝ π(x | prompt)·1[x begins with primes whose product is N] (sympy checks
primality). A hard, verifiable condition: easy for small N (15 = 3 × 5 is on the web many
times over), hard for large N (2021 = 43 × 47) and hopeless for N = 1000003 × 1000033, where
the LM would have to factor. The product must not run on into more arithmetic (" 3*5 + 1"
begins with "3*5" but does not say that 15 = 3 × 5). Because N is the model's argument, one
guide trained by SVI is amortised over N. Not prefix-closed as checked (the first number may
still grow), so SMC defers it to the end; prefer importance sampling with many samples, or SVI.
"""

import sys

import pyro

import ppl_lm
from ppl_lm import rewards

description = "The text begins with the prime factorisation of N (the model's argument; hard, sympy-checked)."
context = 15
methods = {"importance": {"num_samples": 256}, "smc": {"num_particles": 128}}

TEMPLATE = "The prime factorisation of {N} is"

# A product of numbers followed by another operator: more arithmetic, not a factorisation.
_RUNS_ON = r"^\s*\d++(?:\s*[*×x·]\s*\d++)*+\s*[-+*/^(!×·]"  # possessive: no backtracking


def prompt(N) -> str:
    """The prompt for ``N``."""
    return TEMPLATE.format(N=N)


def build(lm, max_new_tokens: int = 12):
    """The LM prompted with ``prompt(N)``, conditioned on factorising N; ``model(N)``."""

    def model(N):
        try:
            n = int(N)
        except (TypeError, ValueError):
            raise TypeError(f"factorisation: N must be an integer, got {N!r}") from None
        if n < 2:
            raise ValueError(f"factorisation: N must be an integer >= 2, got {n}")
        x = pyro.sample("x", lm.sequence(prompt(n), max_new_tokens=max_new_tokens))
        ok = rewards.factorisation(lm, x, n) & ~rewards.regex(lm, x, _RUNS_ON)
        ppl_lm.constraint("factorises", ok)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
