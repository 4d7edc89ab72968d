"""The LM as a Pyro distribution over token sequences."""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import TYPE_CHECKING, Any, Iterator

import torch
from pyro.distributions import TorchDistribution, constraints

from ppl_lm import seeding as _random
from .tokens import after_eos_mask, as_prompt_tensor
from .validation import check_int

if TYPE_CHECKING:  # the LM protocol is used for annotations only: ppl_lm.lm.base imports this module
    from .lm.base import LanguageModel

__all__ = ["SequenceDistribution", "encode_texts", "row_cache"]

# Run-scoped cache of scored rows: (LM, prompt row, prompt length, value row) -> per-token log-probs.
# Opened by a backend's run (``row_cache()``); used for observed texts, whose rows recur at every
# model run of a run (each SMC token step, each MH proposal, each importance chunk).
_ROW_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ppl_lm_row_cache", default=None)


@contextlib.contextmanager
def row_cache() -> Iterator[dict]:
    """Within the block, ``SequenceDistribution.log_prob(value, cached=True)`` scores each distinct
    (LM, prompt row, value row) once and reads it back afterwards (frozen LMs only)."""
    cache: dict = {}
    token = _ROW_CACHE.set(cache)
    try:
        yield cache
    finally:
        _ROW_CACHE.reset(token)


def encode_texts(lm: LanguageModel, texts, max_new_tokens: int) -> torch.Tensor:
    """Observed text as token ids (see :func:`_encode_texts`); within a :func:`row_cache` block each
    (LM, texts, length) is encoded once."""
    cache = _ROW_CACHE.get()
    if cache is None:
        return _encode_texts(lm, texts, max_new_tokens)
    key = ("text", id(lm), texts if isinstance(texts, str) else tuple(texts), max_new_tokens)
    if key not in cache:
        cache[key] = (lm, _encode_texts(lm, texts, max_new_tokens))
    return cache[key][1]


