"""A suffix condition: the text ends with "happily ever after.".

π(x | c) ∝ π(x)·1[x ends with "happily ever after."] with π the LM prompted by a story
opening. Hard: the ending is rare under π in a few dozen tokens, and the condition is *not*
prefix-closed (any prefix may still end well), so SMC cannot prune on prefixes and must carry
particles to the end; importance sampling from π usually finds no satisfying sample.

``mode="soft"`` replaces the indicator by a graded reward for a smoke run or a warm start:
r(x) = (#words of the ending present)/(#words) + 1[ends with it], target π(x)·exp(r(x)/β).
"""

import sys

import pyro

import ppl_lm
from ppl_lm import rewards

description = "The story ends with 'happily ever after.' (hard, not prefix-closed; mode='soft' for a graded reward)."
context = "Once upon a time, a kind princess"
methods = {"smc": {"num_particles": 128}, "importance": {"num_samples": 512}}

ENDING = "happily ever after."


def build(lm, ending: str = ENDING, mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 32):
    """The prompted LM conditioned on ending with ``ending``.

    Args:
        mode: ``"hard"`` (constraint) or ``"soft"`` (graded reward with temperature ``beta``).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    words = [w.strip(".,!?;:") for w in ending.split()]

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ends = rewards.ends_with(lm, x, ending)
        if mode == "hard":
            ppl_lm.constraint("ends_with", ends)
        else:
            r = rewards.keywords(lm, x, words) / len(words) + ends.float()
            ppl_lm.reward("ending", r, beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
