"""SMC on many contexts in one call (:mod:`ppl_lm.inference.contexts`): the sweeps of every context
stacked into one batch of rows, each context's model, token draws and resampling on its own rows
and its own seeded stream, each context's Ẑ its own (nothing is pooled across contexts).

Shares batches when the LM is the proposal (no guide=, proposal None or "prior"), there is no twist, every latent site is a sequence,
and the token masks are the very same objects for every context (built once by the model script);
otherwise :class:`~ppl_lm.inference.contexts.Unbatchable` sends the call to the plain loop.
"""

from __future__ import annotations

import dataclasses

import pyro.poutine as poutine
import torch
from ppl_lm.inference._runtime import (
    Scores, cat_scores, observed_sequences, row_cache, run_model, run_model_until, sequence_base, sequence_sites,
)

from ppl_lm import seeding as _random
from ppl_lm.inference import contexts as _ctx
from ppl_lm.diagnostics.estimators import kish_ess_rows
from ppl_lm.inference import shards
from ppl_lm.posterior import Posterior
from ppl_lm.resampling import resample
from ppl_lm.tokens import masked_categorical

from .islands import combine, default_chunk_size, sweep_plan
from .sweep import SiteState, Sweep, SweepSpec

__all__ = ["run_contexts"]


def run_contexts(model, contexts, args, kwargs, sites, seed, opts) -> list[Posterior]:
    """Many contexts in one call, with the LM as proposal: every context's sweeps (islands or batches
    of replicates, each under its own seeded stream) stacked into shared batches; each keeps its own Ẑ."""
    from .driver import build_stages

    # a guide, another proposal or a twist: the plain loop, which checks them as the single call does
    if opts.get("guide") is not None or opts.get("proposal") not in (None, "prior") or opts.get("twist") is not None:
        raise _ctx.Unbatchable
    _ctx.one_sequence_lm(sites, every_latent=True)
    N, R, chunk_size = opts["num_particles"], opts["num_replicates"], opts["chunk_size"]
    stages, sizes, parts = [], [], []
    for c, ctx in enumerate(contexts):
        a = (ctx, *args)
        with _random.seeded(_ctx.context_seed(seed, c)), torch.no_grad(), row_cache():
            seq = sequence_sites(sites[c])
            st, _, masks = build_stages(model, a, kwargs, seq)
            if stages and not _same_masks(stages[0], st):
                raise _ctx.Unbatchable
            size = chunk_size
            if size is None:
                sized = [*seq.values(), *observed_sequences(model, a, kwargs).values()]
                size = min((default_chunk_size(d) for d in sized), default=max(2, N))
        stages.append(st)
        sizes.append(size)
        cseed = _ctx.context_seed(seed, c)
        for i, (n, reps) in enumerate(sweep_plan(N, R, size)):
            parts.append(_ctx.Part(c, i, a, n * len(reps), _random.Stream(shards.part_seed(cseed, i)), reps))
    bound = chunk_size or min(sizes)
    done: dict[int, list] = {c: [] for c in range(len(contexts))}
    with torch.no_grad(), row_cache():
        by_size: dict[int, list[_ctx.Part]] = {}
        for p in parts:  # a batched sweep holds islands of one size
            by_size.setdefault(p.rows // len(p.replicates), []).append(p)
        for n, group in by_size.items():
            for batch in _ctx.pack(group, max(bound, n)):
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


class _ContextSweep(Sweep):
    """A :class:`Sweep` whose rows are the parts of several contexts: each part's model runs on its
    rows under its context, and its tokens, resampling and other draws come from its own stream."""

    def __init__(self, spec: SweepSpec, parts: list[_ctx.Part]):
        super().__init__(spec)
        self.parts = parts
        self.offsets = _ctx.row_offsets(parts)
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
        prompt, lengths = _ctx.stack_prompts(dists, [p.rows for p in self.parts])
        d = dists[0]
        d.lm.check_context(prompt.shape[-1], d.max_new_tokens)
        return SiteState(
            stage=stage, lm=d.lm, T=d.max_new_tokens, prompt=prompt.to(d.lm.device), prompt_lengths=lengths,
            lm_state=_ctx.start_unique(d.lm, prompt, lengths, B), q_state=None,
            mask_states=[m.start(B) for m in stage.masks],
            tokens=torch.full((B, d.max_new_tokens), d.lm.eos_id, dtype=torch.long, device=d.lm.device),
            done=torch.zeros(B, dtype=torch.bool))

    def _choose(self, logq, allowed, gen, t):
        """Each part's rows drawn from its own stream, as :meth:`Sweep._choose` draws them."""
        if allowed is not None:
            allowed = allowed.expand_as(logq)
        drawn = [masked_categorical(logq[a:b], None if allowed is None else allowed[a:b], p.stream.generator(logq.device))
                 for p, a, b in zip(self.parts, self.offsets[:-1], self.offsets[1:])]
        return torch.cat([tok for tok, _ in drawn]), torch.cat([mass for _, mass in drawn])

    def _ancestors(self, probs, need, gen):
        out, j = [], 0
        for k, p in enumerate(self.parts):
            m = int(need[self.rep_offsets[k]:self.rep_offsets[k + 1]].sum())
            if m:
                out.append(resample(probs[j:j + m], self.spec.N, self.spec.resampling, p.stream.generator("cpu")))
                j += m
        return torch.cat(out)

    def _resample(self, allowed: bool) -> None:
        ess = kish_ess_rows(self.state.log_w.view(self.spec.R, self.spec.N))
        for k in range(len(self.parts)):
            self.ess_by_part[k].append(float(ess[self.rep_offsets[k]:self.rep_offsets[k + 1]].mean()))
        super()._resample(allowed)

    def _check_alive(self, where: str) -> None:
        dead = ~torch.isfinite(self.state.log_w.view(self.spec.R, self.spec.N)).any(-1)
        for k, p in enumerate(self.parts):
            if bool(dead[self.rep_offsets[k]:self.rep_offsets[k + 1]].all()):
                raise ValueError(
                    f"context {p.context} ({_ctx.short(p.args[0])}): every particle died {where}: no particle satisfies "
                    "the condition on this context. Use more particles, declare hard constraints prefix_closed, or "
                    "leave this context out of the call")

    def results(self) -> list:
        """The :class:`~ppl_lm.inference.smc.sweep.SweepResult` of each part, as a single-context sweep
        of that part gives it."""
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
