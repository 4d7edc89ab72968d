"""The edit moves of MH: one function each, registered in :data:`MOVES`.

A move is a function of an :class:`EditBatch` (the current states of every chain and what one
LM pass read from them) that returns ``(proposal [C, T], log_fwd [C], log_rev [C])``: a proposed
state for every chain, the log-probability of proposing it, and the log-probability of the
reverse move proposing the current state from it. The kernel draws one move per chain, evaluates
each drawn move on the whole batch (most moves are a few tensor operations on what the kernel's
LM pass read; ``masked_suffix`` runs its own pass), keeps each chain's own row and accepts it with
one Metropolis–Hastings step on
``log target' - log target + log_rev - log_fwd``.

A move that has nothing to act on (delete from an empty sequence, insert into a full one)
proposes the current state with ``log_rev = -inf``: the accept step rejects it, which leaves the
target invariant. Every move maps canonical sequences (content, then EOS padding) to canonical
sequences.

``masked_suffix`` respects token masks (``ppl_lm.token_constraint``): choose ``k`` uniformly in
``{0, ..., min(n, T-1)}`` and redraw positions ``k..T-1`` from ``q(y_t | y_<t) = π(y_t | y_<t) · 1[y_t ∈ A_t] / Z_t``, where ``A_t`` is the
set every mask allows after ``y_<t`` (only completing tokens at the last position) and
``Z_t = π(A_t | y_<t)``. The reverse redraws ``x[k:]`` from ``x[:k] = y[:k]`` under the same
masks, so forward ``1/K(x) · Π_t q(y_t | y_<t)`` and reverse ``1/K(y) · Π_t q(x_t | x_<t)`` are
both exact and the Hastings ratio reduces to ``K(x)/K(y) · Π Z_t(x) / Π Z_t(y)``. A proposal
that reaches a prefix with no allowed token (or a reverse through a token the masks forbid) is
rejected. With no mask on the site it is the plain suffix move.

Adding a move is one function and one row of :data:`MOVES`; the row says where the move edits
(:class:`Move`: a content position, a gap between tokens, or a suffix start), since the kernel
draws that position before its LM pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ppl_lm import seeding as _random
from ppl_lm.lm.base import start_rows
from ppl_lm.tokens import categorical

__all__ = ["DEFAULT_MOVES", "MOVES", "EditBatch", "Move", "check_moves", "content_length", "delete_move",
           "draw_positions", "insert_move", "log_q_token", "masked_log_q", "masked_suffix_move", "substitute_move",
           "substitute_uniform_move", "suffix_move"]


@dataclass(frozen=True)
class EditBatch:
    """What the moves read for one transition of ``C`` chains on the edited sequence site.

    Attributes:
        x: current states ``[C, T]`` (canonical: content, then EOS padding).
        n: content lengths ``[C]``.
        eos: the site's EOS id.
        vocab_size: the site's vocabulary size.
        log_move_probs: log-probability of each move (name -> 0-dim tensor), for moves that
            are each other's reverse.
        pos: the edited position ``[C]`` (a content position or a gap; -1 for suffix moves).
        k: the suffix start ``[C]`` (``T`` for chains not moving by suffix).
        lq: the LM's next-token law given ``x[:pos]``, restricted to non-EOS, ``[C, V]`` log-probs
            (rows all ``-inf`` where no non-EOS token is possible).
        z: a token drawn from ``lq`` ``[C]``.
        z_uniform: a token drawn uniformly from the non-EOS vocabulary ``[C]``.
        tok_lp_x: the LM's log-probability of each token of ``x`` ``[C, T]`` (0 after EOS).
        y: ``x[:k]`` followed by a suffix drawn from the LM ``[C, T]`` (``x`` for other chains).
        y_lp: the LM's log-probability of each drawn token of ``y`` ``[C, T]`` (0 elsewhere).
        generator: the random stream, for a move that draws more than the above.
        site: the edited site (its LM and each chain's prompt rows), for a move that runs the LM.
        masks: the token masks (``ppl_lm.token_constraint``) on the edited site.
    """

    x: torch.Tensor
    n: torch.Tensor
    eos: int
    vocab_size: int
    log_move_probs: dict
    pos: torch.Tensor
    k: torch.Tensor
    lq: torch.Tensor
    z: torch.Tensor
    z_uniform: torch.Tensor
    tok_lp_x: torch.Tensor
    y: torch.Tensor
    y_lp: torch.Tensor
    generator: torch.Generator | None = None
    site: Any = None
    masks: tuple = ()

    @property
    def T(self) -> int:
        return self.x.shape[-1]


Proposal = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def log_q_token(logp: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The LM's next-token law restricted to non-EOS tokens, as log-probabilities ``[B, V]``.

    Rows where every non-EOS token has probability zero come back all ``-inf`` (no move).

    >>> import torch
    >>> log_q_token(torch.log(torch.tensor([[0.5, 0.25, 0.25]])), eos_id=0).exp()
    tensor([[0.0000, 0.5000, 0.5000]], dtype=torch.float64)
    """
    masked = logp.double().clone()
    masked[:, eos_id] = -math.inf
    z = torch.logsumexp(masked, -1, keepdim=True)
    return torch.where(torch.isfinite(z), masked - z, torch.full_like(masked, -math.inf))


def content_length(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number of tokens before the first EOS (``T`` when there is none).

    >>> import torch
    >>> content_length(torch.tensor([[3, 1, 0, 0], [2, 2, 2, 2]]), eos_id=0).tolist()
    [2, 4]
    """
    return torch.cumprod((x != eos_id).long(), -1).sum(-1)


def _unless_impossible(b: EditBatch, ok: torch.Tensor, proposal: torch.Tensor, log_fwd: torch.Tensor,
                       log_rev: torch.Tensor) -> Proposal:
    """Where ``ok`` fails the move has nothing to act on: the current state, reverse impossible."""
    return (torch.where(ok[:, None], proposal, b.x), torch.where(ok, log_fwd, torch.zeros_like(log_fwd)),
            torch.where(ok, log_rev, torch.full_like(log_rev, -math.inf)))


def _rows(b: EditBatch) -> torch.Tensor:
    return torch.arange(len(b.x))


def suffix_move(b: EditBatch) -> Proposal:
    """Regenerate positions ``k..T-1`` from the LM given ``x[:k]``, ``k`` uniform in
    ``{0, ..., min(n, T-1)}``.

    Forward ``1/K(x) · π(x'[k:] | x[:k])``, reverse ``1/K(x') · π(x[k:] | x[:k])`` with
    ``K(x) = min(n+1, T)``; ``k`` is a valid choice at ``x'`` because ``x'[:k] = x[:k]`` holds
    no EOS.
    """
    K = torch.clamp(b.n + 1, max=b.T)
    after_k = torch.arange(b.T)[None, :] >= b.k[:, None]
    K_y = torch.clamp(content_length(b.y, b.eos) + 1, max=b.T)
    log_fwd = -K.double().log() + (b.y_lp * after_k).sum(-1)
    log_rev = -K_y.double().log() + (b.tok_lp_x * after_k).sum(-1)
    return b.y, log_fwd, log_rev


def _substituted(b: EditBatch, tokens: torch.Tensor) -> torch.Tensor:
    out = b.x.clone()
    out[_rows(b), b.pos.clamp(min=0)] = tokens
    return out


def substitute_move(b: EditBatch) -> Proposal:
    """Redraw the token at a uniform content position ``i`` from the LM's next-token law given
    ``x[:i]``, restricted to non-EOS tokens. The length is unchanged, so the ``1/n`` choice of
    position cancels and the reverse is the same position with the old token."""
    old = b.x[_rows(b), b.pos.clamp(min=0)]
    ok = (b.n >= 1) & torch.isfinite(b.lq).any(-1)
    return _unless_impossible(b, ok, _substituted(b, b.z), b.lq[_rows(b), b.z], b.lq[_rows(b), old])


def substitute_uniform_move(b: EditBatch) -> Proposal:
    """As :func:`substitute` with the new token uniform over the non-EOS vocabulary (symmetric)."""
    zero = torch.zeros(len(b.x), dtype=torch.float64)
    return _unless_impossible(b, b.n >= 1, _substituted(b, b.z_uniform), zero, zero)


def insert_move(b: EditBatch) -> Proposal:
    """Insert a token ``z`` from the LM given ``x[:i]`` (non-EOS) at a uniform gap ``i`` in
    ``{0, ..., n}`` (``n < T``), shifting ``x[i:]`` right (at ``n = T-1`` the last EOS falls off).

    The reverse is :func:`delete_move` at ``j = i``: forward ``p_ins/(n+1) · q(z | x[:i])``,
    reverse ``p_del/(n+1)``.
    """
    idx = torch.arange(b.T)
    src = torch.where(idx[None, :] < b.pos[:, None], idx[None, :], idx[None, :] - 1).clamp(min=0)
    ins = b.x.gather(1, src)
    ins[_rows(b), b.pos.clamp(min=0)] = b.z
    log_fwd = b.log_move_probs["insert"] - (b.n + 1).double().log() + b.lq[_rows(b), b.z]
    log_rev = b.log_move_probs["delete"] - (b.n + 1).double().log()
    ok = (b.n < b.T) & torch.isfinite(b.lq).any(-1)
    return _unless_impossible(b, ok, ins, log_fwd, log_rev)


def delete_move(b: EditBatch) -> Proposal:
    """Delete the token at a uniform content position ``j`` in ``{0, ..., n-1}`` (``n >= 1``),
    shifting the rest left and padding with EOS; the reverse of :func:`insert_move`.

    >>> import torch
    >>> x = torch.tensor([[3, 1, 2, 0]])
    >>> b = EditBatch(x, content_length(x, 0), 0, 5, {"insert": torch.tensor(0.5).log(),
    ...               "delete": torch.tensor(0.5).log()}, torch.tensor([1]), torch.tensor([4]),
    ...               torch.zeros(1, 5), torch.tensor([1]), torch.tensor([1]), None, None, None)
    >>> proposal, log_fwd, log_rev = delete_move(b)
    >>> proposal.tolist(), round(float(log_fwd.exp()), 4)  # p_del / n = 0.5 / 3
    ([[3, 2, 0, 0]], 0.1667)
    """
    idx = torch.arange(b.T)
    src = torch.where(idx[None, :] < b.pos[:, None], idx[None, :], idx[None, :] + 1)
    dele = b.x.gather(1, src.clamp(max=b.T - 1))
    dele = torch.where(src >= b.T, torch.full_like(dele, b.eos), dele)
    n_d = b.n.clamp(min=1).double()
    old = b.x[_rows(b), b.pos.clamp(min=0)]
    log_fwd = b.log_move_probs["delete"] - n_d.log()
    log_rev = b.log_move_probs["insert"] - n_d.log() + b.lq[_rows(b), old]
    return _unless_impossible(b, b.n >= 1, dele, log_fwd, log_rev)


def masked_log_q(logp: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The next-token law ``logp`` ``[B, V]`` restricted to ``allowed`` and renormalised
    (rows with no allowed mass all ``-inf``).

    >>> import torch
    >>> masked_log_q(torch.log(torch.tensor([[0.5, 0.25, 0.25]])), torch.tensor([[True, False, True]])).exp()
    tensor([[0.6667, 0.0000, 0.3333]], dtype=torch.float64)
    """
    masked = logp.double().masked_fill(~allowed, -math.inf)
    z = torch.logsumexp(masked, -1, keepdim=True)
    return torch.where(torch.isfinite(z), masked - z, torch.full_like(masked, -math.inf))


def masked_suffix_move(b) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``masked_suffix`` move on an :class:`~ppl_lm.inference.mh.moves.EditBatch` (see the module)."""
    y, lq_y, lq_x = _masked_pass(b)
    idx = torch.arange(b.T)[None, :]
    after_k = idx >= b.k[:, None]
    x_part = after_k & (idx <= content_length(b.x, b.eos)[:, None])  # x[k:] through its EOS
    y_part = after_k & (idx <= content_length(y, b.eos)[:, None])
    K = torch.clamp(b.n + 1, max=b.T)
    K_y = torch.clamp(content_length(y, b.eos) + 1, max=b.T)
    log_fwd = -K.double().log() + torch.where(y_part, lq_y, 0.0).sum(-1)
    log_rev = -K_y.double().log() + torch.where(x_part, lq_x, 0.0).sum(-1)
    ok = torch.isfinite(log_fwd)  # a prefix with no allowed token: nothing proposed
    return (torch.where(ok[:, None], y, b.x), torch.where(ok, log_fwd, torch.zeros_like(log_fwd)),
            torch.where(ok, log_rev, torch.full_like(log_rev, -math.inf)))


@torch.no_grad()
def _masked_pass(b):
    """One incremental LM pass over ``2C`` rows: ``x`` teacher-forced and ``y`` = ``x[:k]`` then
    masked draws. Returns ``(y [C, T], log q(y_t) [C, T], log q(x_t) [C, T])`` under the masks."""
    site, x, k = b.site, b.x, b.k
    lm, (C, T), eos = site.lm, x.shape, b.eos
    dev = lm.device
    gen = _random.generator(dev)
    prompt, lengths = site.prompt, site.prompt_lengths
    if prompt.dim() > 1:
        prompt = torch.cat([prompt, prompt])
    if lengths is not None:
        lengths = torch.cat([lengths, lengths])
    state = start_rows(lm, prompt.to(dev), 2 * C, lengths)
    states = [m.start(2 * C) for m in b.masks]
    xd, kd = x.to(dev), k.to(dev)
    ys = xd.clone()
    lq_x = torch.zeros(C, T, dtype=torch.float64)
    lq_y = torch.zeros(C, T, dtype=torch.float64)
    done = torch.zeros(C, dtype=torch.bool, device=dev)
    for t in range(T):
        logp = state.logprobs.float()
        allowed = torch.ones_like(logp, dtype=torch.bool)
        for s in states:
            allowed = allowed & s.allowed(t + 1 == T).to(dev)
        lq = masked_log_q(logp, allowed)
        lq_x[:, t] = lq[:C].gather(-1, xd[:, t : t + 1])[:, 0].cpu()
        ly = lq[C:]
        stuck = ~torch.isfinite(ly).any(-1)
        s_tok = categorical(torch.where(stuck[:, None], torch.zeros_like(ly), ly).float(), gen)
        tok = torch.where(t < kd, xd[:, t], torch.where(done, torch.full_like(s_tok, eos), s_tok))
        lp_tok = ly.gather(-1, tok[:, None])[:, 0]
        lq_y[:, t] = torch.where(t < kd, torch.zeros_like(lp_tok), lp_tok).cpu()
        ys[:, t] = tok
        done = done | (tok == eos)
        both = torch.cat([xd[:, t], tok])
        for s in states:
            s.advance(both.cpu())
        if t + 1 < T:
            state = lm.extend(state, both)
    return ys.cpu(), lq_y, lq_x


class Move(NamedTuple):
    """A row of :data:`MOVES`: the move's function and where it edits (drawn before the LM pass)."""

    propose: Callable[[EditBatch], Proposal]
    #: "token": a content position; "gap": one of n+1 gaps; "suffix": a suffix start k, and the
    #: kernel's LM pass regenerates x[k:] (``EditBatch.y``); "start": a suffix start k, and the
    #: move regenerates the suffix itself.
    edits: str = "token"


#: name -> move, in the order of the move indices the sampler records (``stats["move"]``).
MOVES: dict[str, Move] = {
    "suffix": Move(suffix_move, "suffix"),
    "substitute": Move(substitute_move),
    "substitute_uniform": Move(substitute_uniform_move),
    "insert": Move(insert_move, "gap"),
    "delete": Move(delete_move),
    "masked_suffix": Move(masked_suffix_move, "start"),
}
DEFAULT_MOVES = {"suffix": 0.4, "substitute": 0.25, "substitute_uniform": 0.05, "insert": 0.15, "delete": 0.15}


def check_moves(moves: Mapping[str, float] | None) -> torch.Tensor:
    """Move probabilities ``[len(MOVES)]`` (normalised) from a dict move -> probability.

    >>> check_moves({"suffix": 3.0, "delete": 1.0}).tolist()
    [0.75, 0.0, 0.0, 0.0, 0.25, 0.0]
    """
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


def draw_positions(move: torch.Tensor, u: torch.Tensor, n: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each chain's move edits, uniform over its choices from the uniforms ``u`` ``[C]``.

    Returns ``(pos, k)``: the edited position (``-1`` for suffix moves; a content position in
    ``{0..n-1}`` or a gap in ``{0..n}``) and the suffix start in ``{0..min(n, T-1)}`` (``T`` for
    other moves).
    """
    edits = [row.edits for row in MOVES.values()]
    is_suffix = _index_in(move, [i for i, e in enumerate(edits) if e in ("suffix", "start")])
    is_gap = _index_in(move, [i for i, e in enumerate(edits) if e == "gap"])
    K = torch.clamp(n + 1, max=T)
    k = torch.where(is_suffix, (u * K).floor().long().clamp(max=K - 1), torch.full_like(n, T))
    n_pos = torch.where(is_gap, n + 1, n)  # choices of position for the edit moves
    pos = torch.where(is_suffix, torch.full_like(n, -1), (u * n_pos).floor().long().clamp(min=0, max=T - 1))
    return torch.minimum(pos, (n_pos - 1).clamp(min=0)), k


def _index_in(move: torch.Tensor, indices: list[int]) -> torch.Tensor:
    return torch.isin(move, torch.tensor(indices, dtype=move.dtype))
