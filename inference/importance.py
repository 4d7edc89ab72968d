"""Importance sampling: prior (or guide) proposals, self-normalised weights, PSIS diagnostics.

Each chunk of ``chunk_size`` particles is one vectorised run of the model inside the particle
plate (so one batched LM call per chunk), and only the tokens and per-sample scalars of a chunk
are kept: ``num_samples=100_000`` runs in memory bounded by the chunk size.

With the prior as proposal the weight of a sample is its log-likelihood (the sum of the
condition factors): log p(x) cancels, and the sampler's own log-probabilities are reused for the
``log_prior`` statistic, so nothing is scored twice. With a guide ``q`` (a callable with the
model's signature that samples the same latent site(s) inside the particle plate, e.g. the
trained SVI guide) the weight is log p(x, obs) - log q(x).

With a token ``proposal`` (:mod:`ppl_lm.proposal`: the same LM under another prompt, a smaller LM
over the same vocabulary, a trained guide's LM) the latent sites before the first sequence site are
drawn from the prior, that site's tokens from the proposal started on the site's own prompt rows,
one token at a time, restricted to the tokens its token masks allow and renormalised; the weight is
log p(x, obs) - log q(x) with that renormalised q (the prior draws cancel).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ppl_lm import seeding as _random
from ppl_lm.backends import Kind, describe
from ppl_lm.diagnostics.estimators import KHAT_THRESHOLD, kish_ess, log_evidence_se, log_mean_exp, pareto_khat
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference import contexts as _ctx
from ppl_lm.inference import shards
from ppl_lm.inference._runtime import (
    Scores, cat_scores, check_guide_sites, check_has_latent, finish, latent_sites, make_posterior, observed_sequences, row_cache,
    run_guide, run_model, run_model_until, sequence_base, sequence_sites, token_masks,
)
from ppl_lm.lm import LanguageModel
from ppl_lm.lm.base import sample_from
from ppl_lm.posterior import Info, Posterior, normalise
from ppl_lm.proposal import proposal_lm, proposal_name, sample_tokens
from ppl_lm.validation import PositiveInt

__all__ = ["run", "run_contexts", "pool", "default_chunk_size", "ImportanceInfo", "pareto_khat", "log_evidence_se", "KHAT_THRESHOLD"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportanceInfo(Info):
    """Facts of an importance-sampling run."""

    num_samples: int = 0
    chunk_size: int = 0
    proposal: str = "prior"  # "prior", "guide", "prompted:<text>" or the proposal LM's type
    num_nonzero: int = 0  # samples with positive weight


TOKENS_PER_CHUNK = 1 << 15


@describe(kind=Kind.WEIGHTED, info=ImportanceInfo, contexts="run_contexts")
def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, num_samples: PositiveInt = 1000,
        chunk_size: PositiveInt | None = None, guide=None, proposal: str | LanguageModel | None = None,
        progress: bool = True) -> Posterior:
    """Self-normalised importance sampling with the prior or a guide as proposal.

    Args:
        model: a vectorised Pyro model; ``*args`` and ``model_kwargs`` are its arguments.
        seed: same seed, same samples (on CPU), for a given ``chunk_size``: chunk i draws from its own seed
            (:func:`ppl_lm.inference.shards.part_seed`), whatever came before it, so the chunks can be drawn by several processes (:mod:`ppl_lm.inference.distributed`).
        num_samples: number of proposals drawn.
        chunk_size: particles per vectorised model run (bounds memory). ``None`` picks about
            32k tokens (prompt plus new tokens) per chunk. Another chunk size gives different,
            equally valid, samples.
        guide: proposal; ``None`` is the prior. Otherwise a callable with the model's signature
            that samples the model's latent site(s) under the same names; latent sites the guide
            does not sample are drawn from the prior (their log-probabilities cancel).
        proposal: a token proposal for the first latent sequence site: ``"prompted:<text>"`` or
            ``ppl_lm.prompted(lm, text)`` (the model's LM with ``text`` read before the model's
            prompt), another :class:`LanguageModel` over the same vocabulary (a smaller LM with
            the same tokenizer), or a trained guide (``post.guide``); ``None`` or ``"prior"``: the
            prior. Tokens are drawn from q restricted to the tokens the token masks allow
            (renormalised) and weighted by π/q exactly. Not with ``guide``.
        progress: show a progress bar over samples.

    Returns:
        A :class:`Posterior` with ``log_evidence`` = log mean weight, ``log_evidence_se`` (delta
        method), ``khat`` (PSIS) and an :class:`ImportanceInfo`; a ``khat`` warning when k-hat > 0.7.

    Raises:
        ValueError: bad options, or every weight is zero (no sample satisfies the condition).

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1)
    >>> post = ppl_lm.infer(model, method="importance", num_samples=4000, progress=False)
    >>> abs(post.log_evidence - (-1.0986)) < 0.1  # log(1/3); 0.1 is 4.5 standard errors at N=4000
    True
    """
    if guide is not None and not callable(guide):
        raise TypeError(f"guide must be a callable with the model's signature (or None), got {type(guide).__name__}")
    if guide is not None and proposal is not None:
        raise ValueError("give the proposal once: guide= (a program sampling the model's sites) or proposal= "
                         "(a token proposal), not both")
    kwargs = dict(model_kwargs or {})

    with _random.seeded(seed), torch.no_grad(), row_cache():
        sites = latent_sites(model, args, kwargs, placeholder=True)
        check_has_latent(sites, "importance")
        shard = shards.current()  # which chunks this process draws (all, unless distributed)
        qlm, masks = _token_proposal(model, args, kwargs, sites, proposal)
        if chunk_size is None:
            chunk_size = shard.chunk_size(
                default_chunk_size({**sites, **observed_sequences(model, args, kwargs)}, num_samples), num_samples)
        done = {}
        starts = range(0, num_samples, chunk_size)
        bar = tqdm(total=sum(min(chunk_size, num_samples - s) for i, s in enumerate(starts) if shard.owns(i)),
                   desc="importance", unit="sample", disable=not progress)
        try:
            for i, start in enumerate(starts):
                if not shard.owns(i):
                    continue
                n = min(chunk_size, num_samples - start)
                with shards.part_stream(i):  # chunk i draws the same wherever it runs
                    scores, log_w = (_chunk(model, args, kwargs, n, guide) if qlm is None
                                     else _proposal_chunk(model, args, kwargs, n, qlm, masks))
                scores.trace = None  # keep tokens and scalars only
                done[i] = (scores, log_w.double())
                bar.update(n)
        finally:
            bar.close()
        parts = shard.gather(done)
        if parts is None:  # another process pools the chunks
            return None
    return pool(parts, num_samples, chunk_size, sites,
                "guide" if guide is not None else proposal_name(qlm))


def pool(parts: list, num_samples: int, chunk_size: int, sites: dict, proposal: str = "prior") -> Posterior:
    """The Posterior of a run's chunks ``parts`` (``(Scores, log-weights)`` per chunk, in chunk order):
    log Z = log mean weight, its standard error, PSIS k-hat."""
    scores = cat_scores([s for s, _ in parts]) if len(parts) > 1 else parts[0][0]
    log_w = torch.cat([w for _, w in parts])
    normalise(log_w)  # the clear errors: NaN weights, or every weight zero
    log_z = float(log_mean_exp(log_w))
    info = ImportanceInfo(num_samples=num_samples, chunk_size=chunk_size, proposal=proposal,
                          num_nonzero=int(torch.isfinite(log_w).sum()))
    post = make_posterior("importance", scores, log_w, sites, log_evidence=log_z, info=info,
                          log_evidence_se=log_evidence_se(log_w), khat=pareto_khat(log_w))
    log.info("importance: N=%d, log Z=%.4f ± %.4f, ESS=%.1f, k-hat=%.2f", num_samples, log_z,
             post.log_evidence_se or 0.0, kish_ess(log_w), post.khat if post.khat is not None else float("nan"))
    return finish(post)


def default_chunk_size(sites: dict, num_samples: int) -> int:
    """About :data:`TOKENS_PER_CHUNK` tokens (prompt plus new tokens of every latent and observed
    sequence site) per chunk."""
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
    guide_tr, guide_scores = run_guide(guide, args, kwargs, n)
    scores = run_model(model, args, kwargs, n, guide_trace=guide_tr, score_latent=True)
    check_guide_sites(guide_scores, scores.latent_log_prob, cover_all=False)
    # Latent sites the guide leaves out were drawn from the prior: their log p cancels.
    log_w = scores.log_likelihood.double()
    for name, lq in guide_scores.items():
        log_w = log_w + scores.latent_log_prob[name].double() - lq.double()
    return scores, log_w


def _token_proposal(model, args, kwargs, sites, proposal):
    """The proposal LM of the first latent sequence site and that site's token masks (``None, None``
    for the prior); a clear error before any sampling when the model has no such site or the
    vocabularies differ."""
    if proposal is None:
        return None, None
    seq = sequence_sites(sites)
    if not seq:
        raise ValueError("a token proposal proposes the tokens of a latent lm.sequence(...) site, and this model "
                         "has none; leave proposal= out")
    name, d = next(iter(seq.items()))
    qlm = proposal_lm(proposal, d.lm)
    return qlm, (None if qlm is None else token_masks(model, args, kwargs, seq)[name])


def _proposal_chunk(model, args, kwargs, n: int, qlm: LanguageModel, masks: list):
    """One vectorised run with the first sequence site's tokens drawn from ``qlm`` (masked,
    renormalised): (Scores, log-weights ``[n]``)."""
    # The latent sites before the sequence site, from the prior (they cancel in the weight).
    head, site = run_model_until(model, args, kwargs, n, {}, sequences_only=True)
    name, d = site["name"], sequence_base(site["fn"])
    prompt, lengths = d.prompt_rows(n)
    tokens, log_q = sample_tokens(qlm, prompt, lengths, n, d.max_new_tokens, [m.start(n) for m in masks],
                                  _random.generator(qlm.device))
    scores = run_model(model, args, kwargs, n, data={**head.values, name: tokens.to(d.lm.device)}, score_latent=True)
    log_w = scores.log_likelihood.double() + scores.latent_log_prob[name].double() - log_q.to(scores.log_likelihood.device)
    return scores, log_w


# -- many contexts in one call (ppl_lm.inference.contexts) ----------------------------------------
def run_contexts(model, contexts, args, kwargs, sites, seed, options) -> list[Posterior]:
    """Many contexts in one call, with the prior as proposal: every context's chunks (each under its
    own seeded stream) stacked into shared LM batches, pooled per context as :func:`run` pools them."""
    if options.get("guide") is not None or options.get("proposal") not in (None, "prior"):
        raise _ctx.Unbatchable
    _ctx.one_sequence_lm(sites)
    num_samples, chunk_size = options["num_samples"], options["chunk_size"]
    parts, chunks, bounds = [], [], []
    for c, ctx in enumerate(contexts):
        a = (ctx, *args)
        with _random.seeded(_ctx.context_seed(seed, c)), torch.no_grad(), row_cache():
            obs = observed_sequences(model, a, kwargs)
        size = chunk_size or default_chunk_size({**sites[c], **obs}, num_samples)
        chunks.append(size)
        bounds.append(default_chunk_size({**sites[c], **obs}, 1 << 30))  # observed tokens count too
        cseed = _ctx.context_seed(seed, c)
        for i, start in enumerate(range(0, num_samples, size)):
            parts.append(_ctx.Part(c, i, a, min(size, num_samples - start), _random.Stream(shards.part_seed(cseed, i))))
    bound = chunk_size or min(bounds)
    done: dict[int, list] = {c: [] for c in range(len(contexts))}
    with torch.no_grad(), row_cache():
        for batch in _ctx.pack(parts, bound):
            for p, result in zip(batch, _run_context_batch(model, kwargs, batch)):
                done[p.context].append(result)
    posts = []
    for c, ctx in enumerate(contexts):
        try:
            posts.append(pool(done[c], num_samples, chunks[c], sites[c]))
        except ValueError as err:  # e.g. every weight zero: say which context
            raise ValueError(f"context {c} ({_ctx.short(ctx)}): {err}") from err
    return posts


def _run_context_batch(model, kwargs, batch: list[_ctx.Part]) -> list[tuple[Scores, torch.Tensor]]:
    """One batch: each part runs its model up to its first sequence site, the site's tokens of every
    part are drawn in one batched LM pass, then each part's model runs to its end on them."""
    heads, dists = [], []
    for p in batch:
        with p.stream:
            head, site = run_model_until(model, p.args, kwargs, p.rows, {}, sequences_only=True)
        heads.append(head)
        dists.append(sequence_base(site["fn"]))
    name, d0 = site["name"], dists[0]
    offsets = _ctx.row_offsets(batch)
    prompt, lengths = _ctx.stack_prompts(dists, [p.rows for p in batch])
    d0.lm.check_context(prompt.shape[-1], d0.max_new_tokens)
    state = _ctx.start_unique(d0.lm, prompt, lengths, offsets[-1])
    tokens, lps = sample_from(d0.lm, state, d0.max_new_tokens, _ctx.draw_by_part(batch, offsets))
    out = []
    for k, (p, head) in enumerate(zip(batch, heads)):
        rows = slice(offsets[k], offsets[k + 1])
        with p.stream:
            scores = run_model(model, p.args, kwargs, p.rows, data={**head.values, name: tokens[rows]},
                               score_latent=False)
        latent = {name: lps[rows].sum(-1).detach().to(scores.log_prior.device),
                  **_ctx.other_log_prior(scores.trace, {name}, p.rows)}
        latent = {k2: latent[k2] for k2 in scores.values if k2 in latent}  # program order
        scores.latent_log_prob = latent
        scores.log_prior = sum(v.to(scores.log_prior.device) for v in latent.values()).detach()
        scores.trace = None
        out.append((scores, scores.log_likelihood.double()))
    return out
