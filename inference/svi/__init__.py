"""Stochastic variational inference: fine-tuning the LM toward a reward is SVI on the model.

The model "prior π, likelihood exp(r/β)" has the posterior π′(x) ∝ π(x)·exp(r(x)/β). A guide q
(the LM with trainable weights, :mod:`ppl_lm.inference.svi.guides`; LoRA on a transformer; for a
model with other latent sites a joint guide over all of them, :mod:`ppl_lm.inference.svi.joint`) is
trained on one of two objectives (:mod:`ppl_lm.inference.svi.elbo`):

- ``objective="reverse"``: the ELBO ``E_q[log π + r/β − log q] = (E_q[r] − β·KL(q‖π))/β``, the
  KL-regularised RL objective; ``log Z − ELBO = KL(q‖π′)`` (mode-seeking);
- ``objective="forward"``: KL(π′‖q), self-normalised importance-weighted maximum likelihood on
  the guide's own draws (``proposal="guide"``), the prior's (``proposal="prior"``), or a
  defensive mixture of both (``proposal="mixture"``, :mod:`~ppl_lm.inference.svi.taught`: the
  guide proposes, the weighted draws teach it, and the prior's share finds the mass the guide
  misses) (distribution matching: mass-covering);
- ``objective="forward_then_reverse"``: forward for the first half of the steps, then reverse;
- ``objective="dpo"`` with ``preferences=``: direct preference optimisation
  (:mod:`~ppl_lm.inference.svi.dpo`): the Bradley–Terry loss of the pairs under the implicit
  reward β·log(q/π), with the model's LM as the reference π and the model's β. No draws of q
  enter training; its minimiser is the RLHF optimum under the maximum-likelihood reward of the
  pairs (free per text seen; not unique off them).

One training loop (:mod:`~ppl_lm.inference.svi.training`; the data-parallel runner uses the
same one): Adam, the gradient's global norm clipped, the step size decaying geometrically,
non-finite steps skipped. Every run estimates both KL directions over training from its own
draws (``post.info.kl_trace`` and ``post.info.trace``), and after training cross-
checks the guide against prior importance sampling (``crosscheck_samples``): log Ẑ from the
prior minus the ELBO of the guide's draws estimates KL(q‖π′) with its standard error.

Hard conditions: while q violates one the reverse KL is infinite, so reverse training uses a
relaxed penalty (each ``-inf`` factor becomes ``-relax_penalty``); forward training needs none.
The result is corrected either way: the returned :class:`Posterior` holds ``num_samples`` guide
draws importance-weighted against the exact target (``method="importance"`` with the trained
guide as proposal), so weights, samples and ``log_evidence`` are those of the exact conditional
whatever the guide's quality. Failure detectors (:mod:`~ppl_lm.inference.svi.checks`) attach
typed warnings to ``post.warnings``.

Checkpoints (``checkpoint_dir``, :mod:`~ppl_lm.inference.svi.checkpoint`) hold the guide's
weights, the optimiser state, the step, the trace and every random state, written atomically,
with a fingerprint of the model, its arguments and kwargs, the LM and the options: a run killed
at any point and restarted with the same arguments resumes and ends with the same result as an
uninterrupted run; a checkpoint of another run is refused with the list of what differs.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from typing import Literal

from ppl_lm.backends import Kind, describe
from ppl_lm.validation import AtLeastTwo, NonNegativeInt, PositiveInt
from ppl_lm.inference.svi import checkpoint as _ckpt
from ppl_lm.inference.svi import checks
from ppl_lm.inference.svi.admissible import AdmissibleWatch, NothingAdmissible, no_admissible_message
from ppl_lm.inference.svi.crosscheck import Crosscheck, correction_seed, crosscheck
from ppl_lm.inference.svi.dpo import DEFAULT_BATCH_SIZE, DPOLoss, model_beta, prepare_pairs
from ppl_lm.inference.svi.elbo import OBJECTIVES, PROPOSALS, make_loss
from ppl_lm.inference.svi.guides import (
    GUIDE_KINDS,
    SequenceGuide,
    make_guide,
    model_site,
)
from ppl_lm.inference.svi.taught import MixtureForwardKL
from ppl_lm.inference.svi.training import KLTrace, kl_trace, train

import ppl_lm
from ppl_lm import seeding
from ppl_lm.diagnostics.warnings import PplLmWarning
from ppl_lm.inference._runtime import (
    check_has_latent, finish, latent_sites, observed_sequences, row_cache, sequence_sites,
)
from ppl_lm.lm import LanguageModel, PositionalMarkovLM, TransformersLM
from ppl_lm.posterior import Info, Posterior
from ppl_lm.proposal import prompted

__all__ = [
    "CHECKPOINT_FILE",
    "DEFAULT_LR",
    "PAIR_OBJECTIVES",
    "SCHEDULES",
    "Crosscheck",
    "SVIError",
    "SVIInfo",
    "build_guide",
    "default_guide",
    "default_lr",
    "run",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = _ckpt.CHECKPOINT_FILE
#: Adam step sizes at the start of the run (they decay by ``lr_decay`` over it): LoRA on a real
#: LM needs small steps; the toy guides (a Markov table, a tiny transformer) take large ones.
DEFAULT_LR = {"lora": 2e-3, "full_markov": 0.1, "full_transformer": 0.01, "latents": 0.1}
#: Objectives that switch estimators during the run.
SCHEDULES = ("forward_then_reverse",)
#: Objectives trained on preference pairs instead of draws (``preferences=``).
PAIR_OBJECTIVES = ("dpo",)


@dataclass(frozen=True)
class SVIInfo(Info):
    """What an SVI run reports about its training (``post.info``: ``post.info.trace``, ``post.info.kl_trace`` ...)."""

    objective: str = "reverse"
    proposal: str = "guide"
    guide: str = ""
    num_steps: int = 0
    start_step: int = 0
    num_particles: int = 0
    lr: float = math.nan
    lr_decay: float = 1.0
    clip_norm: float | None = None
    relax_penalty: float | None = None
    train_time: float = 0.0
    seconds_per_step: float = math.nan
    step_seconds: np.ndarray | None = None  # this session's steps (the first warms up)
    skipped_steps: int = 0
    elbo: float | None = None  # mean ELBO estimate of the last 20 steps
    trace: dict = field(default_factory=dict)  # per-step arrays (see run)
    kl_trace: KLTrace | None = None
    crosscheck: Crosscheck | None = None
    correction: Info | None = None  # the importance correction's facts (num_samples, chunk_size...)
    beta: float | None = None  # objective="dpo": the implicit reward's temperature
    batch_size: int | None = None  # objective="dpo": pairs per step
    num_pairs: int | None = None  # objective="dpo": pairs trained on


class SVIError(ValueError):
    """SVI trained a guide but could not give a posterior; the guide is kept (``err.guide``)."""

    def __init__(self, message: str, guide=None, info: SVIInfo | None = None):
        super().__init__(message)
        self.guide, self.info = guide, info


@describe(kind=Kind.WEIGHTED, info=SVIInfo)
def run(model, *args, seed: int = 0,
        objective: Literal["reverse", "forward", "forward_then_reverse", "dpo"] = "reverse",
        proposal: Literal["guide", "prior", "mixture"] = "guide", num_steps: NonNegativeInt = 200,
        num_particles: AtLeastTwo = 8, lr: float | None = None,
        guide: Literal["lora", "full"] | SequenceGuide | None = None, num_samples: PositiveInt = 1000,
        contexts=None, checkpoint_dir: str | None = None, checkpoint_every: PositiveInt = 50,
        relax_penalty: float | None = 10.0, log_evidence_ref: float | None = None, progress: bool = True,
        lora_r: PositiveInt = 8, lora_alpha: float = 16, lora_targets: Literal["all-linear"] | list[str] | None = None,
        lr_decay: float = 0.1, clip_norm: float | None = 1.0, crosscheck_samples: NonNegativeInt | None = None,
        callback=None, preferences=None, beta: float | None = None, batch_size: PositiveInt | None = None,
        guide_prompt: str | None = None, model_kwargs: dict | None = None) -> Posterior:
    """Train a guide by SVI, then importance-weight its draws against the exact target.

    Args:
        model: a vectorised Pyro model with at least one ``lm.sequence(...)`` latent site;
            other latent sites (discrete, continuous, more sequences) get a joint guide
            (:mod:`~ppl_lm.inference.svi.joint`), trained on one ELBO over the whole joint.
        *args: the model's arguments (the context the returned posterior is for).
        seed: same seed, same training and samples (on CPU).
        objective: ``"reverse"`` (the ELBO, KL(q‖π′)), ``"forward"`` (KL(π′‖q)),
            ``"forward_then_reverse"`` (forward for the first half of the steps) or ``"dpo"``
            (the DPO loss of ``preferences``; see :mod:`~ppl_lm.inference.svi.dpo`).
        proposal: where the forward objective's draws come from: ``"guide"`` (its own draws; mass
            it misses stays unseen), ``"prior"``, or ``"mixture"`` (half prior, half guide, each
            draw weighted by the mixture's density: a guide taught by importance sampling
            that cannot lose a mode, :mod:`~ppl_lm.inference.svi.taught`).
        num_steps: optimisation steps (a resumed run counts the steps already done). 0 only
            with a trained guide object (``guide=post.guide``): its draws are weighted, untrained.
        num_particles: draws per step (>= 2), in one vectorised plate (unused by ``"dpo"``).
        lr: Adam step size at the start; default by guide (:data:`DEFAULT_LR`): LoRA 2e-3,
            full Markov table 0.1, full transformer 0.01, no latent sequence (a guide over the
            other latents only) 0.1.
        guide: ``"lora"``, ``"full"`` or a guide object (a
            :class:`~ppl_lm.inference.svi.guides.SequenceGuide`, e.g. ``post.guide`` of an
            earlier run, trained further). Default: ``"lora"`` for a transformer LM, else ``"full"``.
        num_samples: guide draws importance-weighted against the exact target at the end.
        contexts: optional list of contexts to train the (amortised) guide on: each step picks
            one with the seeded generator. A context is the tuple of the model's arguments, or
            one argument that is not a tuple.
        checkpoint_dir: folder for the checkpoint; an existing checkpoint of the same run is
            resumed, one of another run is an error.
        checkpoint_every: steps between checkpoints (a killed run loses fewer steps than this).
        relax_penalty: reverse training replaces each ``-inf`` condition factor by
            ``-relax_penalty`` (nats); ``None`` keeps hard conditions hard.
        log_evidence_ref: a known log Z (exact backend, or a reference importance run): the
            trace then reports ``kl_posterior`` = log Z − ELBO = KL(q‖π′) per step.
        progress: tqdm progress bars.
        lora_r, lora_alpha, lora_targets: LoRA settings for ``guide="lora"`` (targets: module
            names, ``"all-linear"``, or ``None`` to find them from the architecture).
        lr_decay: the step size shrinks by this factor over the run (geometrically).
        clip_norm: the gradient's global L2 norm is clipped to this (``None``: not clipped).
        crosscheck_samples: prior importance draws for the guide-vs-prior cross-check after
            training (default ``min(num_samples, 256)``; 0 skips it).
        callback: ``callback(step, guide, stats)`` after each step, off the training clock.
        preferences: ``objective="dpo"`` only: the pairs (:class:`ppl_lm.Preferences`, token ids
            ``[n, T]`` with T the site's ``max_new_tokens``, or texts the site's LM encodes). A
            pair's ``context`` is the model's positional argument for that pair; without
            contexts every pair answers ``*args``.
        beta: ``objective="dpo"`` only: β of the implicit reward β·(log q − log π). Default: the
            model's own β, the temperature of its reward factor(s) (``ppl_lm.reward``,
            ``ppl_lm.learned_reward``), so that DPO and the model target the same π·e^{r/β}; a
            clear error if the model has none, or several different ones.
        batch_size: ``objective="dpo"`` only: pairs per step, drawn without replacement by the
            seeded generator (default ``min(n, 64)``; ``>= n``: the full, deterministic loss).
        guide_prompt: "prompt, then fine-tune": a new guide reads this text before the model's
            prompt, so it starts at π(·|text + prompt) (not at the prior) and is trained from there
            in that context; its draws are still weighted against the exact target. The guide
            keeps the text (``post.guide.lm`` is a :class:`ppl_lm.PromptedLM`), so the trained
            weights are the fine-tuning on top of the instruction. A sequence guide only (one
            latent ``lm.sequence(...)`` site), not with a guide object.
        model_kwargs: keyword arguments of the model.

    Returns:
        A :class:`Posterior` of ``num_samples`` importance-weighted guide draws, with
        ``log_evidence`` and ``log_evidence_se`` from importance sampling, the trained
        guide at ``post.guide``, typed training facts at ``post.info`` (:class:`SVIInfo`:
        the KL trace in both directions, the cross-check) and ``info.trace``: per-step arrays
        ``elbo``, ``kl_prior`` (KL(q‖π)), ``reward:NAME`` (E_q[r], raw), ``ok:NAME``,
        ``grad_norm`` (before clipping), ``seconds``, and ``kl_reverse``/``kl_forward`` (± ``_se``)
        over a trailing window of steps; given ``log_evidence_ref``, ``kl_posterior``. DPO's
        trace has ``dpo_loss``, ``dpo_accuracy`` and ``dpo_margin`` per step instead of the
        draw-based entries (it draws nothing from the guide in training).

    Raises:
        SVIError: no guide draw satisfies a hard condition after training (the guide is kept).
    """
    kwargs = dict(model_kwargs or {})
    _check_options(num_steps, num_particles, lr, num_samples, checkpoint_every, lr_decay, clip_norm,
                   log_evidence_ref, contexts, objective, proposal, crosscheck_samples)
    _check_pair_options(objective, preferences, beta, batch_size, contexts, proposal)
    if num_steps == 0 and not isinstance(guide, SequenceGuide):
        raise ValueError(
            "num_steps=0 trains nothing: the draws would come from an untrained guide (at initialisation, the "
            "prior). Give num_steps >= 1, or pass a trained guide (guide=post.guide) to importance-weight its "
            "draws without training it further")
    contexts = None if contexts is None else [c if isinstance(c, tuple) else (c,) for c in contexts]
    if crosscheck_samples is None:
        crosscheck_samples = min(num_samples, 256)
    t_start = time.perf_counter()
    with seeding.seeded(seed), row_cache():  # observed texts scored once per run
        if not isinstance(guide, SequenceGuide):
            check_has_latent(latent_sites(model, args, kwargs, placeholder=True), "svi")
        pairs = None
        if objective in PAIR_OBJECTIVES:  # the pairs and β checked before a guide is built or trained
            pairs = prepare_pairs(model, args, kwargs, preferences)
            beta = float(beta) if beta is not None else model_beta(model, args, kwargs)
            batch_size = min(batch_size or DEFAULT_BATCH_SIZE, len(pairs))
        g = build_guide(model, args, kwargs, guide, lora_r, lora_alpha, lora_targets, seed)
        if guide_prompt is not None:
            _prompt_guide(g, guide, guide_prompt)
        if lr is None:
            lr = default_lr(g)
        losses = (DPOLoss(pairs, beta, batch_size),) if pairs is not None else _losses(
            objective, proposal, num_particles, relax_penalty)
        schedule = _schedule(losses, num_steps)
        path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_FILE)
        fp = None
        if path is not None:
            fp = _ckpt.fingerprint(model, args, kwargs, _fingerprint_lm(model, args, kwargs, g), {
                "seed": seed, "objective": objective, "proposal": proposal, "num_particles": num_particles,
                "lr": lr, "guide": g.kind, "relax_penalty": relax_penalty, "lr_decay": lr_decay,
                "clip_norm": clip_norm, "contexts": contexts, "guide_prompt": guide_prompt,
                # the step-size schedule depends on the run's length, unless it is constant
                "num_steps": num_steps if lr_decay != 1 or objective in SCHEDULES else None,
                "params": {k: tuple(v.shape) for k, v in g.parameters().items()},
                **({} if pairs is None else {"beta": beta, "batch_size": batch_size, "pairs": _pairs_digest(pairs)})})
        watch = AdmissibleWatch(num_steps, num_particles, callback)
        try:
            res = train(model, args, kwargs, g, schedule, num_steps=num_steps, lr=lr, lr_decay=lr_decay,
                        clip_norm=clip_norm, contexts=contexts, checkpoint_path=path,
                        checkpoint_every=checkpoint_every, fingerprint=fp, progress=progress, callback=watch)
        except NothingAdmissible as stop:
            raise SVIError(str(stop), guide=g, info=SVIInfo(
                objective=objective, proposal=proposal, guide=g.kind, num_steps=num_steps,
                num_particles=num_particles, lr=lr, lr_decay=lr_decay, clip_norm=clip_norm,
                relax_penalty=relax_penalty)) from None

    trace = dict(res.trace)
    kt = kl_trace(res.draws, trace.get("seconds"))
    for k in ("kl_reverse", "kl_reverse_se", "kl_forward", "kl_forward_se"):
        trace[k] = getattr(kt, k)
    if log_evidence_ref is not None and "elbo" in trace:
        trace["kl_posterior"] = float(log_evidence_ref) - trace["elbo"]
    seconds_per_step = res.train_time / res.steps_run if res.steps_run else math.nan
    elbo = None
    if len(trace.get("elbo", ())):
        elbo = float(np.nanmean(trace["elbo"][-max(1, min(20, len(trace["elbo"]))):]))
    log.info("svi: %d steps (from %d), %.3f s/step, final ELBO %s", num_steps, res.start_step, seconds_per_step, elbo)

    def info_with(cross=None, correction=None):
        return SVIInfo(objective=objective, proposal=proposal, guide=g.kind, num_steps=num_steps,
                       start_step=res.start_step, num_particles=num_particles, lr=lr, lr_decay=lr_decay,
                       clip_norm=clip_norm, relax_penalty=relax_penalty, train_time=res.train_time,
                       seconds_per_step=seconds_per_step, step_seconds=res.step_seconds,
                       skipped_steps=res.nonfinite_steps, elbo=elbo, trace=trace, kl_trace=kt, crosscheck=cross,
                       correction=correction, beta=beta if pairs is not None else None,
                       batch_size=batch_size if pairs is not None else None,
                       num_pairs=len(pairs) if pairs is not None else None)

    found = checks.nonfinite(res.nonfinite_steps, len(trace.get("elbo", ())))
    # Divergence is judged on the ELBO where the ELBO is what is maximised (reverse, and the
    # reverse half of a schedule). Forward training may lower the ELBO as it covers more mass, and
    # its own KL(π′‖q) estimate from guide draws cannot see mass the guide has not found yet (it
    # rose in a sound run on the two-mode toy), so forward runs are judged by the KL bound and
    # the cross-check against prior draws instead.
    if objective in PAIR_OBJECTIVES:
        found += checks.loss_divergence(trace.get("dpo_loss", np.zeros(0)), "the DPO loss")
    elif objective != "forward":
        elbo_trace = trace.get("elbo", np.zeros(0))
        found += checks.divergence(elbo_trace[num_steps // 2:] if objective in SCHEDULES else elbo_trace)
    found += checks.kl_beyond_posterior(trace.get("kl_prior", np.zeros(0)), _reward_range(res.rewards))

    # A seed distinct from training's, so the correction's draws are independent of the random
    # numbers that shaped the guide.
    try:
        with warnings.catch_warnings():  # its diagnoses are re-made (and raised) as the svi run's, below
            warnings.simplefilter("ignore", PplLmWarning)
            post = ppl_lm.infer(model, *args, method="importance", guide=g, num_samples=num_samples,
                                seed=correction_seed(seed), progress=progress, model_kwargs=kwargs)
    except ValueError as err:
        if "every weight is zero" not in str(err):
            raise
        raise SVIError(no_admissible_message(trace, num_samples), guide=g, info=info_with()) from err
    cross = None
    if crosscheck_samples:
        cross = crosscheck(model, args, kwargs, g, post, crosscheck_samples, seed, progress)
        found += checks.crosscheck(cross.kl_reverse, cross.kl_reverse_se, cross.kl_at_prior, cross.kl_at_prior_se,
                                   float(post.log_evidence), float(post.log_evidence_se or 0.0),
                                   cross.log_evidence, cross.log_evidence_se)
    post.method = "svi"
    post.guide = g
    post.info = info_with(cross, post.info)
    post.seed = seed
    post.wall_time = time.perf_counter() - t_start
    return finish(post, found)  # the SVI checks first, then the weights' (k-hat, few distinct)


# -- pieces ------------------------------------------------------------------------------------
def default_guide(model, args: tuple, kwargs: dict | None = None) -> str:
    """``"lora"`` for a transformer LM (one copy of the weights), ``"full"`` otherwise (and for a
    model whose sequence sites are all observed: its guide covers the other latents only)."""
    if not sequence_sites(latent_sites(model, args, kwargs or {}, placeholder=True)):
        return "full"
    _, d = model_site(model, args, kwargs or {})
    return "lora" if isinstance(d.lm, TransformersLM) else "full"


def _fingerprint_lm(model, args, kwargs, g):
    """The LM a checkpoint is tied to: the guide's main site's, else the first observed text's."""
    if g.site is not None:
        return model_site(model, args, kwargs, g.site)[1].lm
    observed = observed_sequences(model, args, kwargs)
    return next(iter(observed.values())).lm if observed else None


