"""Conditions as likelihood factors: soft rewards, hard constraints, pinned tokens.

Every condition is a ``pyro.factor``-style site (a ``Unit`` distribution, observed) whose
``infer["ppl_lm"]`` entry is a typed :class:`Factor` record of what backends and diagnostics need
(the raw reward r and β, or whether the condition holds; :func:`factor_of` reads it).

Conditions that need to know which ``lm.sequence`` site produced a tensor (a pin checks token ids
against that LM's vocabulary; SMC advances a token mask with that site's tokens) ask the
:class:`SequenceSites` messenger the runtime runs every model under.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

from .masks import TokenMask

__all__ = ["reward", "constraint", "pin", "token_constraint", "is_partial", "prefix_length", "partial_prefix",
           "trial_run", "Factor", "factor_of", "SequenceSites"]

# The number of generated tokens being scored while a backend (SMC) re-runs the model on a prefix;
# None while it scores finished sequences. A ContextVar: each thread and task sees its own.
_PREFIX: contextvars.ContextVar[int | None] = contextvars.ContextVar("ppl_lm_prefix_length", default=None)
_TRIAL: contextvars.ContextVar[bool] = contextvars.ContextVar("ppl_lm_trial_run", default=False)
_SITES: contextvars.ContextVar["SequenceSites | None"] = contextvars.ContextVar("ppl_lm_sequence_sites", default=None)


@dataclass(frozen=True)
class Factor:
    """What a condition site records beside its log-factor (its ``infer["ppl_lm"]``).

    Attributes:
        kind: ``"reward"`` (soft, r/β) or ``"constraint"`` (hard, 0 or -inf).
        r, beta: the raw reward per sequence and its temperature (rewards).
        ok: whether the condition holds per sequence (constraints).
        prefix_closed: a failing prefix fails every completion (SMC may prune on prefixes).
        mask: the :class:`TokenMask` of a ``token_constraint`` (SMC proposes from it).
        site: the name of the sequence site the mask constrains (``None`` when not known).
    """

    kind: Literal["reward", "constraint"]
    r: torch.Tensor | None = None
    beta: float | None = None
    ok: torch.Tensor | None = None
    prefix_closed: bool = False
    mask: TokenMask | None = None
    site: str | None = None


def factor_of(site: dict[str, Any]) -> Factor | None:
    """The :class:`Factor` record of a traced site, ``None`` for a site that is not a condition."""
    meta = (site.get("infer") or {}).get("ppl_lm")
    return meta if isinstance(meta, Factor) else None


class SequenceSites(Messenger):
    """While a model runs under it, records which ``lm.sequence`` site produced each value, so that a
    condition given ``x`` can find its site (and LM) without reading Pyro's handler stack. The
    runtime (:mod:`ppl_lm.inference._runtime`) runs every model under one; outside it, the
    conditions that would use it skip what needs it (a pin's vocabulary check)."""

    def __init__(self):
        super().__init__()
        self._by_id: dict[int, tuple[str, Any, torch.Tensor]] = {}
        self._tokens: list = []

    def __enter__(self):
        self._tokens.append(_SITES.set(self))
        return super().__enter__()

    def __exit__(self, *exc):
        _SITES.reset(self._tokens.pop())
        return super().__exit__(*exc)

    def _postprocess_message(self, msg):
        if msg["type"] != "sample":
            return
        from ..distribution import SequenceDistribution

        fn = msg["fn"]
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if isinstance(fn, SequenceDistribution):
            self._by_id[id(msg["value"])] = (msg["name"], fn, msg["value"])

    def site_of(self, x: torch.Tensor):
        entry = self._by_id.get(id(x))
        return None if entry is None or entry[2] is not x else entry[:2]


def is_partial() -> bool:
    """True while a backend (SMC) re-scores the model on prefixes, not finished sequences.

    Rewards may read it to give a prefix score (a twist); the final weight is exact anyway.
    """
    return _PREFIX.get() is not None


def prefix_length() -> int | None:
    """How many generated tokens of ``x`` are real while the model is scored on a prefix (the rest
    is EOS padding); ``None`` when it scores finished sequences.

    >>> import ppl_lm
    >>> ppl_lm.prefix_length() is None
    True
    """
    return _PREFIX.get()


@contextlib.contextmanager
def partial_prefix(n: int):
    """Score the model on prefixes of ``n`` generated tokens (used by SMC): ``is_partial()`` is True
    and ``prefix_length()`` is ``n`` inside the block."""
    token = _PREFIX.set(int(n))
    try:
        yield
    finally:
        _PREFIX.reset(token)


def _factor(name: str, log_factor: torch.Tensor, meta: Factor) -> None:
    unit = dist.Unit(log_factor)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True, "ppl_lm": meta})


