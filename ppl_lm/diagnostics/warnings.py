"""Typed warnings: what a failed or doubtful run says about itself, first.

Every backend attaches a list of :class:`InferenceWarning` to its :class:`~ppl_lm.Posterior`
(``post.warnings``); the CLI prints them and the report shows them before anything else. Each
warning is also raised with :func:`warnings.warn` (category :class:`PplLmWarning`) so that a
script sees it at the user's own line.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backends import Kind
from ..tokens import support_size
from .estimators import KHAT_THRESHOLD, RHAT_THRESHOLD, row_groups

if TYPE_CHECKING:
    from ..posterior import Posterior

__all__ = ["InferenceWarning", "PplLmWarning", "emit", "diagnose", "user_stacklevel", "more_draws_advice", "verdict",
           "MIN_BULK_ESS", "MIN_DRAWS", "MIN_EFFECTIVE_DRAWS"]

#: Bulk ESS below which MCMC estimates are too noisy to report (ArviZ: 100 per chain, 400 in all).
MIN_BULK_ESS = 100
#: Fewer draws than this, or fewer effective draws than :data:`MIN_EFFECTIVE_DRAWS`, is a
#: ``too_few_draws`` run: a mean from 30 independent draws is off by 0.18 sd (one standard error),
#: and the diagnostics themselves (k-hat's tail fit, ESS, R-hat) are noise below about 100 draws.
MIN_DRAWS = 100
MIN_EFFECTIVE_DRAWS = 30


class PplLmWarning(UserWarning):
    """The ``warnings`` category of every ppl-lm inference warning."""


@dataclass(frozen=True)
class InferenceWarning:
    """One diagnosis of a run.

    Attributes:
        code: a stable identifier (``"khat"``, ``"few_distinct"``, ``"path_degeneracy"``,
            ``"rhat"``, ``"low_ess"``, ``"svi_divergence"``, ``"disagreeing_backends"``...).
        message: one sentence saying what is wrong, with the number that shows it.
        fix: what to do about it.
    """

    code: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} Fix: {self.fix}"


def _library_dirs() -> tuple[str, ...]:
    import ppl_lm
    import ppl_lm.inference
    import ppl_lm.models

    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                 for m in (ppl_lm, ppl_lm.inference, ppl_lm.models))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes :func:`warnings.warn`, called by the caller of this function,
    point at the first frame outside ppl-lm (the user's line)."""
    lib = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(lib):
        frame, level = frame.f_back, level + 1
    return level


def emit(items: list[InferenceWarning], method: str) -> None:
    """Raise each warning with :func:`warnings.warn`, attributed to the user's line."""
    for w in items:
        warnings.warn(f"{method}: {w}", PplLmWarning, stacklevel=user_stacklevel())


def num_sequences(post: Posterior) -> int | float:
    """How many canonical sequences the main site can hold (``inf`` when unknown): a posterior
    over a toy support of 85 sequences is not "collapsed" for having 13 distinct ones."""
    vocab = getattr(post.lm, "vocab_size", None)
    if vocab is None or post.samples is None or post.samples.dim() != 2:
        return math.inf
    if (vocab - 1) ** post.samples.shape[1] > 2**62:
        return math.inf
    return support_size(vocab, post.samples.shape[1])


def more_draws_advice(post: Posterior) -> str:
    """What gives this run more effective draws, read from its fields (never its method name):
    chains, resampled particles (``ancestor``), a trained guide, or independent proposals."""
    if post.is_mcmc:
        return "run more draws per chain (num_samples), more chains (num_chains) or a longer warm-up (warmup_steps)."
    if post.ancestor is not None:
        return "use more particles (num_particles), or num_replicates >= 10 independent runs."
    if post.guide is not None:
        return "train the guide longer (num_steps) or draw more from it (num_samples)."
    return "use more samples (num_samples), method='smc', or a better proposal (a guide trained with method='svi')."


def _is_enumeration(post: Posterior) -> bool:
    return post.kind is Kind.EXACT


