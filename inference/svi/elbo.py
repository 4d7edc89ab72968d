"""Score-function estimators that fit an LM guide to the posterior: reverse KL (the ELBO) and forward KL.

For the model "prior π, likelihood L = exp(r/β)" and a guide q, per draw
``f(x) = log π(x) + log L(x) − log q(x)``; ``ELBO = E_q[f] = (E_q[r] − β·KL(q‖π))/β`` and
``log Z − ELBO = KL(q‖π′)`` with ``π′ ∝ π·L``: maximising the ELBO is KL-regularised reward
maximisation (mode-seeking). The other direction, ``KL(π′‖q) = E_π′[log π′ − log q]``, is
minimised by maximum likelihood of q on draws of π′ (distribution matching, as in DPG): mass-
covering, and it cannot collapse onto one text, since a text of π′ that q never proposes
costs it without bound.

The site is discrete, so both gradients are score-function ones, ``Σ_i c_i ∇log q(x_i)``, and
an estimator is a rule for the coefficients ``c`` of a batch of draws:

- :class:`RLOO_ELBO` (``objective="reverse"``), draws from q: ``c_i = (f_i − mean_{j≠i} f_j)/N``
  (the leave-one-out baseline: unbiased for ∇ELBO, far less variance than none).
- :class:`ForwardKL` (``objective="forward"``), self-normalised importance weights of π′:
  from q's own draws ``c_i = softmax(f)_i − 1/N`` (the ``−1/N`` is a baseline: E_q ∇log q = 0;
  at q = π′ every c_i is 0, so the estimator has no variance there), or from the prior's
  draws ``c_i = softmax(log L)_i`` (weights that do not depend on q; no baseline is unbiased
  there). Consistent, biased by O(1/N) like every self-normalised estimate.

Pyro's own estimators do not fit this site: ``Trace_ELBO`` ignores baselines,
``TraceGraph_ELBO`` drops a reward that lost its provenance (text rewards leave torch),
``TraceMeanField_ELBO`` / ``RenyiELBO`` assume what an LM site does not give. So this module
writes ``loss_and_grads`` on ``poutine.trace`` of the guide and the shared model runtime
(:func:`ppl_lm.inference._runtime.run_model`) replayed on its draws.

Hard conditions make the reverse KL infinite while the guide violates them: with
``relax_penalty=c`` every ``-inf`` condition factor is replaced by ``-c`` (training only;
correct the trained guide afterwards by importance sampling, as ``method="svi"`` does). The
forward estimators need no relaxation: a violating draw has weight zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from ppl_lm.validation import check_int
from ppl_lm.conditions.factors import factor_of
from ppl_lm.inference._runtime import (
    check_guide_sites,
    is_latent,
    fixed_values,
    observed_log_prob,
    particle_dim,
    run_guide,
    run_model,
    site_log_prob,
)
from pyro import poutine
from pyro.infer import ELBO

__all__ = [
    "OBJECTIVES",
    "PROPOSALS",
    "RLOO_ELBO",
    "ForwardKL",
    "ParticleTerms",
    "make_loss",
    "particle_terms",
    "summarise",
    "trace_guide",
]

OBJECTIVES = ("reverse", "forward")
PROPOSALS = ("guide", "prior")


@dataclass
class ParticleTerms:
    """Per-draw pieces of the objectives (each ``[N]``)."""

    log_q: torch.Tensor  # guide log-probability (differentiable w.r.t. the guide's parameters)
    log_prior: torch.Tensor  # log π(x) of the latent sites
    log_likelihood: torch.Tensor  # sum of condition factors (relaxed where asked)
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # raw r per reward site
    betas: dict[str, float] = field(default_factory=dict)
    constraints: dict[str, torch.Tensor] = field(default_factory=dict)  # ok per constraint site
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    log_proposal: torch.Tensor | None = None  # the draws' proposal log-density (None: the guide's)

    @property
    def f(self) -> torch.Tensor:
        """``log p(x, obs) − log q(x)`` per draw, detached."""
        return (self.log_prior + self.log_likelihood - self.log_q.detach()).detach()

    @property
    def proposal_log_prob(self) -> torch.Tensor:
        return self.log_q.detach() if self.log_proposal is None else self.log_proposal

    def draws(self) -> torch.Tensor:
        """``[N, 4]``: log q, log π, log L, log ρ (the training loop keeps these per step)."""
        return torch.stack([self.log_q.detach(), self.log_prior, self.log_likelihood, self.proposal_log_prob], -1)


def _relaxed(scores, n: int, penalty: float) -> torch.Tensor:
    """The condition factors again, each ``-inf`` one replaced by ``-penalty`` (per site)."""
    total = torch.zeros(n)
    for name, site in scores.trace.nodes.items():
        if site["type"] == "sample" and site["is_observed"]:
            lp = site_log_prob(name, observed_log_prob(site), n, particle_dim(site)).float()
            total = total + torch.where(lp == -math.inf, torch.full_like(lp, -float(penalty)), lp)
    return total


def trace_guide(guide: Callable, args: tuple, kwargs: dict, n: int,
                values: dict | None = None) -> tuple[poutine.Trace, torch.Tensor]:
    """Run ``guide`` for ``n`` particles (its latent sites fixed to ``values`` ``[n, ...]`` if given):
    its trace and ``log q`` per particle ``[n]``, differentiable w.r.t. the guide's parameters."""
    g = guide if values is None else poutine.replay(guide, trace=fixed_values(values))
    guide_tr, by_site = run_guide(g, args, kwargs, n, detach=False)  # the runtime's one guide scoring
    log_q = torch.zeros(n)
    for lq in by_site.values():
        log_q = log_q + lq.float()
    return guide_tr, log_q