def build_guide(model, args, kwargs, guide, lora_r=8, lora_alpha=16, lora_targets=None, seed=0) -> SequenceGuide:
    """The guide of a run: a new one of kind ``guide`` (seeded), or the given guide object."""
    if guide is None:
        guide = default_guide(model, args, kwargs)
    if isinstance(guide, str):
        if guide not in GUIDE_KINDS:
            raise ValueError(f"unknown guide {guide!r}; choose one of {', '.join(GUIDE_KINDS)} or pass a guide object")
        return make_guide(model, *args, kind=guide, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets,
                          seed=seed, **kwargs)
    if not callable(guide):
        raise TypeError(f"guide must be 'full', 'lora' or a callable guide, got {type(guide).__name__}")
    if not isinstance(guide, SequenceGuide):
        raise TypeError("a guide object must be a ppl_lm.inference.svi.guides.SequenceGuide (e.g. post.guide of an "
                        "svi run; build one with ppl_lm.inference.svi.guides.make_guide)")
    return guide


def _prompt_guide(g, guide, text: str) -> None:
    """A new sequence guide reads ``text`` before the model's prompt (``guide_prompt``)."""
    if isinstance(guide, SequenceGuide):
        raise ValueError("guide_prompt starts a new guide at π(·|text + prompt); a guide object keeps the context it "
                         "was trained in. Leave guide_prompt out, or pass guide='lora' / 'full'")
    if type(g) is not SequenceGuide or not isinstance(g.lm, LanguageModel):
        raise ValueError("guide_prompt needs a model with one latent lm.sequence(...) site and no other latent site "
                         "(a sequence guide); this model gets a joint guide")
    if not isinstance(text, str) or not text:
        raise ValueError(f"guide_prompt must be a non-empty text, got {text!r}")
    g.lm = prompted(g.lm, text)


