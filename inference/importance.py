"""Importance sampling: prior (or guide) proposals, self-normalised weights, PSIS diagnostics.

Each chunk of ``chunk_size`` particles is one vectorised run of the model inside the particle
plate (so one batched LM call per chunk), and only the tokens and per-sample scalars of a chunk
are kept: ``num_samples=100_000`` runs in memory bounded by the chunk size.

With the prior as proposal the weight of a sample is its log-likelihood (the sum of the
condition factors): log p(x) cancels, and the sampler's own log-probabilities are reused for the
``log_prior`` statistic, so nothing is scored twice. With a guide ``q`` (a callable with the
model's signature that samples the same latent site(s) inside the particle plate, e.g. the
trained SVI guide) the weight is log p(x, obs) - log q(x).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from ppl_lm import seeding as _random
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.posterior import Posterior, ess_of, normalise
from ppl_lm.inference._runtime import cat_scores, make_posterior
from ppl_lm.inference._runtime import PARTICLE_PLATE, latent_sites, run_model

__all__ = ["run", "pareto_khat", "log_evidence_se", "KHAT_THRESHOLD"]

log = logging.getLogger(__name__)

KHAT_THRESHOLD = 0.7


TOKENS_PER_CHUNK = 1 << 15


def run(model, *args, seed: int = 0, num_samples: int = 1000, chunk_size: int | None = None, guide=None,
        progress: bool = True, warn: bool = True, **kwargs) -> Posterior:
    """Self-normalised importance sampling with the prior or a guide as proposal.

    Args:
        model: a vectorised Pyro model; ``*args`` and ``**kwargs`` are its arguments.
        seed: same seed, same samples (on CPU), for a given ``chunk_size``.
        num_samples: number of proposals drawn.
        chunk_size: particles per vectorised model run (bounds memory). ``None`` picks about
            32k tokens (prompt plus new tokens) per chunk. The chunks draw from one random
            stream, so another chunk size gives different, equally valid, samples.
        guide: proposal; ``None`` is the prior. Otherwise a callable with the model's signature
            that samples the model's latent site(s) under the same names; latent sites the guide
            does not sample are drawn from the prior (their log-probabilities cancel).
        progress: show a progress bar over samples.
        warn: emit a warning when the PSIS k-hat exceeds 0.7.

    Returns:
        A :class:`Posterior` with ``log_evidence`` = log mean weight and ``info`` holding
        ``log_evidence_se`` (delta method), ``ess``, ``khat`` and ``num_samples``.

    Raises:
        ValueError: bad options, or every weight is zero (no sample satisfies the condition).

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1)
    >>> post = ppl_lm.infer(model, method="importance", num_samples=4000, progress=False)
    >>> abs(post.log_evidence - (-1.0986)) < 0.05
    True
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if guide is not None and not callable(guide):
        raise TypeError(f"guide must be a callable with the model's signature (or None), got {type(guide).__name__}")

    with _random.seeded(seed), torch.no_grad():
        sites = latent_sites(model, args, kwargs, placeholder=True)
        if chunk_size is None:
            chunk_size = _default_chunk(sites, num_samples)
        parts, log_ws = [], []
        bar = tqdm(total=num_samples, desc="importance", unit="sample", disable=not progress)
        try:
            for start in range(0, num_samples, chunk_size):
                n = min(chunk_size, num_samples - start)
                scores, log_w = _chunk(model, args, kwargs, n, guide)
                scores.trace = None  # keep tokens and scalars only
                parts.append(scores)
                log_ws.append(log_w.double())
                bar.update(n)
        finally:
            bar.close()
        scores = cat_scores(parts) if len(parts) > 1 else parts[0]
        log_w = torch.cat(log_ws)

    normalise(log_w)  # the clear errors: NaN weights, or every weight zero
    log_z = float(torch.logsumexp(log_w, 0) - math.log(num_samples))
    khat = pareto_khat(log_w)
    if warn and khat > KHAT_THRESHOLD:
        warnings.warn(
            f"importance sampling: Pareto k-hat = {khat:.2f} > {KHAT_THRESHOLD}. The weights are "
            "heavy-tailed (or too few samples have non-zero weight), so the posterior estimates and "
            "log_evidence are unreliable and their standard errors too small. Use more samples, "
            "method='smc', or a better proposal (a trained guide, method='svi').",
            stacklevel=3,
        )
    info = {
        "num_samples": num_samples,
        "chunk_size": chunk_size,
        "proposal": "prior" if guide is None else "guide",
        "log_evidence_se": log_evidence_se(log_w),
        "khat": khat,
        "ess": ess_of(normalise(log_w)),
        "num_nonzero": int(torch.isfinite(log_w).sum()),
    }
    log.info("importance: N=%d, log Z=%.4f ± %.4f, ESS=%.1f, k-hat=%.2f", num_samples, log_z,
             info["log_evidence_se"], info["ess"], khat)
    return make_posterior("importance", scores, log_w, sites, log_evidence=log_z, info=info)


