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
Every move maps canonical sequences to canonical sequences by construction; a move that has
nothing to act on (delete from an empty sequence, insert into a full one) proposes the current
state and is counted as rejected, which leaves the target invariant. Each move is paired with
its exact reverse and accepted with the exact Hastings ratio:

``suffix``
    choose ``k`` uniformly in ``{0, ..., min(n, T-1)}`` and regenerate positions ``k..T-1``
    from the LM given the prompt and ``x[:k]``. Forward ``1/K(x) · π(x'[k:] | x[:k])``,
    reverse ``1/K(x') · π(x[k:] | x[:k])`` with ``K(x) = min(n+1, T)``; ``k`` is a valid
    choice at ``x'`` because ``x'[:k] = x[:k]`` holds no EOS.
``substitute``
    choose a content position ``i`` uniformly and redraw ``x[i]`` from the LM's next-token law
    given ``x[:i]``, restricted to non-EOS tokens. The length is unchanged, so the reverse is
    the same position with the old token.
``substitute_uniform``
    as ``substitute`` with the new token uniform over the non-EOS vocabulary (symmetric).
``insert`` / ``delete``
    exact reverses of each other. Insert at a length-``n`` sequence (``n < T``) chooses a gap
    ``i`` uniformly in ``{0, ..., n}`` and a token ``z`` from the LM given ``x[:i]``
    (restricted to non-EOS), shifting ``x[i:]`` right by one (at ``n = T-1`` the last EOS
    falls off and the result has no EOS). Delete at a length-``n`` sequence (``n >= 1``)
    chooses a content position ``j`` uniformly in ``{0, ..., n-1}`` and shifts the rest
    left, padding with EOS. Insert ``(i, z)`` from ``x`` and delete ``j = i`` from the result
    are a bijection, with probabilities ``p_ins/(n+1) · q(z | x[:i])`` and ``p_del/(n+1)``.

Chains are a batch dimension inside the kernel (state ``[num_chains, T]``); Pyro's ``MCMC``
runs one "chain" of that batch, so no worker processes are started. Each chain draws its own
move every transition, so chains stay independent and R-hat is meaningful.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ppl_lm.backends import Kind, describe
from ppl_lm.validation import NonNegativeInt, PositiveInt
from ppl_lm.inference._runtime import (
    Scores,
    check_has_latent,
    finish,
    latent_sites,
    row_cache,
    run_model,
    run_model_until,
    sequence_base,
    sequence_sites,
    stats_from_scores,
)
from pyro.infer.mcmc import MCMC
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from tqdm.auto import tqdm

from ppl_lm import seeding as _random
from ppl_lm.diagnostics.estimators import mcmc_diagnostics
from ppl_lm.lm.base import start_rows
from ppl_lm.posterior import Info, Posterior, normalise
from ppl_lm.tokens import after_eos_mask, categorical

__all__ = ["DEFAULT_MOVES", "MOVES", "EditKernel", "MHInfo", "run", "sequence_ess"]

log = logging.getLogger(__name__)

MOVES = ("suffix", "substitute", "substitute_uniform", "insert", "delete")
DEFAULT_MOVES = {"suffix": 0.4, "substitute": 0.25, "substitute_uniform": 0.05, "insert": 0.15, "delete": 0.15}
_IDX = {m: i for i, m in enumerate(MOVES)}


@dataclass(frozen=True)
class MHInfo(Info):
    """Facts of an MH run: acceptance per move, per-summary R-hat and bulk ESS, and the options.

    ``ess_sequences`` is the between-chain effective size of the law over whole sequences
    (:func:`sequence_ess`) of the main (first) sequence site; ``ess_sequences_by_site`` gives it
    for every sequence site.
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


def _log_q_token(logp: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The LM's next-token law restricted to non-EOS tokens, as log-probabilities ``[B, V]``.

    Rows where every non-EOS token has probability zero come back all ``-inf`` (no move).
    """
    masked = logp.double().clone()
    masked[:, eos_id] = -math.inf
    z = torch.logsumexp(masked, -1, keepdim=True)
    return torch.where(torch.isfinite(z), masked - z, torch.full_like(masked, -math.inf))


def _content_length(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number of tokens before the first EOS (``T`` when there is none)."""
    return torch.cumprod((x != eos_id).long(), -1).sum(-1)


def _check_moves(moves: Mapping[str, float] | None) -> torch.Tensor:
    if moves is None:
        moves = DEFAULT_MOVES
    if not isinstance(moves, Mapping):
        raise TypeError(f"moves must be a dict move -> probability, e.g. {DEFAULT_MOVES}")
    unknown = set(moves) - set(MOVES)
    if unknown:
        raise ValueError(f"unknown move(s) {sorted(unknown)}; choose among {list(MOVES)}")
    p = torch.tensor([float(moves.get(m, 0.0)) for m in MOVES], dtype=torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"move probabilities must be finite, >= 0 and not all zero; got {dict(moves)}")
    return p / p.sum()


class EditKernel(MCMCKernel):
    """A batch of MH chains over token sequences, moved by LM-guided edits.

    Args:
        model: a vectorised Pyro model with one or more latent ``lm.sequence(...)`` sites (and any other
            latent sites with a finite support or a continuous one).
        num_chains: chains, run as one batch.
        moves: move name -> probability (see :data:`MOVES`); normalised.
        thin: transitions per kept sample after warm-up.
        initial_samples: LongTensor ``[num_chains, T]`` of starting states; by default, prior
            samples that satisfy every condition.
        init_budget: most prior draws spent looking for admissible starting states.

    The state handed to and returned by ``sample`` is ``{"x": [C, T], "accepted": [C],
    "move": [C]}`` (all int64); the kernel keeps the scores of the current states itself.
    """

    def __init__(self, model, *, num_chains: int = 4, moves: Mapping[str, float] | None = None,
                 thin: int = 1, initial_samples: torch.Tensor | None = None, init_budget: int | None = None,
                 progress: bool = False):
        self.model = model
        self.progress = progress
        self.num_chains = num_chains
        self.move_probs = _check_moves(moves)
        self.thin = thin
        self.initial_samples = initial_samples
        self.init_budget = init_budget if init_budget is not None else max(4096, 64 * num_chains)
        self.transforms: dict = {}  # tells Pyro's MCMC that values need no transform
        self._initial_params = None

    # -- Pyro MCMCKernel interface ------------------------------------------------------------
    def setup(self, warmup_steps, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.warmup_steps = warmup_steps
        sites = latent_sites(self.model, args, kwargs, placeholder=True)
        self.order = list(sites)
        check_has_latent(sites, "mh")
        self.seq = sequence_sites(sites)
        # The main site (the Posterior's samples) is the first; every sequence site is edited in turn.
        # With none (every text observed) a transition updates the other latents only.
        self.site, d = next(iter(self.seq.items()), (None, None))
        # Every other latent site: discrete ones get an exact Gibbs step, continuous ones random-walk MH.
        self.others = {k: v for k, v in sites.items() if k not in self.seq}
        for k, v in self.others.items():
            if not getattr(v, "has_enumerate_support", False) and v.support.is_discrete:
                raise ValueError(f"method='mh' cannot update the discrete latent site {k!r}: it has no finite "
                                 "enumerate_support. Use method='importance' or 'smc'")
        self.rw_scale = {k: 0.5 for k, v in self.others.items() if not getattr(v, "has_enumerate_support", False)}
        self.rw_counts = {k: [0, 0] for k in self.rw_scale}
        self.dist = d
        self.lm = None if d is None else d.lm
        self.T = 0 if d is None else d.max_new_tokens
        self.eos = None if d is None else d.lm.eos_id
        self.values: dict[str, torch.Tensor] = {}
        self._t = 0
        self._transitions = 0  # edit transitions so far: they visit the sequence sites in turn
        self._proposed = torch.zeros(len(MOVES), dtype=torch.long)
        self._accepted = torch.zeros(len(MOVES), dtype=torch.long)
        self._proposed_warm = torch.zeros(len(MOVES), dtype=torch.long)
        self._accepted_warm = torch.zeros(len(MOVES), dtype=torch.long)
        self.history: list[dict[str, Any]] = []
        x0, values = self._init_states()
        if self.site is not None:
            values = {**values, self.site: x0}
        self._set_state(values, self._score(values))
        zeros = torch.zeros(self.num_chains, dtype=torch.long)
        self._initial_params = {"x": x0.clone(), "accepted": zeros, "move": zeros.clone()}

    @property
    def initial_params(self):
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params):
        self.initial_samples = params["x"]

    def sample(self, params):
        warm = self._t < self.warmup_steps
        for _ in range(1 if warm else self.thin):
            move, acc = self._transition(warm)
        self._t += 1
        if not warm:
            self.history.append({
                "log_prior": self.scores.log_prior.clone(),
                "log_likelihood": self.scores.log_likelihood.clone(),
                "rewards": {k: v.clone() for k, v in self.scores.rewards.items()},
                "constraints": {k: v.clone() for k, v in self.scores.constraints.items()},
                "values": {k: v.clone() for k, v in self.values.items() if k != self.site},
            })
        return {"x": self._main().clone(), "accepted": acc.long(), "move": move}

    def _main(self) -> torch.Tensor:
        """The main sequence site's value of every chain (``[C, 0]`` when every text is observed)."""
        if self.site is None:
            return torch.zeros(self.num_chains, 0, dtype=torch.long)
        return self.values[self.site]

    def logging(self):
        prop, acc = self._proposed + self._proposed_warm, self._accepted + self._accepted_warm
        rate = float(acc.sum()) / max(1, int(prop.sum()))
        return OrderedDict([("acc. rate", f"{rate:.3f}")])

    def diagnostics(self):
        return {"acceptance": self.acceptance()}

    # -- public helpers -----------------------------------------------------------------------
    def acceptance(self) -> dict[str, float]:
        """Post-warm-up acceptance rate of each move with positive probability."""
        out = {}
        for m, i in _IDX.items():
            if self.move_probs[i] > 0:
                n = int(self._proposed[i])
                out[m] = float(self._accepted[i]) / n if n else float("nan")
        return out

    # -- internals ----------------------------------------------------------------------------
    def _score(self, values: dict[str, torch.Tensor]) -> Scores:
        """The joint target of every chain's values (all latent sites): every sequence site is
        scored under the prompt the other values give it."""
        with torch.no_grad():
            return run_model(self.model, self.args, self.kwargs, self.num_chains, data=values)

    def _set_state(self, values: dict[str, torch.Tensor], scores: Scores) -> None:
        self.values = values
        self.scores = Scores(scores.log_prior.double(), scores.log_likelihood.double(), {},
                             dict(scores.rewards), dict(scores.constraints))
        self.log_target = self.scores.log_prior + self.scores.log_likelihood

    def _edit_site(self, name: str) -> None:
        """Make ``name`` the sequence site the next edit moves act on: its LM, length and each
        chain's prompt rows under the current values (a later site's prompt may be an earlier
        site's value), read by running the model only up to that site."""
        d = self.seq[name]
        self.edited, self.lm, self.T, self.eos = name, d.lm, d.max_new_tokens, d.lm.eos_id
        with torch.no_grad():
            _, msg = run_model_until(self.model, self.args, self.kwargs, self.num_chains,
                                     {k: v for k, v in self.values.items() if k != name})
        if msg is None or msg["name"] != name:
            raise ValueError(f"method='mh' expected the model to sample the sequence site {name!r}; the sites a model "
                             "samples must not depend on the values drawn")
        self.prompt, self.prompt_lengths = sequence_base(msg["fn"]).prompt_rows(self.num_chains)

    def _prompt_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt of each chain ``[C, P]`` (or the shared ``[P]``), for LM proposals."""
        if self.prompt.dim() == 1:
            return self.prompt
        return self.prompt if rows is None else self.prompt[rows]

    def _update_others(self, warm: bool) -> None:
        """One update of every non-sequence site: exact Gibbs for discrete ones (one scoring pass per
        value of the support), random-walk MH for continuous ones (scale adapted in warm-up)."""
        g = _random.generator("cpu")
        C = self.num_chains
        for name, d in self.others.items():
            if name not in self.rw_scale:
                support = d.enumerate_support(expand=False).reshape(-1, *d.event_shape)
                lj = []
                for v in support:
                    sc = self._score({**self.values, name: v.expand(C, *v.shape).clone()})
                    lj.append(sc.log_prior.double() + sc.log_likelihood.double())
                lj = torch.stack(lj, -1)  # [C, K]
                pick = categorical(torch.log_softmax(lj, -1).float(), g)
                values = {**self.values, name: support[pick].clone()}
                self._set_state(values, self._score(values))
                continue
            cur = self.values[name]
            step = self.rw_scale[name]
            prop = cur + step * torch.randn(cur.shape, dtype=cur.dtype, generator=g)
            sc = self._score({**self.values, name: prop})
            new_target = sc.log_prior.double() + sc.log_likelihood.double()
            log_alpha = torch.nan_to_num(new_target - self.log_target, nan=-math.inf)
            acc = torch.rand(C, dtype=torch.float64, generator=g).log() < log_alpha
            mask = acc.reshape(C, *([1] * (cur.dim() - 1)))
            values = {**self.values, name: torch.where(mask, prop, cur)}
            self._set_state(values, self._score(values))
            self.rw_counts[name][0] += C
            self.rw_counts[name][1] += int(acc.sum())
            if warm:  # Robbins–Monro on log scale towards acceptance 0.44 (Roberts & Rosenthal, 2001)
                rate = float(acc.double().mean())
                self.rw_scale[name] = float(step * math.exp((rate - 0.44) / math.sqrt(1 + self._t)))

    def _init_states(self) -> torch.Tensor:
        C, T = self.num_chains, self.T
        if self.initial_samples is not None and self.site is None:
            raise ValueError("initial_samples gives the first latent sequence site, and this model has none (every "
                             "lm.sequence(...) site is observed): leave initial_samples out")
        if self.initial_samples is not None:
            x0 = torch.as_tensor(self.initial_samples)
            if x0.dtype.is_floating_point or x0.dtype == torch.bool:
                raise TypeError("initial_samples must be a LongTensor of token ids")
            x0 = x0.long().cpu()
            if x0.shape != (C, T):
                raise ValueError(f"initial_samples must have shape [num_chains, T] = [{C}, {T}], got "
                                 f"{tuple(x0.shape)}")
            if x0.min() < 0 or x0.max() >= self.lm.vocab_size:
                raise ValueError(f"initial_samples hold token ids outside [0, {self.lm.vocab_size})")
            if not bool(self.dist.canonical(x0).all()):
                raise ValueError("initial_samples must be EOS-padded: every position after the first EOS is EOS")
            rest = [k for k in (*self.seq, *self.others) if k != self.site]
            if rest:
                raise ValueError("initial_samples gives only the sequence site; this model has other latent sites "
                                 f"{rest}: leave initial_samples out (admissible prior draws start the chains)")
            sc = self._score({self.site: x0})
            if not bool(torch.isfinite(sc.log_prior + sc.log_likelihood).all()):
                raise ValueError("some initial_samples have zero posterior probability (a constraint fails "
                                 "or the LM gives them probability 0)")
            return x0, {}
        found, found_vals, draws = [], [], 0
        batch = max(64, 4 * C)
        # Prior draws until every chain has an admissible start: seconds on a real LM, so say so.
        bar = tqdm(total=C, desc="mh: starting states", unit="chain", leave=False, disable=not self.progress)
        try:
            while sum(len(f) for f in found) < C and draws < self.init_budget:
                bar.set_postfix(prior_draws=draws + batch)
                with torch.no_grad():
                    sc = run_model(self.model, self.args, self.kwargs, batch)
                draws += batch
                ok = torch.isfinite(sc.log_prior + sc.log_likelihood)
                main = sc.values[self.site] if self.site is not None else torch.zeros(batch, 0, dtype=torch.long)
                found.append(main.reshape(batch, -1)[ok].cpu())
                found_vals.append({k: sc.values[k][ok].cpu() for k in sc.values if k != self.site})
                bar.update(min(C, sum(len(f) for f in found)) - bar.n)
        finally:
            bar.close()
        pool = torch.cat(found) if found else torch.zeros(0, T, dtype=torch.long)
        pool_vals = {k: torch.cat([f[k] for f in found_vals]) for k in found_vals[0]} if found_vals else {}
        if len(pool) == 0:
            raise ValueError(
                f"no prior sample satisfied the model's conditions in {draws} draws, so the MH chains "
                "have no starting state. Raise init_budget=, pass initial_samples= (e.g. from method='smc'), "
                "or use smc/svi for conditions this rare"
            )
        if len(pool) < C:
            log.warning("only %d admissible starting states for %d chains after %d prior draws; "
                        "some chains start from the same state", len(pool), C, draws)
            idx = torch.randint(len(pool), (C,), generator=_random.generator("cpu"))
        else:
            idx = torch.arange(C)
        return pool[idx], {k: v[idx] for k, v in pool_vals.items()}

    @torch.no_grad()
    def _lm_pass(self, x: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, sel: torch.Tensor):
        """One incremental LM pass: every ``x`` teacher-forced, plus, for the chains ``sel``
        (suffix moves), ``x[:k]`` followed by a suffix sampled from the LM.

        Returns ``(logp_at_pos [C, V], tok_lp_x [C, T], y [C, T], y_lp [C, T])``: the next-token
        law given ``x[:pos]``, the per-token log-probs of ``x``, the suffix proposals (``x`` for
        chains not in ``sel``) and the per-token log-probs of ``y`` (0 after EOS).
        """
        lm, (C, T), eos = self.lm, x.shape, self.eos
        dev = lm.device
        gen = _random.generator(dev)
        xd, posd = x.to(dev), pos.to(dev)
        seld = sel.to(dev)
        ys, ks = xd[seld].clone(), k.to(dev)[seld]
        m = len(sel)
        prompt, lengths = self._prompt_rows(), self.prompt_lengths
        if prompt.dim() > 1:
            prompt = torch.cat([prompt, prompt[sel]])
        if lengths is not None:
            lengths = torch.cat([lengths, lengths[sel]])
        state = start_rows(lm, prompt.to(dev), C + m, lengths)
        tok_lp_x = torch.zeros(C, T, dtype=torch.float64, device=dev)
        ys_lp = torch.zeros(m, T, dtype=torch.float64, device=dev)
        at_pos = torch.zeros(C, lm.vocab_size, dtype=torch.float32, device=dev)
        done = torch.zeros(m, dtype=torch.bool, device=dev)
        for t in range(T):
            logp = state.logprobs.float()
            lx, ly = logp[:C], logp[C:]
            tok_lp_x[:, t] = lx.gather(-1, xd[:, t : t + 1])[:, 0].double()
            at_pos = torch.where((posd == t)[:, None], lx, at_pos)
            tok = ys[:, t]
            if m:
                s = categorical(ly, gen)
                tok = torch.where(t < ks, ys[:, t], torch.where(done, torch.full_like(s, eos), s))
                lp = ly.gather(-1, tok[:, None])[:, 0].double()
                ys_lp[:, t] = torch.where(done, torch.zeros_like(lp), lp)
                ys[:, t] = tok
                done = done | (tok == eos)
            if t + 1 < T:
                state = lm.extend(state, torch.cat([xd[:, t], tok]))
        tok_lp_x = tok_lp_x.masked_fill(after_eos_mask(xd, eos), 0.0)
        y, y_lp = x.clone(), torch.zeros(C, T, dtype=torch.float64)
        y[sel], y_lp[sel] = ys.cpu(), ys_lp.cpu()
        return at_pos.cpu(), tok_lp_x.cpu(), y, y_lp

    def _transition(self, warm: bool):
        """One MH transition of every chain: an edit of one sequence site (each in turn, given the
        others), then an update of every other latent site; returns (move index [C], accepted [C])."""
        if not self.seq:  # every sequence observed: Gibbs and random-walk steps on the other latents
            self._update_others(warm)
            zeros = torch.zeros(self.num_chains, dtype=torch.long)
            return zeros, zeros.bool()
        names = list(self.seq)
        self._edit_site(names[self._transitions % len(names)])
        self._transitions += 1
        x, T, eos, V = self.values[self.edited], self.T, self.eos, self.lm.vocab_size
        C = len(x)
        g = _random.generator("cpu")
        move = torch.multinomial(self.move_probs.float(), C, replacement=True, generator=g)
        u = torch.rand(C, dtype=torch.float64, generator=g)
        n = _content_length(x, eos)
        is_m = {m: move == i for m, i in _IDX.items()}

        # positions: suffix start k, or the edited position
        K = torch.clamp(n + 1, max=T)
        k = torch.where(is_m["suffix"], (u * K).floor().long().clamp(max=K - 1), torch.full_like(n, T))
        n_pos = torch.where(is_m["insert"], n + 1, n)  # choices of position for the edit moves
        pos = torch.where(is_m["suffix"], torch.full_like(n, -1),
                          (u * n_pos).floor().long().clamp(min=0, max=T - 1))
        pos = torch.minimum(pos, (n_pos - 1).clamp(min=0))
        possible = torch.ones(C, dtype=torch.bool)
        possible &= ~((is_m["substitute"] | is_m["substitute_uniform"] | is_m["delete"]) & (n < 1))
        possible &= ~(is_m["insert"] & (n >= T))

        at_pos, tok_lp_x, y, y_lp = self._lm_pass(x, pos, k, is_m["suffix"].nonzero()[:, 0])
        lq = _log_q_token(at_pos, eos)  # [C, V] restricted next-token law at pos
        possible &= ~((is_m["substitute"] | is_m["insert"]) & ~torch.isfinite(lq).any(-1))
        z_lm = categorical(lq.float(), g)
        z_uni = torch.randint(V - 1, (C,), generator=g)
        z_uni = z_uni + (z_uni >= eos).long()
        rows = torch.arange(C)
        p_cur = pos.clamp(min=0)
        lq_z = lq[rows, z_lm]
        lq_old = lq[rows, x[rows, p_cur]]

        log_fwd = torch.zeros(C, dtype=torch.float64)
        log_rev = torch.zeros(C, dtype=torch.float64)
        prop = x.clone()
        idx = torch.arange(T)

        # suffix
        after_k = idx[None, :] >= k[:, None]
        m = is_m["suffix"]
        n_y = _content_length(y, eos)
        K_y = torch.clamp(n_y + 1, max=T)
        log_fwd = torch.where(m, -K.double().log() + (y_lp * after_k).sum(-1), log_fwd)
        log_rev = torch.where(m, -K_y.double().log() + (tok_lp_x * after_k).sum(-1), log_rev)
        prop = torch.where(m[:, None], y, prop)

        # substitutions (length unchanged: the 1/n position choice cancels)
        sub = x.clone()
        sub[rows, p_cur] = torch.where(is_m["substitute"], z_lm, z_uni)
        m = is_m["substitute"]
        log_fwd = torch.where(m, lq_z, log_fwd)
        log_rev = torch.where(m, lq_old, log_rev)
        prop = torch.where((m | is_m["substitute_uniform"])[:, None], sub, prop)

        # insert / delete
        log_p_ins, log_p_del = self.move_probs[_IDX["insert"]].log(), self.move_probs[_IDX["delete"]].log()
        src = torch.where(idx[None, :] < pos[:, None], idx[None, :], idx[None, :] - 1).clamp(min=0)
        ins = x.gather(1, src)
        ins[rows, p_cur] = z_lm
        m = is_m["insert"]
        log_fwd = torch.where(m, log_p_ins - (n + 1).double().log() + lq_z, log_fwd)
        log_rev = torch.where(m, log_p_del - (n + 1).double().log(), log_rev)
        prop = torch.where(m[:, None], ins, prop)

        src = torch.where(idx[None, :] < pos[:, None], idx[None, :], idx[None, :] + 1)
        dele = x.gather(1, src.clamp(max=T - 1))
        dele = torch.where(src >= T, torch.full_like(dele, eos), dele)
        m = is_m["delete"]
        n_d = n.clamp(min=1).double()
        log_fwd = torch.where(m, log_p_del - n_d.log(), log_fwd)
        log_rev = torch.where(m, log_p_ins - n_d.log() + lq_old, log_rev)
        prop = torch.where(m[:, None], dele, prop)

        prop = torch.where(possible[:, None], prop, x)
        scores = self._score({**self.values, self.edited: prop})
        new_target = scores.log_prior.double() + scores.log_likelihood.double()
        log_alpha = new_target - self.log_target + log_rev - log_fwd
        log_alpha = torch.where(possible & (new_target > -math.inf), log_alpha,
                                torch.full_like(log_alpha, -math.inf))
        if torch.isnan(log_alpha).any():
            raise FloatingPointError("NaN in the MH acceptance ratio: the LM or a reward returned NaN")
        accept = torch.rand(C, dtype=torch.float64, generator=g).log() < log_alpha

        counts_p = torch.bincount(move, minlength=len(MOVES))
        counts_a = torch.bincount(move[accept], minlength=len(MOVES))
        if warm:
            self._proposed_warm += counts_p
            self._accepted_warm += counts_a
        else:
            self._proposed += counts_p
            self._accepted += counts_a

        a = accept
        merged = Scores(
            torch.where(a, scores.log_prior.double(), self.scores.log_prior),
            torch.where(a, scores.log_likelihood.double(), self.scores.log_likelihood),
            {},
            {k_: torch.where(a, scores.rewards[k_], v) for k_, v in self.scores.rewards.items()},
            {k_: torch.where(a, scores.constraints[k_], v) for k_, v in self.scores.constraints.items()},
        )
        self._set_state({**self.values, self.edited: torch.where(a[:, None], prop, x)}, merged)
        if self.others:
            self._update_others(warm)
        return move, accept


def sequence_ess(samples: torch.Tensor, num_chains: int) -> float:
    """Effective sample size of the empirical law over whole sequences, from between-chain spread.

    Chains are independent, so the spread of each sequence's frequency across chains estimates
    the Monte Carlo variance of its pooled frequency, ``var_s``, whatever the autocorrelation.
    The result is the ``n`` whose i.i.d. errors match in total: ``(Σ_s sqrt(p_s(1-p_s)) / Σ_s
    sqrt(var_s))²``, the ``n`` at which the expected total-variation error of ``n`` independent
    draws equals this run's. It needs tens of chains to be precise (the variance of each
    frequency is estimated from ``num_chains`` chain means); ``nan`` with a single chain.
    """
    C = num_chains
    N = len(samples)
    if C < 2:
        return float("nan")
    S = N // C
    _, inv = torch.unique(samples, dim=0, return_inverse=True)
    U = int(inv.max()) + 1
    counts = torch.zeros(C, U, dtype=torch.float64)
    counts.index_put_((torch.arange(N) // S, inv), torch.ones(N, dtype=torch.float64), accumulate=True)
    freq = counts / S
    p = freq.mean(0)
    sd = (freq.var(0, unbiased=True) / C).sqrt()
    iid = (p * (1 - p)).sqrt()
    if float(sd.sum()) == 0.0:
        return float(N)
    return float((iid.sum() / sd.sum()) ** 2)


@describe(kind=Kind.MCMC, info=MHInfo)
def run(model, *args, seed: int = 0, model_kwargs: dict | None = None, num_samples: PositiveInt = 500,
        num_chains: PositiveInt = 4, warmup_steps: NonNegativeInt = 200, thin: PositiveInt = 1, moves: Mapping[str, float] | None = None, progress: bool = True,
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
        moves: move name -> probability, from :data:`MOVES` (default :data:`DEFAULT_MOVES`).
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
    for name, val, lo in (("num_samples", num_samples, 1), ("num_chains", num_chains, 1),
                          ("warmup_steps", warmup_steps, 0), ("thin", thin, 1)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if init_budget is not None and (isinstance(init_budget, bool) or not isinstance(init_budget, int) or init_budget < 1):
        raise ValueError(f"init_budget must be a positive integer, got {init_budget!r}")
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
    hist = kernel.history

    def stack(get) -> torch.Tensor:
        return chain_major(torch.stack([get(h) for h in hist])[None])

    values = {k: stack(lambda h, k=k: h["values"][k]) for k in hist[0]["values"]}
    if kernel.site is not None:
        values[kernel.site] = samples
    values = {k: values[k] for k in kernel.order}  # program order
    scores = Scores(
        stack(lambda h: h["log_prior"]), stack(lambda h: h["log_likelihood"]), values,
        {k: stack(lambda h, k=k: h["rewards"][k]) for k in hist[0]["rewards"]},
        {k: stack(lambda h, k=k: h["constraints"][k]) for k in hist[0]["constraints"]},
    )
    main_lm = kernel.seq[kernel.site].lm if kernel.site is not None else None  # kernel.lm: the site edited last
    stats = stats_from_scores(scores, kernel.site, None if main_lm is None else main_lm.eos_id, kernel.seq)
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
        acceptance_overall=(float(kernel._accepted.sum()) / int(kernel._proposed.sum())  # nan: no edit proposed
                            if int(kernel._proposed.sum()) else float("nan")),
        rhat_by_stat=rhat, ess_by_stat=ess_by_stat,
        ess_sequences=sequence_ess(samples, C) if samples is not None else float("nan"),
        ess_sequences_by_site={k: sequence_ess(values[k], C) for k in kernel.seq},
        num_chains=C, num_samples=S, warmup_steps=int(warmup_steps), thin=int(thin),
        moves={m: float(kernel.move_probs[i]) for m, i in _IDX.items()},
        random_walk_scale=dict(kernel.rw_scale),
        random_walk_acceptance={k: a / n if n else float("nan") for k, (n, a) in kernel.rw_counts.items()},
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
