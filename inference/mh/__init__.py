"""Metropolis-Hastings over edits: an MCMC kernel on token sequences, driven by Pyro's ``MCMC``.

The target is the model's joint posterior over its latent sites: log prior (each
``SequenceDistribution.log_prob``, and the other latents' log-probs) plus every factor, evaluated
by running the vectorised model on the proposed values
(:func:`ppl_lm.inference._runtime.run_model` with ``data=``: a sequence site is scored under the
prompt the other values give it, so editing an earlier sequence rescores a later one prompted by
it). One transition edits one sequence site, the sites in turn (a deterministic scan; each edit
leaves the joint invariant given the other sites), then updates every other latent site: a
discrete one by an exact Gibbs step, a continuous one by random-walk MH.

A sequence of ``T = max_new_tokens`` positions is held in canonical form: ``n`` content tokens
(none of them EOS), then EOS padding (``n < T``), or ``n = T`` content tokens and no EOS.
Each edit move (``suffix``, ``substitute``, ``substitute_uniform``, ``insert``, ``delete``) is
one function in :mod:`.moves`, registered in :data:`MOVES`, that maps canonical sequences to
canonical sequences and returns its exact forward and reverse proposal log-probabilities; one
Metropolis–Hastings step (:func:`.state.mh_accept`) accepts or rejects every move.

Chains are a batch dimension inside the kernel (state ``[num_chains, T]``); Pyro's ``MCMC``
runs one "chain" of that batch, so no worker processes are started. Each chain draws its own
move every transition, so chains stay independent and R-hat is meaningful.

Modules: :mod:`.moves` (the moves and their table), :mod:`.kernel` (the Pyro kernel: one
transition, the LM pass the moves read), :mod:`.state` (the chains' state, the accept step),
:mod:`.latents` (Gibbs and random-walk updates of the other latent sites), :mod:`.start`
(starting states); here: ``run`` (Pyro's ``MCMC`` drives the kernel; the kept draws become a
:class:`Posterior`) and :class:`MHInfo`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from ppl_lm.backends import Kind, describe
from ppl_lm.inference._runtime import Scores, finish, row_cache, stats_from_scores
from ppl_lm.inference.mh.kernel import EditKernel
from ppl_lm.inference.mh.moves import DEFAULT_MOVES, MOVES, EditBatch, Move
from pyro.infer.mcmc import MCMC

from ppl_lm import seeding as _random
from ppl_lm.diagnostics.estimators import mcmc_diagnostics, sequence_ess
from ppl_lm.posterior import Info, Posterior, normalise
from ppl_lm.validation import NonNegativeInt, PositiveInt

__all__ = ["DEFAULT_MOVES", "MOVES", "EditBatch", "EditKernel", "MHInfo", "Move", "run", "sequence_ess"]


@dataclass(frozen=True)
class MHInfo(Info):
    """Facts of an MH run: acceptance per move, per-summary R-hat and bulk ESS, and the options.

    ``ess_sequences`` is the between-chain effective size of the law over whole sequences
    (:func:`~ppl_lm.diagnostics.estimators.sequence_ess`) of the main (first) sequence site;
    ``ess_sequences_by_site`` gives it for every sequence site.
    """

    acceptance: dict = field(default_factory=dict)
    acceptance_overall: float = float("nan")
    rhat_by_stat: dict = field(default_factory=dict)
    ess_by_stat: dict = field(default_factory=dict)
    ess_sequences: float = float("nan")
    ess_sequences_by_site: dict = field(default_factory=dict)  # every sequence site's sequence_ess
    num_chains: int = 0
    num_samples: int = 0
    warmup_steps: int = 0
    thin: int = 1
    moves: dict = field(default_factory=dict)
    random_walk_scale: dict = field(default_factory=dict)  # continuous sites: adapted proposal scale
    random_walk_acceptance: dict = field(default_factory=dict)


@describe(kind=Kind.MCMC, info=MHInfo)
def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, num_samples: PositiveInt = 500,
        num_chains: PositiveInt = 4, warmup_steps: NonNegativeInt = 200, thin: PositiveInt = 1,
        moves: Mapping[str, float] | None = None, progress: bool = True,
        initial_samples: torch.Tensor | None = None, init_budget: PositiveInt | None = None) -> Posterior:
    """MH over edits: ``num_chains`` batched chains of ``num_samples`` kept draws each.

    Args:
        model: a vectorised Pyro model with one or more latent ``lm.sequence(...)`` sites (each edited
            in turn; ``samples`` is the first); other latent sites are updated by Gibbs or random-walk steps.
        *args, model_kwargs: the model's arguments.
        seed: same seed, same samples.
        num_samples: kept draws per chain (after warm-up and thinning).
        num_chains: chains, run as one batch inside the kernel.
        warmup_steps: transitions discarded at the start of every chain.
        thin: transitions per kept draw after warm-up.
        moves: move name -> probability, from :data:`~ppl_lm.inference.mh.moves.MOVES` (default
            :data:`~ppl_lm.inference.mh.moves.DEFAULT_MOVES`).
        progress: show Pyro's MCMC progress bar.
        initial_samples: starting states ``[num_chains, T]`` (default: admissible prior draws).
        init_budget: most prior draws spent looking for admissible starting states.

    Returns:
        A :class:`Posterior` with ``num_chains * num_samples`` uniformly weighted samples
        (chain-major), ``chain`` indices, per-sample ``stats`` (with the sampler's ``accepted`` and
        ``move``), ``log_evidence = None``, ``rhat`` and ``bulk_ess`` (the worst over the scalar
        summaries) and an :class:`MHInfo`; ``rhat`` / ``low_ess`` warnings when chains have not mixed.

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1)
    >>> post = ppl_lm.infer(model, method="mh", num_samples=50, num_chains=2, warmup_steps=10,
    ...                     progress=False)
    >>> bool((post.samples[:, 0] == 1).all()), post.samples.shape
    (True, torch.Size([100, 3]))
    """
    # num_samples, num_chains, warmup_steps, thin and init_budget were checked by @describe (annotations)
    kernel = EditKernel(model, num_chains=int(num_chains), moves=moves, thin=int(thin),
                        initial_samples=initial_samples, init_budget=init_budget, progress=progress)
    with _random.seeded(seed), row_cache():
        # num_chains=1 at the driver: the chains are a batch inside the kernel (Pyro's
        # multi-process chains would fork the process, and hang with the default context).
        mcmc = MCMC(kernel, num_samples=int(num_samples), warmup_steps=int(warmup_steps), num_chains=1,
                    disable_progbar=not progress)
        mcmc.run(*args, **dict(model_kwargs or {}))
    C, S = int(num_chains), int(num_samples)
    draws = mcmc.get_samples(group_by_chain=True)  # [1, S, C, ...]

    def chain_major(v: torch.Tensor) -> torch.Tensor:
        return v[0].transpose(0, 1).reshape(C * S, *v.shape[3:])

    samples = chain_major(draws["x"]).long() if kernel.site is not None else None
    hist, layout, state = kernel.state.history, kernel.layout, kernel.state

    def stack(get) -> torch.Tensor:
        return chain_major(torch.stack([get(h) for h in hist])[None])

    values = {k: stack(lambda h, k=k: h["values"][k]) for k in hist[0]["values"]}
    if kernel.site is not None:
        values[kernel.site] = samples
    values = {k: values[k] for k in layout.order}  # program order
    scores = Scores(
        stack(lambda h: h["log_prior"]), stack(lambda h: h["log_likelihood"]), values,
        {k: stack(lambda h, k=k: h["rewards"][k]) for k in hist[0]["rewards"]},
        {k: stack(lambda h, k=k: h["constraints"][k]) for k in hist[0]["constraints"]},
    )
    main_lm = layout.seq[kernel.site].lm if kernel.site is not None else None
    stats = stats_from_scores(scores, kernel.site, None if main_lm is None else main_lm.eos_id, layout.seq)
    by_chain = {k: v.reshape(C, S) for k, v in stats.items() if not k.startswith("ok:")}
    rhat, ess_by_stat = mcmc_diagnostics(by_chain)
    if ess_by_stat:
        bulk_ess = min(ess_by_stat.values())
    else:  # every summary constant (a point-mass posterior) or too few draws to tell
        bulk_ess = float(C * S) if S >= 4 else float("nan")
    if kernel.site is not None:  # the edit moves' record (none when every text is observed)
        stats["accepted"] = chain_major(draws["accepted"]).bool()
        stats["move"] = chain_major(draws["move"]).long()
    info = MHInfo(
        acceptance=kernel.acceptance(),
        acceptance_overall=(float(state.accepted.sum()) / int(state.proposed.sum())  # nan: no edit proposed
                            if int(state.proposed.sum()) else float("nan")),
        rhat_by_stat=rhat, ess_by_stat=ess_by_stat,
        ess_sequences=sequence_ess(samples, C) if samples is not None else float("nan"),
        ess_sequences_by_site={k: sequence_ess(values[k], C) for k in layout.seq},
        num_chains=C, num_samples=S, warmup_steps=int(warmup_steps), thin=int(thin),
        moves={m: float(kernel.move_probs[i]) for i, m in enumerate(MOVES)},
        random_walk_scale=dict(state.rw_scale),
        random_walk_acceptance={k: a / n if n else float("nan") for k, (n, a) in state.rw_counts.items()},
    )
    post = Posterior(
        samples=samples,
        log_weights=normalise(torch.zeros(C * S)),
        log_evidence=None,
        method="mh",
        lm=main_lm,
        site=kernel.site,
        stats=stats,
        chain=torch.arange(C).repeat_interleave(S),
        info=info,
        values=values,
        rhat=max(rhat.values()) if rhat else None,
        bulk_ess=bulk_ess,
    )
    return finish(post)
