"""Prompt as reward: pin the first tokens of the continuation to a target, softly or hard.

With y = encode(target) and S = {0, ..., |y|-1}, the reward is r(x) = λ·Σ_{i∈S} δ(x_i, y_i)
and the target π(x)·exp(r(x)) (``ppl_lm.pin``). ``lam=None`` is the hard limit λ → ∞:
π(x | x_S = y), which is exactly prompting with prompt + target for the remaining tokens
(see ``prefix.py``). Soft λ interpolates between the LM (λ = 0) and that prompt. Easy when y
is likely after the prompt; the hard version is a needle-in-a-haystack for importance
sampling from π (probability π(y | prompt)), whereas SMC prunes at each pinned token.
"""

import sys

import pyro

import ppl_lm

description = "Prompt as reward: r = λ·#(first tokens equal to the target's), lam=None for the hard pin."
context = ("Once upon a time,", " there was a")
methods = {"smc": {"num_particles": 64}, "importance": {"num_samples": 256}}


def build(lm, lam: float | None = 2.0, max_new_tokens: int = 16):
    """``model(prompt, target)``: the prompted LM with its first tokens pinned to ``target``.

    Args:
        lam: reward per matching token (``None``: hard condition).
    """

    def model(prompt: str, target: str):
        ids = lm.encode(target)
        if not 0 < len(ids) <= max_new_tokens:
            raise ValueError(f"pin: the target must encode to 1..{max_new_tokens} tokens, got {len(ids)}; "
                             "shorten it or raise max_new_tokens")
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ppl_lm.pin("pin", x, dict(enumerate(ids)), lam=lam)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