def particle_terms(model: Callable, guide: Callable, args: tuple, kwargs: dict, num_particles: int, *,
                   relax_penalty: float | None = None, values: dict | None = None,
                   proposal: str = "guide") -> ParticleTerms:
    """Draw ``num_particles`` sequences and score them under the guide and the model.

    Args:
        relax_penalty: replace each ``-inf`` condition factor by ``-relax_penalty``.
        values: fix the latent sites to these values ``[num_particles, ...]`` instead of
            sampling (to evaluate on an enumerated support).
        proposal: ``"guide"`` (draw from the guide; the model is replayed on its draws) or
            ``"prior"`` (draw from the model; the guide scores the draws).
    """
    n = num_particles
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    log_proposal = None
    if proposal == "prior" and values is None:
        with torch.no_grad():
            prior = run_model(model, args, kwargs, n)
        values = prior.values
        log_proposal = prior.log_prior.float()
    guide_tr, log_q = trace_guide(guide, args, kwargs, n, values)
    guide_latent = [name for name, site in guide_tr.nodes.items() if is_latent(site)]
    with torch.no_grad():
        scores = run_model(model, args, kwargs, n, guide_trace=guide_tr)
    check_guide_sites(guide_latent, list(scores.values), cover_all=True)
    log_lik = scores.log_likelihood.float()
    if relax_penalty is not None and (log_lik == -math.inf).any():
        log_lik = _relaxed(scores, n, relax_penalty)
    out = ParticleTerms(log_q, scores.log_prior.float(), log_lik, log_proposal=log_proposal)
    out.values = scores.values
    for name, r in scores.rewards.items():
        out.rewards[name] = r.float()
        out.betas[name] = factor_of(scores.trace.nodes[name]).beta
    for name, ok in scores.constraints.items():
        out.constraints[name] = ok.bool()
    if torch.isnan(out.log_prior).any() or torch.isnan(out.log_likelihood).any() or torch.isnan(log_q).any():
        raise FloatingPointError("NaN in the objective's terms: the LM, the guide or a reward produced NaN")
    return out