def _as_tensor(name: str, r, what: str) -> torch.Tensor:
    if isinstance(r, (bool, int, float)):
        r = torch.tensor(r)
    if not isinstance(r, torch.Tensor):
        raise TypeError(f"{what} {name!r} must be a tensor (one value per sequence), got {type(r).__name__}")
    return r


def _non_finite_message(name: str, r: torch.Tensor) -> str:
    nan, pos, neg = int(r.isnan().sum()), int(r.isposinf().sum()), int(r.isneginf().sum())
    what = ", ".join(f"{k} {w}" for k, w in ((nan, "NaN"), (pos, "+inf"), (neg, "-inf")) if k)
    first = tuple(int(i) for i in (~torch.isfinite(r)).nonzero()[0]) if r.dim() else ()
    return (f"reward {name!r} is non-finite for {nan + pos + neg} of {r.numel()} sequences ({what}; first at "
            f"index {first if len(first) != 1 else first[0]}). Rewards must be finite numbers: fix the reward "
            "function (e.g. a mean over zero tokens is NaN), or use ppl_lm.constraint for a hard condition")


@contextlib.contextmanager
def trial_run():
    """Mark a run of the model that only discovers its sites (on placeholder sequences).

    Rewards skip their finiteness check there, so a bad reward is reported on the real batch,
    with the real count, rather than on the placeholder.
    """
    token = _TRIAL.set(True)
    try:
        yield
    finally:
        _TRIAL.reset(token)


def reward(name: str, r, beta: float = 1.0) -> None:
    """Soft condition: ``pyro.factor(name, r / beta)``; the target is π(x)·exp(r(x)/β).

    Args:
        name: site name (unique in the model).
        r: reward, a float tensor with one value per sequence (batch shape of the samples).
        beta: temperature > 0; small β conditions hard, large β barely at all.
    """
    r = _as_tensor(name, r, "reward")
    if isinstance(beta, torch.Tensor):
        beta = float(beta)
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"reward {name!r}: beta must be a finite number > 0, got {beta!r}")
    if r.dtype == torch.bool:
        r = r.float()
    if not r.dtype.is_floating_point:
        r = r.float()
    if not bool(torch.isfinite(r.detach()).all()):
        if not _TRIAL.get():
            raise ValueError(_non_finite_message(name, r.detach()))
        r = torch.zeros_like(r)  # a placeholder's reward is never used
    _factor(name, r / beta, Factor("reward", r=r.detach(), beta=float(beta)))


def constraint(name: str, ok, prefix_closed: bool = False) -> None:
    """Hard condition: factor 0 where ``ok`` holds, -inf elsewhere.

    Args:
        ok: boolean tensor, one value per sequence.
        prefix_closed: declare that a prefix failing ``ok`` fails for every completion (e.g.
            "never contains e"). SMC then prunes on prefixes; otherwise, on prefixes, the
            constraint is deferred to the finished sequence (``ok`` is still evaluated).
    """
    ok = _as_tensor(name, ok, "constraint")
    if ok.dtype != torch.bool:
        raise TypeError(f"constraint {name!r} needs a boolean tensor, got dtype {ok.dtype}")
    meta = Factor("constraint", ok=ok.detach(), prefix_closed=prefix_closed)
    if is_partial() and not prefix_closed:
        _factor(name, torch.zeros(ok.shape), meta)
        return
    lf = torch.zeros(ok.shape).masked_fill(~ok, -math.inf)
    _factor(name, lf, meta)


