"""Positive sentiment: a soft condition.

π(x | c) ∝ π(x)·exp(s(x)/β), with s the VADER compound sentiment of the continuation, in
[-1, 1]. Between the most negative and the most positive text the tilt is exp(2/β). Easy:
positive continuations are common under π, so importance sampling from the prompted LM
already has a good effective sample size for moderate β; small β sharpens the condition
(and lowers the ESS).
"""

import sys

import pyro

import ppl_lm
from ppl_lm import rewards

description = "Positive continuations: reward = VADER compound sentiment, target π(x)·exp(r/β) (soft)."
context = "I watched the new movie last night and"
methods = {
    "importance": {"num_samples": 256},
    "smc": {"num_particles": 64},
    "svi": {"num_steps": 40, "num_samples": 256},  # about 4 s a step on one CPU thread (8 draws of 24 tokens)
}


def build(lm, beta: float = 0.25, max_new_tokens: int = 24):
    """The prompted LM tilted towards positive sentiment with temperature ``beta``."""

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ppl_lm.reward("sentiment", rewards.sentiment(lm, x), beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
