"""A keyword condition: the text mentions "dragon".

Hard (``mode="hard"``): π(x | c) ∝ π(x)·1[every keyword occurs in x as a whole word].
Soft (``mode="soft"``): π(x)·exp(k(x)/β), k(x) = number of the keywords that occur.
Moderately hard: a given word is rare in a short continuation (a few percent for "dragon"
after a fairy-tale opening), and the hard condition is "upward closed" rather than
prefix-closed (once the word appears it stays), so SMC can only judge it at the end.
"""

import sys


import pyro

import ppl_lm
from ppl_lm import rewards

description = "The text contains the keyword(s) (default 'dragon'): mode='hard' (all present) or 'soft' (count)."
context = "Once upon a time, in a land far away,"
# Sized for a 2-core CPU on SmolLM2 (a few minutes each); pass larger options for better estimates.
methods = {"importance": {"num_samples": 512}, "smc": {"num_particles": 128},
           "mh": {"num_samples": 30, "num_chains": 4, "warmup_steps": 10},
           "svi": {"num_steps": 20, "num_samples": 128}}


def build(lm, keywords=("dragon",), mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 24):
    """The prompted LM conditioned on mentioning ``keywords``.

    Args:
        keywords: a word, a comma-separated string of words, or a sequence of words.
        mode: ``"hard"`` (every keyword present) or ``"soft"`` (reward = number present).
    """
    if isinstance(keywords, str):
        keywords = keywords.split(",")
    words = tuple(w.strip() for w in keywords if w.strip())
    if not words:
        raise ValueError("keyword: give at least one keyword")
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        k = rewards.keywords(lm, x, words)
        if mode == "hard":
            ppl_lm.constraint("keywords", k == len(words))
        else:
            ppl_lm.reward("keywords", k, beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