def summarise(terms: ParticleTerms) -> dict[str, float]:
    """Step estimates under q: ``elbo``, ``kl_prior`` (KL(q‖π)), ``reward:NAME`` (raw r), ``ok:NAME``.

    Plain means over q's draws; over another proposal's draws, self-normalised by q/ρ.
    """
    log_q = terms.log_q.detach().double()
    if terms.log_proposal is None:
        w = torch.full_like(log_q, 1.0 / len(log_q))
    else:
        w = torch.softmax(log_q - terms.log_proposal.double(), 0)

    def mean(x):
        x = x.double()
        return float((w * torch.where(w > 0, x, torch.zeros_like(x))).sum())

    out = {"elbo": mean(terms.f), "kl_prior": mean(log_q - terms.log_prior)}
    for name, r in terms.rewards.items():
        out[f"reward:{name}"] = mean(r)
    for name, ok in terms.constraints.items():
        out[f"ok:{name}"] = mean(ok)
    return out


# -- coefficient rules: c[b, i] for blocks of draws; the surrogate is −Σ c·log q / num_blocks ----
def reverse_coefficients(f: torch.Tensor) -> torch.Tensor:
    """RLOO: ``(f_i − mean_{j≠i} f_j)/n`` within each block (row) of ``f`` ``[B, n]``."""
    n = f.shape[-1]
    baseline = (f.sum(-1, keepdim=True) - f) / (n - 1)
    return (f - baseline) / n


def forward_coefficients(log_w: torch.Tensor, baseline: bool) -> torch.Tensor:
    """Self-normalised weights ``softmax(log_w)`` per block (minus ``1/n`` with ``baseline``);
    a block whose weights are all zero contributes nothing."""
    n = log_w.shape[-1]
    dead = ~torch.isfinite(log_w).any(-1, keepdim=True)
    w = torch.softmax(torch.where(dead, torch.zeros_like(log_w), log_w), -1)
    if baseline:
        w = w - 1.0 / n
    return torch.where(dead, torch.zeros_like(w), w)


