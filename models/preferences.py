"""RLHF as Bayes: fit a reward model to preference pairs, then condition the LM on it.

The data (``data=FILE``, JSONL ``{"context", "chosen", "rejected"}``; default: the shipped
``models/data/sentiment_prefs.jsonl``, see ``models/data/README.md``) are a rater's choices. The
reward model is a Bayesian Bradley–Terry head on two features of a continuation, its VADER
sentiment and its length as a share of ``max_new_tokens``: r_θ(x) = θ·φ(x), θ ~ N(0, I)
(:func:`ppl_lm.fit_reward`, ``fit=`` laplace (default: seconds) | nuts | svi | map). The conditional is
π′(x) ∝ π(x)·L(x) with L the learned likelihood, its uncertainty taken as ``uncertainty=``
mean (the point estimate, as RLHF does) or marginal (E_θ[e^{r_θ/β}]). The fitted head's
posterior mean, R-hat and ESS (NUTS) and training accuracy are printed to stderr when it is fitted.
"""

import sys
from pathlib import Path

import pyro
import torch

import ppl_lm
from ppl_lm import rewards

DATA = Path(__file__).resolve().parent / "data" / "sentiment_prefs.jsonl"
TOY_DATA = DATA.with_name("toy_prefs.jsonl")  # short ASCII pairs, for the character-level LM of --lm tiny

description = "Fit a Bayesian Bradley-Terry reward to preference pairs (JSONL), then condition the LM on it."
context = "I watched the new movie last night and"
toy_context = "I watched the movie and"
methods = {"importance": {"num_samples": 256}, "smc": {"num_particles": 64}}


def features(lm, max_new_tokens: int):
    """φ(x) = [VADER sentiment, length / max_new_tokens]: ``[N, T]`` -> ``[N, 2]``."""
    def phi(x):
        return torch.stack([rewards.sentiment(lm, x).double(),
                            rewards.length(lm, x).double() / max_new_tokens], -1)
    return phi


def build(lm, data: str | None = None, fit: str = "laplace", uncertainty: str = "marginal", beta: float = 0.5,
          max_new_tokens: int = 16, num_samples: int = 300, seed: int = 0):
    """Fit the reward model to ``data`` (token ids or text), then the conditional's model."""
    prefs = ppl_lm.Preferences.from_jsonl(data or DATA)
    if data is None and prefs.is_text:
        try:
            prefs.tokens(lm, max_new_tokens)
        except (ValueError, TypeError) as err:  # SmolLM2's texts do not fit a character-level toy LM
            print(f"the shipped pairs do not fit this LM ({str(err).split(':')[0]}); using {TOY_DATA.name}",
                  file=sys.stderr)
            prefs = ppl_lm.Preferences.from_jsonl(TOY_DATA)
    phi = features(lm, max_new_tokens)
    if not prefs.is_text and prefs.chosen.shape[1] != max_new_tokens:
        raise ValueError(f"the pairs in {data or DATA} hold {prefs.chosen.shape[1]} tokens; set max_new_tokens to that")
    rm = ppl_lm.fit_reward(prefs, phi, method=fit, num_samples=num_samples, lm=lm, max_new_tokens=max_new_tokens,
                           seed=seed)
    d = rm.diagnostics
    print(f"reward model ({fit}, {len(prefs)} pairs): E[θ] = {[round(v, 3) for v in rm.mean.tolist()]} "
          f"(sentiment, length); train accuracy {d['train_accuracy']:.2f}"
          + (f"; R-hat {max(d['rhat']):.3f}, bulk ESS {min(d['ess_bulk']):.0f}" if "rhat" in d else ""),
          file=sys.stderr)

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        ppl_lm.learned_reward("learned", rm, x, beta, uncertainty=uncertainty)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
