"""Updates of the latent sites that are not sequences: exact Gibbs for a finite support,
random-walk Metropolis–Hastings (scale adapted in warm-up) for a continuous one."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from ppl_lm.inference._runtime import Scores
from ppl_lm.inference.mh.state import ChainState, mh_accept

from ppl_lm.tokens import categorical

__all__ = ["check_updatable", "random_walk_sites", "update_other_latents"]

#: Random-walk acceptance that the warm-up adaptation aims at (Roberts & Rosenthal, 2001).
TARGET_ACCEPTANCE = 0.44


def check_updatable(others: dict) -> None:
    """Raise for a discrete latent site MH cannot update (no finite ``enumerate_support``)."""
    for k, v in others.items():
        if not getattr(v, "has_enumerate_support", False) and v.support.is_discrete:
            raise ValueError(f"method='mh' cannot update the discrete latent site {k!r}: it has no finite "
                             "enumerate_support. Use method='importance' or 'smc'")


def random_walk_sites(others: dict) -> dict[str, float]:
    """The continuous sites among ``others``, each with its starting random-walk scale."""
    return {k: 0.5 for k, v in others.items() if not getattr(v, "has_enumerate_support", False)}


def update_other_latents(state: ChainState, others: dict, score: Callable[[dict], Scores], warm: bool,
                         generator: torch.Generator | None) -> None:
    """One update of every site in ``others``, given the rest of ``state``: exact Gibbs for a
    discrete site (one scoring pass per value of its support), random-walk MH for a continuous
    one (its scale adapted towards acceptance 0.44 in warm-up)."""
    for name, d in others.items():
        if name in state.rw_scale:
            _random_walk(state, name, score, warm, generator)
        else:
            _gibbs(state, name, d, score, generator)


def _gibbs(state: ChainState, name: str, d, score, g) -> None:
    C = len(state.log_target)
    support = d.enumerate_support(expand=False).reshape(-1, *d.event_shape)
    lj = []
    for v in support:
        sc = score({**state.values, name: v.expand(C, *v.shape).clone()})
        lj.append(sc.log_prior.double() + sc.log_likelihood.double())
    lj = torch.stack(lj, -1)  # [C, K]
    pick = categorical(torch.log_softmax(lj, -1).float(), g)
    values = {**state.values, name: support[pick].clone()}
    state.set(values, score(values))


def _random_walk(state: ChainState, name: str, score, warm: bool, g) -> None:
    C = len(state.log_target)
    cur = state.values[name]
    step = state.rw_scale[name]
    prop = cur + step * torch.randn(cur.shape, dtype=cur.dtype, generator=g)
    sc = score({**state.values, name: prop})
    new_target = sc.log_prior.double() + sc.log_likelihood.double()
    zero = torch.zeros(C, dtype=torch.float64)
    acc = mh_accept(new_target, state.log_target, zero, zero, g)  # symmetric proposal
    mask = acc.reshape(C, *([1] * (cur.dim() - 1)))
    values = {**state.values, name: torch.where(mask, prop, cur)}
    state.set(values, score(values))
    state.rw_counts[name][0] += C
    state.rw_counts[name][1] += int(acc.sum())
    if warm:  # Robbins–Monro on log scale
        rate = float(acc.double().mean())
        state.rw_scale[name] = float(step * math.exp((rate - TARGET_ACCEPTANCE) / math.sqrt(1 + state.t)))
