"""Running a vectorised model on a batch of particles, and reading its trace.

Shared by every backend: a model is run inside one ``pyro.plate("particles", N)``; its
latent sequence sites are sampled (or conditioned on given values); the result is a
:class:`Scores` with one value per particle for the log prior, the log likelihood (every
observed site and factor) and each recorded reward / constraint.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch

from ppl_lm.conditions.factors import trial_run
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.posterior import Posterior, normalise
from ppl_lm.tokens import lengths

__all__ = ["Scores", "run_model", "score_trace", "latent_sites", "PARTICLE_PLATE", "main_site", "stats_from_scores",
           "cat_scores", "make_posterior"]

PARTICLE_PLATE = "particles"


@dataclass
class Scores:
    """Per-particle quantities read off one vectorised trace."""

    log_prior: torch.Tensor  # [N] sum of latent sites' log-probs
    log_likelihood: torch.Tensor  # [N] sum of observed sites and factors
    values: dict[str, torch.Tensor]  # latent site values, [N, ...]
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # raw r per reward site
    constraints: dict[str, torch.Tensor] = field(default_factory=dict)  # ok per constraint site
    observed_log_prob: dict[str, torch.Tensor] = field(default_factory=dict)  # observed seq sites
    trace: Any = None

    @property
    def log_joint(self) -> torch.Tensor:
        return self.log_prior + self.log_likelihood


def _per_particle(t: torch.Tensor, n: int) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() == 0:
        return t.expand(n)
    if t.shape[0] != n:
        # Broadcast a site that ignores the particle plate (a shared observation).
        t = t.reshape(-1).sum().expand(n) if t.numel() != n else t.reshape(n)
        return t
    return t.reshape(n, -1).sum(-1) if t.dim() > 1 else t


def run_model(model: Callable, args: tuple, kwargs: dict, num_particles: int,
              data: dict[str, torch.Tensor] | None = None, *, score_latent: bool = True,
              guide_trace=None) -> Scores:
    """Run ``model`` once for ``num_particles`` particles and score every site per particle.

    Args:
        data: values for latent sites (conditioning them, as in replay); other latent sites
            are sampled from the model.
        score_latent: compute the latent sites' log-probs (an LM pass); off when a backend
            knows them already.
        guide_trace: replay latent sites from a guide's trace instead of sampling.
    """
    fn = model
    if guide_trace is not None:
        fn = poutine.replay(fn, trace=guide_trace)
    if data:
        fn = _fix_latent(fn, data)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-1):
        tr = poutine.trace(fn).get_trace(*args, **kwargs)
    return score_trace(tr, num_particles, score_latent=score_latent)


def _fix_latent(fn, data):
    """Give latent sites fixed values while keeping them latent (not observed)."""

    def wrapped(*args, **kwargs):
        with _LatentValues(data):
            return fn(*args, **kwargs)

    return wrapped


class _LatentValues(poutine.messenger.Messenger):
    def __init__(self, data):
        super().__init__()
        self.data = data

    def _pyro_sample(self, msg):
        if msg["name"] in self.data and not msg["is_observed"]:
            msg["value"] = self.data[msg["name"]]
            msg["done"] = True  # skip sampling, keep the site latent


def score_trace(tr, n: int, *, score_latent: bool = True) -> Scores:
    log_prior = torch.zeros(n)
    log_lik = torch.zeros(n)
    values, rewards, cons, obs = {}, {}, {}, {}
    for name, site in tr.nodes.items():
        if site["type"] != "sample":
            continue
        meta = site["infer"].get("ppl_lm")
        if site["is_observed"]:
            lp = site["fn"].log_prob(site["value"])
            lp = _per_particle(lp, n).to(log_lik.device)
            log_lik = log_lik + lp
            if meta is not None and meta["kind"] == "reward":
                rewards[name] = _per_particle(meta["r"], n)
            elif meta is not None and meta["kind"] == "constraint":
                cons[name] = _per_particle(meta["ok"], n)
            elif isinstance(site["fn"], SequenceDistribution) or _base(site["fn"]) is not None:
                obs[name] = lp
        else:
            values[name] = site["value"]
            if score_latent:
                lp = site["fn"].log_prob(site["value"])
                log_prior = log_prior + _per_particle(lp, n).to(log_prior.device)
    return Scores(log_prior.detach(), log_lik.detach(), values, rewards, cons, obs, tr)


def _base(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn if isinstance(fn, SequenceDistribution) else None


def latent_sites(model: Callable, args: tuple, kwargs: dict, *,
                 placeholder: bool = False) -> dict[str, SequenceDistribution]:
    """The model's latent sites and their distributions, from one single-particle prior run.

    Args:
        placeholder: give latent sequence sites an all-EOS value instead of sampling them (no
            LM call), for backends that need only the sites' names and distributions.
    """
    # On placeholders, rewards defer their checks to the real batch (trial_run).
    ctx = _EosSequences() if placeholder else contextlib.nullcontext()
    trial = trial_run() if placeholder else contextlib.nullcontext()
    with ctx, trial, pyro.plate(PARTICLE_PLATE, 1, dim=-1):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    out = {}
    for name, site in tr.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            out[name] = _base(site["fn"]) or site["fn"]
    return out


class _EosSequences(poutine.messenger.Messenger):
    """Latent sequence sites take the all-EOS value (the empty sequence) without sampling."""

    def _pyro_sample(self, msg):
        d = _base(msg["fn"])
        if d is not None and not msg["is_observed"] and not msg["done"]:
            shape = msg["fn"].batch_shape + msg["fn"].event_shape
            msg["value"] = torch.full(shape, d.lm.eos_id, dtype=torch.long, device=d.lm.device)
            msg["done"] = True


# -- from scores to a Posterior ------------------------------------------------------------------
def main_site(values: dict[str, torch.Tensor], sites: dict) -> str:
    """The name of the sequence site a Posterior reports (the last latent sequence site)."""
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