def _default_chunk(sites: dict, num_samples: int) -> int:
    tokens = 0
    for d in sites.values():
        if isinstance(d, SequenceDistribution):
            tokens += d.prompt.shape[-1] + d.max_new_tokens
    return max(1, min(num_samples, TOKENS_PER_CHUNK // max(tokens, 1)))


def _chunk(model, args, kwargs, n: int, guide):
    """One vectorised proposal run: (Scores, log-weights ``[n]``)."""
    if guide is None:
        # The sampler's log-probs are cached for the values it just drew, so scoring the latent
        # sites here costs no second LM pass; the weight is the likelihood alone.
        scores = run_model(model, args, kwargs, n, score_latent=True)
        return scores, scores.log_likelihood.double()
    with pyro.plate(PARTICLE_PLATE, n, dim=-1):
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
    log_q = _site_log_probs(guide_tr, n, latent=True)
    if not log_q:
        raise ValueError("the guide samples no latent site; it must sample the model's latent site(s)")
    scores = run_model(model, args, kwargs, n, guide_trace=guide_tr, score_latent=True)
    log_p = _site_log_probs(scores.trace, n, latent=True)
    unknown = set(log_q) - set(log_p)
    if unknown:
        raise ValueError(f"the guide samples site(s) {sorted(unknown)} that the model does not have as latent sites")
    # Latent sites the guide leaves out were drawn from the prior: their log p cancels.
    from_prior = sum((lp for name, lp in log_p.items() if name not in log_q), torch.zeros(n, dtype=torch.float64))
    log_w = scores.log_likelihood.double() + scores.log_prior.double() - from_prior - sum(log_q.values())
    return scores, log_w


def _site_log_probs(tr, n: int, latent: bool) -> dict[str, torch.Tensor]:
    """Per-particle log-probabilities ``[n]`` of a trace's latent sample sites."""
    out = {}
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site["is_observed"] != (not latent):
            continue
        lp = torch.as_tensor(site["fn"].log_prob(site["value"])).double()
        if lp.dim() == 0:
            lp = lp.expand(n)
        elif lp.shape[0] != n:
            raise ValueError(
                f"site {name!r} has log-prob shape {tuple(lp.shape)}; it must lie inside the particle plate "
                "(the guide and model are run in pyro.plate('particles', N))"
            )
        out[name] = lp.reshape(n, -1).sum(-1)
    return out


def log_evidence_se(log_w: torch.Tensor) -> float:
    """Delta-method standard error of log Ẑ = log mean(w): sqrt(var(w)/N) / mean(w).

    With normalised weights ``W``, var(w)/mean(w)² = N/(N-1)·(N·ΣW² − 1). Zero for
    a single sample or equal weights. ``log_w`` holds unnormalised log-weights ``[N]``.
    """
    n = log_w.numel()
    if n < 2:
        return float("nan")
    W = torch.exp(normalise(log_w).double())
    rel_var = n / (n - 1) * (n * float((W**2).sum()) - 1.0)
    return math.sqrt(max(rel_var, 0.0) / n)


def pareto_khat(log_w: torch.Tensor) -> float:
    """PSIS k-hat of importance log-weights (``arviz.psislw``), robust to ties and zero weights.

    Zero weights (-inf) count as samples but never enter the tail. Degenerate cases:
    too few samples for a tail fit (fewer than ~25) gives ``nan``; a tail made of tied weights
    (bounded weights with an atom at their maximum, e.g. a hard constraint with the prior as
    proposal) gives ``-inf`` (no heavy tail); four or fewer non-zero weights among many
    samples gives ``inf`` (unreliable); at most four weights above tied ones gives ``inf`` when
    they carry most of the weight, else ``nan`` (undefined).
    """
    import arviz

    x = log_w.detach().double().cpu().numpy()
    n = x.size
    finite = np.isfinite(x)
    m = int(np.ceil(min(n / 5.0, 3.0 * math.sqrt(n))))  # arviz's tail length (reff = 1)
    if m <= 4:
        return float("nan")
    if finite.sum() <= 4:
        return float("inf")
    x = np.where(finite, x - x[finite].max(), -1e300)  # -inf as a huge finite: no inf - inf
    cutoff = max(np.sort(x)[-m - 1], np.log(np.finfo(float).tiny))
    tail = x[x > cutoff]
    if tail.size == 0 or (tail.size > 4 and tail.max() - tail.min() < 1e-12):
        return float("-inf")
    if tail.size <= 4:
        # A handful of weights above tied ones: no tail fit. Unreliable if they dominate.
        share = np.exp(tail).sum() / np.exp(x).sum()
        return float("inf") if share > 0.5 else float("nan")
    with np.errstate(all="ignore"):
        _, k = arviz.psislw(x)
    k = float(k)
    return k if math.isfinite(k) else float("inf")
