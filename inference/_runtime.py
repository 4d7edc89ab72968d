"""The one model runtime every backend reads a model through.

A model is run inside one ``pyro.plate("particles", N)`` (vectorised: each site has a leading
particle dimension); its latent sites are sampled, replayed from a guide's trace, or given fixed
values (still latent); every sample site is scored per particle by one rule
(:func:`site_log_prob`), and the result is a :class:`Scores`: the log prior of the latent sites,
the log likelihood (observed sites and condition factors), each site's own log-prob, and each
recorded reward and constraint. The same runtime serves the ELBO (``inference/svi``).

**The rule for sites outside the particle plate.** A site's log-prob is read per particle: a
scalar (a site whose value does not depend on the particle, e.g. a factor of a constant) is shared
by every particle and added to each; a log-prob with a leading dimension of size N is summed over
its other dimensions; anything else is a :class:`ModelShapeError` naming the site, its shape and
the fix. Every backend applies this rule, so a model one backend accepts, all accept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.util import site_is_subsample

from ppl_lm.conditions.factors import SequenceSites, factor_of, partial_prefix, trial_run
from ppl_lm.conditions.masks import TokenMask
from ppl_lm.distribution import SequenceDistribution, row_cache
from ppl_lm.posterior import Info, Posterior, normalise
from ppl_lm.tokens import lengths

__all__ = ["row_cache", "Scores", "ModelShapeError", "run_model", "run_model_until", "trace_model", "score_trace", "site_log_prob", "latent_sites",
           "sequence_base", "sequence_sites", "check_has_latent", "is_latent", "observed_log_prob", "observed_sequences", "particle_dim", "single_sequence_site", "first_latent_site", "fixed_values",
           "PARTICLE_PLATE", "main_site", "token_masks", "stats_from_scores", "cat_scores", "make_posterior", "finish"]

PARTICLE_PLATE = "particles"


class ModelShapeError(ValueError):
    """A model value does not have one entry per particle (the model is not vectorised)."""


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
    latent_log_prob: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] per latent site

    @property
    def log_joint(self) -> torch.Tensor:
        return self.log_prior + self.log_likelihood


def is_latent(msg) -> bool:
    """A latent sample site: not observed, and not a ``pyro.plate``'s own subsample site."""
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


def sequence_base(fn) -> SequenceDistribution | None:
    """The :class:`SequenceDistribution` under a (possibly expanded or masked) distribution, else ``None``."""
    while not isinstance(fn, SequenceDistribution) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn if isinstance(fn, SequenceDistribution) else None


def particle_dim(site) -> int | None:
    """The batch dimension of the particle plate at a traced site (``None`` outside it)."""
    for frame in site.get("cond_indep_stack", ()):
        if frame.name == PARTICLE_PLATE:
            return frame.dim
    return None


def site_log_prob(name: str, lp, n: int, dim: int | None = None) -> torch.Tensor:
    """One value per particle ``[n]`` from a site's log-prob, by the module's rule.

    ``dim``: the particle plate's dimension at the site (:func:`particle_dim`); other plates'
    dimensions (a plate over a corpus of observed texts) are summed.
    """
    lp = torch.as_tensor(lp)
    if lp.dim() == 0:
        return lp.expand(n)
    if dim is not None and lp.dim() >= -dim and lp.shape[dim] == n:
        return lp.movedim(dim, 0).reshape(n, -1).sum(-1)
    if lp.shape[0] == n:
        return lp.reshape(n, -1).sum(-1)
    raise ModelShapeError(
        f"site {name!r} has log-prob shape {tuple(lp.shape)}, but the model runs {n} particle(s) at once "
        f"inside pyro.plate({PARTICLE_PLATE!r}, {n}): a site must give one value per particle (a leading "
        "dimension of that size) or a single shared value. Write the model vectorised: compute rewards and "
        "conditions from the sampled x (shape [N, T]), e.g. (x == 2).sum(-1), and mark extra dimensions "
        "of a distribution as event dimensions (.to_event(1))")


_PYRO_MISMATCH = re.compile(r"Shape mismatch inside plate\('particles'\) at site (\S+) dim -1, (\d+) vs (\d+)")


