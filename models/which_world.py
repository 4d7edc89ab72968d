"""Which world wrote these texts? The posterior over a latent world given observed text.

The worlds of ``worlds.py`` (plain, "people are kinder", "text is restricted"), each a preamble
that SmolLM2 reads before the context, but conditioned on data instead of on a reward: a handful
of observed continuations of the context (``TEXTS``, sentences SmolLM2 wrote under these
preambles, positive or neutral). The LM is the likelihood:
p(w | texts) ∝ p(w) · Π_i π(text_i | preamble_w + context).

Each text is observed as the beginning of a continuation (``max_new_tokens`` is its own token
count, so no EOS is scored: the text may go on); ``eos=True`` observes each as a whole
continuation that ends there. Only w is latent, so every backend runs it, exact enumeration
included (three worlds, one LM pass per world and text), and it is the ground truth for the
others. The other route to "which world?" conditions on a reward (``worlds.py``): tutorial 06
compares the two.
"""

import sys

import pyro
import pyro.distributions as dist
import torch

from ppl_lm.models.worlds import PREAMBLES, PRIOR, WORLDS

#: Observed continuations of ``context``: four positive, four neutral (SmolLM2-135M-Instruct samples).
TEXTS = (
    " was thoroughly impressed with the cast.",
    " it was amazing.",
    " enjoyed it, and I think it was excellent.",
    " it was a must-watch.",
    " thought about whether I should join the team.",
    " thought it would be great to meet in a week and talk about it.",
    " found out about it.",
    " it was so neat and colorful.",
)

description = ("p(w | observed texts): a latent world w in {plain, kinder, restricted} picks a preamble; "
               "eight observed continuations are scored by the LM (the likelihood).")
context = "I watched the new movie last night and"
toy_context = "I watched the movie and"
labels = {"w": WORLDS}  # the CLI prints p(w | data) by these names
methods = {
    "exact": {},
    "importance": {"num_samples": 256},
    "smc": {"num_particles": 256},
    "mh": {"num_samples": 200, "num_chains": 4, "warmup_steps": 20},
    "svi": {"num_steps": 100, "num_particles": 16, "num_samples": 256},
}


def build(lm, texts=TEXTS, prior=PRIOR, preambles=None, eos: bool = False):
    """``w ~ Categorical(prior)``; each of ``texts`` observed from ``lm.sequence(preamble_w + context)``.

    Args:
        texts: the observed continuations (strings; a comma-separated ``--set texts=...`` works too).
        prior: p(w), one probability per world.
        preambles: one string per world, replacing ``PREAMBLES`` (e.g. for a toy LM).
        eos: observe each text as a whole continuation (EOS after it) instead of its beginning.
    """
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t]
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one observed text")
    prior = torch.as_tensor(prior, dtype=torch.float32)
    preambles = [PREAMBLES[w] for w in WORLDS] if preambles is None else list(preambles)
    if prior.dim() != 1 or len(prior) != len(preambles) or bool((prior < 0).any()) or abs(float(prior.sum()) - 1) > 1e-6:
        raise ValueError(f"prior must be {len(preambles)} probabilities summing to 1, one per world; got {prior.tolist()}")
    lengths = [len(lm.encode(t)) + (1 if eos else 0) for t in texts]
    cache: dict[str, list[list[int]]] = {}

    def model(context: str):
        if context not in cache:
            cache[context] = [lm.encode(p + context) for p in preambles]
        ids = cache[context]
        w = pyro.sample("w", dist.Categorical(prior))
        batch = [ids[i] for i in w.reshape(-1).tolist()] if w.dim() else ids[int(w)]
        for i, (text, n) in enumerate(zip(texts, lengths)):
            pyro.sample(f"x{i}", lm.sequence(batch, max_new_tokens=n), obs=text)
        return w

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
