"""Token-tensor helpers shared by the LMs, the sequence distribution and the backends.

Sequences are tensors of new tokens ``[B, T]``; a sequence ends at the first EOS (included) or
at ``T``. Positions after the first EOS hold EOS again (canonical padding).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .lm.base import LanguageModel

__all__ = ["CATEGORICAL_BLOCK", "categorical", "masked_categorical", "as_prompt_tensor", "after_eos_mask", "lengths",
           "support_size"]


#: Vocabularies of more than ``16 * CATEGORICAL_BLOCK`` tokens are sampled by two-level inversion,
#: in blocks of this many tokens.
CATEGORICAL_BLOCK = 256

#: A row whose allowed mass, summed as given, is under this (float32 ``exp`` flushes denormals, so part
#: of it may be lost) or overflows is redone, shifted by its largest allowed token.
_TINY = 1e-20


def categorical(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exact categorical sampling from log-probabilities (rows summing to 1, or shifted by a
    constant per row): CDF inversion.

    The CDF is accumulated in float64, so each token is drawn with its probability to about
    1e-15; a token of probability 0 is never drawn. One uniform per row (not one exponential
    per vocabulary entry, as the exponential race needs) makes this 5-10x cheaper on CPU, and
    it needs no host synchronisation, so it is the same code on CPU and GPU. See
    :func:`masked_categorical` for how a large vocabulary is searched.
    """
    return masked_categorical(logprobs, None, generator)[0]


