"""Prefix prompting: π(x | c) with c = "Mary had a little".

The prompt is the condition. Prompting an LM is exact conditioning on the event "the text
starts with c": π(x | starts with c) = π(c·x) / π(c), and the LM's continuation distribution
π(x | c) *is* that conditional, sampled ancestrally. So every backend is exact here with
uniform weights (ESS = number of samples): the easiest conditional there is.

The same conditional written as a condition (prompt as a hard pin, no prompt at all) makes
the equivalence explicit, and shows why it would be hard to reach by sampling from π:

    def pinned(prompt):
        ids = lm.encode(prompt)
        y = pyro.sample("x", lm.sequence(None, max_new_tokens=len(ids) + 16))
        ppl_lm.pin("prefix", y, dict(enumerate(ids)), lam=None)   # y[:P] == c, hard
        return y

Its posterior, restricted to ``y[P:]``, equals π(x | c) (for a transformer, up to the BOS
token it reads before an empty prompt); but importance sampling from the unprompted π only
hits c with probability π(c) (tiny), whereas the prompt gets it for free.
"""

import sys

import pyro

description = "Prompting is conditioning: continuations of 'Mary had a little' (no extra condition)."
context = "Mary had a little"
methods = {"importance": {"num_samples": 64}, "smc": {"num_particles": 64}}


def build(lm, max_new_tokens: int = 16):
    """The prompted LM, with no further condition."""

    def model(prompt: str):
        return pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
