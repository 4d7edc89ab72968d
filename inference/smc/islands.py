"""Bounded memory: how many particles each sweep holds, and the sweeps pooled into one Posterior.

Replicates that fit in ``chunk_size`` rows are batched into one sweep; a replicate with more
particles runs as *islands* (Vergé, Dubarry, Del Moral & Moulines, 2015), independent SMC runs
whose sizes add up to ``num_particles``. Island u of size n_u in replicate r estimates Z by Ẑ_u,
so Ẑ_r = Σ_u (n_u/N)·Ẑ_u is unbiased, and its particles are pooled with weights
(n_u/N)·Ẑ_u·W_uj; the run's Ẑ is the mean of the replicates' Ẑ_r.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from ppl_lm.inference._runtime import cat_scores, finish, make_posterior

from ppl_lm.diagnostics.estimators import genealogy_diagnostics, log_mean_exp, normalise
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.posterior import Info, Posterior

from .genealogy import path_degeneracy

if TYPE_CHECKING:
    from .sweep import SweepResult

__all__ = ["SMCInfo", "TOKENS_PER_SWEEP", "LOGITS_PER_SWEEP", "default_chunk_size", "sweep_plan", "combine"]

log = logging.getLogger(__name__)

# Default bounds on one sweep: rows × (prompt + new tokens) (the KV cache) and rows × vocabulary
# (each [rows, vocab] float32 copy of the next-token log-probs: 256 MiB at the bound).
TOKENS_PER_SWEEP = 1 << 16
LOGITS_PER_SWEEP = 1 << 26


@dataclass(frozen=True)
class SMCInfo(Info):
    """Facts of an SMC run (options, genealogy, resampling).

    ``n_eff_genealogy`` is SMC's own effective count: the number of independent exact draws whose
    empirical law has the same expected TV error as these particles, from their genealogy
    (:func:`~ppl_lm.diagnostics.estimators.genealogy_diagnostics`), for the joint law of every
    sequence site; ``Posterior.ess`` stays Kish's ESS of the final weights.
    """

    num_particles: int = 0
    num_replicates: int = 1
    resampling: str = "multinomial"
    ess_threshold: float = 0.5
    proposal: str = "lm"
    twist: bool = False
    token_masks: int = 0
    chunk_size: int = 0
    num_sweeps: int = 1
    num_islands: int = 1
    log_evidence_se_genealogy: float = float("nan")
    log_evidence_replicates: list = field(default_factory=list)
    log_evidence_islands: list = field(default_factory=list)
    n_eff_genealogy: float = float("nan")
    num_eves: int = 0
    num_resampling: list = field(default_factory=list)
    ess_history: list = field(default_factory=list)
    num_steps: int = 0


SMCInfo.__module__ = "ppl_lm.inference.smc"  # its public home: reprs, pickles and the backend checks read it


def default_chunk_size(d: SequenceDistribution) -> int:
    """Rows per sweep within :data:`TOKENS_PER_SWEEP` tokens and :data:`LOGITS_PER_SWEEP` logits."""
    rows = min(TOKENS_PER_SWEEP // (d.prompt.shape[-1] + d.max_new_tokens), LOGITS_PER_SWEEP // d.lm.vocab_size)
    return max(2, rows)


def sweep_plan(num_particles: int, num_replicates: int, chunk_size: int) -> list[tuple[int, list[int]]]:
    """The sweeps of a run: ``(particles per island, [replicate of each island])``, in order.

    Whole replicates are batched while they fit in ``chunk_size`` rows; a replicate with more
    particles is split into ``ceil(N / chunk_size)`` islands whose sizes differ by at most one.

    >>> sweep_plan(10, 3, 25)
    [(10, [0, 1]), (10, [2])]
    >>> sweep_plan(10, 1, 4)
    [(4, [0]), (3, [0]), (3, [0])]
    """
    N, R = num_particles, num_replicates
    if N <= chunk_size:
        per = chunk_size // N
        return [(N, list(range(r, min(r + per, R)))) for r in range(0, R, per)]
    k = -(-N // chunk_size)
    if N // k < 2:
        raise ValueError(f"chunk_size={chunk_size} would split {N} particles into islands of fewer than 2 "
                         "particles; use a larger chunk_size")
    sizes = [N // k + (1 if i < N % k else 0) for i in range(k)]
    return [(n, [r]) for r in range(R) for n in sizes]


def combine(parts: list[SweepResult], N: int, R: int, chunk_size: int, sites: dict, options: dict) -> Posterior:
    """Pool the islands of every sweep into one Posterior (see the module notes).

    ``options``: the run's options recorded in :class:`SMCInfo` (``resampling``, ``ess_threshold``,
    ``proposal``, ``token_masks``).
    """
    # Per island u: log Ẑ_u, its share a_u = n_u / N of its replicate, its replicate.
    log_z_u = torch.cat([p.log_z for p in parts])
    log_a_u = torch.cat([torch.full((len(p.replicates),), math.log(p.size / N), dtype=torch.float64)
                         for p in parts])
    rep_u = torch.tensor([r for p in parts for r in p.replicates])
    rel_u = torch.cat([p.rel_var for p in parts])
    log_z_r = torch.full((R,), -math.inf, dtype=torch.float64)
    for r in range(R):
        log_z_r[r] = torch.logsumexp(log_a_u[rep_u == r] + log_z_u[rep_u == r], 0)
    log_z = float(log_mean_exp(log_z_r, 0))
    # Particle j of island u gets weight a_u · Ẑ_u · W_uj (W normalised within the island).
    final, eves, offset = [], [], 0
    for p in parts:
        lw = p.log_w.view(len(p.replicates), p.size)
        w = lw - torch.logsumexp(lw, -1, keepdim=True) + (p.log_z + math.log(p.size / N))[:, None]
        final.append(torch.where(torch.isfinite(lw), w, torch.full_like(w, -math.inf)).reshape(-1))
        eves.append(p.eve + offset)  # Eves never cross islands
        offset += lw.numel()
    final = torch.cat(final)
    W = torch.exp(normalise(final).double())
    # Var(Ẑ) = Σ_u (a_u / R)² Var(Ẑ_u), Var(Ẑ_u) ≈ Ẑ_u² · rel_u (Lee–Whiteley, per island).
    share = torch.exp(2 * (log_a_u + log_z_u - log_z)) / R**2
    se_eve = math.sqrt(max(float(torch.nan_to_num(share * rel_u, nan=0.0).sum()), 0.0))
    if R >= 2:
        ratio = torch.exp(log_z_r - log_z)  # Ẑ_r / mean Ẑ
        se = float(ratio.std(unbiased=True)) / math.sqrt(R)
    else:
        se = se_eve
    diag = genealogy_diagnostics(torch.cat([p.draws for p in parts]), torch.cat(eves), W)
    degenerate = path_degeneracy(diag["num_eves"], len(W), N)
    scores = cat_scores([p.scores for p in parts]) if len(parts) > 1 else parts[0].scores
    num_islands = len(log_z_u) // R
    info = SMCInfo(
        num_particles=N, num_replicates=R, **options, chunk_size=chunk_size, num_sweeps=len(parts),
        num_islands=num_islands, log_evidence_se_genealogy=se_eve, log_evidence_replicates=log_z_r.tolist(),
        log_evidence_islands=log_z_u.tolist() if num_islands > 1 else [],
        n_eff_genealogy=diag["n_eff"], num_eves=diag["num_eves"],
        num_resampling=torch.cat([p.num_resampling for p in parts]).tolist(),
        ess_history=parts[0].ess_history, num_steps=max(p.steps for p in parts),
    )
    log.info("smc: %d x %d particles (%d island(s) each), log Z=%.4f ± %.4f, n_eff=%.1f", R, N, num_islands,
             log_z, se, diag["n_eff"])
    post = make_posterior("smc", scores, final, sites, log_evidence=log_z, log_evidence_se=se, info=info,
                          ancestor=torch.cat(eves))
    return finish(post, [] if degenerate is None else [degenerate])
