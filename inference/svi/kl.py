"""Both KL directions between a guide q and the posterior π′ ∝ π·e^{r/β}, from weighted draws.

Draws come from a proposal ρ (the guide itself, or the prior) with known log-densities. With
``a = log π + log L − log ρ`` (log L: the condition factors, r/β for a reward) and
``b = log q − log ρ``:

- ``log Ẑ = log mean e^a`` (unbiased for Z in Ẑ, whatever ρ),
- ``KL(π′‖q) = E_π′[log π + log L − log q] − log Z ≈ Σ softmax(a)·(log π + log L − log q) − log Ẑ``,
- ``KL(q‖π′) = E_q[log q − log π − log L] + log Z ≈ Σ softmax(b)·(log q − log π − log L) + log Ẑ``
  (with ρ = q this is ``log Ẑ − ELBO``).

Each standard error is the delta method's, over the draws' influence values, so an estimate
built from the same draws as its log Ẑ carries their covariance. Self-normalised estimates
are consistent, not unbiased: with few draws or heavy-tailed weights they are biased (the
forward one low when the draws miss mass of π′: the weights cannot see what ρ never
proposes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["KLEstimate", "kl_estimates"]


@dataclass(frozen=True)
class KLEstimate:
    """Estimates from one batch of draws (nats), each with its standard error."""

    log_evidence: float
    log_evidence_se: float
    kl_reverse: float  # KL(q‖π′)
    kl_reverse_se: float
    kl_forward: float  # KL(π′‖q)
    kl_forward_se: float
    num_draws: int


def _ratio(log_w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ softmax(log_w)·h and its per-draw influence values (zero-weight draws contribute 0)."""
    w = torch.exp(log_w - log_w.max())
    w = w / w.mean()
    hh = torch.where(w > 0, h, torch.zeros_like(h))  # 0·(±inf) is 0: a draw of weight zero says nothing
    est = (w * hh).mean()
    return est, w * (hh - est)


def kl_estimates(log_q: torch.Tensor, log_prior: torch.Tensor, log_likelihood: torch.Tensor,
                 log_proposal: torch.Tensor | None = None) -> KLEstimate:
    """Both KLs and log Ẑ from draws of a proposal (default: the guide, ``log_proposal = log_q``).

    Args:
        log_q, log_prior, log_likelihood: per draw, ``[n]``; ``log_likelihood`` may be ``-inf``
            (a violated hard condition).
        log_proposal: the proposal's log-density of each draw; ``None`` when the draws are q's.

    Returns:
        A :class:`KLEstimate`. ``kl_reverse`` is ``inf`` when a q-weighted draw violates a hard
        condition (q has mass π′ does not); ``nan`` everywhere when no draw has positive weight.
    """
    log_q, log_prior, log_lik = (t.detach().double().reshape(-1) for t in (log_q, log_prior, log_likelihood))
    log_rho = log_q if log_proposal is None else log_proposal.detach().double().reshape(-1)
    n = log_q.numel()
    a = log_prior + log_lik - log_rho
    nan = float("nan")
    if n == 0 or not torch.isfinite(a).any():
        return KLEstimate(nan, nan, nan, nan, nan, nan, n)
    amax = a.max()
    wz = torch.exp(a - amax)
    log_z = float(amax + torch.log(wz.mean()))
    psi_z = wz / wz.mean() - 1  # influence of log Ẑ
    fwd, psi_f = _ratio(a, log_prior + log_lik - log_q)
    b = log_q - log_rho
    rev_h = log_q - log_prior - log_lik
    if bool(((rev_h == math.inf) & torch.isfinite(b)).any()):
        rev, rev_se = math.inf, nan
    else:
        r, psi_r = _ratio(b, rev_h)
        rev = float(r) + log_z
        rev_se = _se(psi_r + psi_z)
    return KLEstimate(log_z, _se(psi_z), rev, rev_se, float(fwd) - log_z, _se(psi_f - psi_z), n)


def _se(psi: torch.Tensor) -> float:
    n = psi.numel()
    return float(psi.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
