"""The particles' genealogy: the Eve-based variance of log Ẑ and the path-degeneracy check.

An *Eve* is a particle's time-0 ancestor; resampling copies it to its offspring. Grouping the
final weights by Eve gives Lee & Whiteley's (2018) estimate of Var(Ẑ)/Ẑ² from a single run,
and the number of Eves left says whether any genealogy-based estimate can be trusted. The
effective count for the law of the sequences (Chan & Lai, 2013) is
:func:`ppl_lm.diagnostics.estimators.genealogy_diagnostics`.
"""

from __future__ import annotations

import torch

from ppl_lm.diagnostics.estimators import MIN_DRAWS_FOR_SE
from ppl_lm.diagnostics.warnings import InferenceWarning

__all__ = ["draw_rows", "eve_relative_variance", "path_degeneracy"]


def eve_relative_variance(log_w: torch.Tensor, eve: torch.Tensor, num_resampling: torch.Tensor) -> torch.Tensor:
    """Lee–Whiteley estimate of Var(Ẑ_r)/Ẑ_r² per replicate, from the Eve genealogy.

    ``log_w [R, N]`` (since each replicate's last resampling), ``eve [R·N]`` (row indices; Eves never
    cross replicates: Eve e belongs to replicate e // N), ``num_resampling [R]``. The estimate is
    1 − (N/(N−1))^(m+1) · Σ_{i,j: E_i ≠ E_j} W_i W_j with m the number of resampling events:
    exact (unbiased) for multinomial resampling, an approximation for the other schemes.
    """
    R, N = log_w.shape
    W = torch.softmax(log_w, -1).reshape(-1)  # normalised within each replicate
    W_e = torch.zeros(R * N, dtype=torch.float64).index_add_(0, eve, W)
    sum_sq = torch.zeros(R, dtype=torch.float64).index_add_(0, torch.arange(R * N) // N, W_e**2)
    c = (N / (N - 1)) ** (num_resampling.double() + 1)
    rel = 1.0 - c * (1.0 - sum_sq)
    return torch.nan_to_num(rel, nan=0.0)  # a dead replicate (Ẑ_r = 0) adds no variance term


def draw_rows(values: dict, names: list, B: int) -> torch.Tensor:
    """One row per particle that identifies its draw, for the genealogy diagnostics: the tokens of
    every sequence site, or, with none (every sequence site observed), every latent value."""
    if names:
        return torch.cat([values[k].reshape(B, -1) for k in names], -1)
    return torch.cat([v.reshape(B, -1).double() for v in values.values()], -1)


def path_degeneracy(num_eves: int, num_final: int, num_particles: int) -> InferenceWarning | None:
    """A warning when the ``num_final`` final particles descend from too few Eves; ``None`` otherwise.

    Fewer than :data:`~ppl_lm.diagnostics.estimators.MIN_DRAWS_FOR_SE` particles cannot have that
    many ancestors: a tiny run is judged by half its size.
    """
    if num_eves >= min(MIN_DRAWS_FOR_SE, max(2, num_particles // 2)):
        return None
    return InferenceWarning(
        "path_degeneracy",
        f"the {num_final} final particles descend from only {num_eves} initial particle(s), so the "
        "genealogy standard error of log Z and the effective count are unreliable.",
        "use more particles, a lower ess_threshold, or num_replicates >= 10 for an error bar from "
        "independent runs.")
