"""``run``: SMC's options, its stages (one per sequence site) and the sweeps of a run.

The algorithm is described in the package notes (:mod:`ppl_lm.inference.smc`); one sweep is
:class:`.sweep.Sweep`, the plan of sweeps and their pooling are in :mod:`.islands`.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
from ppl_lm.inference import shards
from ppl_lm.inference._runtime import (
    check_has_latent,
    latent_sites,
    observed_sequences,
    row_cache,
    sequence_sites,
    token_masks,
)
from tqdm.auto import tqdm

from ppl_lm import seeding as _random
from ppl_lm.backends import Kind, describe
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.lm import LanguageModel
from ppl_lm.posterior import Posterior
from ppl_lm.proposal import proposal_lm, proposal_name
from ppl_lm.resampling import SCHEMES, Scheme
from ppl_lm.validation import AtLeastTwo, Fraction, PositiveInt

from .islands import SMCInfo, combine, default_chunk_size, sweep_plan
from .sweep import Stage, Sweep, SweepSpec
from .twists import Twist

__all__ = ["OBSERVED", "RESAMPLING", "run"]

#: The values of ``resampling=``: every scheme of :mod:`ppl_lm.resampling`.
RESAMPLING = SCHEMES
#: The values of ``observed=``.
Observed = Literal["prefix", "end"]
OBSERVED: tuple[str, ...] = typing.get_args(Observed)


@describe(kind=Kind.WEIGHTED, info=SMCInfo, contexts="run_contexts")
def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, num_particles: AtLeastTwo = 256,
        ess_threshold: Fraction = 0.5, resampling: Scheme = "multinomial", num_replicates: PositiveInt = 1,
        chunk_size: AtLeastTwo | None = None, guide=None, proposal: str | LanguageModel | None = None,
        observed: Observed = "prefix", twist: Twist | None = None, progress: bool = True) -> Posterior:
    """Token-by-token SMC with prefix re-scoring, ESS-triggered resampling and token masks.

    Args:
        model: a vectorised Pyro model; its latent ``lm.sequence(...)`` sites are advanced in program
            order (see the module notes), other latent sites are drawn from their prior, observed
            text is scored once its prompt exists; ``*args`` and ``model_kwargs`` are its arguments.
        seed: same seed, same samples (on CPU). Sweep i (an island, or a batch of replicates)
            draws from its own seed (:func:`ppl_lm.inference.shards.part_seed`), whatever came
            before it, so the sweeps can run on several processes (:mod:`ppl_lm.inference.distributed`).
        num_particles: particles per replicate (at least 2).
        ess_threshold: resample when ESS < ``ess_threshold · num_particles`` (0 never, 1 at
            almost every step).
        resampling: one of :data:`ppl_lm.resampling.SCHEMES` (``"multinomial"``, ``"stratified"``,
            ``"systematic"``, ``"residual"``). The genealogy standard error of log Z (the one
            ``log_evidence_se`` of a single replicate) is unbiased (Lee & Whiteley) only for
            multinomial: on the toy problems the others' was 0.82-0.99 of the true one at
            ``ess_threshold=0.5`` and as low as 0 when resampling at every step
            (benchmarks/RESULTS.md, section 14); use ``num_replicates >= 10`` for their error bar.
        num_replicates: independent SMC runs, batched together (``num_replicates ·
            num_particles`` rows). Their log Z estimates are averaged (in Z, so unbiased), their
            particles pooled with weights Ẑ_r·W_ri, and with two or more ``log_evidence_se`` is
            the spread between replicates (use ten or more for a usable error bar).
        chunk_size: the most particles advanced together (bounds memory: their KV cache and
            next-token log-probs). Replicates are batched up to it; a replicate with more
            particles runs as independent islands of at most ``chunk_size`` particles, one after
            another (see the module notes). ``None`` allows 64k tokens (prompt plus new tokens)
            and 64M next-token logits per sweep (1365 rows on SmolLM2's 49k vocabulary).
            Another chunk size gives different, equally valid, results.
        guide: an object whose ``.lm`` is a :class:`LanguageModel` over the same vocabulary,
            used as the token proposal of the first sequence site with the model's prompt
            (weights corrected by π/q); later sequence sites are proposed from their own LM.
        proposal: a token proposal for the first latent sequence site: ``"prompted:<text>"`` or
            ``ppl_lm.prompted(lm, text)`` (the model's LM with ``text`` read before the model's
            prompt), another :class:`LanguageModel` over the same vocabulary (a smaller LM with
            the same tokenizer), or a trained guide (``post.guide``); ``None`` or ``"prior"``: the
            prior. Each token is weighted by π/q exactly (q restricted to the tokens the
            token masks allow, renormalised), so the target and log Z do not change. Not with ``guide``.
        observed: when an observed text whose prompt reads the sequence being advanced is scored
            (see the module notes): ``"prefix"`` (at every token, under the prompt the prefix
            gives: a twist; rows whose prompt did not change are read from the run's cache) or
            ``"end"`` (once the sequence has ended: one pass per particle, but the weights jump
            there; on the toy rows its ESS fell to 6 of 2,000 where ``"prefix"`` kept hundreds).
        twist: a learned twist ψ for the first sequence site (a :class:`~.twists.Twist`, e.g. from
            :func:`ppl_lm.learn_twist` or, on toys, the optimal :func:`ppl_lm.exact_twist`): tokens are
            proposed from π·ψ and an unfinished particle's target is π·ψ (the model's prefix scores
            keep only their pruning); an ended sequence gets its exact score, so the twist is divided
            out and log Z stays unbiased for any ψ (see :mod:`.twists`).
        progress: show a progress bar over tokens.

    Returns:
        A :class:`Posterior` of the final particles (``log_weights`` pooled over replicates),
        ``log_evidence_se`` and an :class:`SMCInfo` (genealogy effective count ``n_eff_genealogy``,
        ``num_eves``, ``num_resampling`` per island, ``ess_history`` of the first sweep, options);
        a ``path_degeneracy`` warning when the final particles descend from too few ancestors.

    Raises:
        ValueError: bad options, an unsupported model, or every particle of a replicate died.

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1, prefix_closed=True)
    >>> post = ppl_lm.infer(model, method="smc", num_particles=4000, progress=False)
    >>> abs(post.log_evidence - (-1.0986)) < 0.1  # log(1/3); 0.1 is 4.5 standard errors at N=4000
    True
    """
    # The options' values are checked by @describe, from their annotations, before this body runs.
    kwargs = dict(model_kwargs or {})
    with _random.seeded(seed), torch.no_grad(), row_cache():
        sites = latent_sites(model, args, kwargs, placeholder=True)
        check_has_latent(sites, "smc")
        seq = sequence_sites(sites)
        shard = shards.current()  # which islands this process runs (all, unless distributed)
        if chunk_size is None:
            sized = [*seq.values(), *observed_sequences(model, args, kwargs).values()]
            chunk_size = shard.chunk_size(min((default_chunk_size(d) for d in sized), default=max(2, num_particles)),
                                          num_particles * num_replicates)
        stages, qlm, masks = build_stages(model, args, kwargs, seq, guide, proposal, twist)
        plan = sweep_plan(num_particles, num_replicates, chunk_size)
        done = {}
        bar = tqdm(total=sum(n * len(reps) for i, (n, reps) in enumerate(plan) if shard.owns(i)), desc="smc",
                   unit="particle", disable=not progress or len(plan) == 1)
        try:
            for i, (n, reps) in enumerate(plan):
                if not shard.owns(i):
                    continue
                with shards.part_stream(i):  # island i draws the same wherever it runs
                    sweep = Sweep(SweepSpec(model, args, kwargs, stages, n, reps, ess_threshold, resampling,
                                            observed))
                    sweep.run(progress and len(plan) == 1, sum(d.max_new_tokens for d in seq.values()))
                    done[i] = sweep.result()
                del sweep  # free its KV cache before the next sweep allocates one
                bar.update(n * len(reps))
        finally:
            bar.close()
        parts = shard.gather(done)
        if parts is None:  # another process pools the islands
            return None
        return combine(parts, num_particles, num_replicates, chunk_size, sites,
                       {"resampling": resampling, "ess_threshold": ess_threshold,
                        "proposal": "lm" if qlm is None else "guide" if guide is not None else proposal_name(qlm),
                        "twist": twist is not None,
                        "token_masks": sum(len(m) for m in masks.values())})


def build_stages(model, args, kwargs, seq: dict[str, SequenceDistribution], guide=None, proposal=None,
                 twist=None) -> tuple[list[Stage], LanguageModel | None, dict]:
    """The sweep's stages: each sequence site with its token masks; the first also with the token
    proposal (``guide=`` or ``proposal=``) and the twist. Returns the stages, the proposal LM (None: the
    model's own) and the masks by site."""
    first = next(iter(seq), None)
    qlm = None if first is None else _proposal(guide, proposal, seq[first].lm)
    if (guide is not None or proposal is not None) and first is None:
        raise ValueError("an SMC proposal proposes the tokens of a latent sequence site, and this model has none "
                         "(every lm.sequence(...) site is observed); leave guide= and proposal= out")
    masks = token_masks(model, args, kwargs, seq)
    if twist is not None:
        _check_twist(twist, None if first is None else seq[first])
    stages = [Stage(name, masks[name], qlm if name == first else None, twist if name == first else None)
              for name in seq]
    return stages, qlm, masks


def _proposal(guide, proposal, lm: LanguageModel) -> LanguageModel | None:
    """The first sequence site's token proposal, from ``guide=`` (whose ``.lm`` proposes) or ``proposal=``."""
    if guide is None:
        return proposal_lm(proposal, lm)
    if proposal is not None:
        raise ValueError("give the token proposal once: guide= (a trained guide) or proposal=, not both")
    if not isinstance(getattr(guide, "lm", None), LanguageModel):
        raise TypeError(
            "an SMC guide must expose a LanguageModel as its .lm attribute (the token proposal), e.g. "
            f"the guide trained by method='svi'; got {type(guide).__name__} with .lm = {type(getattr(guide, 'lm', None)).__name__}"
        )
    return proposal_lm(guide, lm)


def _check_twist(twist, d: SequenceDistribution | None) -> None:
    if not isinstance(twist, torch.nn.Module):
        raise TypeError(f"twist= takes a ppl_lm twist (a torch.nn.Module returning log ψ [particles, vocab], e.g. "
                        f"ppl_lm.learn_twist(model, ...)); got {type(twist).__name__}")
    if d is None:
        raise ValueError("a twist guides the tokens of a latent sequence site, and this model has none; leave twist= out")
    V, T = getattr(twist, "vocab_size", d.lm.vocab_size), getattr(twist, "max_new_tokens", d.max_new_tokens)
    if V != d.lm.vocab_size or T < d.max_new_tokens:
        raise ValueError(f"the twist covers {T} positions of a {V}-token vocabulary; the first sequence site has "
                         f"{d.max_new_tokens} positions of {d.lm.vocab_size} tokens: learn the twist on this model")
