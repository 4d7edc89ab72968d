"""Starting states of the MH chains: the caller's, checked, or admissible prior draws."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from ppl_lm.inference._runtime import Scores, run_model
from ppl_lm.inference.mh.state import ModelLayout
from tqdm.auto import tqdm

from ppl_lm import seeding as _random

__all__ = ["initial_states"]

log = logging.getLogger(__name__)


def initial_states(model, layout: ModelLayout, num_chains: int, initial_samples: torch.Tensor | None,
                   init_budget: int, score: Callable[[dict], Scores], progress: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Every latent site's starting value for each of ``num_chains`` chains.

    ``initial_samples`` (``[num_chains, T]`` token ids) starts the main sequence site, when it
    is the only latent site; otherwise prior draws are made in batches, up to ``init_budget``,
    until every chain has one that satisfies every condition.
    """
    if initial_samples is not None:
        return {layout.site: _checked_initial_samples(layout, num_chains, initial_samples, score)}
    return _admissible_prior_draws(model, layout, num_chains, init_budget, progress)


def _checked_initial_samples(layout: ModelLayout, C: int, initial_samples, score) -> torch.Tensor:
    if layout.site is None:
        raise ValueError("initial_samples gives the first latent sequence site, and this model has none (every "
                         "lm.sequence(...) site is observed): leave initial_samples out")
    dist = layout.seq[layout.site]
    T, V = dist.max_new_tokens, dist.lm.vocab_size
    x0 = torch.as_tensor(initial_samples)
    if x0.dtype.is_floating_point or x0.dtype == torch.bool:
        raise TypeError("initial_samples must be a LongTensor of token ids")
    x0 = x0.long().cpu()
    if x0.shape != (C, T):
        raise ValueError(f"initial_samples must have shape [num_chains, T] = [{C}, {T}], got {tuple(x0.shape)}")
    if x0.min() < 0 or x0.max() >= V:
        raise ValueError(f"initial_samples hold token ids outside [0, {V})")
    if not bool(dist.canonical(x0).all()):
        raise ValueError("initial_samples must be EOS-padded: every position after the first EOS is EOS")
    rest = [k for k in (*layout.seq, *layout.others) if k != layout.site]
    if rest:
        raise ValueError("initial_samples gives only the sequence site; this model has other latent sites "
                         f"{rest}: leave initial_samples out (admissible prior draws start the chains)")
    sc = score({layout.site: x0})
    if not bool(torch.isfinite(sc.log_prior + sc.log_likelihood).all()):
        raise ValueError("some initial_samples have zero posterior probability (a constraint fails "
                         "or the LM gives them probability 0)")
    return x0


def _admissible_prior_draws(model, layout: ModelLayout, C: int, init_budget: int, progress: bool
                            ) -> dict[str, torch.Tensor]:
    site = layout.site
    T = 0 if site is None else layout.seq[site].max_new_tokens
    found, found_vals, draws = [], [], 0
    batch = max(64, 4 * C)
    # Prior draws until every chain has an admissible start: seconds on a real LM, so say so.
    bar = tqdm(total=C, desc="mh: starting states", unit="chain", leave=False, disable=not progress)
    try:
        while sum(len(f) for f in found) < C and draws < init_budget:
            bar.set_postfix(prior_draws=draws + batch)
            with torch.no_grad():
                sc = run_model(model, layout.args, layout.kwargs, batch)
            draws += batch
            ok = torch.isfinite(sc.log_prior + sc.log_likelihood)
            main = sc.values[site] if site is not None else torch.zeros(batch, 0, dtype=torch.long)
            found.append(main.reshape(batch, -1)[ok].cpu())
            found_vals.append({k: sc.values[k][ok].cpu() for k in sc.values if k != site})
            bar.update(min(C, sum(len(f) for f in found)) - bar.n)
    finally:
        bar.close()
    pool = torch.cat(found) if found else torch.zeros(0, T, dtype=torch.long)
    pool_vals = {k: torch.cat([f[k] for f in found_vals]) for k in found_vals[0]} if found_vals else {}
    if len(pool) == 0:
        raise ValueError(
            f"no prior sample satisfied the model's conditions in {draws} draws, so the MH chains "
            "have no starting state. Raise init_budget=, pass initial_samples= (e.g. from method='smc'), "
            "or use smc/svi for conditions this rare"
        )
    if len(pool) < C:
        log.warning("only %d admissible starting states for %d chains after %d prior draws; "
                    "some chains start from the same state", len(pool), C, draws)
        idx = torch.randint(len(pool), (C,), generator=_random.generator("cpu"))
    else:
        idx = torch.arange(C)
    values = {k: v[idx] for k, v in pool_vals.items()}
    if site is not None:
        values[site] = pool[idx]
    return values