def default_lr(g) -> float:
    """:data:`DEFAULT_LR` for the guide's kind."""
    if g.kind == "lora":
        return DEFAULT_LR["lora"]
    if g.lm is None:
        return DEFAULT_LR["latents"]
    return DEFAULT_LR["full_markov" if isinstance(g.lm, PositionalMarkovLM) else "full_transformer"]


def _losses(objective, proposal, num_particles, relax_penalty):
    if objective == "forward_then_reverse":
        return (make_loss("forward", num_particles, proposal=proposal),
                make_loss("reverse", num_particles, relax_penalty=relax_penalty))
    return (make_loss(objective, num_particles, proposal=proposal, relax_penalty=relax_penalty),)


def _schedule(losses, num_steps):
    if len(losses) == 1:
        return lambda step: losses[0]
    return lambda step: losses[0] if step < num_steps // 2 else losses[1]


def _reward_range(rewards: dict) -> float | None:
    """Σ over reward sites of (r_max − r_min)/β seen in training (None without reward sites)."""
    if not rewards:
        return None
    return float(sum((hi - lo) / beta for lo, hi, beta in rewards.values()))


def _pairs_digest(pairs) -> str:
    """A fingerprint of the pairs a DPO checkpoint was trained on."""
    import hashlib

    h = hashlib.sha256()
    for t in (pairs.chosen, pairs.rejected, pairs.context_index):
        h.update(t.cpu().numpy().tobytes())
    h.update(repr(pairs.contexts).encode())
    return h.hexdigest()[:16]