def _clear_shape_error(err: ValueError, n: int) -> ModelShapeError | None:
    m = _PYRO_MISMATCH.search(str(err))
    if m is None:
        return None
    site, plate, got = m.group(1), m.group(2), m.group(3)
    probe = " (a first run with one particle that finds the model's sites)" if n == 1 else ""
    return ModelShapeError(
        f"site {site!r} has {got} values along its batch dimension, but the model runs {plate} particle(s) at "
        f"once{probe} inside pyro.plate({PARTICLE_PLATE!r}): a reward, constraint or distribution must give "
        "one value per particle. Write the model vectorised: compute it from the sampled x (shape [N, T]), "
        "e.g. (x == 2).sum(-1), not from a tensor of fixed size")


def trace_model(fn: Callable, args: tuple, kwargs: dict, n: int):
    """``poutine.trace`` of ``fn`` inside the particle plate of size ``n``, with clear shape errors."""
    return _trace_until(fn, args, kwargs, n, None)[0]


def run_guide(guide: Callable, args: tuple, kwargs: dict, n: int, *, detach: bool = True):
    """One vectorised run of a guide (a proposal program) in the particle plate.

    Returns ``(trace, log_q)``: ``log_q`` maps each latent site the guide samples to its
    per-particle log-probability ``[n]`` (by the runtime's one rule, :func:`site_log_prob`),
    detached unless ``detach=False`` (a trained guide's gradient). Replay the model on the trace
    with ``run_model(..., guide_trace=trace)``; :func:`check_guide_sites` then compares the sites.
    """
    tr = trace_model(guide, args, kwargs, n)
    log_q = {}
    for name, site in tr.nodes.items():
        if is_latent(site):
            lq = site_log_prob(name, site["fn"].log_prob(site["value"]), n, particle_dim(site))
            log_q[name] = lq.detach() if detach else lq
    if not log_q:
        raise ValueError("the guide samples no latent site; it must sample the model's latent site(s)")
    return tr, log_q


def check_guide_sites(guide_sites, model_latent, *, cover_all: bool) -> None:
    """A clear error when a guide samples a site the model does not have as a latent site, or
    (``cover_all``) leaves one of the model's latent sites to the prior."""
    extra = sorted(set(guide_sites) - set(model_latent))
    if extra:
        raise ValueError(f"the guide samples site(s) {extra} that the model does not have as latent sites")
    missing = [k for k in model_latent if k not in guide_sites]
    if cover_all and missing:
        raise ValueError(f"the model's latent site(s) {missing} are not sampled by the guide; the guide must "
                         "cover every latent site of the model")


def _trace_until(fn: Callable, args: tuple, kwargs: dict, n: int, stop):
    """:func:`trace_model`, stopped (``poutine.escape``) at the first sample site where ``stop(msg)``
    holds when ``stop`` is given: ``(trace of the sites before it, its message or None)``."""
    tracer = poutine.trace(fn if stop is None else poutine.escape(fn, escape_fn=stop))
    try:
        with SequenceSites(), pyro.plate(PARTICLE_PLATE, n, dim=-1):
            tracer(*args, **kwargs)
    except NonlocalExit as exit_:
        if stop is None:
            raise
        return tracer.msngr.trace, exit_.site
    except (ValueError, RuntimeError) as err:
        original = _without_trace_shapes(err)
        clear = _clear_shape_error(original, n) if isinstance(original, ValueError) else None
        if clear is not None:
            raise clear from None
        if original is err:
            raise
        raise original  # the error as the user's (or our) code raised it, its traceback intact
    except TypeError as err:
        original = _unrebuilt(err)
        if original is None:
            raise
        original.__suppress_context__ = True  # Pyro's TypeError is no part of the model's error
        raise original
    return tracer.msngr.trace, None


def _unrebuilt(err: TypeError) -> BaseException | None:
    """The model's ValueError or RuntimeError when Pyro's trace handler failed to re-raise it with its
    shapes table (``type(e)(message)`` refuses a class whose constructor takes other arguments, e.g.
    ``json.JSONDecodeError``) and raised this TypeError instead; ``None`` for any other TypeError."""
    frames = traceback.extract_tb(err.__traceback__)
    if (isinstance(err.__context__, (ValueError, RuntimeError)) and frames
            and frames[-1].filename.endswith(os.path.join("poutine", "trace_messenger.py"))):
        return _without_trace_shapes(err.__context__)
    return None


