"""Many contexts in one call: one Posterior per context, the contexts' particles in shared LM batches.

``ppl_lm.infer(model, contexts=[c_0, c_1, ...], method=..., seed=s, **options)`` runs the model on
every context (each passed as the model's first positional argument, before ``*args``) and returns
a list with one :class:`~ppl_lm.posterior.Posterior` per context, in order.

**Seeds.** Context i runs under its own seed :func:`context_seed` ``(s, i)`` (context 0's is ``s``
itself), so its result does not depend on how many other contexts are in the call, nor on what they
are: ``posts[i]`` is what ``ppl_lm.infer(model, contexts[i], *args, seed=context_seed(s, i),
**options)`` returns: exactly on a table LM such as ``MarkovLM`` (and on the tiny test
transformers); on a real transformer the log-probabilities of a batch of left-padded prompts
differ from those of one prompt in the last bits (SmolLM2: up to 6e-5), and a draw whose uniform
lands within that distance of a boundary of the CDF picks the neighbouring token, so a few rows
differ (SmolLM2, 8 tokens: about 1 row in 64; benchmarks/RESULTS.md section 22): the same law,
not the same draws.

**Shared batches.** Every context's run is cut into its independent parts as the single-context
call cuts it (importance: chunks of ``chunk_size`` samples; SMC: the sweeps of
:func:`ppl_lm.inference.smc.sweep_plan`, islands or batches of replicates), each part drawing
from its own seeded stream (:func:`ppl_lm.inference.shards.part_seed` of the context's seed).
Parts of several contexts are then stacked into one batch of at most ``chunk_size`` rows (the
backend's default bound when ``chunk_size`` is not given: about 32k tokens for importance, the
token and logits bounds of :func:`ppl_lm.inference.smc.default_chunk_size` for SMC): one LM call per
token for the whole batch. Each part draws its tokens, its resampling and its model's other draws
from its own stream (:class:`ppl_lm.seeding.Stream`), and SMC resamples each part's replicates
within themselves, so the parts stay independent (each context keeps its own Ẑ; nothing is pooled
across contexts). A batch's prompt rows are read once per distinct prompt (once per context for a
shared prompt), then the LM state is repeated over that context's rows (:func:`start_unique`).
The model itself (its rewards, conditions, and prompts) runs per part on that part's rows.

**Where sharing applies.** ``method="importance"`` with the prior as proposal and ``method="smc"``
with the LM as proposal, no learned twist, and token masks (if any) that are the same objects for
every context (a mask built once by the model script), on models whose first latent site
(SMC: every latent site) is an ``lm.sequence(...)`` whose LM and ``max_new_tokens`` are the same
for every context. Everything else (``exact``, ``mh``, a ``guide=`` or ``proposal=``, token
masks built per context, twists, other latent sites in SMC) runs as a plain loop over the contexts, one
``infer`` per context with the same derived seeds: the same results, without shared batches.

**SVI.** ``method="svi"`` has its own ``contexts=`` option (a guide amortised over several
contexts, trained on all of them); ``ppl_lm.infer`` passes ``contexts=`` to a backend that
declares such an option, so SVI keeps that meaning and returns one Posterior.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyro.poutine as poutine
import torch

from ppl_lm import seeding as _random
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference import importance as _importance
from ppl_lm.inference import shards
from ppl_lm.inference._runtime import (
    Scores, cat_scores, check_has_latent, is_latent, latent_sites, observed_sequences, particle_dim, row_cache,
    run_model, run_model_until, sequence_base, sequence_sites, site_log_prob,
)
from ppl_lm.inference.smc import driver as _smc_driver
from ppl_lm.inference.smc.islands import combine, default_chunk_size, sweep_plan
from ppl_lm.inference.smc.sweep import SiteState, Sweep, SweepSpec
from ppl_lm.lm.base import LMState, sample_from, start_rows
from ppl_lm.posterior import Posterior
from ppl_lm.resampling import resample
from ppl_lm.tokens import categorical

__all__ = ["run", "context_seed", "check_contexts", "start_unique", "shares_batches"]

log = logging.getLogger(__name__)


def context_seed(seed: int, i: int) -> int:
    """The seed of context ``i`` of a call seeded by ``seed``: ``seed`` itself for context 0, and
    for the others a map distinct from :func:`~ppl_lm.inference.shards.part_seed` (whose seeds
    number a context's own parts), so two contexts' parts do not share a stream.

    >>> context_seed(7, 0), context_seed(0, 1) != context_seed(0, 2)
    (7, True)
    """
    if i == 0:
        return int(seed)
    return (int(seed) * 6_364_136_223_846_793_005 + int(i) * 1_442_695_040_888_963_407 + 11) % _random.MAX_SEED


def check_contexts(contexts) -> list:
    """``contexts`` as a list, or a clear error: a non-empty list or tuple of model arguments."""
    if isinstance(contexts, (str, bytes)):
        raise TypeError(f"contexts= takes a list of contexts (one model argument each), got one string "
                        f"{contexts[:40]!r}; write contexts=[{contexts[:40]!r}] or pass it as the model's argument")
    if isinstance(contexts, dict) or not isinstance(contexts, (list, tuple)):
        raise TypeError(f"contexts= takes a list of contexts (one model argument each), got {type(contexts).__name__}")
    if len(contexts) == 0:
        raise ValueError("contexts= is empty: give at least one context (the model's first argument)")
    return list(contexts)


def _sites_of(model, i: int, ctx, args: tuple, kwargs: dict) -> dict:
    """The latent sites of the model on context ``i`` (a placeholder run: no LM call), or an error
    naming the context the model refuses."""
    try:
        sites = latent_sites(model, (ctx, *args), kwargs, placeholder=True)
    except Exception as err:
        raise type(err)(f"context {i} ({_short(ctx)}): the model refused it: {err}") from err
    return sites


def _short(ctx) -> str:
    text = repr(ctx)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the plain loop -------------------------------------------------------------------------------
def _loop(model, contexts: list, args: tuple, seed: int, method: str, options: dict) -> list[Posterior]:
    from ppl_lm.infer import infer

    return [infer(model, ctx, *args, method=method, seed=context_seed(seed, i), **options)
            for i, ctx in enumerate(contexts)]


# -- entry point ----------------------------------------------------------------------------------
def run(model: Callable, contexts, *args, method: str, seed: int = 0, **options) -> list[Posterior]:
    """One Posterior per context (see the module notes); ``options`` are the backend's.

    Every context is checked first (the model runs on it once on placeholders: no LM call), so a
    context the model refuses is a clear error naming it before any sampling.

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model(first):
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("first", x[..., 0] == first)
    >>> posts = ppl_lm.infer(model, contexts=[1, 2], method="importance", num_samples=200, progress=False)
    >>> [int(p.samples[p.log_weights.argmax(), 0]) for p in posts]  # the first token is the context
    [1, 2]
    """
    contexts = check_contexts(contexts)
    kwargs = dict(options.get("model_kwargs") or {})
    with torch.no_grad():
        sites = [_sites_of(model, i, ctx, args, kwargs) for i, ctx in enumerate(contexts)]
    for s in sites:
        check_has_latent(s, method)
    if not shares_batches(method, options, sites):
        log.info("contexts: %d context(s), method=%r by a plain loop (no shared batches)", len(contexts), method)
        return _loop(model, contexts, args, seed, method, options)
    t0 = time.perf_counter()
    runner = _importance_batched if method == "importance" else _smc_batched
    opts = _defaults(method)
    opts.update({k: v for k, v in options.items() if k in opts})
    try:
        posts = runner(model, contexts, args, kwargs, sites, seed, opts)
    except _Unbatchable:
        return _loop(model, contexts, args, seed, method, options)
    wall = (time.perf_counter() - t0) / len(posts)
    for i, post in enumerate(posts):
        post.seed, post.wall_time = context_seed(seed, i), wall  # the call's time, shared equally
    return posts


def shares_batches(method: str, options: dict, sites: list[dict]) -> bool:
    """Whether the contexts of a call share LM batches (see the module notes), else a plain loop."""
    if method not in ("importance", "smc"):
        return False
    if options.get("guide") is not None or options.get("proposal") not in (None, "prior"):
        return False
    if options.get("twist") is not None:
        return False
    firsts = []
    for s in sites:
        seq = sequence_sites(s)
        if not seq or next(iter(s)) not in seq:
            return False  # the first latent site is not a sequence (importance), or there is none
        if method == "smc" and len(seq) != len(s):
            return False  # SMC batches only models whose latent sites are all sequences
        firsts.append(next(iter(seq.values())))
    lm, T = firsts[0].lm, firsts[0].max_new_tokens
    return all(d.lm is lm and d.max_new_tokens == T for d in firsts)


# -- shared machinery -----------------------------------------------------------------------------
@dataclass
class _Part:
    """One independent part of one context (an importance chunk or an SMC sweep) in a batch."""

    context: int  # index into the call's contexts
    index: int  # the part's number within its context's run
    args: tuple  # the model's positional arguments (the context first)
    rows: int  # rows it holds in the batch
    stream: _random.Stream
    replicates: list | None = None  # SMC: the replicate of each island it holds


def _pack(parts: list[_Part], bound: int) -> list[list[_Part]]:
    """Consecutive parts stacked into batches of at most ``bound`` rows (a larger part alone)."""
    batches, cur, rows = [], [], 0
    for p in parts:
        if cur and rows + p.rows > bound:
            batches.append(cur)
            cur, rows = [], 0
        cur.append(p)
        rows += p.rows
    if cur:
        batches.append(cur)
    return batches


def _offsets(parts: list[_Part]) -> list[int]:
    out, o = [], 0
    for p in parts:
        out.append(o)
        o += p.rows
    return out + [o]


def start_unique(lm, prompt: torch.Tensor, lengths: torch.Tensor | None, B: int) -> LMState:
    """``lm.start`` of ``B`` prompt rows (``prompt [B, P]`` right-padded to ``lengths [B]``, or one
    shared ``[P]``) that reads each distinct row once, then repeats the state over the rows that share
    it (``lm.reorder``): a batch of contexts computes each context's prompt once.

    A transformer whose KV cache is preallocated (``kv_cache="static"`` or ``"compiled"``) cannot
    grow a state by ``reorder``; its rows are read as they are.
    """
    if prompt.dim() == 2 and prompt.shape[-1] == 0:  # every row empty: one shared empty prompt
        return start_rows(lm, prompt[0], B)
    if prompt.dim() == 1 or getattr(getattr(lm, "kv_mode", None), "name", "dynamic") != "dynamic":
        return start_rows(lm, prompt, B, lengths)
    key = prompt if lengths is None else torch.cat([lengths.to(prompt.device)[:, None], prompt], -1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    if len(uniq) == B:
        return start_rows(lm, prompt, B, lengths)
    rows = torch.zeros(len(uniq), dtype=torch.long, device=inverse.device).scatter_(
        0, inverse, torch.arange(B, device=inverse.device))
    sub_lengths = None if lengths is None else lengths[rows.to(lengths.device)]
    state = start_rows(lm, prompt[rows.to(prompt.device)], len(uniq), sub_lengths)
    return lm.reorder(state, inverse.to(lm.device))


def _stack_prompts(dists: list[SequenceDistribution], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt rows of several sites' batches, stacked: ``(prompt [B, P] right-padded, lengths
    [B] or None when every row has one length)``."""
    rows, lens = [], []
    for d, n in zip(dists, counts):
        p, ln = d.prompt_rows(n)
        p = p.expand(n, -1) if p.dim() == 1 else p
        rows.append(p)
        lens.append(torch.full((n,), p.shape[-1], dtype=torch.long) if ln is None else ln.cpu())
    lengths = torch.cat(lens)
    P = int(lengths.max()) if len(lengths) else 0
    eos = dists[0].lm.eos_id
    prompt = torch.cat([torch.nn.functional.pad(r.cpu(), (0, P - r.shape[-1]), value=eos) for r in rows])
    return prompt, (None if bool((lengths == P).all()) else lengths)


def _draw_by_part(parts: list[_Part], offsets: list[int]):
    """``draw(logprobs) -> tokens``: each part's rows from its own stream's generator."""

    def draw(logp: torch.Tensor) -> torch.Tensor:
        return torch.cat([categorical(logp[offsets[k]:offsets[k + 1]], p.stream.generator(logp.device))
                          for k, p in enumerate(parts)])

    return draw


def _other_log_prior(trace, skip: set, n: int) -> dict[str, torch.Tensor]:
    """Per-particle log-probs of the latent sites of ``trace`` not in ``skip``."""
    return {k: site_log_prob(k, node["fn"].log_prob(node["value"]), n, particle_dim(node)).detach()
            for k, node in trace.nodes.items() if is_latent(node) and k not in skip}


# -- importance -----------------------------------------------------------------------------------
def _importance_batched(model, contexts, args, kwargs, sites, seed, options) -> list[Posterior]:
    num_samples, chunk_size = options["num_samples"], options["chunk_size"]
    parts, chunks = [], []
    for c, ctx in enumerate(contexts):
        a = (ctx, *args)
        with _random.seeded(context_seed(seed, c)), torch.no_grad(), row_cache():
            obs = observed_sequences(model, a, kwargs)
        size = chunk_size or _importance.default_chunk_size({**sites[c], **obs}, num_samples)
        chunks.append(size)
        cseed = context_seed(seed, c)
        for i, start in enumerate(range(0, num_samples, size)):
            parts.append(_Part(c, i, a, min(size, num_samples - start), _random.Stream(shards.part_seed(cseed, i))))
    bound = chunk_size or min(_importance.default_chunk_size(s, 1 << 30) for s in sites)
    done: dict[int, list] = {c: [] for c in range(len(contexts))}
    with torch.no_grad(), row_cache():
        for batch in _pack(parts, bound):
            for p, result in zip(batch, _importance_batch(model, kwargs, batch)):
                done[p.context].append(result)
    posts = []
    for c, ctx in enumerate(contexts):
        try:
            posts.append(_importance.pool(done[c], num_samples, chunks[c], sites[c]))
        except ValueError as err:  # e.g. every weight zero: say which context
            raise ValueError(f"context {c} ({_short(ctx)}): {err}") from err
    return posts


def _importance_batch(model, kwargs, batch: list[_Part]) -> list[tuple[Scores, torch.Tensor]]:
    """One batch: each part runs its model up to its first sequence site, the site's tokens of every
    part are drawn in one batched LM pass, then each part's model runs to its end on them."""
    heads, dists = [], []
    for p in batch:
        with p.stream:
            head, site = run_model_until(model, p.args, kwargs, p.rows, {}, sequences_only=True)
        heads.append(head)
        dists.append(sequence_base(site["fn"]))
    name, d0 = site["name"], dists[0]
    offsets = _offsets(batch)
    prompt, lengths = _stack_prompts(dists, [p.rows for p in batch])
    d0.lm.check_context(prompt.shape[-1], d0.max_new_tokens)
    state = start_unique(d0.lm, prompt, lengths, offsets[-1])
    tokens, lps = sample_from(d0.lm, state, d0.max_new_tokens, _draw_by_part(batch, offsets))
    out = []
    for k, (p, head) in enumerate(zip(batch, heads)):
        rows = slice(offsets[k], offsets[k + 1])
        with p.stream:
            scores = run_model(model, p.args, kwargs, p.rows, data={**head.values, name: tokens[rows]},
                               score_latent=False)
        latent = {name: lps[rows].sum(-1).detach().to(scores.log_prior.device),
                  **_other_log_prior(scores.trace, {name}, p.rows)}
        latent = {k2: latent[k2] for k2 in scores.values if k2 in latent}  # program order
        scores.latent_log_prob = latent
        scores.log_prior = sum(v.to(scores.log_prior.device) for v in latent.values()).detach()
        scores.trace = None
        out.append((scores, scores.log_likelihood.double()))
    return out


# -- SMC ------------------------------------------------------------------------------------------
def _smc_batched(model, contexts, args, kwargs, sites, seed, opts) -> list[Posterior]:
    N, R, chunk_size = opts["num_particles"], opts["num_replicates"], opts["chunk_size"]
    stages, sizes, parts = [], [], []
    for c, ctx in enumerate(contexts):
        a = (ctx, *args)
        with _random.seeded(context_seed(seed, c)), torch.no_grad(), row_cache():
            seq = sequence_sites(sites[c])
            st, _, masks = _smc_driver.build_stages(model, a, kwargs, seq)
            if stages and not _same_masks(stages[0], st):
                raise _Unbatchable
            size = chunk_size
            if size is None:
                sized = [*seq.values(), *observed_sequences(model, a, kwargs).values()]
                size = min((default_chunk_size(d) for d in sized), default=max(2, N))
        stages.append(st)
        sizes.append(size)
        cseed = context_seed(seed, c)
        for i, (n, reps) in enumerate(sweep_plan(N, R, size)):
            parts.append(_Part(c, i, a, n * len(reps), _random.Stream(shards.part_seed(cseed, i)), reps))
    bound = chunk_size or min(sizes)
    done: dict[int, list] = {c: [] for c in range(len(contexts))}
    with torch.no_grad(), row_cache():
        by_size: dict[int, list[_Part]] = {}
        for p in parts:  # a batched sweep holds islands of one size
            by_size.setdefault(p.rows // len(p.replicates), []).append(p)
        for n, group in by_size.items():
            for batch in _pack(group, max(bound, n)):
                spec = SweepSpec(model, (), kwargs, stages[batch[0].context], n,
                                 [r for p in batch for r in p.replicates], opts["ess_threshold"], opts["resampling"],
                                 opts["observed"])
                sweep = _ContextSweep(spec, batch)
                sweep.run(False, 0)
                for p, result in zip(batch, sweep.results()):
                    done[p.context].append((p.index, result))
                del sweep
    posts = []
    for c in range(len(contexts)):
        results = [r for _, r in sorted(done[c], key=lambda ir: ir[0])]
        posts.append(combine(results, N, R, sizes[c], sites[c],
                             {"resampling": opts["resampling"], "ess_threshold": opts["ess_threshold"],
                              "proposal": "lm", "twist": False,
                              "token_masks": sum(len(st.masks) for st in stages[c])}))
    return posts


def _same_masks(a: list, b: list) -> bool:
    """Whether two contexts' stages follow the very same token masks (one mask object, built once by
    the model script, e.g. ``rewards.forbid_chars``): their rows can then share one batch."""
    return len(a) == len(b) and all(
        x.name == y.name and len(x.masks) == len(y.masks) and all(m is n for m, n in zip(x.masks, y.masks))
        for x, y in zip(a, b))


class _Unbatchable(Exception):
    """A context's run cannot share batches (found while setting it up): run the plain loop."""


def _defaults(method: str) -> dict[str, Any]:
    """The backend's options with their defaults."""
    from ppl_lm.infer import backend_options

    return {k: p.default for k, p in backend_options(method).items()}


class _ContextSweep(Sweep):
    """A :class:`Sweep` whose rows are the parts of several contexts: each part's model runs on its
    rows under its context, and its tokens, resampling and other draws come from its own stream."""

    def __init__(self, spec: SweepSpec, parts: list[_Part]):
        super().__init__(spec)
        self.parts = parts
        self.offsets = _offsets(parts)
        # part k holds replicates rep_offsets[k]:rep_offsets[k+1] of the sweep
        self.rep_offsets = [o // spec.N for o in self.offsets]
        self.part_of_row = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([p.rows for p in parts]))
        self.ess_by_part: list[list[float]] = [[] for _ in parts]

    def _split(self, rows: torch.Tensor | None):
        """``(part index, this part's positions among rows)`` for each part with rows among ``rows``."""
        if rows is None:
            return [(k, slice(self.offsets[k], self.offsets[k + 1])) for k in range(len(self.parts))]
        owner = self.part_of_row[rows.cpu()]
        out = []
        for k in range(len(self.parts)):
            pos = (owner == k).nonzero()[:, 0]
            if len(pos):
                out.append((k, pos))
        return out

    def _each(self, rows, data, fn):
        results = []
        for k, pos in self._split(rows):
            p = self.parts[k]
            sub = {name: v[pos.to(v.device) if isinstance(pos, torch.Tensor) else pos] for name, v in data.items()}
            n = pos.stop - pos.start if isinstance(pos, slice) else len(pos)
            with p.stream:
                results.append(fn(p, n, sub))
        return results

    def _run_model(self, rows, data, **kw) -> Scores:
        spec = self.spec
        res = self._each(rows, data, lambda p, n, sub: run_model(spec.model, p.args, spec.kwargs, n, data=sub, **kw))
        return _merge(res)

    def _run_model_until(self, rows, data, **kw):
        spec = self.spec
        res = self._each(rows, data,
                         lambda p, n, sub: run_model_until(spec.model, p.args, spec.kwargs, n, sub, **kw))
        sites = [s for _, s in res]
        if any(s is None for s in sites):
            return _merge([s for s, _ in res]), None
        return _merge([s for s, _ in res]), {"name": sites[0]["name"], "parts": sites}

    def _start_site(self, stage, site) -> SiteState:
        dists = [sequence_base(s["fn"]) for s in site["parts"]]
        B = self.spec.B
        prompt, lengths = _stack_prompts(dists, [p.rows for p in self.parts])
        d = dists[0]
        d.lm.check_context(prompt.shape[-1], d.max_new_tokens)
        return SiteState(
            stage=stage, lm=d.lm, T=d.max_new_tokens, prompt=prompt.to(d.lm.device), prompt_lengths=lengths,
            lm_state=start_unique(d.lm, prompt, lengths, B), q_state=None,
            mask_states=[m.start(B) for m in stage.masks],
            tokens=torch.full((B, d.max_new_tokens), d.lm.eos_id, dtype=torch.long, device=d.lm.device),
            done=torch.zeros(B, dtype=torch.bool))

    def _choose(self, logq_m, gen, t):
        return _draw_by_part(self.parts, self.offsets)(logq_m)

    def _ancestors(self, probs, need, gen):
        out, j = [], 0
        for k, p in enumerate(self.parts):
            m = int(need[self.rep_offsets[k]:self.rep_offsets[k + 1]].sum())
            if m:
                out.append(resample(probs[j:j + m], self.spec.N, self.spec.resampling, p.stream.generator("cpu")))
                j += m
        return torch.cat(out)

    def _resample(self, allowed: bool) -> None:
        from ppl_lm.diagnostics.estimators import kish_ess_rows

        ess = kish_ess_rows(self.state.log_w.view(self.spec.R, self.spec.N))
        for k in range(len(self.parts)):
            self.ess_by_part[k].append(float(ess[self.rep_offsets[k]:self.rep_offsets[k + 1]].mean()))
        super()._resample(allowed)

    def _check_alive(self, where: str) -> None:
        dead = ~torch.isfinite(self.state.log_w.view(self.spec.R, self.spec.N)).any(-1)
        for k, p in enumerate(self.parts):
            if bool(dead[self.rep_offsets[k]:self.rep_offsets[k + 1]].all()):
                raise ValueError(
                    f"context {p.context} ({_short(p.args[0])}): every particle died {where}: no particle satisfies "
                    "the condition on this context. Use more particles, declare hard constraints prefix_closed, or "
                    "leave this context out of the call")

    def results(self) -> list:
        """The :class:`~ppl_lm.inference.smc.sweep.SweepResult` of each part, as a single-context sweep
        of that part gives it."""
        import dataclasses

        whole = self.result()
        out = []
        for k, p in enumerate(self.parts):
            rows, reps = slice(self.offsets[k], self.offsets[k + 1]), slice(self.rep_offsets[k], self.rep_offsets[k + 1])
            s = whole.scores
            scores = Scores(s.log_prior[rows], s.log_likelihood[rows], {n: v[rows] for n, v in s.values.items()},
                            {n: v[rows] for n, v in s.rewards.items()}, {n: v[rows] for n, v in s.constraints.items()},
                            {n: v[rows] for n, v in s.observed_log_prob.items()}, None,
                            {n: v[rows] for n, v in s.latent_log_prob.items()})
            out.append(dataclasses.replace(
                whole, scores=scores, draws=whole.draws[rows], log_w=whole.log_w[rows],
                eve=whole.eve[rows] - self.offsets[k], replicates=p.replicates, log_z=whole.log_z[reps],
                rel_var=whole.rel_var[reps], num_resampling=whole.num_resampling[reps],
                ess_history=self.ess_by_part[k]))
        return out


def _merge(parts: list[Scores]) -> Scores:
    """Per-part scores concatenated in row order; the trace is an empty one (the batched SMC runs
    only models whose latent sites are all sequences, so no per-site log-prob is read off it)."""
    merged = cat_scores(parts) if len(parts) > 1 else parts[0]
    merged.trace = poutine.Trace()
    return merged
