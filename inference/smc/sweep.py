"""One batched SMC sweep: ``R`` replicates (or islands) × ``N`` particles = ``B`` rows, advanced
through the stages (one per sequence site) in program order.

What a sweep runs is a frozen :class:`SweepSpec`; everything it changes lives in one
:class:`SweepState` (per-row weights, twists, values and Eves, per-replicate tallies) and, during
a stage, in its :class:`SiteState` (the sequence site's tokens, prompts, LM, proposal and mask
states). Resampling reorders both through their ``reorder`` methods, so a new per-row field is
reordered by adding it there. See :mod:`ppl_lm.inference.smc` for the algorithm.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from ppl_lm.inference._runtime import (
    Scores,
    is_latent,
    particle_dim,
    run_model,
    run_model_until,
    sequence_base,
    site_log_prob,
)
from tqdm.auto import tqdm

from ppl_lm import seeding as _random
from ppl_lm.conditions import partial_prefix
from ppl_lm.diagnostics.estimators import kish_ess_rows, log_mean_exp
from ppl_lm.lm import LanguageModel
from ppl_lm.lm.base import start_rows
from ppl_lm.resampling import resample
from ppl_lm.tokens import masked_categorical

from .genealogy import draw_rows, eve_relative_variance
from .twists import learned_twist, twist_logits

__all__ = ["Stage", "SweepSpec", "SiteState", "SweepState", "SweepResult", "Sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One sequence site, advanced token by token: its name, token masks, proposal LM and learned
    twist (:mod:`.twists`; ``None``: the model's prefix scores alone)."""

    name: str
    masks: list
    qlm: LanguageModel | None = None
    twist: Any = None


@dataclass(frozen=True)
class SweepSpec:
    """What one sweep runs: the model and its stages, ``len(replicates)`` independent runs of
    ``N`` particles (``replicates`` names the replicate each belongs to), and the options."""

    model: Callable
    args: tuple
    kwargs: dict
    stages: list[Stage]
    N: int
    replicates: list[int]
    ess_threshold: float
    resampling: str
    observed: str = "prefix"

    @property
    def R(self) -> int:
        return len(self.replicates)

    @property
    def B(self) -> int:
        return self.N * len(self.replicates)


