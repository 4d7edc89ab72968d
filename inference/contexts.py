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

**Where sharing applies.** A backend declares its shared-batch run in its description
(``@describe(..., contexts="run_contexts")``, :mod:`ppl_lm.backends`); this module holds what such
runs share (the parts, packing, stacked prompts, per-part draws) and names no backend. A backend's
run raises :class:`Unbatchable` for a call it cannot batch. Today: ``method="importance"`` with the prior as proposal and ``method="smc"``
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
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ppl_lm import seeding as _random
from ppl_lm.backends import get
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference._runtime import check_has_latent, is_latent, latent_sites, particle_dim, sequence_sites, site_log_prob
from ppl_lm.lm.base import LMState, start_rows
from ppl_lm.posterior import Posterior
from ppl_lm.tokens import categorical

__all__ = ["run", "context_seed", "check_contexts", "one_sequence_lm", "Part", "pack", "row_offsets", "start_unique",
           "stack_prompts", "draw_by_part", "other_log_prior", "Unbatchable", "defaults"]

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
    except Exception as err:  # a note, not a new exception: its class may need other arguments
        err.add_note(f"context {i} ({short(ctx)}): the model refused it")
        raise
    return sites


def short(ctx) -> str:
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
    sites = []
    for i, ctx in enumerate(contexts):
        with _random.seeded(context_seed(seed, i)), torch.no_grad():  # the caller's global RNGs untouched
            sites.append(_sites_of(model, i, ctx, args, kwargs))
    for s in sites:
        check_has_latent(s, method)
    batched = get(method).contexts
    if batched is None:
        log.info("contexts: %d context(s), method=%r by a plain loop (no shared batches)", len(contexts), method)
        return _loop(model, contexts, args, seed, method, options)
    t0 = time.perf_counter()
    opts = defaults(method)
    opts.update({k: v for k, v in options.items() if k in opts})
    try:
        with _random.seeded(seed):  # restores the caller's global RNGs (each part draws from its own stream)
            posts = batched(model, contexts, args, kwargs, sites, seed, opts)
    except Unbatchable:
        return _loop(model, contexts, args, seed, method, options)
    wall = (time.perf_counter() - t0) / len(posts)
    for i, post in enumerate(posts):
        post.seed, post.wall_time = context_seed(seed, i), wall  # the call's time, shared equally
    return posts


def one_sequence_lm(sites: list[dict], every_latent: bool = False) -> None:
    """Raise :class:`Unbatchable` unless every context's first latent site (``every_latent``: each of
    its latent sites) is an ``lm.sequence(...)`` and their first sequence sites share one name, one LM
    and one ``max_new_tokens``: the condition for rows of several contexts to share a batch."""
    firsts = []
    for s in sites:
        seq = sequence_sites(s)
        if not seq or next(iter(s)) not in seq or (every_latent and len(seq) != len(s)):
            raise Unbatchable
        firsts.append(next(iter(seq.items())))
    name, d0 = firsts[0]
    if not all(k == name and d.lm is d0.lm and d.max_new_tokens == d0.max_new_tokens for k, d in firsts):
        raise Unbatchable


# -- shared machinery -----------------------------------------------------------------------------
@dataclass
class Part:
    """One independent part of one context (an importance chunk or an SMC sweep) in a batch."""

    context: int  # index into the call's contexts
    index: int  # the part's number within its context's run
    args: tuple  # the model's positional arguments (the context first)
    rows: int  # rows it holds in the batch
    stream: _random.Stream
    replicates: list | None = None  # SMC: the replicate of each island it holds


def pack(parts: list[Part], bound: int) -> list[list[Part]]:
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


def row_offsets(parts: list[Part]) -> list[int]:
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


def stack_prompts(dists: list[SequenceDistribution], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt rows of several sites' batches, stacked: ``(prompt [B, P] right-padded, lengths
    [B] or None when every row has one length)``. Each site holds one prompt (shared by its rows) or
    one per row; anything else is a clear error."""
    rows, lens = [], []
    for d, n in zip(dists, counts):
        given = math.prod(d.prompt.shape[:-1])
        if given not in (1, n):
            raise ValueError(f"a sequence site's prompt holds {given} rows for {n} particles: give one prompt (shared "
                             f"by every particle) or one per particle ([{n}, P] token ids or {n} texts)")
        p, ln = d.prompt_rows(n)  # one row ([P] or [1, P]) comes back as the shared [P] prompt
        p = p.expand(n, -1) if p.dim() == 1 else p
        rows.append(p)
        lens.append(torch.full((n,), p.shape[-1], dtype=torch.long) if ln is None else ln.cpu())
    lengths = torch.cat(lens)
    P = int(lengths.max()) if len(lengths) else 0
    eos = dists[0].lm.eos_id
    prompt = torch.cat([torch.nn.functional.pad(r.cpu(), (0, P - r.shape[-1]), value=eos) for r in rows])
    return prompt, (None if bool((lengths == P).all()) else lengths)


def draw_by_part(parts: list[Part], offsets: list[int]):
    """``draw(logprobs) -> tokens``: each part's rows from its own stream's generator."""

    def draw(logp: torch.Tensor) -> torch.Tensor:
        return torch.cat([categorical(logp[offsets[k]:offsets[k + 1]], p.stream.generator(logp.device))
                          for k, p in enumerate(parts)])

    return draw


def other_log_prior(trace, skip: set, n: int) -> dict[str, torch.Tensor]:
    """Per-particle log-probs of the latent sites of ``trace`` not in ``skip``."""
    return {k: site_log_prob(k, node["fn"].log_prob(node["value"]), n, particle_dim(node)).detach()
            for k, node in trace.nodes.items() if is_latent(node) and k not in skip}


class Unbatchable(Exception):
    """Raised by a backend's ``contexts`` run when these contexts cannot share batches: the plain loop runs."""


def defaults(method: str) -> dict[str, Any]:
    """The backend's options with their defaults."""
    from ppl_lm.infer import backend_options

    return {k: p.default for k, p in backend_options(method).items()}