def _encode_texts(lm: LanguageModel, texts, max_new_tokens: int) -> torch.Tensor:
    """Observed text as token ids ``[T]`` (one string) or ``[K, T]`` (a list of strings).

    Each text is ``lm.encode(text)`` (no special tokens, as a prompt is encoded), then EOS when
    it is shorter than ``max_new_tokens`` (the text ended, as a sampled text that stopped at EOS
    decodes), then EOS padding. A text of exactly ``max_new_tokens`` tokens gets no EOS (as a
    sample that reached the length limit). A longer text is an error. Observed text is scored
    under this one tokenisation, not summed over every tokenisation of the same string.
    """
    single = isinstance(texts, str)
    rows = []
    for text in [texts] if single else texts:
        if not isinstance(text, str):
            raise TypeError(f"observed text must be a string or a list of strings, got {type(text).__name__}")
        try:
            ids = list(lm.encode(text))
        except (NotImplementedError, ValueError) as err:
            raise TypeError(f"this LM ({type(lm).__name__}) cannot encode text ({err}); observe token ids instead: "
                            "a LongTensor [T] (EOS-padded) or [N, T]") from None
        if len(ids) > max_new_tokens:
            raise ValueError(
                f"the observed text {text[:40]!r}{'...' if len(text) > 40 else ''} is {len(ids)} tokens long, more "
                f"than max_new_tokens={max_new_tokens}: raise max_new_tokens in lm.sequence(...) to at least {len(ids)}")
        if lm.eos_id in ids:
            raise ValueError(f"the observed text {text[:40]!r} encodes to the EOS token; observe the text before it")
        rows.append(ids + [lm.eos_id] * (max_new_tokens - len(ids)))
    out = torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_new_tokens)
    return out[0] if single else out



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

    Observed text (``pyro.sample(name, lm.sequence(...), obs=value)``): ``value`` is token ids
    ``[T]`` (shared by every particle) or ``[N, T]``, EOS-padded like samples, or text: a string, or
    a list of strings (one per particle, or along the outermost plate, e.g. a corpus plate at dim
    -2), encoded by :func:`encode_texts` (EOS appended when shorter than ``max_new_tokens``).
    Scoring reads each distinct (prompt row, value row) once.

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
        check_int("max_new_tokens", max_new_tokens)
        self.lm = lm
        self.prompt_lengths: torch.Tensor | None = None  # [N] for ragged prompts (right-padded)
        if _is_prompt_batch(prompt):
            memo: dict[int, torch.Tensor] = {}  # rows that are one object (a world's prompt) converted once
            rows = [memo[id(p)] if id(p) in memo else memo.setdefault(id(p), as_prompt_tensor(p, lm)) for p in prompt]
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


    def prompt_rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``lm.start(prompt, n, lengths)`` reads for ``n`` flattened rows of the batch.

        ``(prompt, None)`` when every row has one length (``prompt`` ``[P]`` shared, also for a batch of one
        prompt such as ``[1, P]``, or ``[n, P]``),
        ``(prompt [n, P] right-padded, lengths [n])`` when the prompts are ragged.
        """
        return self._flat_prompt_for(self.batch_shape, n), self._flat_lengths_for(self.batch_shape, n)

    def _groups(self, n: int, prompts: torch.Tensor):
        """``(rows, prompt [k, P_k])`` per distinct prompt length (one group unless ragged)."""
        lens = self._flat_lengths_for(self.batch_shape, n)
        if lens is None:
            return [(None, prompts)]
        return [((lens == L).nonzero()[:, 0], prompts[lens == L][:, : int(L)]) for L in torch.unique(lens)]

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        if self.prompt.dim() > 1 and len(sample_shape):
            raise NotImplementedError("sample_shape with per-element prompts; use expand instead")
        gen = _random.generator(self.lm.device)
        groups = self._groups(n, self._flat_prompt_for(self.batch_shape, n))
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

    def as_value(self, value) -> torch.Tensor:
        """A value as token ids: tensors as they are; text (a string, or a list of strings along
        the outermost batch dimension) encoded by :func:`encode_texts`."""
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)):
            ids = encode_texts(self.lm, value, self.max_new_tokens)
            if ids.dim() == 2 and len(self.batch_shape) >= 2:  # texts along an outer plate (a corpus)
                ids = ids.reshape(len(ids), *([1] * (len(self.batch_shape) - 1)), self.max_new_tokens)
            return ids.to(self.lm.device)
        return torch.as_tensor(value)

    def token_logprobs(self, value: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """Per-token log-probabilities ``[..., T]`` (0 after EOS).

        Rows are scored once per distinct (prompt row, value row): a text observed under K
        prompts costs K LM passes however many particles share them. With ``cached`` (and a
        frozen LM) rows scored earlier in the same :func:`row_cache` block are read back.
        """
        value = self.as_value(value)
        try:
            shape = torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"a value of shape {tuple(value.shape)} does not fit this lm.sequence(...) site's batch shape "
                f"{tuple(self.batch_shape)} (plus [T={self.max_new_tokens}]): give one text [T] shared by every "
                "particle, one per particle [N, T], or, inside pyro.plate('corpus', K) (dim -2 of the particle "
                "plate), K texts as [K, 1, T] (texts[:, None]) or a list of K strings") from None
        n = math.prod(shape)
        flat = value.expand(*shape, self.max_new_tokens).reshape(n, self.max_new_tokens).long()
        prompts = self._flat_prompt_for(shape, n)
        lens = self._flat_lengths_for(shape, n)
        key = flat if prompts.dim() == 1 else torch.cat([prompts.to(flat.device), flat], -1)
        if lens is not None:
            key = torch.cat([lens.to(flat.device)[:, None], key], -1)
        uniq, inv = torch.unique(key, dim=0, return_inverse=True)
        cache = _ROW_CACHE.get() if cached else None
        if cache is not None:  # a trainable LM's rows are not cached (its weights may move); asked once per run
            trainable = cache.setdefault(("trainable", id(self.lm)), (self.lm, self.lm.is_trainable()))[1]
            cache = None if trainable else cache
        if len(uniq) == n and cache is None:
            return self._score_rows(prompts, lens, flat).reshape(*shape, self.max_new_tokens)
        first = torch.full((len(uniq),), n, dtype=torch.long, device=inv.device).scatter_reduce(
            0, inv, torch.arange(n, device=inv.device), "amin")
        lp_u = self._score_unique(uniq, first, prompts, lens, flat, cache)
        return lp_u[inv].reshape(*shape, self.max_new_tokens)

    def _score_unique(self, uniq, first, prompts, lens, flat, cache) -> torch.Tensor:
        """Per-token log-probs of the distinct rows (``first``: one row index of each), from the cache where held."""
        if cache is None:
            return self._score_rows(*self._pick(prompts, lens, first), flat[first.to(flat.device)])
        keys = [(id(self.lm), *self._row_key(row, prompts, lens is not None)) for row in uniq.cpu()]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            m = torch.tensor(missing, dtype=torch.long)
            rows = first[m.to(first.device)]
            lp = self._score_rows(*self._pick(prompts, lens, rows), flat[rows.to(flat.device)]).detach()
            for j, i in enumerate(missing):
                cache[keys[i]] = (self.lm, lp[j])  # the LM is held so its id is not reused within the block
        return torch.stack([cache[k][1] for k in keys])

    @staticmethod
    def _row_key(row: torch.Tensor, prompts: torch.Tensor, ragged: bool) -> tuple[bytes, bytes]:
        """``(prompt tokens, value tokens)`` of a distinct row of :meth:`token_logprobs`' key: the
        prompt without its padding, so a row's key does not depend on the batch it came in."""
        P = prompts.shape[-1]
        if ragged:
            p, v = row[1: 1 + int(row[0])], row[1 + P:]
        elif prompts.dim() == 2:
            p, v = row[:P], row[P:]
        else:
            p, v = prompts.cpu(), row
        return p.numpy().tobytes(), v.numpy().tobytes()

    @staticmethod
    def _pick(prompts: torch.Tensor, lens: torch.Tensor | None, rows: torch.Tensor):
        """The prompt rows (a shared ``[P]`` prompt as it is) and lengths of ``rows``."""
        p = prompts if prompts.dim() == 1 else prompts[rows.to(prompts.device)]
        return p, None if lens is None else lens[rows.to(lens.device)]

    def _score_rows(self, prompts: torch.Tensor, lens: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs ``[n, T]`` of rows ``flat`` under ``prompts`` (``[P]`` shared or ``[n, P]``,
        right-padded to ``lens`` when ragged), one batched LM call per prompt length."""
        if lens is None:
            return self.lm.token_logprobs(prompts, flat)
        lp = torch.zeros(len(flat), self.max_new_tokens, device=flat.device)
        for L in torch.unique(lens):
            rows = (lens == L).nonzero()[:, 0].to(flat.device)
            p = prompts[rows.to(prompts.device)][:, : int(L)]
            lp = lp.index_put((rows,), self.lm.token_logprobs(p, flat[rows]).to(lp.dtype))
        return lp

    def _flat_prompt_for(self, shape: torch.Size, n: int) -> torch.Tensor:
        # One prompt row ([P], or a batch of one such as [1, P]) is shared by every row, as
        # broadcasting reads it: backends ask for n particle rows of a site whose batch shape is (1,).
        if math.prod(self.prompt.shape[:-1]) == 1:
            return self.prompt.reshape(-1)
        return self.prompt.expand(*shape, self.prompt.shape[-1]).reshape(n, -1)

    def _flat_lengths_for(self, shape: torch.Size, n: int) -> torch.Tensor | None:
        if self.prompt_lengths is None:
            return None
        if self.prompt.dim() > 1:
            return self.prompt_lengths.expand(*self.prompt.shape[:-1]).expand(*shape).reshape(n)
        return self.prompt_lengths.expand(*shape).reshape(n)

    def log_prob(self, value, cached: bool = False):
        """Exact log-probability of ``value`` (token ids, or observed text: see :meth:`as_value`);
        ``cached``: read distinct rows scored earlier in the same :func:`row_cache` block."""
        value = self.as_value(value)
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
            lp = self.token_logprobs(value, cached=cached).sum(-1)
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