@dataclass
class SiteState:
    """The sequence site a stage advances, one row per particle (reordered on resampling)."""

    stage: Stage
    lm: LanguageModel
    T: int  # the site's max_new_tokens
    prompt: torch.Tensor  # [P] shared, or [B, P] per particle
    prompt_lengths: torch.Tensor | None  # [B] for ragged prompt rows
    lm_state: Any  # the LM's incremental state (KV cache)
    q_state: Any  # the proposal LM's, or None
    mask_states: list  # one MaskState per token mask
    tokens: torch.Tensor  # [B, T], EOS-padded
    done: torch.Tensor  # [B] the particle has ended the site

    @classmethod
    def start(cls, stage: Stage, site, B: int) -> SiteState:
        """Per-particle state of the sequence site ``stage`` advances: its prompt rows (which may
        depend on each particle's earlier values), LM states, masks and tokens."""
        d = sequence_base(site["fn"])
        prompt, prompt_lengths = d.prompt_rows(B)
        if prompt.dim() > 1 and prompt.shape[0] != B:
            raise ValueError(f"SMC runs {B} particles, but site {stage.name!r} has {prompt.shape[0]} prompts: "
                             "a batch of prompts must have one row per particle (or use one shared prompt)")
        return cls(
            stage=stage, lm=d.lm, T=d.max_new_tokens, prompt=prompt, prompt_lengths=prompt_lengths,
            lm_state=start_rows(d.lm, prompt, B, prompt_lengths),
            q_state=None if stage.qlm is None else start_rows(stage.qlm, prompt, B, prompt_lengths),
            mask_states=[m.start(B) for m in stage.masks],
            tokens=torch.full((B, d.max_new_tokens), d.lm.eos_id, dtype=torch.long, device=d.lm.device),
            done=torch.zeros(B, dtype=torch.bool),
        )

    @property
    def eos(self) -> int:
        return self.lm.eos_id

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes row ``index[i]`` (``index`` on the CPU)."""
        self.done = self.done[index]
        if self.prompt.dim() > 1:
            self.prompt = self.prompt[index.to(self.prompt.device)]
        if self.prompt_lengths is not None:
            self.prompt_lengths = self.prompt_lengths[index.to(self.prompt_lengths.device)]
        dev_index = index.to(self.device)
        self.tokens = self.tokens[dev_index]
        self.lm_state = self.lm.reorder(self.lm_state, dev_index)
        for m in self.mask_states:  # a grammar mask's parser state travels with its particle
            m.reorder(index)
        if self.q_state is not None:
            self.q_state = self.stage.qlm.reorder(self.q_state, dev_index)


@dataclass
class SweepState:
    """Everything a sweep changes: per-row tensors ``[B]`` (reordered on resampling), per-replicate
    tallies ``[R]``, and the sequence site being advanced (``None`` between stages)."""

    # Values of every site the program has passed (other latents, finished sequence sites).
    fixed: dict[str, torch.Tensor]
    log_w: torch.Tensor  # since the last resampling of its replicate
    twist: torch.Tensor  # ψ of the current prefix (final score when done)
    log_p: torch.Tensor  # LM log-probability of the tokens so far
    eve: torch.Tensor  # each row's time-0 ancestor
    log_z: torch.Tensor  # [R] log evidence of the completed epochs
    num_resampling: torch.Tensor  # [R]
    ess_history: list[float] = field(default_factory=list)
    steps: int = 0
    name: str | None = None  # the sequence site of the current (or next) stage, for messages
    site: SiteState | None = None

    @classmethod
    def initial(cls, B: int, R: int) -> SweepState:
        f64 = dict(dtype=torch.float64)
        return cls(fixed={}, log_w=torch.zeros(B, **f64), twist=torch.zeros(B, **f64), log_p=torch.zeros(B, **f64),
                   eve=torch.arange(B), log_z=torch.zeros(R, **f64), num_resampling=torch.zeros(R, dtype=torch.long))

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes row ``index[i]``: every per-row tensor, value and site state."""
        self.log_w, self.twist, self.log_p, self.eve = (x[index] for x in
                                                         (self.log_w, self.twist, self.log_p, self.eve))
        self.fixed = {k: v[index.to(v.device)] for k, v in self.fixed.items()}
        if self.site is not None:
            self.site.reorder(index)


@dataclass
class SweepResult:
    """What the run keeps of a sweep: tokens and per-particle / per-island scalars."""

    scores: Scores
    draws: torch.Tensor  # [B, ...] one row per particle identifying its draw (genealogy.draw_rows)
    log_w: torch.Tensor  # [B] since each island's last resampling
    eve: torch.Tensor  # [B]
    size: int  # particles per island
    replicates: list[int]  # the replicate of each island
    log_z: torch.Tensor  # [R] log Ẑ of each island
    rel_var: torch.Tensor  # [R] Lee–Whiteley Var(Ẑ)/Ẑ²
    num_resampling: torch.Tensor  # [R]
    ess_history: list[float]
    steps: int


