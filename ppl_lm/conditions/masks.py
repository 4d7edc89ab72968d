"""Token masks: token-level, prefix-closed conditions that SMC uses as a locally constrained proposal.

A :class:`TokenMask` says which next tokens keep a prefix admissible. It is *stateful*: SMC asks it
for a :class:`MaskState` holding one state per particle (``start``), reads the allowed next tokens
of every row (``allowed``), appends the sampled tokens (``advance``) and moves rows when particles
are resampled (``reorder``). Every other backend checks finished sequences with the same object
(``check``), so the condition is one definition. A static mask (a fixed set of allowed tokens,
EOS always allowed) is the simplest case: its state holds nothing per row.
"""

from __future__ import annotations

import torch

__all__ = ["MaskState", "TokenMask"]


class MaskState:
    """The mask's state along ``B`` sequences generated token by token (one row per particle).

    Subclasses implement the three methods; rows of finished sequences (after EOS) may report any
    mask, SMC does not read them.
    """

    def allowed(self, last: bool = False) -> torch.Tensor:
        """Bool ``[B, V]``: the next tokens that keep each row admissible.

        Args:
            last: the next token is the last one (``max_new_tokens`` reached after it), so only
                tokens after which the text is complete are admissible. A state may still allow
                more (then the finished sequence fails ``check`` and its particle dies: exact,
                only less efficient).
        """
        raise NotImplementedError

    def advance(self, tokens: torch.Tensor) -> None:
        """Append one token per row (``tokens``: ``[B]``); EOS finishes a row."""
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes row ``index[i]`` (resampling; an index may repeat)."""
        raise NotImplementedError


class _StaticState(MaskState):
    def __init__(self, allowed_tokens: torch.Tensor, batch_size: int):
        self._allowed = allowed_tokens
        self._rows = batch_size

    def allowed(self, last: bool = False) -> torch.Tensor:
        return self._allowed.expand(self._rows, -1)

    def advance(self, tokens: torch.Tensor) -> None:
        pass

    def reorder(self, index: torch.Tensor) -> None:
        self._rows = len(index)


class _PrefixState(MaskState):
    """State of a mask given as a function of the prefix (a subclass overriding ``allowed(prefix)``)."""

    def __init__(self, mask: TokenMask, batch_size: int):
        self._mask = mask
        self._prefix = torch.zeros(batch_size, 0, dtype=torch.long)

    def allowed(self, last: bool = False) -> torch.Tensor:
        return self._mask.allowed(self._prefix)

    def advance(self, tokens: torch.Tensor) -> None:
        self._prefix = torch.cat([self._prefix, tokens.cpu()[:, None]], -1)

    def reorder(self, index: torch.Tensor) -> None:
        self._prefix = self._prefix[index.cpu()]


class TokenMask:
    """Which next tokens keep a prefix admissible: a token-level, prefix-closed condition.

    Three kinds, one protocol (:meth:`start` gives the per-row :class:`MaskState`):

    - static: ``allowed_tokens`` (bool ``[V]``) is the same after every prefix (EOS should be
      among them), e.g. :func:`ppl_lm.rewards.forbid_chars`;
    - a function of the prefix: a subclass overrides ``allowed(prefix)`` -> bool ``[B, V]``;
    - stateful: a subclass overrides :meth:`start` and :meth:`check` (the grammar masks of
      :mod:`.grammar`, whose parser state travels with each particle).

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)  # tokens "", "a", "b"
    >>> mask = ppl_lm.rewards.forbid_chars(lm, "b")
    >>> mask.check(torch.tensor([[1, 1, 0], [1, 2, 0]])).tolist()
    [True, False]
    """

    def __init__(self, lm, allowed_tokens: torch.Tensor | None = None):
        self.lm = lm
        if allowed_tokens is not None:
            allowed_tokens = torch.as_tensor(allowed_tokens, dtype=torch.bool)
            if allowed_tokens.shape != (lm.vocab_size,):
                raise ValueError(f"allowed_tokens must be a bool tensor [{lm.vocab_size}] (one entry per token), "
                                 f"got shape {tuple(allowed_tokens.shape)}")
        self._static = allowed_tokens

    def start(self, batch_size: int) -> MaskState:
        """The state of ``batch_size`` empty sequences."""
        if self._static is not None:
            return _StaticState(self._static, batch_size)
        return _PrefixState(self, batch_size)

    def allowed(self, prefix: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, V]``: the allowed next tokens after each prefix ``[B, t]``."""
        if self._static is None:
            raise NotImplementedError("a TokenMask without allowed_tokens must override allowed(prefix) or start()")
        return self._static.to(prefix.device).expand(prefix.shape[0], -1)

    def check(self, x: torch.Tensor, complete: bool = True) -> torch.Tensor:
        """``ok`` ``[...]`` for sequences ``[..., T]``: every generated token allowed.

        Args:
            complete: ``x`` is finished (ends at EOS or at ``max_new_tokens``); ``False`` for a
                prefix that may still grow. A static mask needs nothing at the end.
        """
        if self._static is not None:
            return self._static.to(x.device)[x].all(-1)
        flat = x.reshape(-1, x.shape[-1])
        ok = torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
        for t in range(flat.shape[-1]):
            ok &= self.allowed(flat[:, :t]).to(x.device).gather(-1, flat[:, t : t + 1])[:, 0]
        return ok.reshape(x.shape[:-1])
