"""Building a :class:`Posterior` from per-particle scores (shared by the weighted backends)."""

from __future__ import annotations

import torch

from .lm import lengths
from .posterior import Posterior
from .tracing import Scores

__all__ = ["stats_from_scores", "main_site"]


def main_site(values: dict[str, torch.Tensor], sites: dict) -> str:
    """The name of the sequence site a Posterior reports (the last latent sequence site)."""
    from .distribution import SequenceDistribution

    seq = [n for n, d in sites.items() if isinstance(d, SequenceDistribution)]
    if not seq:
        raise ValueError("the model has no latent sequence site (pyro.sample(name, lm.sequence(...)))")
    return seq[-1]


def stats_from_scores(scores: Scores, site: str, eos_id: int) -> dict[str, torch.Tensor]:
    """Per-sample scalar summaries: log prior, log likelihood, length, each reward and constraint."""
    stats = {
        "log_prior": scores.log_prior.float(),
        "log_likelihood": scores.log_likelihood.float(),
        "length": lengths(scores.values[site], eos_id).float(),
    }
    for name, r in scores.rewards.items():
        stats[f"reward:{name}"] = r.float()
    for name, ok in scores.constraints.items():
        stats[f"ok:{name}"] = ok.float()
    return stats


def cat_scores(parts: list[Scores]) -> Scores:
    """Concatenate per-chunk scores along the particle dimension."""
    first = parts[0]
    cat = lambda key: torch.cat([getattr(p, key) for p in parts])  # noqa: E731
    return Scores(
        cat("log_prior"), cat("log_likelihood"),
        {k: torch.cat([p.values[k] for p in parts]) for k in first.values},
        {k: torch.cat([p.rewards[k] for p in parts]) for k in first.rewards},
        {k: torch.cat([p.constraints[k] for p in parts]) for k in first.constraints},
        {k: torch.cat([p.observed_log_prob[k] for p in parts]) for k in first.observed_log_prob},
    )


def make_posterior(method: str, scores: Scores, log_w: torch.Tensor, sites: dict, **kw) -> Posterior:
    from .posterior import normalise

    site = main_site(scores.values, sites)
    lm = sites[site].lm
    return Posterior(
        samples=scores.values[site].reshape(len(log_w), -1),
        log_weights=normalise(log_w),
        method=method, lm=lm, site=site,
        stats=stats_from_scores(scores, site, lm.eos_id),
        values={k: v for k, v in scores.values.items()},
        **kw,
    )
