"""A world behind the text: which world explains a positive continuation?

The seed's latent-variable question as a model. A world w is drawn from a prior p(w); each world
is a preamble that SmolLM2 reads before the context; the continuation x ~ π(x | preamble_w +
context) is tilted towards positive sentiment, π(x)·exp(s(x)/β). The posterior p(w | positive)
says which story explains the reward better: the plain world (no preamble), "people are kinder"
(good things happen) or "text is restricted" (only pleasant things get written down). Its
posterior predictive on new contexts is the Bayesian answer to how the conditional generalises.
"""

import sys

import pyro
import pyro.distributions as dist
import torch

import ppl_lm
from ppl_lm import rewards

#: The worlds, in the order of w's values, and the preamble each one prepends to the context.
WORLDS = ("plain", "kinder", "restricted")
PREAMBLES = {
    "plain": "",
    "kinder": "People are kinder than most stories suggest: they help each other, and things usually turn out well. ",
    "restricted": "Only pleasant things get written down here; anything unpleasant is left out of the record. ",
}
PRIOR = (0.5, 0.25, 0.25)

description = ("A world latent w in {plain, people are kinder, text is restricted} picks a preamble; "
               "x ~ LM(. | preamble_w + context); reward = VADER sentiment, target p(w) π(x | w)·exp(r/β).")
context = "I watched the new movie last night and"
toy_context = "I watched the movie and"
methods = {
    "importance": {"num_samples": 256},
    "smc": {"num_particles": 64},
    "mh": {"num_samples": 100, "num_chains": 4, "warmup_steps": 50},
}


def prompts(lm, context: str, preambles=None) -> list[list[int]]:
    """The token ids each world reads: preamble_w + context, in the order of ``WORLDS``."""
    preambles = [PREAMBLES[w] for w in WORLDS] if preambles is None else preambles
    return [lm.encode(p + context) for p in preambles]


def build(lm, beta: float = 0.25, max_new_tokens: int = 24, prior=PRIOR, preambles=None):
    """The world model: ``w ~ Categorical(prior)``, ``x ~ π(· | preamble_w + context)``, sentiment reward.

    ``preambles`` (one string per world, in the order of ``WORLDS``) replaces ``PREAMBLES``,
    e.g. for a toy LM whose vocabulary cannot spell the real ones.
    """
    prior = torch.as_tensor(prior, dtype=torch.float32)
    if prior.dim() != 1 or bool((prior < 0).any()) or abs(float(prior.sum()) - 1) > 1e-6:
        raise ValueError(f"prior must be probabilities summing to 1, one per world; got {prior.tolist()}")
    if len(prior) != (len(WORLDS) if preambles is None else len(preambles)):
        raise ValueError(f"prior has {len(prior)} entries but there are "
                         f"{len(WORLDS) if preambles is None else len(preambles)} worlds")
    cache: dict[str, list[list[int]]] = {}

    def model(context: str):
        if context not in cache:
            cache[context] = prompts(lm, context, preambles)
        ids = cache[context]
        w = pyro.sample("w", dist.Categorical(prior))
        batch = [ids[i] for i in w.reshape(-1).tolist()] if w.dim() else ids[int(w)]
        x = pyro.sample("x", lm.sequence(batch, max_new_tokens=max_new_tokens))
        ppl_lm.reward("sentiment", rewards.sentiment(lm, x), beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