class Sweep:
    """One batched SMC run of a :class:`SweepSpec`; its mutable state is ``self.state``."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.state = SweepState.initial(spec.B, spec.R)

    def run(self, progress: bool, total_tokens: int) -> None:
        spec, st = self.spec, self.state
        bar = tqdm(total=total_tokens, desc="smc", unit="token", disable=not progress or not total_tokens)
        st.name = spec.stages[0].name if spec.stages else None
        try:
            site = self._boundary(last=not spec.stages)
            self._check_alive(f"before site {st.name!r}")
            for k, stage in enumerate(spec.stages):
                if site is None or site["name"] != stage.name:  # the program order changed between runs
                    raise ValueError(f"SMC expected the model to sample the sequence site {stage.name!r} next, got "
                                     f"{None if site is None else site['name']!r}: the sites a model samples, and "
                                     "their order, must not depend on the values drawn")
                st.name, st.site = stage.name, self._start_site(stage, site)
                self._advance(bar)
                st.fixed[st.name] = st.site.tokens
                st.site = None  # frees the stage's LM states
                last = k + 1 == len(spec.stages)
                site = self._boundary(last)
                self._check_alive(f"at the end of site {st.name!r}")
                if not last:
                    self._resample(True)
        finally:
            bar.close()

    # -- the model runs and the site's start (a batch of contexts overrides them: inference.smc.contexts) --
    def _run_model(self, rows: torch.Tensor | None, data: dict, **kw) -> Scores:
        """``run_model`` of the spec's model on ``rows`` (``None``: every row), given ``data`` for them."""
        spec = self.spec
        return run_model(spec.model, spec.args, spec.kwargs, spec.B if rows is None else len(rows), data=data, **kw)

    def _run_model_until(self, rows: torch.Tensor | None, data: dict, **kw):
        """``run_model_until`` of the spec's model on ``rows`` (``None``: every row), given ``data`` for them."""
        spec = self.spec
        return run_model_until(spec.model, spec.args, spec.kwargs, spec.B if rows is None else len(rows), data, **kw)

    def _start_site(self, stage: Stage, site) -> SiteState:
        """The state of the sequence site ``stage`` advances, from its Pyro message ``site``."""
        return SiteState.start(stage, site, self.spec.B)

    # -- stage boundaries ---------------------------------------------------------------------
    def _boundary(self, last: bool):
        """Between stages: draw the latent sites the program samples before its next sequence site
        (after the last stage: every remaining one) from their prior for each particle, and replace
        the twist by the factors applied up to there (after the last stage: the full log likelihood).
        Returns the next sequence site's message (``None`` after the last stage)."""
        st = self.state
        if last:
            scores, site = self._run_model(None, st.fixed, score_latent=False), None
        else:
            scores, site = self._run_model_until(None, st.fixed, sequences_only=True)
        for k, v in scores.values.items():
            if k not in st.fixed:
                st.fixed[k] = v.detach()
        self._reweight(torch.isfinite(st.log_w), scores.log_likelihood.double().cpu())
        return site

    def _reweight(self, live: torch.Tensor, new_twist: torch.Tensor) -> None:
        """Multiply the weights of ``live`` rows by exp(ψ_new − ψ_old) and make ψ_new the twist."""
        st = self.state
        delta = torch.where(live, new_twist - st.twist, torch.zeros_like(new_twist))
        st.log_w = torch.where(live, st.log_w + delta, st.log_w)
        st.twist = torch.where(live, new_twist, st.twist)
        if torch.isnan(st.log_w).any():
            raise FloatingPointError(f"NaN in the SMC weights at site {st.name!r}: a reward or the LM produced NaN")

    def _check_alive(self, where: str) -> None:
        # A replicate whose particles all died estimates Z by 0 (still unbiased); only when
        # every replicate is dead is there nothing to report.
        dead = ~torch.isfinite(self.state.log_w.view(self.spec.R, self.spec.N)).any(-1)
        if bool(dead.all()):
            raise ValueError(
                f"every particle died {where}: no particle satisfies the condition. "
                "The condition may be unsatisfiable or too rare for this many particles; use more "
                "particles, declare hard constraints prefix_closed or as a token_constraint (SMC then "
                "proposes only allowed tokens), or use a trained guide (method='svi')"
            )

    # -- one token ----------------------------------------------------------------------------
    def _advance(self, bar) -> None:
        """The tokens of the current stage's site, one at a time, until every particle has ended it."""
        st = self.state
        s = st.site  # resampling reorders it in place
        gen = _random.generator(s.device)
        for t in range(s.T):
            st.steps += 1
            active = ~s.done
            alive = torch.isfinite(st.log_w)
            log_psi = None
            if s.stage.twist is not None:  # log ψ of every next token: twists the proposal and the target
                log_psi = twist_logits(s.stage.twist, s.tokens[:, :t], s.lm_state, active & alive, st.log_w, st.twist)
            tok, lp, inc = self._propose(t, gen, log_psi)
            s.tokens[:, t] = tok
            for m in s.mask_states:
                m.advance(tok.cpu())
            st.log_p += lp
            finished = active & ((tok.cpu() == s.eos) | (t + 1 == s.T))
            s.done = s.done | finished
            if t + 1 < s.T and not bool(s.done.all()):
                s.lm_state = s.lm.extend(s.lm_state, tok)
                if s.q_state is not None:
                    s.q_state = s.stage.qlm.extend(s.q_state, tok)
            # Re-score only the live rows that moved: pruned rows stay pruned, finished rows
            # keep their final score.
            live = active & alive & torch.isfinite(inc)
            new_twist = st.twist.clone()
            for rows, length in ((live & ~finished, t + 1), (live & finished, None)):
                idx = rows.nonzero()[:, 0]
                if len(idx):
                    new_twist[idx] = self._rescore(idx, length)
            if log_psi is not None:
                psi_tok = log_psi.gather(-1, tok[:, None].to(log_psi.device))[:, 0]
                new_twist = learned_twist(new_twist, psi_tok, live & ~finished)
            st.log_w = torch.where(alive, st.log_w + inc, st.log_w)
            self._reweight(live, new_twist)
            self._check_alive(f"by token {t + 1} (of {s.T}) of site {st.name!r}")
            self._resample(t + 1 < s.T and not bool(s.done.all()))
            bar.update(1)
            bar.set_postfix(ess=f"{st.ess_history[-1]:.1f}")
            if bool(s.done.all()):
                break
        bar.update(s.T - t - 1)  # the site's remaining positions: every particle has ended it

    def _propose(self, t: int, gen, log_psi: torch.Tensor | None = None):
        """Sample the next token of every row (from the proposal times ψ, if a learned twist gives
        ``log_psi``); return (tokens, log π(tok), log incremental weight)."""
        s = self.state.site
        logp = s.lm_state.logprobs
        logq = logp if s.q_state is None else s.q_state.logprobs
        if log_psi is not None:
            logq = logq + log_psi.to(logq.device, logq.dtype)
        allowed = None
        if s.mask_states:
            last = t + 1 == s.T  # only tokens that complete the text (grammar masks)
            allowed = s.mask_states[0].allowed(last)
            for m in s.mask_states[1:]:
                allowed = allowed & m.allowed(last)
            if allowed.shape != logq.shape:
                raise ValueError(f"a TokenMask returned shape {tuple(allowed.shape)}, expected {tuple(logq.shape)}")
            allowed = allowed.to(logq.device)
        # The draw from q restricted to the allowed tokens and the log of their mass, in one pass
        # (a row with no allowed mass gets -inf: the particle dies).
        tok, log_mass = self._choose(logq, allowed, gen, t)
        done = s.done.to(tok.device)
        tok = torch.where(done, torch.full_like(tok, s.eos), tok)
        lp = logp.gather(-1, tok[:, None])[:, 0].double()
        if s.q_state is None and not s.mask_states and log_psi is None:
            inc = torch.zeros_like(lp)
        else:
            lq = logq.gather(-1, tok[:, None])[:, 0].double()
            inc = lp - lq + log_mass
            inc = torch.where(torch.isfinite(log_mass), inc, torch.full_like(inc, -math.inf))
        inc = torch.where(done, torch.zeros_like(inc), inc)
        lp = torch.where(done, torch.zeros_like(lp), lp)
        return tok, lp.cpu(), inc.cpu()

    def _choose(self, logq: torch.Tensor, allowed: torch.Tensor | None, gen, t: int):
        """The token at position ``t`` of every row, drawn from the proposal ``logq`` restricted to
        the ``allowed`` tokens (``None``: all), and the log of the allowed proposal mass
        (conditional SMC overrides it to keep its reference rows)."""
        return masked_categorical(logq, allowed, gen)

    def _ancestors(self, probs: torch.Tensor, need: torch.Tensor, gen) -> torch.Tensor:
        """Ancestor indices ``[k, N]`` within each of the ``k`` replicates being resampled (the rows
        of ``need``), from their normalised weights ``probs`` (conditional SMC overrides it)."""
        return resample(probs, self.spec.N, self.spec.resampling, gen)

    def _rescore(self, rows: torch.Tensor, t: int | None) -> torch.Tensor:
        """The factors the model applies before its next latent site without a value, for ``rows``
        holding the current site's prefix of length ``t`` (partial), or finished (``t=None``)."""
        spec, st = self.spec, self.state
        data = {k: v[rows.to(v.device)] for k, v in st.fixed.items()}
        data[st.name] = st.site.tokens[rows.to(st.site.device)]
        # observed="end": while partial, observed texts after this site wait for it to end.
        defer = st.name if t is not None and spec.observed == "end" else None
        with partial_prefix(t) if t is not None else contextlib.nullcontext():
            scores, _ = self._run_model_until(rows, data, defer_observed_after=defer)
        return scores.log_likelihood.double().cpu()

    def _resample(self, allowed: bool) -> None:
        """Resample the replicates whose ESS fell below the threshold (if ``allowed``)."""
        spec, st = self.spec, self.state
        lw = st.log_w.view(spec.R, spec.N)
        ess = kish_ess_rows(lw)  # a dead replicate (all weights 0) has ESS 0
        st.ess_history.append(float(ess.mean()))
        need = (ess < spec.ess_threshold * spec.N) & torch.isfinite(lw).any(-1)  # dead replicates stay
        if not allowed or not bool(need.any()):
            return
        gen = _random.generator("cpu")
        index = torch.arange(spec.B).view(spec.R, spec.N).clone()
        offset = (torch.arange(spec.R) * spec.N)[need, None]
        index[need] = self._ancestors(torch.softmax(lw, -1)[need], need, gen) + offset
        st.log_z[need] += log_mean_exp(lw[need], -1)
        lw[need] = 0.0
        st.num_resampling[need] += 1
        index = index.reshape(-1)
        if not bool((index == torch.arange(spec.B)).all()):  # every particle its own ancestor: nothing moves
            st.reorder(index)
        log.debug("smc: site %r, resampled %d replicate(s), ESS %.1f", st.name, int(need.sum()), float(ess.mean()))

    # -- result -------------------------------------------------------------------------------
    def result(self) -> SweepResult:
        """What the run keeps of this sweep (after :meth:`run`)."""
        spec, st = self.spec, self.state
        lw = st.log_w.view(spec.R, spec.N)
        # One final, non-partial run for the per-sample statistics (no LM pass).
        scores = self._run_model(None, st.fixed, score_latent=False)
        live = torch.isfinite(st.log_w)
        if not torch.allclose(scores.log_likelihood.double()[live], st.twist[live], rtol=1e-4, atol=1e-4):
            warnings.warn("SMC: the model scored the same sequences differently on two runs; its conditions "
                          "should be deterministic functions of the sequence", stacklevel=4)
        # The log prior: the LM log-probability of every sequence site plus the other latents'.
        log_prior = st.log_p.clone()
        names = [s.name for s in spec.stages]
        for k, node in scores.trace.nodes.items():
            if is_latent(node) and k not in names:
                log_prior += site_log_prob(k, node["fn"].log_prob(node["value"]), spec.B,
                                           particle_dim(node)).double().cpu()
        scores.trace = None
        scores.log_prior = log_prior.float()
        scores.values = {k: v.cpu() for k, v in scores.values.items()}
        return SweepResult(
            scores=scores, draws=draw_rows(scores.values, names, spec.B), log_w=st.log_w, eve=st.eve,
            size=spec.N, replicates=spec.replicates,
            log_z=st.log_z + torch.logsumexp(lw, -1) - math.log(spec.N),  # Ẑ of each island
            rel_var=eve_relative_variance(lw, st.eve, st.num_resampling),
            num_resampling=st.num_resampling, ess_history=st.ess_history, steps=st.steps,
        )
