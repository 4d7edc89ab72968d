"""After training: the guide against prior importance sampling (both KLs and the evidence, ± se)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

import ppl_lm
from ppl_lm import seeding
from ppl_lm.diagnostics.warnings import PplLmWarning
from ppl_lm.inference.svi.elbo import particle_terms
from ppl_lm.inference.svi.kl import kl_estimates

__all__ = ["Crosscheck", "crosscheck", "correction_seed"]


@dataclass(frozen=True)
class Crosscheck:
    """The trained guide against prior importance sampling (independent draws), nats ± se.

    ``kl_reverse = log Ẑ_prior − ELBO`` (the ELBO of the correction's guide draws) estimates
    KL(q‖π′); ``kl_at_prior = log Ẑ_prior − E_π[log L]`` is KL(π‖π′), where training started;
    ``kl_forward`` is KL(π′‖q) on the prior's draws (weights e^{log L}).
    """

    num_samples: int
    log_evidence: float
    log_evidence_se: float
    elbo: float
    elbo_se: float
    kl_reverse: float
    kl_reverse_se: float
    kl_forward: float
    kl_forward_se: float
    kl_at_prior: float
    kl_at_prior_se: float


def correction_seed(seed: int) -> int:
    """The seed of the guide draws weighted after training (apart from the training stream)."""
    return (int(seed) * 1_000_003 + 12_345) % (2**62)


def crosscheck(model, args, kwargs, g, post, n, seed, progress) -> Crosscheck:
    """Prior importance sampling against the guide: both KLs and the evidence, with se."""
    with warnings.catch_warnings():  # a reference run: its own diagnoses are not the user's
        warnings.simplefilter("ignore", PplLmWarning)
        prior = ppl_lm.infer(model, *args, method="importance", num_samples=n, seed=correction_seed(seed + 1),
                             progress=progress, model_kwargs=kwargs)
    log_z, log_z_se = float(prior.log_evidence), float(prior.log_evidence_se or 0.0)
    # the correction's raw log-weights are f = log p − log q of its guide draws
    f = (post.log_weights.double() + float(post.log_evidence) + math.log(len(post))).double()
    elbo = float(f.mean()) if torch.isfinite(f).all() else -math.inf
    elbo_se = float(f.std() / math.sqrt(len(f))) if math.isfinite(elbo) else math.nan
    lik = prior.stats["log_likelihood"].double()
    e_lik = float(lik.mean()) if torch.isfinite(lik).all() else -math.inf
    kl_at_prior = log_z - e_lik
    kl_at_prior_se = math.hypot(log_z_se, float(lik.std() / math.sqrt(len(lik)))) if math.isfinite(e_lik) else math.nan
    with torch.no_grad(), seeding.seeded(seed):
        t = particle_terms(model, g, args, kwargs, len(prior), values=dict(prior.values))
    fwd = kl_estimates(t.log_q, t.log_prior, t.log_likelihood, log_proposal=t.log_prior)
    return Crosscheck(n, log_z, log_z_se, elbo, elbo_se, log_z - elbo, math.hypot(log_z_se, elbo_se),
                      fwd.kl_forward, fwd.kl_forward_se, kl_at_prior, kl_at_prior_se)
