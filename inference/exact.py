"""Exact inference by enumeration (toy LMs): the ground truth every estimator is tested against.

Enumerates every canonical sequence of the model's latent sequence site (all sequences that
end at EOS, padded, plus those that reach ``max_new_tokens``), scores each exactly, and
returns the normalised posterior and the exact log Z.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ppl_lm import seeding as _random
from ppl_lm.backends import Kind, describe
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference._runtime import cat_scores, check_has_latent, finish, latent_sites, make_posterior, row_cache, run_model
from ppl_lm.posterior import Info, Posterior
from ppl_lm.tokens import support_size
from ppl_lm.validation import PositiveInt
from tqdm.auto import tqdm

__all__ = ["run", "enumerate_sequences", "support_size", "site_support", "ExactInfo"]


@dataclass(frozen=True)
class ExactInfo(Info):
    """Facts of an exact run: the support's size and the prior mass of its admissible part."""

    support_size: int = 0
    prior_mass: float = float("nan")


def enumerate_sequences(vocab_size: int, eos_id: int, max_new_tokens: int) -> torch.Tensor:
    """Every canonical sequence ``[M, T]``: prefixes without EOS, then EOS padding."""
    others = [t for t in range(vocab_size) if t != eos_id]
    rows = []
    for n in range(max_new_tokens + 1):
        for prefix in itertools.product(others, repeat=n):
            rows.append(list(prefix) + [eos_id] * (max_new_tokens - n))
    return torch.tensor(rows, dtype=torch.long)


def site_support(name: str, d) -> torch.Tensor:
    """Every value of a latent site: canonical sequences of an ``lm.sequence``, or a finite
    ``enumerate_support`` (discrete latents); a clear error for anything else."""
    if isinstance(d, SequenceDistribution):
        return enumerate_sequences(d.lm.vocab_size, d.lm.eos_id, d.max_new_tokens)
    if getattr(d, "has_enumerate_support", False):
        vals = d.enumerate_support(expand=False)
        return vals.reshape(vals.shape[0], *d.event_shape)
    raise ValueError(
        f"exact enumeration cannot enumerate the latent site {name!r} ({type(d).__name__}): only lm.sequence(...) "
        "sites and discrete latents with a finite support can be enumerated. Use importance, smc or mh for "
        "continuous latents (or condition the site on a value with pyro.poutine.condition)")


@describe(kind=Kind.EXACT, info=ExactInfo)
def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, max_support: PositiveInt = 200_000,
        chunk_size: PositiveInt = 8192, progress: bool = True) -> Posterior:
    """Enumerate the joint support of every latent site; exact posterior weights and ``log_evidence``.

    The support is the product of each latent site's values in program order: the canonical
    sequences of each ``lm.sequence(...)`` site and the ``enumerate_support`` of each discrete
    latent (a sequence site's prompt may depend on earlier values; its support does not).
    Observed sites (observed text included) are scored, not enumerated: a model whose only
    latent sites are discrete (which world wrote these texts?) enumerates just those.

    Args:
        model_kwargs: the model's keyword arguments.
        max_support: refuse (with a clear error, before any work) when the support is larger.
        chunk_size: joint values scored per model call.
        progress: a progress bar over the chunks (when there are several).
    """
    kwargs = dict(model_kwargs or {})
    with _random.seeded(seed), row_cache():
        sites = latent_sites(model, args, kwargs, placeholder=True)
        check_has_latent(sites, "exact")
        sizes = {}
        for name, d in sites.items():
            if isinstance(d, SequenceDistribution):
                sizes[name] = support_size(d.lm.vocab_size, d.max_new_tokens)
            else:
                sizes[name] = len(site_support(name, d))
        size = math.prod(sizes.values())
        if size > max_support:
            parts_txt = " × ".join(f"{k}: {v:,}" for k, v in sizes.items())
            raise ValueError(
                f"the joint support has {size:,} values ({parts_txt}), more than max_support={max_support:,}; "
                "exact enumeration is for toy LMs. Use importance, smc, mh or svi instead")
        supports = {name: site_support(name, d) for name, d in sites.items()}
        names = list(supports)
        strides = [math.prod(len(supports[m]) for m in names[i + 1:]) for i in range(len(names))]
        parts = []
        starts = range(0, size, chunk_size)
        with torch.no_grad():
            for start in tqdm(starts, desc="exact", unit="chunk", disable=not progress or len(starts) < 2):
                flat = torch.arange(start, min(size, start + chunk_size))
                data = {m: supports[m][(flat // st) % len(supports[m])] for m, st in zip(names, strides)}
                parts.append(run_model(model, args, kwargs, len(flat), data=data))
        scores = cat_scores(parts)
        log_joint = scores.log_prior.double() + scores.log_likelihood.double()
        log_z = float(torch.logsumexp(log_joint, 0))
        if not math.isfinite(log_z):
            raise ValueError("no sequence (joint value) in the support satisfies the condition: the posterior is undefined")
        keep = torch.isfinite(log_joint)
        for k, v in list(scores.values.items()):
            scores.values[k] = v[keep]
        scores.log_prior, scores.log_likelihood = scores.log_prior[keep], scores.log_likelihood[keep]
        scores.rewards = {k: v[keep] for k, v in scores.rewards.items()}
        scores.constraints = {k: v[keep] for k, v in scores.constraints.items()}
        info = ExactInfo(support_size=size, prior_mass=float(torch.logsumexp(scores.log_prior.double(), 0).exp()))
        post = make_posterior("exact", scores, log_joint[keep], sites, log_evidence=log_z, log_evidence_se=0.0,
                              info=info)
    return finish(post)
