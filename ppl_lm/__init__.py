"""ppl-lm: conditioning language models as probabilistic inference, on Pyro.

An LM is a prior over token sequences (:class:`SequenceDistribution`); conditions are
likelihood factors (:func:`reward`, :func:`constraint`, :func:`pin`); every way of
conditioning is an inference backend behind :func:`infer`.
"""

from typing import TYPE_CHECKING

from . import notebook, rewards, seeding, tokens
from .conditions import TokenMask, constraint, is_partial, pin, prefix_length, reward, token_constraint
from .distribution import SequenceDistribution
from .infer import METHODS, infer
from .lm import LanguageModel, MarkovLM, ToyVocab, chat
from .posterior import Posterior
from .preferences import Preferences
from .proposal import PromptedLM, prompted
from .reward_model import RewardModel, fit_reward, learned_reward

if TYPE_CHECKING:
    from .inference.bounds import EvidenceBounds, ExactDraws, KLSandwich, exact_draws, kl_sandwich, log_evidence_bounds
    from .inference.smc.twists import exact_twist, learn_twist
    from .lm import TransformersLM, load_lm, tiny_char_transformer, tiny_transformer

# Names read from their module on first use: `import ppl_lm` does not import the transformers side
# (ppl_lm.lm), and the core does not import the backends (ppl_lm.inference).
_LAZY = {
    **dict.fromkeys(("TransformersLM", "load_lm", "tiny_transformer", "tiny_char_transformer"), "ppl_lm.lm"),
    **dict.fromkeys(("exact_draws", "ExactDraws", "log_evidence_bounds", "EvidenceBounds", "kl_sandwich",
                     "KLSandwich"), "ppl_lm.inference.bounds"),
    **dict.fromkeys(("learn_twist", "exact_twist"), "ppl_lm.inference.smc.twists"),
}

__all__ = [
    "LanguageModel", "MarkovLM", "TransformersLM", "ToyVocab", "load_lm", "chat", "tiny_transformer",
    "tiny_char_transformer",
    "SequenceDistribution", "reward", "constraint", "pin", "token_constraint", "TokenMask",
    "is_partial", "prefix_length", "infer", "METHODS", "Posterior", "rewards", "seeding", "tokens", "notebook", "report",
    "Preferences", "RewardModel", "fit_reward", "learned_reward",
    "exact_draws", "ExactDraws", "log_evidence_bounds", "EvidenceBounds", "kl_sandwich", "KLSandwich",
    "learn_twist", "exact_twist", "prompted", "PromptedLM",
]

__version__ = "0.1.0"


def report(posteriors, out_dir, **kwargs):
    """Write an HTML report comparing posteriors (see :mod:`ppl_lm.reporting`)."""
    from .reporting import report as _report

    return _report(posteriors, out_dir, **kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