def pin(name: str, x: torch.Tensor, tokens: Mapping[int, int], lam: float | None = None) -> None:
    """Prompt as reward: r(x) = lam·Σ_{i∈S} δ(x_i, y_i); ``lam=None`` is the hard condition.

    ``tokens`` maps positions of ``x`` (0-based, within the sampled sequence) to token ids.
    As lam → ∞ the soft conditional tends to the hard one.
    """
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point:
        raise TypeError(f"pin {name!r}: x must be a LongTensor of tokens")
    if not tokens:
        raise ValueError(f"pin {name!r}: give at least one {{position: token}}")
    T = x.shape[-1]
    for pos in tokens:
        if not (0 <= int(pos) < T):
            raise ValueError(f"pin {name!r}: position {pos} is outside the sequence length {T}")
    vocab = _vocab_size_of(x)
    for p, tok in tokens.items():
        if int(tok) < 0 or (vocab is not None and int(tok) >= vocab):
            raise ValueError(
                f"pin {name!r}: token id {tok} at position {p} is outside the vocabulary"
                + (f" of the LM that sampled x (ids 0..{vocab - 1})" if vocab is not None else " (ids are >= 0)")
                + "; pin token ids from lm.encode(text)")
    pos = torch.tensor([int(p) for p in tokens], device=x.device)
    want = torch.tensor([int(t) for t in tokens.values()], device=x.device)
    hits = (x.index_select(-1, pos) == want)
    if lam is None:
        if is_partial():
            # On a prefix, only positions already generated can be checked: pruning is exact.
            n = _partial_length(x)
            hits = hits | (pos >= n)
        constraint(name, hits.all(-1), prefix_closed=True)
        return
    if not math.isfinite(lam):
        raise ValueError(f"pin {name!r}: lam must be finite or None (the hard limit), got {lam}")
    reward(name, hits.float().sum(-1) * float(lam), beta=1.0)


def _vocab_size_of(x: torch.Tensor) -> int | None:
    """The vocabulary size of the LM whose sequence site produced ``x`` in the trace being
    recorded (``None`` when ``x`` is not such a site's value, e.g. a slice or a hand-made tensor)."""
    site = _sequence_site_of(x)
    return None if site is None else site[1].lm.vocab_size


def _sequence_site_of(x: torch.Tensor):
    """``(name, SequenceDistribution)`` of the sequence site whose value is ``x`` in the model run
    under way (:class:`SequenceSites`), or ``None`` (``x`` is a slice, a hand-made tensor, or the
    model runs outside the runtime)."""
    sites = _SITES.get()
    return None if sites is None else sites.site_of(x)


def _partial_length(x: torch.Tensor) -> int:
    n = _PREFIX.get()
    return x.shape[-1] if n is None else n


def token_constraint(name: str, x: torch.Tensor, mask: TokenMask) -> None:
    """Hard token-level condition: every token of ``x`` is allowed by ``mask``.

    For a grammar mask (``rewards.regex_mask``, ``grammar_mask``, ``json_mask``): the decoded
    text of ``x``, up to EOS or ``max_new_tokens``, is a sentence of the language; on a prefix
    (SMC), that some continuation is.

    Equivalent to ``constraint(name, mask.check(x), prefix_closed=True)`` for every backend;
    SMC also reads the mask and samples only allowed tokens (a locally constrained proposal,
    with the exact weight correction).
    """
    if not isinstance(mask, TokenMask):
        raise TypeError(f"token_constraint {name!r} needs a TokenMask, got {type(mask).__name__}")
    if is_partial():
        # On a prefix only the generated positions are checked (the rest is EOS padding), so a
        # mask that forbids EOS somewhere (e.g. pinned positions) does not prune every prefix.
        n = _partial_length(x)
        ok = (mask.check(x[..., :n], complete=False) if n > 0
              else torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device))
    else:
        ok = mask.check(x)
    # The sequence site the mask constrains (None when x is not a site's value): SMC advances the
    # mask with that site's tokens.
    site = _sequence_site_of(x)
    meta = Factor("constraint", ok=ok.detach(), prefix_closed=True, mask=mask, site=None if site is None else site[0])
    lf = torch.zeros(ok.shape).masked_fill(~ok, -math.inf)
    _factor(name, lf, meta)
