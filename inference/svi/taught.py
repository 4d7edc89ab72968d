"""Guides taught by importance sampling: forward KL whose target draws can find what the guide misses.

The self-normalised forward objective on the guide's own draws (``proposal="guide"``) weights
them by π·L/q: a sequence the guide gives (almost) no mass is (almost) never drawn, so its
weight is never seen and its gradient never pulls the guide there. A guide that misses a mode
early keeps missing it, and the run reports a good-looking ESS of draws that do not cover π′.

Here the target draws come from a *defensive mixture* ``ρ = α·π + (1 − α)·q`` of the prior and
the guide (Hesterberg 1995), with each step's draws split deterministically: ``round(α·N)``
from the prior, the rest from the guide, every draw weighted by the mixture's density (the
balance heuristic of multiple importance sampling, Veach & Guibas 1995: unbiased for Z, and
lower variance than weighting each draw by its own component). Then

- the weights ``π·L/ρ <= L/α`` are bounded wherever the likelihood is, so no mass of π′ is
  invisible: a region the guide misses is found by the prior's share of the draws;
- the guide proposes for the sampler and the sampler's weighted draws train the guide: as the
  guide approaches π′, the guide's share of the draws carries the weight and the estimator's
  variance falls (the prior's share never costs more than a factor ``1/(1 − α)`` in ESS).

The gradient is ``−Σ_i c_i ∇log q(x_i)`` with ``c = softmax(log π + log L − log ρ)``: consistent
for ∇KL(π′‖q), biased by O(1/N) like every self-normalised estimate. It is a coefficient rule on
per-draw weights like the other estimators, so the data-parallel runner
(:mod:`~ppl_lm.inference.svi.distributed`) takes it unchanged (each block its own mixture).

Use it as ``method="svi", objective="forward", proposal="mixture"`` (or as the first half of
``objective="forward_then_reverse"``); :data:`PRIOR_FRACTION` is α.
"""

from __future__ import annotations

import math

import torch

from ppl_lm.inference.svi.elbo import ForwardKL, ParticleTerms, forward_coefficients, particle_terms

__all__ = ["PRIOR_FRACTION", "MixtureForwardKL", "mixture_terms", "split_draws"]

#: α, the prior's share of each step's draws. 1/2 bounds every weight by 2·L (the prior's
#: coverage) and costs at most half the ESS of a guide that has reached π′.
PRIOR_FRACTION = 0.5


def split_draws(n: int, prior_fraction: float = PRIOR_FRACTION) -> tuple[int, int]:
    """Draws from the prior and from the guide out of ``n`` (each at least one)."""
    if n < 2:
        raise ValueError(f"a defensive mixture needs at least 2 draws per step (one per component), got {n}")
    n_prior = min(n - 1, max(1, round(prior_fraction * n)))
    return n_prior, n - n_prior


def _cat(a: ParticleTerms, b: ParticleTerms) -> ParticleTerms:
    """The two batches' terms as one batch (prior's draws first)."""
    out = ParticleTerms(torch.cat([a.log_q, b.log_q]), torch.cat([a.log_prior, b.log_prior]),
                        torch.cat([a.log_likelihood, b.log_likelihood]))
    out.values = {k: torch.cat([a.values[k], b.values[k]]) for k in a.values}
    out.rewards = {k: torch.cat([a.rewards[k], b.rewards[k]]) for k in a.rewards}
    out.constraints = {k: torch.cat([a.constraints[k], b.constraints[k]]) for k in a.constraints}
    out.betas = dict(a.betas)
    return out


def mixture_terms(model, guide, args: tuple, kwargs: dict, num_particles: int, *,
                  prior_fraction: float = PRIOR_FRACTION) -> ParticleTerms:
    """``num_particles`` draws of the defensive mixture ``α·π + (1 − α)·q``, scored.

    ``log_proposal`` is the mixture's log-density of every draw (α the realised share
    ``n_prior / num_particles``), whichever component drew it.
    """
    n_prior, n_guide = split_draws(num_particles, prior_fraction)
    from_prior = particle_terms(model, guide, args, kwargs, n_prior, proposal="prior")
    from_guide = particle_terms(model, guide, args, kwargs, n_guide, proposal="guide")
    if (from_guide.log_prior == -math.inf).any():
        raise ValueError("the guide drew a sequence the prior gives probability zero; the guide's support "
                         "must lie inside the prior's")
    t = _cat(from_prior, from_guide)
    alpha = n_prior / num_particles
    t.log_proposal = torch.logaddexp(math.log(alpha) + t.log_prior.double(),
                                     math.log1p(-alpha) + t.log_q.detach().double()).float()
    return t


class MixtureForwardKL(ForwardKL):
    """Forward KL(π′‖q) on draws of the defensive mixture ``α·π + (1 − α)·q`` (``proposal="mixture"``).

    Usable wherever Pyro takes an ``ELBO``. See the module docstring for why the prior's share
    of the draws matters.

    Args:
        num_particles: draws per step (>= 2: at least one per component).
        prior_fraction: α, the prior's share of the draws, in (0, 1).
    """

    proposal = "mixture"

    def __init__(self, num_particles: int = 8, prior_fraction: float = PRIOR_FRACTION):
        super().__init__(num_particles, proposal="guide")
        if not (isinstance(prior_fraction, (int, float)) and 0 < prior_fraction < 1):
            raise ValueError(f"prior_fraction must be in (0, 1), got {prior_fraction!r}")
        self.proposal = "mixture"
        self.prior_fraction = float(prior_fraction)

    def terms(self, model, guide, args, kwargs, n: int | None = None) -> ParticleTerms:
        return mixture_terms(model, guide, args, kwargs, n or self.num_particles, prior_fraction=self.prior_fraction)

    def log_weights(self, t):
        return (t.log_prior.double() + t.log_likelihood.double() - t.log_proposal.double())

    def coefficients(self, a):
        return forward_coefficients(a, baseline=False)
