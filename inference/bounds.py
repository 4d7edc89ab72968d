"""log Z from both sides, and the KL sandwich of a guide (Zhao, Brekelmans, Makhzani & Grosse, 2024).

An importance or SMC estimate Ẑ is unbiased, so log Ẑ is a stochastic **lower** bound:
E[log Ẑ] ≤ log Z. Exact draws x* ~ π′ from the conditional give a stochastic **upper** bound
from the same estimator run backwards:

- importance sampling (prior or guide proposal, an SVI posterior): *conditional importance
  sampling*. With the run's N weights w_k and one exact draw, log((w(x*) + Σ_k w_k)/(N + 1)) has
  expectation ≥ log Z; with no proposal draws it is reverse importance sampling, E_π′[log w(x*)]
  = log Z + KL(π′‖q) (the EUBO, reported too);
- SMC: *conditional SMC* (:mod:`ppl_lm.inference.smc.conditional`), the same sweep with one
  particle held to x*.

Both gaps shrink as N grows (to first order each side is off by Var(Ẑ/Z)/2), so the pair
brackets log Z and says how far the run's estimate can be from it, with no exact log Z.

**The draws must be exact.** :func:`exact_draws` makes them by enumeration (toy LMs,
``method="exact"``) or by rejection (prior draws kept with probability exp(log L − log_bound):
every draw that meets a hard condition; real LMs at moderate p). MCMC draws, SMC particles and
importance draws are *not* exact draws and are refused: a proposal's draws make the "upper"
bound a second lower bound (the test suite plants exactly this bug and it fails to bracket).

>>> import torch, pyro, ppl_lm
>>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
>>> def model():
...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
...     ppl_lm.constraint("starts_b", x[..., 0] == 1)
>>> exact = ppl_lm.exact_draws(model, num_samples=200, method="rejection", seed=1)
>>> post = ppl_lm.infer(model, method="importance", num_samples=400, progress=False)
>>> b = ppl_lm.log_evidence_bounds(post, model, exact=exact)
>>> bool(b.lower - 3 * b.lower_se < -1.0986 < b.upper + 3 * b.upper_se)   # log(1/3)
True
>>> post.log_evidence_bounds == (b.lower, b.upper)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from ppl_lm.inference._runtime import latent_sites, row_cache, run_model
from ppl_lm.inference.smc import SMCInfo
from ppl_lm.inference.smc.conditional import log_evidence_replicates

from ppl_lm import seeding
from ppl_lm.backends import Kind
from ppl_lm.infer import infer
from ppl_lm.posterior import Posterior
from ppl_lm.validation import PositiveInt, check_value

__all__ = ["ExactDraws", "exact_draws", "EvidenceBounds", "log_evidence_bounds", "KLSandwich", "kl_sandwich"]

#: Exact draws taken from an exact Posterior when ``exact=`` is one.
DEFAULT_NUM_EXACT = 256


@dataclass(frozen=True)
class ExactDraws:
    """Independent draws from the exact conditional π′, one row per draw in every latent site.

    Attributes:
        values: each latent site's draws ``[M, ...]`` (sequence sites EOS-padded).
        source: ``"exact"`` (enumeration), ``"rejection"`` or ``"given"`` (the caller vouches).
        num_proposals: prior draws made (rejection).
        log_evidence: rejection's own estimate of log Z, log(accepted / proposed) + log_bound.
    """

    values: dict[str, torch.Tensor]
    source: str
    num_proposals: int | None = None
    log_evidence: float | None = None

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))


def exact_draws(model, *args, num_samples: int, method: str = "exact", seed: int = 0,
                model_kwargs: dict | None = None, log_bound: float = 0.0, max_proposals: int = 10_000_000,
                chunk_size: int = 4096) -> ExactDraws:
    """``num_samples`` independent draws from the model's exact conditional.

    Args:
        method: ``"exact"``: enumerate the support (toy LMs; ``ppl_lm.infer(method="exact")``) and
            draw from it. ``"rejection"``: draw from the prior and keep a draw with probability
            exp(log L − ``log_bound``) (log L: the sum of the condition factors), which keeps
            exactly the draws that meet a hard condition (``log_bound=0``). Its cost is about
            ``num_samples / p`` prior draws for a condition of prior probability p.
        log_bound: an upper bound on log L over every sequence (``max r / β`` for rewards); a draw
            above it is an error, as the draws would not be exact.
        max_proposals: rejection gives up (a clear error) after this many prior draws.
        chunk_size: prior draws per vectorised model run (rejection).

    Not exact, and refused by :func:`log_evidence_bounds`: MCMC draws (correlated, from a chain
    that has not provably mixed), SMC particles and importance draws (weighted, biased for any
    finite N).
    """
    check_value("num_samples", num_samples, PositiveInt)
    check_value("max_proposals", max_proposals, PositiveInt)
    check_value("chunk_size", chunk_size, PositiveInt)
    kwargs = dict(model_kwargs or {})
    if method == "exact":
        post = infer(model, *args, method="exact", model_kwargs=kwargs, progress=False)
        return _from_exact_posterior(post, num_samples, seed)
    if method != "rejection":
        raise ValueError(f"method must be 'exact' (enumeration) or 'rejection', got {method!r}")
    if not math.isfinite(log_bound):
        raise ValueError(f"log_bound must be a finite upper bound on the log-likelihood, got {log_bound!r}")
    kept: dict[str, list[torch.Tensor]] = {}
    accepted, proposed = 0, 0
    with seeding.seeded(seed), torch.no_grad(), row_cache():
        gen = seeding.generator("cpu")
        while accepted < num_samples:
            if proposed >= max_proposals:
                raise ValueError(
                    f"rejection kept {accepted} of {num_samples} draws after {proposed:,} prior draws (acceptance "
                    f"{accepted / proposed:.2e}): the condition is too rare under the prior for rejection. Raise "
                    "max_proposals (about num_samples / acceptance draws are needed), or bound log Z from one side "
                    "only (post.log_evidence)")
            n = min(chunk_size, max_proposals - proposed)
            scores = run_model(model, args, kwargs, n, score_latent=False)
            ll = scores.log_likelihood.double().cpu()
            if bool((ll > log_bound + 1e-9).any()):
                raise ValueError(f"a draw has log-likelihood {float(ll.max()):.4g} > log_bound={log_bound:.4g}: "
                                 "log_bound must bound the sum of the condition factors (max r / β for a reward) "
                                 "for rejection to be exact")
            keep = torch.rand(n, generator=gen, dtype=torch.float64).log() < ll - log_bound
            idx = keep.nonzero()[:, 0][: num_samples - accepted]
            for k, v in scores.values.items():
                kept.setdefault(k, []).append(v.detach().cpu()[idx])
            accepted += len(idx)
            proposed += n if len(idx) == int(keep.sum()) else int(keep.nonzero()[len(idx) - 1, 0]) + 1
    values = {k: torch.cat(v) for k, v in kept.items()}
    return ExactDraws(values, "rejection", proposed, math.log(accepted / proposed) + log_bound)


def _from_exact_posterior(post, num_samples: int, seed: int) -> ExactDraws:
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.multinomial(post.weights.float(), num_samples, replacement=True, generator=g)
    return ExactDraws({k: v[idx] for k, v in post.values.items()}, "exact")


def _exact(exact, model, args, kwargs, seed: int) -> ExactDraws:
    """``exact`` as :class:`ExactDraws`, or a clear error for draws that are not exact."""
    if isinstance(exact, ExactDraws):
        return exact
    if isinstance(exact, Posterior):
        if exact.kind is Kind.EXACT:
            return _from_exact_posterior(exact, DEFAULT_NUM_EXACT, seed)
        what = ("MCMC draws are correlated and come from a chain that has not provably mixed"
                if exact.kind is Kind.MCMC else "weighted draws (importance, SMC, SVI) are biased for any finite N")
        raise ValueError(f"exact= must hold exact draws from the conditional; a {exact.method!r} posterior does not "
                         f"({what}), and draws that are not exact give no upper bound. Use "
                         "ppl_lm.exact_draws(model, ..., method='exact' or 'rejection')")
    if isinstance(exact, dict):
        return ExactDraws({k: torch.as_tensor(v) for k, v in exact.items()}, "given")
    if isinstance(exact, torch.Tensor):
        sites = latent_sites(model, args, kwargs, placeholder=True)
        if len(sites) != 1:
            raise ValueError(f"exact= as one tensor gives the draws of one latent site, and the model has "
                             f"{list(sites)}; pass a dict {{site: draws}} or ppl_lm.exact_draws(...)")
        return ExactDraws({next(iter(sites)): exact}, "given")
    raise TypeError(f"exact= takes ppl_lm.exact_draws(...), an exact Posterior, a dict of draws or a tensor, "
                    f"got {type(exact).__name__}")


@dataclass(frozen=True)
class EvidenceBounds:
    """Stochastic bounds on log Z: E[lower] ≤ log Z ≤ E[upper] (see the module notes).

    Attributes:
        lower, lower_se: the run's log Ẑ and its standard error.
        upper, upper_se: the mean over exact draws of the conditional estimator's log Ẑ.
        estimator: ``"conditional smc"``, ``"conditional importance sampling"`` or ``"exact"``.
        num_particles: the N of both sides.
        num_exact: exact draws used; ``exact_source``: where they came from.
        eubo, eubo_se: reverse importance sampling, E_π′[log w] (importance runs; else ``None``).
    """

    lower: float
    upper: float
    lower_se: float = 0.0
    upper_se: float = 0.0
    estimator: str = ""
    num_particles: int = 0
    num_exact: int = 0
    exact_source: str = ""
    eubo: float | None = None
    eubo_se: float | None = None
    upper_replicates: list = field(default_factory=list, repr=False)

    @property
    def gap(self) -> float:
        return self.upper - self.lower

    def __iter__(self):
        return iter((self.lower, self.upper))


def log_evidence_bounds(post, model, *args, exact, model_kwargs: dict | None = None, guide=None, seed: int = 0,
                        **smc_options) -> EvidenceBounds:
    """Bound log Z from both sides: ``post``'s own log Ẑ below, the same estimator conditioned on
    exact draws above. Stores the result on ``post`` (``post.log_evidence_bounds`` reads it).

    Args:
        post: an importance, SVI or SMC posterior of ``model(*args, **model_kwargs)`` (an exact
            one gives (log Z, log Z); MCMC gives no log Z and is refused).
        exact: exact draws of the conditional: :func:`exact_draws`, an exact Posterior
            (``method="exact"``, 256 draws are taken from it), a dict ``{site: draws}`` or a tensor
            of the one latent site's draws. MCMC, SMC and importance posteriors are refused
            (their draws are not exact).
        guide: the proposal of a run made with ``guide=`` (an SVI posterior carries its own).
        seed: the conditional SMC's seed.
        **smc_options: override the SMC run's options for the conditional sweeps
            (``num_particles``, ``ess_threshold``, ``observed``, ``chunk_size``); a run made with
            ``proposal=`` or ``twist=`` needs the same object again here. The sweeps
            resample multinomially whatever the run used (the conditional law of the other
            schemes is not that of :mod:`ppl_lm.inference.smc.conditional`), and each must fit
            in one chunk (no islands).

    Returns:
        An :class:`EvidenceBounds` (``lower``, ``upper``, their standard errors, ``gap``).
    """
    kwargs = dict(model_kwargs or {})
    if post.kind is Kind.EXACT:
        b = EvidenceBounds(post.log_evidence, post.log_evidence, estimator="exact", num_particles=len(post))
    elif post.log_evidence is None:
        raise ValueError(f"a {post.method!r} posterior has no log Z estimate to bound (MCMC gives none); bound log Z "
                         "with an importance or smc run of the same model")
    else:
        draws = _exact(exact, model, args, kwargs, seed)
        if isinstance(post.info, SMCInfo):
            b = _smc_bounds(post, model, args, kwargs, draws, guide, seed, smc_options)
        else:
            if smc_options:
                raise TypeError(f"unknown option(s) {sorted(smc_options)}: only SMC runs take options here")
            b = _importance_bounds(post, model, args, kwargs, draws, guide if guide is not None else post.guide)
    post.evidence_bounds = b
    return b


def _smc_bounds(post, model, args, kwargs, draws: ExactDraws, guide, seed: int, options: dict) -> EvidenceBounds:
    info = post.info
    if info.proposal != "lm" and guide is None and options.get("proposal") is None:
        raise ValueError(f"this SMC run proposed from {info.proposal!r}: pass the same object as guide= (a trained "
                         "guide) or proposal= so the conditional sweeps propose as the run did")
    if getattr(info, "twist", False) and options.get("twist") is None:
        raise ValueError("this SMC run was twisted: pass the same twist= so the conditional sweeps are twisted as the "
                         "run was")
    taken = ("num_particles", "ess_threshold", "observed", "chunk_size", "proposal", "twist")
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise TypeError(f"unknown SMC option(s) {unknown} for the conditional sweeps; they take {', '.join(taken)}")
    opts = dict(num_particles=info.num_particles, ess_threshold=info.ess_threshold, guide=guide)
    opts.update(options)
    up = log_evidence_replicates(model, *args, model_kwargs=kwargs, reference=draws.values, seed=seed, **opts)
    M = len(up)
    return EvidenceBounds(
        lower=float(post.log_evidence), upper=float(up.mean()), lower_se=float(post.log_evidence_se or 0.0),
        upper_se=float(up.std() / math.sqrt(M)) if M > 1 else math.nan, estimator="conditional smc",
        num_particles=opts["num_particles"], num_exact=M, exact_source=draws.source, upper_replicates=up.tolist())


def reference_log_weights(model, args, kwargs, values: dict, guide) -> torch.Tensor:
    """log w(x*) ``[M]`` of exact draws under an importance proposal: log L(x*) for the prior,
    log p(x*) + log L(x*) − log q(x*) for a guide."""
    M = len(next(iter(values.values())))
    with torch.no_grad(), row_cache():
        if guide is None:
            return run_model(model, args, kwargs, M, data=values, score_latent=False).log_likelihood.double().cpu()
        from ppl_lm.inference.svi.elbo import particle_terms

        t = particle_terms(model, guide, args, kwargs, M, values=values)
        return (t.log_prior.double() + t.log_likelihood.double() - t.log_q.detach().double()).cpu()


def _importance_bounds(post, model, args, kwargs, draws: ExactDraws, guide) -> EvidenceBounds:
    proposal = getattr(post.info, "proposal", "prior")
    if guide is None and proposal != "prior":
        raise ValueError(f"this run proposed from a {proposal!r}: pass the same proposal as guide= so the exact draws "
                         "are weighted as the run's draws were")
    lw_star = reference_log_weights(model, args, kwargs, draws.values, guide)
    if not bool(torch.isfinite(lw_star).all()):
        raise ValueError("an exact draw has zero weight (a condition rejects it, or the proposal cannot make it): "
                         "the draws are not from this model's conditional, or the proposal misses part of its support")
    N = len(post)
    lw = post.log_weights.double() + float(post.log_evidence) + math.log(N)  # the run's unnormalised log-weights
    log_sum = torch.logsumexp(lw, 0)
    up = torch.logaddexp(lw_star, log_sum) - math.log(N + 1)  # conditional IS with N + 1 particles, one exact
    M = len(up)
    lower_se = float(post.log_evidence_se or 0.0)
    # The M terms share the run's N draws: their spread, plus the shared part's (delta method).
    share = float(torch.exp(log_sum - torch.logaddexp(lw_star, log_sum)).mean())
    upper_se = math.sqrt(float(up.var()) / M + (share * lower_se) ** 2) if M > 1 else math.nan
    return EvidenceBounds(
        lower=float(post.log_evidence), upper=float(up.mean()), lower_se=lower_se, upper_se=upper_se,
        estimator="conditional importance sampling", num_particles=N, num_exact=M, exact_source=draws.source,
        eubo=float(lw_star.mean()), eubo_se=float(lw_star.std() / math.sqrt(M)) if M > 1 else math.nan,
        upper_replicates=up.tolist())


@dataclass(frozen=True)
class KLSandwich:
    """Both KLs between a guide q and the conditional π′, bracketed by the bounds on log Z.

    KL(q‖π′) = log Z − ELBO ∈ ``kl_reverse`` and KL(π′‖q) = EUBO − log Z ∈ ``kl_forward``, with
    log Z ∈ [max(lower, ELBO), min(upper, EUBO)]. The ends carry the Monte Carlo error of the ELBO
    (guide draws), the EUBO (exact draws) and the log Z bounds: ``kl_reverse_se`` and
    ``kl_forward_se`` (widen each end by two of them for about 95 %).
    """

    kl_reverse: tuple[float, float]
    kl_forward: tuple[float, float]
    kl_reverse_se: float
    kl_forward_se: float
    elbo: float
    elbo_se: float
    eubo: float
    eubo_se: float
    log_evidence_bounds: tuple[float, float]


def kl_sandwich(post, model, *args, exact, model_kwargs: dict | None = None, guide=None, bounds: Any = None,
                num_samples: int | None = None, seed: int = 0) -> KLSandwich:
    """Bracket KL(q‖π′) and KL(π′‖q) of a guide q (an SVI posterior's, or ``guide=``).

    Args:
        post: the run whose log Z bounds bracket the KLs (an SVI posterior, or any importance or
            SMC run of the same model); its bounds are computed unless ``bounds`` (or
            ``post.log_evidence_bounds``) is given.
        exact: exact draws (as in :func:`log_evidence_bounds`): the EUBO of the guide is their mean
            log-weight.
        guide: the guide q; ``None`` takes ``post.guide``.
        num_samples: guide draws for the ELBO when ``post``'s draws are not the guide's
            (default ``len(post)``).
    """
    from ppl_lm.inference.svi.elbo import particle_terms  # the guide side loads only when a guide is bracketed

    kwargs = dict(model_kwargs or {})
    g = guide if guide is not None else post.guide
    if g is None:
        raise ValueError("kl_sandwich needs the guide q: give an SVI posterior (post.guide) or guide=")
    if bounds is None:
        bounds = post.evidence_bounds or log_evidence_bounds(post, model, *args, exact=exact, model_kwargs=kwargs,
                                                             guide=guide, seed=seed)
    draws = _exact(exact, model, args, kwargs, seed)
    lw_star = reference_log_weights(model, args, kwargs, draws.values, g)
    eubo, eubo_se = float(lw_star.mean()), float(lw_star.std() / math.sqrt(len(lw_star)))
    if post.guide is g and post.log_evidence is not None:  # post's draws are the guide's
        f = post.log_weights.double() + float(post.log_evidence) + math.log(len(post))
    else:
        with seeding.seeded(seed), torch.no_grad(), row_cache():
            t = particle_terms(model, g, args, kwargs, num_samples or len(post))
        f = t.log_prior.double() + t.log_likelihood.double() - t.log_q.detach().double()
    elbo = float(f.mean())  # −inf when the guide makes draws the condition rejects: KL(q‖π′) = ∞
    elbo_se = float(f.std() / math.sqrt(len(f))) if math.isfinite(elbo) else math.nan
    lower, upper = tuple(bounds)
    lo, hi = max(lower, elbo), min(upper, eubo)
    bound_se = max(getattr(bounds, "lower_se", 0.0) or 0.0, getattr(bounds, "upper_se", 0.0) or 0.0)
    return KLSandwich(
        kl_reverse=(max(lo - elbo, 0.0), max(hi - elbo, 0.0)), kl_forward=(max(eubo - hi, 0.0), max(eubo - lo, 0.0)),
        kl_reverse_se=math.hypot(elbo_se, bound_se), kl_forward_se=math.hypot(eubo_se, bound_se), elbo=elbo, elbo_se=elbo_se, eubo=eubo, eubo_se=eubo_se, log_evidence_bounds=(lower, upper))