def diagnose(post: Posterior) -> list[InferenceWarning]:
    """The checks every posterior gets, from its typed fields: heavy-tailed weights (k-hat),
    collapse onto few distinct sequences, unmixed chains (R-hat), too few draws (fewer than
    :data:`MIN_DRAWS`, or fewer than :data:`MIN_EFFECTIVE_DRAWS` effective ones) and too few
    effective draws among many (bulk ESS of chains; Kish's ESS of weights). Each fix fits the run
    (:func:`more_draws_advice`).

    Backend-specific checks (SMC path degeneracy, SVI divergence) are added by their backends.
    """
    from .inference_data import effective_draws

    out: list[InferenceWarning] = []
    if _is_enumeration(post):
        return out
    more = more_draws_advice(post)
    if post.khat is not None and post.khat > KHAT_THRESHOLD:
        out.append(InferenceWarning(
            "khat", f"Pareto k-hat is {post.khat:.2f} > {KHAT_THRESHOLD}: the importance weights are heavy-tailed "
            "(or few samples carry weight), so estimates, log Z and their standard errors are unreliable.", more))
    n = len(post)
    # Collapse onto few sequences; a posterior with no latent sequence (every text observed) has
    # only other latents, whose few distinct values (a world among K) are no sign of collapse.
    alive = None if post.samples is None else post.samples[torch.isfinite(post.log_weights) & (post.log_weights > -1e30)]
    distinct = 0 if alive is None or not len(alive) else int(row_groups(alive).max()) + 1
    if alive is not None and n >= 10 and distinct <= max(1, min(n, num_sequences(post)) // 100):
        out.append(InferenceWarning(
            "few_distinct", f"only {distinct} distinct sequence(s) among {n} samples carry weight: the sampler "
            "may have collapsed onto a mode, and every estimate rests on those few sequences.",
            "check the guide or proposal (a collapsed SVI guide needs a smaller lr or a restart), or use more samples."))
    if post.rhat is not None and post.rhat > RHAT_THRESHOLD:
        out.append(InferenceWarning(
            "rhat", f"split R-hat is {post.rhat:.3f} > {RHAT_THRESHOLD}: the chains have not mixed (they disagree).",
            "run more warm-up and more draws, more chains, or start chains from better states."))
    n_eff = effective_draws(post)
    what = "bulk ESS" if post.is_mcmc else "the weights' effective sample size"
    if n < MIN_DRAWS or n_eff < MIN_EFFECTIVE_DRAWS:
        out.append(InferenceWarning(
            "too_few_draws", f"{n} draws, worth about {n_eff:.0f} independent draw{'' if round(n_eff) == 1 else 's'} "
            f"({what}): below {MIN_DRAWS} draws "
            f"or {MIN_EFFECTIVE_DRAWS} effective draws, estimates, error bars and these diagnostics are too noisy "
            "to trust.", more))
    elif n_eff < MIN_BULK_ESS:
        out.append(InferenceWarning(
            "low_ess", f"{what} is {n_eff:.0f} of {n} draws (< {MIN_BULK_ESS}): every estimate rests on about "
            f"{n_eff:.0f} effective draws.", more))
    return out


def verdict(post: Posterior) -> str:
    """One line: can this run's estimates be trusted? ``"yes"``, or ``"no — "`` and the reasons,
    from its warnings and the numbers behind them (e.g. ``no — path degeneracy, 3 ancestors``)."""
    if not post.warnings:
        return "yes (exact enumeration)" if _is_enumeration(post) else "yes"
    from .inference_data import effective_draws

    def reason(w: InferenceWarning) -> str:
        if w.code == "path_degeneracy" and getattr(post.info, "num_eves", None) is not None:
            k = int(getattr(post.info, "num_eves", None))
            return f"path degeneracy, {k} ancestor{'s' if k != 1 else ''}"
        if w.code == "khat" and post.khat is not None:
            return f"heavy-tailed weights (k-hat {post.khat:.2f})"
        if w.code == "rhat" and post.rhat is not None:
            return f"chains not mixed (R-hat {post.rhat:.3f})"
        if w.code in ("too_few_draws", "low_ess"):
            return f"{w.code.replace('_', ' ')} ({len(post)} draws, {effective_draws(post):.0f} effective)"
        return w.code.replace("_", " ")

    reasons = list(dict.fromkeys(reason(w) for w in post.warnings))
    return "no — " + "; ".join(reasons)