def _without_trace_shapes(err: BaseException) -> BaseException:
    """The exception before Pyro's trace handlers re-raised it with a "Trace Shapes" table appended
    (one layer per nested trace): the table is about Pyro's internals, not the user's error."""
    while ("\nTrace Shapes:" in str(err) and isinstance(err.__cause__, type(err))
           and str(err).startswith(str(err.__cause__))):
        err = err.__cause__
    return err


def fixed_values(data: dict[str, torch.Tensor]) -> poutine.Trace:
    """A trace holding ``data`` as latent sample sites: ``poutine.replay`` on it fixes those sites'
    values while keeping them latent (scored in the prior, not observed)."""
    tr = poutine.Trace()
    for name, value in data.items():
        tr.add_node(name, type="sample", name=name, value=value, is_observed=False, infer={}, fn=None)
    return tr


def run_model(model: Callable, args: tuple, kwargs: dict, num_particles: int,
              data: dict[str, torch.Tensor] | None = None, *, score_latent: bool = True,
              guide_trace=None) -> Scores:
    """Run ``model`` once for ``num_particles`` particles and score every site per particle.

    Args:
        data: values for latent sites (fixed, still latent, as in replay); other latent sites
            are sampled from the model.
        score_latent: compute the latent sites' log-probs (an LM pass); off when a backend
            knows them already.
        guide_trace: replay latent sites from a guide's trace instead of sampling.
    """
    fn = model
    if guide_trace is not None:
        fn = poutine.replay(fn, trace=guide_trace)
    if data:
        fn = poutine.replay(fn, trace=fixed_values(data))
    tr = trace_model(fn, args, kwargs, num_particles)
    return score_trace(tr, num_particles, score_latent=score_latent)


def run_model_until(model: Callable, args: tuple, kwargs: dict, num_particles: int, data: dict[str, torch.Tensor],
                    *, sequences_only: bool = False, defer_observed_after: str | None = None) -> tuple[Scores, Any]:
    """:func:`run_model` (latent sites not scored) up to the first latent site that ``data`` gives no
    value, where the program stops (``poutine.escape``: nothing after it runs, no LM call).

    Returns the scores of the sites before it (``log_likelihood``: the factors the program has
    applied by then) and that site's Pyro message (its ``fn`` is the distribution those values
    imply), or ``None`` when the program ran to its end.

    Args:
        sequences_only: stop only at an ``lm.sequence(...)`` site; other latent sites without a
            value are sampled from the model on the way.
        defer_observed_after: see :func:`score_trace`.
    """

    def stop(msg):
        return (is_latent(msg) and msg["name"] not in data
                and (not sequences_only or sequence_base(msg["fn"]) is not None))

    fn = poutine.replay(model, trace=fixed_values(data)) if data else model
    tr, site = _trace_until(fn, args, kwargs, num_particles, stop)
    return score_trace(tr, num_particles, score_latent=False, defer_observed_after=defer_observed_after), site


def observed_log_prob(site) -> torch.Tensor:
    """An observed site's log-prob; an observed ``lm.sequence(...)`` reads rows it scored earlier in
    the run from the run's :func:`row_cache` (one LM pass per distinct prompt and text)."""
    fn = site["fn"]
    if isinstance(fn, SequenceDistribution):
        return fn.log_prob(site["value"], cached=True)
    return fn.log_prob(site["value"])


def score_trace(tr, n: int, *, score_latent: bool = True, defer_observed_after: str | None = None) -> Scores:
    """Read a vectorised trace: every sample site scored per particle by :func:`site_log_prob`.

    Args:
        defer_observed_after: observed ``lm.sequence(...)`` sites after this site (in program
            order) are not scored: their prompts may read a sequence that is still a prefix (SMC).
    """
    log_prior = torch.zeros(n)
    log_lik = torch.zeros(n)
    values, rewards, cons, obs, latent = {}, {}, {}, {}, {}
    deferring = False
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        meta = factor_of(site)
        if site["is_observed"]:
            if deferring and sequence_base(site["fn"]) is not None:
                continue
            lp = site_log_prob(name, observed_log_prob(site), n, particle_dim(site)).to(log_lik.device)
            log_lik = log_lik + lp
            if meta is not None and meta.kind == "reward":
                rewards[name] = site_log_prob(name, meta.r, n)
            elif meta is not None and meta.kind == "constraint":
                ok = torch.as_tensor(meta.ok).bool()
                cons[name] = ok.expand(n) if ok.dim() == 0 else ~site_log_prob(name, ~ok, n).bool()
            elif sequence_base(site["fn"]) is not None:
                obs[name] = lp
        else:
            values[name] = site["value"]
            deferring = deferring or name == defer_observed_after
            if score_latent:
                lp = site_log_prob(name, site["fn"].log_prob(site["value"]), n, particle_dim(site)).to(log_prior.device)
                latent[name] = lp
                log_prior = log_prior + lp
    return Scores(log_prior.detach(), log_lik.detach(), values, rewards, cons, obs, tr,
                  {k: v.detach() for k, v in latent.items()})


