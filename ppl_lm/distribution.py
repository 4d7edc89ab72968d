"""The LM as a Pyro distribution over token sequences."""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.distributions import TorchDistribution, constraints

from ppl_lm import seeding as _random
from .lm.base import LanguageModel
from .tokens import after_eos_mask, as_prompt_tensor

__all__ = ["SequenceDistribution"]


class SequenceDistribution(TorchDistribution):
    """π(x | prompt): continuations of ``prompt`` of at most ``max_new_tokens`` tokens.

    Event shape ``(T,)`` with ``T = max_new_tokens``; values are LongTensors whose positions
    after the first EOS hold EOS (canonical padding). ``log_prob`` is the exact sum of
    next-token log-probabilities up to and including EOS; a value with non-canonical padding
    has log-probability ``-inf``. ``sample`` is one batched, KV-cached ancestral sampling call
    for the whole batch shape (so ``pyro.plate`` vectorises particles).

    ``prompt`` may be text, a list of ids, a LongTensor ``[P]``, or a batch of prompts aligned
    with the batch (particle) dimension: a LongTensor ``[*batch_shape, P]`` taken token for token
    (as when a prompt is itself a sample, ``lm.sequence(x1[..., :k])``), or a list of N strings or
    N token-id lists (``lm.sequence([preambles[i] for i in w.tolist()])``). Ragged prompts are
    grouped by length, each group one batched LM call, so log-probs equal unbatched scoring.

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> d = lm.sequence([], max_new_tokens=2)
    >>> d.log_prob(torch.tensor([1, 0])).exp().item()
    0.1111111...
    """

    arg_constraints: dict = {}
    has_enumerate_support = False

    def __init__(self, lm: LanguageModel, prompt: Any = None, max_new_tokens: int = 16,
                 batch_shape=torch.Size(), validate_args=None):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.lm = lm
        self.prompt_lengths: torch.Tensor | None = None  # [N] for ragged prompts (right-padded)
        if _is_prompt_batch(prompt):
            rows = [as_prompt_tensor(p, lm) for p in prompt]
            lens = torch.tensor([len(r) for r in rows])
            P = int(lens.max()) if len(rows) else 0
            self.prompt = torch.full((len(rows), P), lm.eos_id, dtype=torch.long)
            for i, r in enumerate(rows):
                self.prompt[i, : len(r)] = r
            if len(rows) and bool((lens != P).any()):
                self.prompt_lengths = lens
        else:
            self.prompt = as_prompt_tensor(prompt, lm)
        self.max_new_tokens = max_new_tokens
        lm.check_context(self.prompt.shape[-1], max_new_tokens)
        if self.prompt.numel() and (self.prompt.min() < 0 or self.prompt.max() >= lm.vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {lm.vocab_size})")
        batch_shape = torch.Size(batch_shape)
        if self.prompt.dim() > 1:
            batch_shape = torch.broadcast_shapes(batch_shape, self.prompt.shape[:-1])
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(batch_shape, torch.Size([max_new_tokens]), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.lm.vocab_size - 1), 1)

    def expand(self, batch_shape, _instance=None):
        new = SequenceDistribution(self.lm, self.prompt, self.max_new_tokens, batch_shape,
                                   validate_args=False)
        new.prompt_lengths = self.prompt_lengths
        new._validate_args = self._validate_args
        return new

    def with_lm(self, lm: LanguageModel) -> SequenceDistribution:
        """The same prompts (ragged ones included), length and batch shape under another LM over
        the same vocabulary (a guide's)."""
        if lm.vocab_size != self.lm.vocab_size:
            raise ValueError(f"the other LM has a vocabulary of {lm.vocab_size}, this site's LM {self.lm.vocab_size}")
        new = SequenceDistribution(lm, self.prompt, self.max_new_tokens, self.batch_shape, validate_args=False)
        new.prompt_lengths = self.prompt_lengths
        new._validate_args = self._validate_args
        return new

    def _flat_lengths(self, n: int) -> torch.Tensor | None:
        if self.prompt_lengths is None:
            return None
        return self.prompt_lengths.expand(*self.batch_shape).reshape(n) if self.batch_shape else self.prompt_lengths

    def prompt_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``lm.start(prompt, n, lengths)`` reads for ``n`` flattened rows of the batch.

        ``(prompt, None)`` when every row has one length (``prompt`` ``[P]`` shared or ``[n, P]``),
        ``(prompt [n, P] right-padded, lengths [n])`` when the prompts are ragged.
        """
        return self._flat_prompt(n), self._flat_lengths(n)

    def _groups(self, n: int, prompts: torch.Tensor):
        """``(rows, prompt [k, P_k])`` per distinct prompt length (one group unless ragged)."""
        lens = self._flat_lengths(n)
        if lens is None:
            return [(None, prompts)]
        return [((lens == L).nonzero()[:, 0], prompts[lens == L][:, : int(L)]) for L in torch.unique(lens)]

    def _flat_prompt(self, n: int) -> torch.Tensor:
        if self.prompt.dim() == 1:
            return self.prompt
        return self.prompt.expand(*self.batch_shape, self.prompt.shape[-1]).reshape(n, -1)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        if self.prompt.dim() > 1 and len(sample_shape):
            raise NotImplementedError("sample_shape with per-element prompts; use expand instead")
        gen = _random.generator(self.lm.device)
        groups = self._groups(n, self._flat_prompt(n))
        if len(groups) == 1:
            tokens, lps = self.lm.sample(groups[0][1], n, self.max_new_tokens, generator=gen)
        else:
            tokens = torch.full((n, self.max_new_tokens), self.lm.eos_id, dtype=torch.long, device=self.lm.device)
            lps = torch.zeros(n, self.max_new_tokens, device=self.lm.device)
            for rows, prompts in groups:
                tok, lp = self.lm.sample(prompts, len(rows), self.max_new_tokens, generator=gen)
                tokens[rows.to(tokens.device)], lps[rows.to(lps.device)] = tok, lp.to(lps.dtype)
        value = tokens.reshape(*shape, self.max_new_tokens)
        # Pyro scores the value it just sampled: keep the sampler's log-probs for that call.
        self._cache = (value, lps.sum(-1).reshape(shape))
        return value

    def token_logprobs(self, value: torch.Tensor) -> torch.Tensor:
        """Per-token log-probabilities ``[..., T]`` (0 after EOS)."""
        value = torch.as_tensor(value)
        shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        n = math.prod(shape)
        flat = value.expand(*shape, self.max_new_tokens).reshape(n, self.max_new_tokens).long()
        prompts = self.prompt if self.prompt.dim() == 1 else self.prompt.expand(*shape, self.prompt.shape[-1]).reshape(n, -1)
        groups = self._groups(n, prompts)
        if len(groups) == 1:
            lp = self.lm.token_logprobs(groups[0][1], flat)
        else:
            lp = torch.zeros(n, self.max_new_tokens, device=flat.device)
            for rows, p in groups:
                r = rows.to(flat.device)
                lp = lp.index_put((r,), self.lm.token_logprobs(p, flat[r]).to(lp.dtype))
        return lp.reshape(*shape, self.max_new_tokens)

    def log_prob(self, value):
        value = torch.as_tensor(value)
        if value.dim() == 0 or value.shape[-1] != self.max_new_tokens:
            raise ValueError(f"expected sequences of length {self.max_new_tokens} (max_new_tokens), "
                             f"got shape {tuple(value.shape)}")
        if value.dtype.is_floating_point:
            raise TypeError("sequence values must be integer token ids")
        if self._validate_args:
            self._validate_sample(value)
        cache = self._cache
        needs_grad = torch.is_grad_enabled() and self.lm.is_trainable()
        if cache is not None and cache[0] is value and not needs_grad:
            lp = cache[1]
        else:
            lp = self.token_logprobs(value).sum(-1)
        return torch.where(self.canonical(value), lp, torch.full_like(lp, -math.inf))

    def canonical(self, value: torch.Tensor) -> torch.Tensor:
        """True where every position after the first EOS holds EOS."""
        eos = self.lm.eos_id
        bad = after_eos_mask(value, eos) & (value != eos)
        return ~bad.any(-1)


def _is_prompt_batch(prompt: Any) -> bool:
    """A list of prompts (strings, id lists or 1-D tensors), not one prompt given as a list of ids."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    return all(isinstance(p, (str, list, tuple)) or (isinstance(p, torch.Tensor) and p.dim() == 1) for p in prompt)
