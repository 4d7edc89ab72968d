"""Sequential Monte Carlo over the tokens of the model's sequence sites, in program order.

Particles are rows of batched tensors (tokens ``[B, T]``, weights, twists) advanced one token at a
time through the LM's incremental state (``lm.start`` / ``lm.extend``; ``lm.reorder`` moves the
KV cache when particles are resampled).

Stages. A model may sample several ``lm.sequence(...)`` sites and other latent sites (a discrete
world, a parameter) in any order. SMC runs one *stage* per sequence site, in program order: stage
k advances the tokens of site k, its LM started on each particle's own prompt rows (a prompt may
depend on the particle's earlier values, e.g. ``lm.sequence(x[..., :1])``; ragged rows are
padded). The other latent sites are drawn from their prior for each particle when the program
reaches them: those before site k at the end of stage k−1 (before stage 1 for the first), those
after the last sequence site at the end. Resampling carries every per-particle value (earlier
sites, the current tokens, prompt rows, LM and mask states).

Target and weights. During stage k a live particle holds the values of every site before site k
and a prefix ``y_{1:t}`` of site k; its intermediate target is the prior of those values times
exp(ψ), where the twist ψ is the sum of the factors the model applies when it is run on them
(the prefix padded with EOS) inside ``ppl_lm.conditions.partial_prefix(t)`` — so
``ppl_lm.is_partial()`` is True and ``prefix_length()`` is t: rewards may score the prefix, hard
constraints declared ``prefix_closed`` prune it, others are deferred — and stopped
(``poutine.escape``) at the first latent site that has no value yet: factors that come after it
in program order are not yet applied. When a particle's site-k sequence ends (EOS or
``max_new_tokens``) the model is run once more, not partial, and that score replaces the twist;
at the end of the stage, the latent sites up to the next sequence site are drawn and the factors
up to it replace the twist; after the last stage, the full log likelihood does. Each step
multiplies the weight by π(y_t | ·) / q(y_t | ·) · exp(ψ_new − ψ_old); the product telescopes to
π(values)·exp(log-likelihood) / q(values) (the prior draws of the other sites cancel), so the
target is exact whatever the twists are, and log Z stays unbiased. ``partial_prefix`` is global:
during stage k the factors on sites that are already finished see ``is_partial()`` too (a
deferred constraint on them waits for the end of the stage), which changes only the twist. The
sites a model samples, and their order, must not depend on the values drawn.

Observed text. An observed ``lm.sequence(...)`` site is scored whenever the program reaches it:
at a stage boundary, and, if it comes after the sequence being advanced, at every token under the
prompt that sequence's prefix (EOS-padded) gives it: a twist like any other factor, exact once the
sequence has ended. Rows whose (prompt, text) pair was scored before are read from the run's
cache, so a prompt that reads only the first tokens (``lm.sequence(y[..., :1])``) costs one pass
per distinct pair. ``observed="end"`` leaves such sites out until the sequence has ended. With
no latent sequence site at all (only observed text and other latents) SMC has no tokens to
advance: it is importance sampling with the prior as proposal (one weighting, no resampling or
move steps), the estimator of ``method="importance"``.

Proposal. The site's LM itself, or, for the first sequence site, ``proposal=`` (a LanguageModel
over the same vocabulary started on the site's own prompt rows: ``ppl_lm.prompted(lm, text)``,
which reads ``text`` before them, a smaller LM with the same tokenizer, or ``guide.lm`` of a
trained SVI guide, see :mod:`ppl_lm.proposal`; ``guide=`` is the older spelling). Token-level constraints
(``ppl_lm.token_constraint``: sites carrying a ``TokenMask``, whose per-particle ``MaskState`` is
started with the stage of the sequence site it constrains, advanced with each of its tokens and
reordered on resampling; at the last position a grammar mask allows only tokens that complete the text)
restrict it to allowed tokens, renormalised; the weight is multiplied by the
proposal mass of the allowed tokens (for the LM proposal, exactly the LM mass of the allowed set),
so particles never die on a hard token constraint.

Learned twist (``twist=``, :mod:`.twists`). A twist ψ gives, for the prefixes of the first
sequence site, log ψ of each next token. Tokens are then proposed from the proposal times ψ
(renormalised, after the masks), and an unfinished particle's intermediate target is
π(y_{1:t})·ψ(y_{1:t}) in place of the model's prefix factors, which keep only their pruning (a
prefix they score −inf stays dead). An ended sequence gets its exact score, and the stage
boundary the full factors, so ψ is divided out: the weights telescope as above and log Z stays
unbiased for any ψ. The optimal ψ(y_{1:t}) = E_π[e^{factors} | y_{1:t}] makes every incremental
weight constant (log Ẑ exact with any number of particles); :func:`.twists.learn_twist` learns
one by contrastive twist learning.

Resampling when the ESS falls below ``ess_threshold · num_particles`` (any scheme of
:mod:`ppl_lm.resampling`: multinomial, stratified, systematic or residual).
``log_evidence`` is the product over resampling epochs of the mean incremental weights
(unbiased for Z). Its standard error and the effective count ``info.n_eff_genealogy`` come from the
particles' genealogy (Lee & Whiteley, 2018; Chan & Lai, 2013: the weights grouped by each
particle's time-0 ancestor, its "Eve"), or, with ``num_replicates >= 2``, from the spread of
independent replicate runs, batched together.

Memory. The KV cache and the ``[rows, vocab]`` log-probabilities of every particle advanced
together are held at once, so ``chunk_size`` bounds the rows of one sweep. Replicates that fit
are batched into one sweep; a replicate larger than ``chunk_size`` runs as *islands*
(Vergé, Dubarry, Del Moral & Moulines, 2015): independent SMC runs of at most ``chunk_size``
particles, one after another, whose sizes add up to ``num_particles``. Island i of size n_i
estimates Z by Ẑ_i (unbiased), so Ẑ = Σ_i (n_i/N)·Ẑ_i is unbiased, and island particles are
pooled with weights (n_i/N)·Ẑ_i·W_ij. Memory is then bounded by the chunk (tokens and a few
scalars per particle are kept), at the cost of resampling only within islands. Each sweep draws
from its own seeded stream (:mod:`ppl_lm.inference.shards`), so islands can also run on several
processes, pooled exactly as here (:mod:`ppl_lm.inference.distributed`).

The package, by job: :mod:`.driver` (``run``: options, stages, the sweeps of a run),
:mod:`.sweep` (one batched sweep and its explicit state), :mod:`.islands` (how many particles
each sweep holds, and islands and replicates pooled into one Posterior), :mod:`.twists` (learned
and exact twists, and the hook the sweep calls), :mod:`.genealogy` (the
Eve-based variance of log Z and the path-degeneracy check; the genealogy effective count is
:func:`ppl_lm.diagnostics.estimators.genealogy_diagnostics`).

:mod:`.conditional` holds one particle of each replicate to an exact draw (conditional SMC): its
log Ẑ is a stochastic upper bound on log Z (:func:`ppl_lm.log_evidence_bounds`).
"""

from ppl_lm.diagnostics.estimators import genealogy_diagnostics

from .contexts import run_contexts
from .driver import OBSERVED, RESAMPLING, run
from .islands import SMCInfo, default_chunk_size, sweep_plan

__all__ = ["OBSERVED", "RESAMPLING", "SMCInfo", "default_chunk_size", "genealogy_diagnostics", "run", "run_contexts",
           "sweep_plan"]