def latent_sites(model: Callable, args: tuple, kwargs: dict, *, placeholder: bool = False) -> dict[str, Any]:
    """The model's latent sites and their distributions (sequence sites unwrapped to their
    :class:`SequenceDistribution`), from one single-particle prior run.

    Args:
        placeholder: give latent sequence sites an all-EOS value instead of sampling them (no
            LM call), for backends that need only the sites' names and distributions.
    """
    # On placeholders, rewards defer their finiteness checks to the real batch (trial_run). The
    # placeholder handler sits outside the particle plate, so it sees the plate's batch shape and
    # x is [1, T] as in every other run (inside the plate it would be [T]).
    ctx = (_EosSequences(), trial_run()) if placeholder else (contextlib.nullcontext(),) * 2
    with ctx[0], ctx[1]:
        tr = trace_model(model, args, kwargs, 1)
    out = {}
    for name, site in tr.nodes.items():
        if is_latent(site):
            out[name] = sequence_base(site["fn"]) or site["fn"]
    return out


def observed_sequences(model: Callable, args: tuple, kwargs: dict) -> dict[str, SequenceDistribution]:
    """The model's observed ``lm.sequence(...)`` sites (observed text), from one single-particle
    run on placeholders (no LM call), for sizing batches."""
    with _EosSequences(), trial_run():
        tr = trace_model(model, args, kwargs, 1)
    return {name: sequence_base(site["fn"]) for name, site in tr.nodes.items()
            if site["type"] == "sample" and site["is_observed"] and sequence_base(site["fn"]) is not None}


def sequence_sites(sites: dict[str, Any]) -> dict[str, SequenceDistribution]:
    """The latent ``lm.sequence(...)`` sites among ``sites`` (program order)."""
    return {k: d for k, d in sites.items() if isinstance(d, SequenceDistribution)}


def single_sequence_site(sites: dict[str, Any], method: str) -> tuple[str, SequenceDistribution]:
    """The model's one latent site, which must be an ``lm.sequence(...)``: the one place that
    says so for the backends that need it."""
    seq = sequence_sites(sites)
    if len(sites) != 1 or len(seq) != 1:
        others = [k for k in sites if k not in seq]
        raise ValueError(
            f"method={method!r} runs over the tokens of exactly one latent site, an lm.sequence(...); this model "
            f"has latent sequence site(s) {list(seq)} and other latent site(s) {others}. Condition the others "
            "(pyro.poutine.condition) or pass them as arguments, or use method='importance'")
    name, d = next(iter(seq.items()))
    return name, d


def first_latent_site(model: Callable, args: tuple, kwargs: dict, site: str | None = None):
    """The first latent sample site of ``model`` (or the one named ``site``), as its Pyro message.

    Runs the model only up to that site (``poutine.escape``: nothing after it runs, no LM call),
    hidden from any enclosing handler. Returns ``None`` when there is no such site.
    """

    def stop_here(msg):
        return is_latent(msg) and (site is None or msg["name"] == site)

    with poutine.block(), SequenceSites():
        try:
            poutine.escape(model, escape_fn=stop_here)(*args, **kwargs)
        except NonlocalExit as exit_:
            exit_.reset_stack()
            return exit_.site
    return None


class _EosSequences(poutine.messenger.Messenger):
    """Latent sequence sites take the all-EOS value (the empty sequence) without sampling."""

    def _pyro_sample(self, msg):
        d = sequence_base(msg["fn"])
        if d is not None and not msg["is_observed"] and not msg["done"]:
            shape = msg["fn"].batch_shape + msg["fn"].event_shape
            msg["value"] = torch.full(shape, d.lm.eos_id, dtype=torch.long, device=d.lm.device)
            msg["done"] = True