def _check_pair_options(objective, preferences, beta, batch_size, contexts, proposal):
    """The options of the pair objectives (DPO), checked before any work."""
    if objective not in PAIR_OBJECTIVES:
        for name, v in (("preferences", preferences), ("beta", beta), ("batch_size", batch_size)):
            if v is not None:
                raise ValueError(f"{name}= is an option of objective='dpo' (training on preference pairs); "
                                 f"objective={objective!r} does not read it. Pass objective='dpo', or drop {name}=")
        return
    if preferences is None:
        raise ValueError("objective='dpo' trains on preference pairs: pass preferences=ppl_lm.Preferences(chosen, "
                         "rejected) (or Preferences.from_jsonl(path))")
    if contexts is not None:
        raise ValueError("objective='dpo' reads each pair's context from the preferences (Preferences(..., "
                         "context=[...])); contexts= is for the sampling objectives")
    if proposal != "guide":
        raise ValueError("objective='dpo' draws nothing in training; proposal= is for objective='forward'")
    if beta is not None and not (isinstance(beta, (int, float)) and not isinstance(beta, bool)
                                 and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


def _check_options(num_steps, num_particles, lr, num_samples, checkpoint_every, lr_decay, clip_norm,
                   log_evidence_ref, contexts, objective, proposal, crosscheck_samples):
    # the integers (num_steps, num_samples, checkpoint_every, crosscheck_samples, num_particles >= 2: the
    # baseline needs two draws) and the choices were checked by @describe, from run's annotations
    for name, v in (("lr", lr), ("lr_decay", lr_decay), ("clip_norm", clip_norm)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if log_evidence_ref is not None and not (isinstance(log_evidence_ref, (int, float))
                                             and math.isfinite(log_evidence_ref)):
        raise ValueError(f"log_evidence_ref must be a finite number (a known log Z), got {log_evidence_ref!r}")
    if contexts is not None and (isinstance(contexts, (str, bytes)) or not hasattr(contexts, "__len__")
                                 or len(contexts) == 0):
        raise ValueError("contexts must be a non-empty list of model arguments (one entry per context)")
    known = OBJECTIVES + SCHEDULES + PAIR_OBJECTIVES
    if objective not in known:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(known)}")
    known = PROPOSALS + (MixtureForwardKL.proposal,)
    if proposal not in known:
        raise ValueError(f"unknown proposal {proposal!r}; choose one of {', '.join(known)}")
    if objective == "reverse" and proposal != "guide":
        raise ValueError(f"objective='reverse' draws from the guide; proposal={proposal!r} is for "
                         "objective='forward'")
