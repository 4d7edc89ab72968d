"""The state of a batch of MH chains, and the one Metropolis–Hastings accept step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from ppl_lm.inference._runtime import Scores

from ppl_lm.conditions.factors import factor_of
from ppl_lm.conditions.masks import TokenMask

__all__ = ["ChainState", "ModelLayout", "mh_accept", "site_masks"]


@dataclass(frozen=True)
class ModelLayout:
    """What the kernel reads from the model once, in ``setup``: its arguments and latent sites.

    Attributes:
        args, kwargs: the model's arguments.
        order: every latent site, in program order.
        seq: the latent sequence sites (``SequenceDistribution`` each), edited in turn.
        others: every other latent site (Gibbs if finite, random-walk MH if continuous).
        site: the main sequence site (the Posterior's ``samples``): the first, ``None`` when
            every text is observed.
        masks: the token masks (``ppl_lm.token_constraint``) on each sequence site.
    """

    args: tuple
    kwargs: dict
    order: list[str]
    seq: dict
    others: dict
    site: str | None
    masks: dict = field(default_factory=dict)


@dataclass
class ChainState:
    """Every chain's current values and their scores, and the run's counters.

    ``proposed``/``accepted`` count edit moves after warm-up, ``*_warm`` during it (index =
    position in :data:`~ppl_lm.inference.mh.moves.MOVES`); ``rw_scale``/``rw_counts`` hold each
    continuous site's random-walk scale and ``[proposed, accepted]``; ``history`` one record per
    kept draw.
    """

    values: dict[str, torch.Tensor]
    scores: Scores
    num_moves: int
    rw_scale: dict[str, float] = field(default_factory=dict)
    t: int = 0  # sample() calls so far, warm-up included
    transitions: int = 0  # edit transitions so far: they visit the sequence sites in turn
    history: list[dict[str, Any]] = field(default_factory=list)
    log_target: torch.Tensor = field(init=False)
    proposed: torch.Tensor = field(init=False)
    accepted: torch.Tensor = field(init=False)
    proposed_warm: torch.Tensor = field(init=False)
    accepted_warm: torch.Tensor = field(init=False)
    rw_counts: dict[str, list[int]] = field(init=False)

    def __post_init__(self):
        self.set(self.values, self.scores)
        self.proposed, self.accepted, self.proposed_warm, self.accepted_warm = (
            torch.zeros(self.num_moves, dtype=torch.long) for _ in range(4))
        self.rw_counts = {k: [0, 0] for k in self.rw_scale}

    def set(self, values: dict[str, torch.Tensor], scores: Scores) -> None:
        """Make ``values`` (every latent site) with their ``scores`` the chains' state."""
        self.values = values
        self.scores = Scores(scores.log_prior.double(), scores.log_likelihood.double(), {},
                             dict(scores.rewards), dict(scores.constraints))
        self.log_target = self.scores.log_prior + self.scores.log_likelihood

    def take(self, accept: torch.Tensor, values: dict[str, torch.Tensor], scores: Scores) -> None:
        """Move the chains where ``accept`` holds to ``values`` (scored ``scores``); keep the rest."""
        a, cur = accept, self.scores
        merged = Scores(
            torch.where(a, scores.log_prior.double(), cur.log_prior),
            torch.where(a, scores.log_likelihood.double(), cur.log_likelihood),
            {},
            {k: torch.where(a, scores.rewards[k], v) for k, v in cur.rewards.items()},
            {k: torch.where(a, scores.constraints[k], v) for k, v in cur.constraints.items()},
        )
        kept = {k: torch.where(a.reshape(-1, *([1] * (v.dim() - 1))), v, self.values[k]) for k, v in values.items()}
        self.set({**self.values, **kept}, merged)

    def count(self, move: torch.Tensor, accept: torch.Tensor, warm: bool) -> None:
        """Record one transition's moves (indices ``[C]``) and which were accepted."""
        counts_p = torch.bincount(move, minlength=self.num_moves)
        counts_a = torch.bincount(move[accept], minlength=self.num_moves)
        if warm:
            self.proposed_warm += counts_p
            self.accepted_warm += counts_a
        else:
            self.proposed += counts_p
            self.accepted += counts_a

    def record(self, site: str | None) -> None:
        """Keep the current scores and every value but the main site's (returned as the draw)."""
        self.history.append({
            "log_prior": self.scores.log_prior.clone(),
            "log_likelihood": self.scores.log_likelihood.clone(),
            "rewards": {k: v.clone() for k, v in self.scores.rewards.items()},
            "constraints": {k: v.clone() for k, v in self.scores.constraints.items()},
            "values": {k: v.clone() for k, v in self.values.items() if k != site},
        })


def mh_accept(new_target: torch.Tensor, log_target: torch.Tensor, log_fwd: torch.Tensor, log_rev: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
    """The Metropolis–Hastings test of every chain ``[C]``: accept with probability
    ``min(1, exp(log target' - log target + log_rev - log_fwd))``.

    A proposal of zero target (``-inf`` or NaN) or with an impossible reverse (``log_rev =
    -inf``) is rejected; a NaN ratio otherwise means a broken LM or reward and raises.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> mh_accept(torch.tensor([0.0, -float("inf"), 5.0]), torch.zeros(3), torch.zeros(3),
    ...           torch.tensor([0.0, 0.0, -float("inf")]), g).tolist()
    [True, False, False]
    """
    log_alpha = new_target - log_target + log_rev - log_fwd
    log_alpha = torch.where(new_target > -math.inf, log_alpha, torch.full_like(log_alpha, -math.inf))
    if torch.isnan(log_alpha).any():
        raise FloatingPointError("NaN in the MH acceptance ratio: the LM or a reward returned NaN")
    return torch.rand(len(log_alpha), dtype=torch.float64, generator=generator).log() < log_alpha


def site_masks(trace, seq: dict) -> dict[str, tuple[TokenMask, ...]]:
    """The token masks of each sequence site, read off a scored trace of the model."""
    masks: dict[str, list[TokenMask]] = {name: [] for name in seq}
    for node in trace.nodes.values():
        f = factor_of(node)
        if f is None or not isinstance(f.mask, TokenMask):
            continue
        target = f.site if f.site is not None else (next(iter(seq)) if len(seq) == 1 else None)
        if target in masks:
            masks[target].append(f.mask)
    return {k: tuple(v) for k, v in masks.items()}