def masked_categorical(logprobs: torch.Tensor, allowed: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw from ``logprobs [..., V]`` restricted to the ``allowed`` tokens (a bool mask that
    broadcasts to it; ``None``: every token) and renormalised, and the log of the allowed mass
    (float64, ``[...]``; rows need not be normalised: log Σ exp over the allowed tokens). A row with
    no allowed mass gets ``-inf`` and a token drawn uniformly from the whole vocabulary (its
    particle dies; the draw keeps the random stream aligned).

    Inversion of the float64 CDF with one float64 uniform u per row: the token is the first
    whose cumulative mass reaches (1 − u)·total. Over more than ``16 * CATEGORICAL_BLOCK`` tokens
    the CDF is searched in two levels (the float64 masses of blocks of ``CATEGORICAL_BLOCK``
    tokens, then the cumulative sum inside the one block the target falls in), which draws the
    same law without a float64 copy and a sequential cumulative sum of the whole ``[rows, V]``
    table: on SmolLM2's 49k vocabulary 3-10x cheaper than one full cumulative sum (more at
    hundreds of rows, where each ``[rows, V]`` temporary costs page faults). The two searches
    round differently from one full cumulative sum only within ~1e-16 of a boundary between tokens.
    """
    lp = logprobs.detach().float()
    # exp of the rows as given: normalised log-probs cannot overflow, so the per-token path has no
    # extra reduction. A row that overflows (an unnormalised twist's logp + log ψ) or keeps under
    # TINY is redone below, shifted by its largest allowed token; the shift is added back to the log-mass.
    p = lp.exp()
    if allowed is not None:
        allowed = allowed.to(p.device)
        if allowed.dim() > 1 and allowed.stride(0) == 0:  # one row expanded (a static mask): negate it once
            allowed = allowed[:1]
        p = p.masked_fill_(~allowed, 0.0)
    shape, V = p.shape[:-1], p.shape[-1]
    p = p.reshape(-1, V)
    m = torch.zeros(p.shape[0], device=p.device)  # the shift of each row (0 unless redone)
    u = torch.rand((p.shape[0], 1), dtype=torch.float64, device=p.device, generator=generator)
    sums = _block_sums(p) if V > 16 * CATEGORICAL_BLOCK else None
    total = (p.sum(-1, dtype=torch.float64) if sums is None else sums.sum(-1))[:, None]
    low = ~((total[:, 0] > _TINY) & (total[:, 0] < math.inf))  # little, none, NaN or overflow: one host sync
    stuck = low
    if bool(low.any()):
        rows = low.nonzero()[:, 0]
        sub = lp.reshape(-1, V)[rows]
        if allowed is not None:
            sub = sub.masked_fill_(~torch.broadcast_to(allowed, lp.shape).reshape(-1, V)[rows], -math.inf)
        m[rows] = sub.amax(-1).nan_to_num(0.0, 0.0, 0.0)
        p[rows] = (sub - m[rows, None]).exp_()
        total[rows] = p[rows].sum(-1, dtype=torch.float64)[:, None]
        stuck = ~(total[:, 0] > 0)  # no allowed mass (or NaN): uniform over the vocabulary
        p = torch.where(stuck[:, None], torch.ones_like(p), p)
        sums = None if sums is None else _block_sums(p)
    if sums is None:
        cdf = torch.cumsum(p, -1, dtype=torch.float64)
        target = (1.0 - u) * cdf[:, -1:]  # in (0, total]: the first index whose CDF reaches it has mass > 0
        tok = torch.searchsorted(cdf, target)[:, 0].clamp_max(V - 1)
    else:
        tok = _two_level(p, sums, u)
    log_mass = torch.where(stuck, -math.inf, total[:, 0].log() + m.double())
    return tok.view(shape), log_mass.view(shape)


def _block_sums(p: torch.Tensor) -> torch.Tensor:
    """float64 masses ``[R, n]`` of the blocks of ``CATEGORICAL_BLOCK`` tokens of ``p [R, V]``
    (the last block zero-padded)."""
    K = CATEGORICAL_BLOCK
    R, V = p.shape
    n = -(-V // K)
    if p.device.type == "cpu" and V == n * K:  # numpy casts in small buffers: no [R, V] float64 copy
        return torch.from_numpy(np.add.reduce(p.numpy().reshape(R, n, K), axis=-1, dtype=np.float64))
    if V != n * K:
        p = torch.nn.functional.pad(p, (0, n * K - V))
    return p.reshape(R, n, K).sum(-1, dtype=torch.float64)


def _two_level(p: torch.Tensor, sums: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """CDF inversion of ``p [R, V]`` at (1 − u)·total: first over the cumulative block masses
    ``sums [R, n]``, then inside the block found (tokens from that block's own cumulative sum)."""
    K = CATEGORICAL_BLOCK
    R, V = p.shape
    cb = sums.cumsum(-1)
    target = (1.0 - u) * cb[:, -1:]
    # The first block whose cumulative mass reaches the target; it has mass > 0.
    j = torch.searchsorted(cb, target).clamp_max(cb.shape[-1] - 1)  # [R, 1]
    before = torch.where(j > 0, cb.gather(-1, (j - 1).clamp_min(0)), torch.zeros_like(target))
    cols = j * K + torch.arange(K, device=p.device)  # [R, K] token ids of the block
    inner = p.gather(-1, cols.clamp_max(V - 1)).masked_fill_(cols >= V, 0.0)
    cdf = before + torch.cumsum(inner, -1, dtype=torch.float64)
    i = torch.searchsorted(cdf, target)
    # Rounding can leave the target just past the block's last cumulative value: the block's
    # last token of positive mass, never a zero-mass one after it.
    last = K - 1 - torch.argmax(torch.flip(inner > 0, [-1]).to(torch.uint8), -1, keepdim=True)
    return (j * K + torch.minimum(i, last))[:, 0]


def as_prompt_tensor(prompt: Any, lm: "LanguageModel") -> torch.Tensor:
    """Turn a prompt (text, list of ids, or LongTensor ``[P]`` / ``[B, P]``) into a LongTensor."""
    if isinstance(prompt, str):
        ids = lm.encode(prompt)
        return torch.tensor(ids, dtype=torch.long)
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"a prompt tensor must hold integer token ids, got dtype {prompt.dtype}")
        return prompt.long()
    if prompt is None:
        return torch.zeros(0, dtype=torch.long)
    bad = TypeError(f"a prompt must be text, a list of token ids or a LongTensor; got {prompt!r} "
                    f"({type(prompt).__name__}). Write lm.sequence('text') or lm.sequence([ids...])")
    if isinstance(prompt, (list, tuple)) and prompt and type(prompt[0]) is int:
        # the common case in one C call; anything but a flat list of ints falls through to the checks
        try:
            t = torch.tensor(prompt)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is not None and t.dtype == torch.int64 and t.dim() == 1:
            return t
    try:
        ids = list(prompt)
    except TypeError:
        raise bad from None
    if not all(isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0) for i in ids):
        raise bad
    return torch.tensor([int(i) for i in ids], dtype=torch.long)




def after_eos_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True at positions strictly after the first EOS of each row."""
    is_eos = (tokens == eos_id).long()
    seen = torch.cumsum(is_eos, -1) - is_eos  # EOS count strictly before each position
    return seen > 0


def lengths(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number of tokens up to and including the first EOS (or T when there is none)."""
    return (~after_eos_mask(tokens, eos_id)).sum(-1)


def support_size(vocab_size: int, max_new_tokens: int) -> int:
    """How many canonical sequences of at most ``max_new_tokens`` tokens a vocabulary has: every
    prefix of non-EOS tokens followed by EOS padding, and the full-length ones without EOS."""
    k = vocab_size - 1
    return sum(k**n for n in range(max_new_tokens)) + k**max_new_tokens