class _ScoreFunctionLoss(ELBO):
    """Shared machinery: draw, score, weight the guide's log-probabilities by a coefficient rule."""

    proposal = "guide"
    relax_penalty: float | None = None

    def __init__(self, num_particles: int):
        check_int("num_particles", num_particles, 2)  # a baseline needs two draws
        super().__init__(num_particles=num_particles, max_plate_nesting=1, vectorize_particles=False)
        self.last: dict[str, float] = {}
        self.last_draws = torch.empty(0, 4)
        self.last_betas: dict[str, float] = {}
        self.last_reward_range: dict[str, tuple[float, float]] = {}

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - ELBO's abstract hook
        raise NotImplementedError("this estimator vectorises its draws in one plate; it has no per-particle traces")

    def terms(self, model, guide, args, kwargs, n: int | None = None) -> ParticleTerms:
        """One batch of draws (``n`` of them, default ``num_particles``), checked for this objective."""
        t = particle_terms(model, guide, args, kwargs, n or self.num_particles, relax_penalty=self.relax_penalty,
                           proposal=self.proposal)
        self.check(t)
        return t

    def check(self, t: ParticleTerms) -> None:
        if self.proposal == "guide" and (t.log_prior == -math.inf).any():
            raise ValueError("the guide drew a sequence the prior gives probability zero; the guide's support "
                             "must lie inside the prior's")

    def log_weights(self, t: ParticleTerms) -> torch.Tensor:
        """The per-draw quantity the coefficient rule reads (``[n]``, float64)."""
        raise NotImplementedError

    def coefficients(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def surrogate(self, t: ParticleTerms) -> torch.Tensor:
        c = self.coefficients(self.log_weights(t).unsqueeze(0))[0]
        return -(c.float() * t.log_q).sum()

    def _record(self, t: ParticleTerms) -> None:
        self.last = summarise(t)
        self.last_draws = t.draws()
        self.last_betas = dict(t.betas)
        self.last_reward_range = {k: (float(r.min()), float(r.max())) for k, r in t.rewards.items()}

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Estimate of −ELBO (no gradients)."""
        with torch.no_grad():
            t = self.terms(model, guide, args, kwargs)
        self._record(t)
        return -self.last["elbo"]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The surrogate loss (its gradient estimates the objective's; its value is not the objective)."""
        t = self.terms(model, guide, args, kwargs)
        self._record(t)
        return self.surrogate(t)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate −ELBO and accumulate the surrogate's gradient into the guide's parameters."""
        s = self.differentiable_loss(model, guide, *args, **kwargs)
        if s.requires_grad:
            s.backward()
        return -self.last["elbo"]


class RLOO_ELBO(_ScoreFunctionLoss):
    """Reverse KL: the ELBO, score function with a leave-one-out baseline, draws from the guide.

    Usable wherever Pyro takes an ``ELBO``: ``pyro.infer.SVI(model, guide, optim, loss=RLOO_ELBO(8))``.
    After each call :attr:`last` holds the step's estimates (``elbo``, ``kl_prior``,
    ``reward:NAME``, ``ok:NAME``) and :attr:`last_draws` the draws' log-densities.

    Args:
        num_particles: draws per step (>= 2: the baseline needs another draw).
        relax_penalty: finite penalty replacing ``-inf`` condition factors during training
            (``None``: hard conditions stay hard, and a violating draw raises).
    """

    objective = "reverse"

    def __init__(self, num_particles: int = 8, relax_penalty: float | None = None):
        super().__init__(num_particles)
        if relax_penalty is not None and not (math.isfinite(relax_penalty) and relax_penalty > 0):
            raise ValueError(f"relax_penalty must be a finite number > 0 or None, got {relax_penalty!r}")
        self.relax_penalty = relax_penalty

    def check(self, t):
        super().check(t)
        if (t.log_likelihood == -math.inf).any():
            raise ValueError(
                "a guide draw violates a hard condition, so the reverse KL (and the ELBO) is -inf. Train on "
                "the relaxed penalty (relax_penalty=10, the svi default), or with objective='forward' (no "
                "relaxation needed), and correct by importance sampling")

    def log_weights(self, t):
        return t.f.double()

    def coefficients(self, a):
        return reverse_coefficients(a)


class ForwardKL(_ScoreFunctionLoss):
    """Forward KL(π′‖q): self-normalised importance-weighted maximum likelihood of the guide.

    Args:
        num_particles: draws per step (>= 2).
        proposal: ``"guide"`` (the guide's own draws, weights π·L/q, with the ``−1/N`` baseline)
            or ``"prior"`` (the prior's draws, weights L, no baseline).
    """

    objective = "forward"

    def __init__(self, num_particles: int = 8, proposal: str = "guide"):
        super().__init__(num_particles)
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        self.proposal = proposal

    def log_weights(self, t):
        if self.proposal == "prior":
            return t.log_likelihood.double()
        return t.f.double()

    def coefficients(self, a):
        return forward_coefficients(a, baseline=self.proposal == "guide")


def make_loss(objective: str, num_particles: int, *, proposal: str = "guide",
              relax_penalty: float | None = None) -> _ScoreFunctionLoss:
    """The estimator of ``objective`` ("reverse" or "forward"; the forward one's draws from ``proposal``:
    "guide", "prior" or "mixture", :mod:`~ppl_lm.inference.svi.taught`)."""
    if objective == "reverse":
        if proposal != "guide":
            raise ValueError(f"objective='reverse' draws from the guide; proposal={proposal!r} is for "
                             "objective='forward'")
        return RLOO_ELBO(num_particles, relax_penalty=relax_penalty)
    if objective == "forward":
        if proposal == "mixture":  # the defensive mixture of prior and guide (taught.py)
            from ppl_lm.inference.svi.taught import MixtureForwardKL

            return MixtureForwardKL(num_particles)
        return ForwardKL(num_particles, proposal=proposal)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