# -- from scores to a Posterior ------------------------------------------------------------------
def main_site(values: dict[str, torch.Tensor], sites: dict) -> str | None:
    """The name of the sequence site a Posterior reports as ``samples``: the first latent sequence
    site (``None`` when every sequence site is observed)."""
    seq = [n for n, d in sites.items() if isinstance(d, SequenceDistribution)]
    return seq[0] if seq else None


def check_has_latent(sites: dict, method: str) -> None:
    """The one error for a model with nothing to infer (no latent site at all), naming the fix."""
    if not sites:
        raise ValueError(
            f"method={method!r}: the model has no latent site, so there is nothing to infer (every pyro.sample is "
            "observed). Add a latent site (pyro.sample('w', dist.Categorical(...)) or a latent lm.sequence(...)), "
            "or score the observed text directly: lm.sequence(prompt, max_new_tokens=T).log_prob(text)")


def stats_from_scores(scores: Scores, site: str, eos_id: int, sites: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-sample scalar summaries: log prior, log likelihood, length, every scalar latent, the
    length of every other sequence site (``length:NAME``, given ``sites``), each reward and constraint."""
    stats = {
        "log_prior": scores.log_prior.float(),
        "log_likelihood": scores.log_likelihood.float(),
    }
    if site is not None:
        stats["length"] = lengths(scores.values[site], eos_id).float()
    n = len(stats["log_prior"])
    for name, v in scores.values.items():  # every scalar latent (a discrete world, a parameter)
        if name != site and v.numel() == n:
            stats[name] = v.reshape(n).float()
        elif name != site and sites is not None and isinstance(sites.get(name), SequenceDistribution):
            stats[f"length:{name}"] = lengths(v.reshape(n, -1), sites[name].lm.eos_id).float()
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
        None,
        {k: torch.cat([p.latent_log_prob[k] for p in parts]) for k in first.latent_log_prob},
    )


def make_posterior(method: str, scores: Scores, log_w: torch.Tensor, sites: dict, **kw) -> Posterior:
    site = main_site(scores.values, sites)
    lm = sites[site].lm if site is not None else None
    return Posterior(
        samples=scores.values[site].reshape(len(log_w), -1) if site is not None else None,
        log_weights=normalise(log_w),
        method=method, lm=lm, site=site,
        stats=stats_from_scores(scores, site, lm.eos_id if lm is not None else None, sites),
        values={k: v for k, v in scores.values.items()},
        **kw,
    )


def finish(post: Posterior, extra_warnings: list | None = None) -> Posterior:
    """Attach every diagnosis to ``post`` (the backend's own, then :func:`~ppl_lm.diagnostics.warnings.diagnose`)
    and raise each as a Python warning at the user's line. Every backend's ``run`` ends here."""
    from ppl_lm.diagnostics.warnings import diagnose, emit

    dtype = getattr(post.lm, "dtype", None)
    if dtype is not None and isinstance(post.info, Info):  # the model the target is defined by (bfloat16 or not)
        post.info = dataclasses.replace(post.info, lm_dtype=str(dtype).removeprefix("torch."))
    post.warnings = list(extra_warnings or []) + diagnose(post)
    emit(post.warnings, post.method)
    return post


def token_masks(model, args, kwargs, seq: dict[str, SequenceDistribution]) -> dict[str, list[TokenMask]]:
    """The TokenMasks of the model's token-level constraints, by the sequence site each constrains,
    from one partial run on empty sequences (SMC and proposals follow them token by token)."""
    empty = {name: torch.full((1, d.max_new_tokens), d.lm.eos_id, dtype=torch.long, device=d.lm.device)
             for name, d in seq.items()}
    with partial_prefix(0):
        scores = run_model(model, args, kwargs, 1, data=empty, score_latent=False)
    masks: dict[str, list[TokenMask]] = {name: [] for name in seq}
    for name, site in scores.trace.nodes.items():
        meta = factor_of(site)
        if meta is None or not isinstance(meta.mask, TokenMask):
            continue
        target = meta.site
        if target is None and len(seq) == 1:
            target = next(iter(seq))
        if target not in masks:
            raise ValueError(
                f"token_constraint {name!r} constrains a tensor that is not the value of one of the model's "
                f"sequence sites {list(seq)}, so a sampler cannot tell whose tokens its mask follows. Pass the sampled "
                "sequence itself (ppl_lm.token_constraint(name, x, mask) with x = pyro.sample(...)), or use "
                "ppl_lm.constraint(name, mask.check(x), prefix_closed=True)")
        masks[target].append(meta.mask)
    return masks
