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
from ppl_lm.inference._runtime import cat_scores, finish, latent_sites, make_posterior, run_model, single_sequence_site
from ppl_lm.posterior import Info, Posterior

__all__ = ["run", "enumerate_sequences", "support_size", "ExactInfo"]


@dataclass(frozen=True)
class ExactInfo(Info):
    """Facts of an exact run: the support's size and the prior mass of its admissible part."""

    support_size: int = 0
    prior_mass: float = float("nan")


def support_size(vocab_size: int, max_new_tokens: int) -> int:
    k = vocab_size - 1
    return sum(k**n for n in range(max_new_tokens)) + k**max_new_tokens


def enumerate_sequences(vocab_size: int, eos_id: int, max_new_tokens: int) -> torch.Tensor:
    """Every canonical sequence ``[M, T]``: prefixes without EOS, then EOS padding."""
    others = [t for t in range(vocab_size) if t != eos_id]
    rows = []
    for n in range(max_new_tokens + 1):
        for prefix in itertools.product(others, repeat=n):
            rows.append(list(prefix) + [eos_id] * (max_new_tokens - n))
    return torch.tensor(rows, dtype=torch.long)


def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, max_support: int = 200_000,
        chunk_size: int = 8192) -> Posterior:
    """Enumerate the support; exact posterior weights and exact ``log_evidence``.

    Args:
        model_kwargs: the model's keyword arguments.
        max_support: refuse (with a clear error) when the support has more sequences.
        chunk_size: sequences scored per model call.
    """
    kwargs = dict(model_kwargs or {})
    with _random.seeded(seed):
        sites = latent_sites(model, args, kwargs, placeholder=True)
        name, d = single_sequence_site(sites, "exact")
        V, T = d.lm.vocab_size, d.max_new_tokens
        size = support_size(V, T)
        if size > max_support:
            raise ValueError(
                f"the support has {size:,} sequences (vocab {V}, max_new_tokens {T}), more than "
                f"max_support={max_support:,}; exact enumeration is for toy LMs. Use importance, smc, "
                "mh or svi instead"
            )
        seqs = enumerate_sequences(V, d.lm.eos_id, T)
        parts = []
        with torch.no_grad():
            for chunk in torch.split(seqs, chunk_size):
                parts.append(run_model(model, args, kwargs, len(chunk), data={name: chunk}))
        scores = cat_scores(parts)
        log_joint = scores.log_prior.double() + scores.log_likelihood.double()
        log_z = float(torch.logsumexp(log_joint, 0))
        if not math.isfinite(log_z):
            raise ValueError("no sequence in the support satisfies the condition: the posterior is undefined")
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
