"""RLHF as Bayes: fit a reward model to preference pairs, then condition the LM on it.

The data (``data=FILE``, JSONL ``{"context", "chosen", "rejected"}``; default: the shipped
``models/data/sentiment_prefs.jsonl``, see ``models/data/README.md``) are a rater's choices. The
reward model is a Bayesian Bradley–Terry head on two features of a continuation, its VADER
sentiment and its length as a share of ``max_new_tokens``: r_θ(x) = θ·φ(x), θ ~ N(0, I)
(:func:`ppl_lm.fit_reward`, ``fit=`` laplace (default: seconds) | nuts | svi | map). The conditional is
π′(x) ∝ π(x)·L(x) with L the learned likelihood, its uncertainty taken as ``uncertainty=``
mean (the point estimate, as RLHF does) or marginal (E_θ[e^{r_θ/β}]). The fitted head's
posterior mean, R-hat and ESS (NUTS) and training accuracy are printed to stderr when it is fitted.

:func:`ambiguous_raters` builds the toy of the seed's warning, "kinder world" versus "restricted
text": two utilities that agree on every text raters are shown and disagree on probe texts; the
shipped ``models/data/ambiguous_prefs.jsonl`` was made by :func:`make_ambiguous_prefs`.
"""

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

import ppl_lm
from ppl_lm import rewards

DATA = Path(__file__).resolve().parent / "data" / "sentiment_prefs.jsonl"
TOY_DATA = DATA.with_name("toy_prefs.jsonl")  # short ASCII pairs, for the character-level LM of --lm tiny
AMBIGUOUS_DATA = DATA.with_name("ambiguous_prefs.jsonl")

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


# -- ambiguous raters: "kinder world" or "restricted text"? ----------------------------------------------
#: The toy's sentences (token strings; id 0 is EOS) and their two features: wording (sentiment words,
#: +1 each) and events (+1 a good deed, -1 a bad one).
SENTENCES = ("", " Then the day went on.", " A kind neighbour happily helped us.",
             " A rude neighbour angrily shouted at us.", " A neighbour helped us.",
             " The records were neatly and properly kept.")
WORDING = (0.0, 0.0, 2.0, -2.0, 0.0, 2.0)
EVENTS = (0.0, 0.0, 1.0, -1.0, 1.0, 0.0)
#: The sentences raters never see: a good deed in neutral words, pleasant words about records.
PROBES = {"kinder": 4, "restricted": 5}


@dataclass(frozen=True)
class AmbiguousRaters:
    """The toy of :func:`ambiguous_raters`.

    Attributes:
        lm: the LM to condition (every sentence; 156 texts of up to ``max_new_tokens`` sentences).
        shown: the LM the raters' pairs are drawn from: the same chain with the probe sentences
            removed, so on every text a rater sees, wording = 2 × events.
        features: φ(x) = [wording, events] summed over the sentences, ``[N, T] -> [N, 2]``.
        kinder, restricted: the two utilities, 1.5·events and 0.75·wording: equal on every shown text.
        max_new_tokens: sentences per text.
    """

    lm: object
    shown: object
    max_new_tokens: int

    @staticmethod
    def features(x):
        w, e = torch.tensor(WORDING, dtype=torch.float64), torch.tensor(EVENTS, dtype=torch.float64)
        return torch.stack([w[x].sum(-1), e[x].sum(-1)], -1)

    @staticmethod
    def kinder(x):
        return 1.5 * AmbiguousRaters.features(x)[:, 1]

    @staticmethod
    def restricted(x):
        return 0.75 * AmbiguousRaters.features(x)[:, 0]

    def probe(self, name: str) -> torch.Tensor:
        """The one-sentence probe text ``[T]`` (``"kinder"`` or ``"restricted"``)."""
        x = torch.zeros(self.max_new_tokens, dtype=torch.long)
        x[0] = PROBES[name]
        return x


def ambiguous_raters(max_new_tokens: int = 3) -> AmbiguousRaters:
    """Two explanations of the same preferences that generalise differently (issue 20, item 5).

    Texts are up to ``max_new_tokens`` sentences of :data:`SENTENCES`. "Kinder world": raters
    like good deeds (u = 1.5·events). "Restricted text": raters like pleasant words
    (u = 0.75·wording). On the texts raters are shown (:attr:`AmbiguousRaters.shown`: no probe
    sentence) every good deed comes in two pleasant words, so the utilities are equal and the
    pairs cannot tell them apart; on the probes they disagree (a neighbour helped us: +1.5 or 0;
    the records were neatly kept: 0 or +1.5). Same seed, same pairs from either utility.
    """
    import ppl_lm

    V = len(SENTENCES)
    init = torch.zeros(V)
    init[0] = -math.inf  # no empty text (a preference pair needs two texts)
    trans = torch.zeros(V, V)
    trans[:, 0] = 0.5  # a little more likely to stop than to go on with any one sentence
    lm = ppl_lm.MarkovLM(init, trans, eos_id=0, token_strings=list(SENTENCES))
    hide = torch.zeros(V)
    hide[list(PROBES.values())] = -math.inf
    shown = ppl_lm.MarkovLM(init + hide, trans + hide, eos_id=0, token_strings=list(SENTENCES))
    return AmbiguousRaters(lm, shown, max_new_tokens)


def make_ambiguous_prefs(n: int = 200, seed: int = 0, path: str | Path | None = None):
    """The shipped ``ambiguous_prefs.jsonl``: ``n`` pairs of shown texts, chosen by the kinder-world
    rater (Bradley–Terry, temperature 1); written as text when ``path`` is given."""
    toy = ambiguous_raters()
    prefs = ppl_lm.preferences.simulate_preferences(toy.shown, [], toy.kinder, n, toy.max_new_tokens, seed=seed)
    text = ppl_lm.Preferences([toy.lm.decode(x) for x in prefs.chosen], [toy.lm.decode(x) for x in prefs.rejected])
    if path is not None:
        text.to_jsonl(path)
    return text


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
