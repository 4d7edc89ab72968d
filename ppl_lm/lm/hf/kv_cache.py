"""How a :class:`~ppl_lm.lm.hf.TransformersLM` keeps keys and values between decode steps.

One strategy class per ``kv_cache`` setting, chosen once when the LM is built (:func:`kv_mode`):

- :class:`DynamicMode` (``"dynamic"``): transformers' ``DynamicCache``, grown by one position a step;
- :class:`StaticMode` (``"static"``): a ``StaticCache`` preallocated by ``start`` and written in place;
- :class:`CompiledMode` (``"compiled"``): the static cache, with the decode step compiled.

A mode starts states (:meth:`DynamicMode.start`, :meth:`DynamicMode.start_ragged`). The data of
each state it starts (a :class:`KVState`) extends and reorders itself, so the LM's ``extend`` and
``reorder`` never ask which mode, or which fallback (a trainable LM under autograd keeps the
dynamic cache; ragged prompts are left-padded), made a state.

>>> import ppl_lm
>>> lm = ppl_lm.tiny_transformer().with_kv_cache("static")
>>> type(lm.kv_mode).__name__, type(lm.start([1, 2], 3).data).__name__
('StaticMode', 'StaticState')
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch

from ..base import LMState

__all__ = ["KV_CACHES", "STATIC_BLOCK", "STATIC_DEFAULT_NEW_TOKENS", "STATIC_RECOMPILE_LIMIT", "check_kv_cache",
           "kv_mode", "KV_MODES", "cache_keyword", "KVState", "DynamicState", "PaddedState", "StaticState", "DynamicMode",
           "StaticMode", "CompiledMode"]

# A static cache's length is rounded up to a multiple of this, so that a compiled decode step
# (specialised on the cache shape) is reused across nearby prompt and sequence lengths.
STATIC_BLOCK = 64
# New tokens a static cache leaves room for when no check_context() told it how many.
STATIC_DEFAULT_NEW_TOKENS = 64
# Versions of the compiled decode step Dynamo may keep (one per batch size and cache length).
STATIC_RECOMPILE_LIMIT = 64


def cache_keyword(model) -> str:
    """The name of the KV-cache argument of ``model.forward``: transformers >= 5.2x renamed
    ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# -- the data of a state, one class per way of keeping the cache ---------------------------------
class KVState:
    """``LMState.data`` of a :class:`~ppl_lm.lm.hf.TransformersLM`: one batch's keys and values,
    and the decode step on them."""

    __slots__ = ()

    def extend(self, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, KVState]:
        """Next-token log-probs ``[B, V]`` after reading ``ids [B, 1]`` at position ``length``
        (tokens read so far), and the data of the state after it."""
        raise NotImplementedError

    def reorder(self, index: torch.Tensor, length: int) -> KVState:
        """The data whose row ``i`` is row ``index[i]`` of this one (``length`` positions filled)."""
        raise NotImplementedError


class DynamicState(KVState):
    """A ``DynamicCache``, grown by one position a step (a new allocation per layer per step)."""

    __slots__ = ("mode", "cache")

    def __init__(self, mode: DynamicMode, cache):
        self.mode, self.cache = mode, cache

    def extend(self, ids, length):
        logits, cache = self.mode.forward(ids, self.cache)
        return self.mode.lm.next_logprobs(logits[:, -1]), DynamicState(self.mode, cache)

    def reorder(self, index, length):
        self.cache.reorder_cache(index)
        return self


class PaddedState(KVState):
    """Ragged prompts in a ``DynamicCache``: rows are left-padded, so their ends line up.

    ``mask`` (``[B, L]``, 1 at real tokens) hides the padding from attention; ``next_pos``
    (``[B]``) is each row's next position id, so rotary positions count real tokens only.
    """

    __slots__ = ("mode", "cache", "mask", "next_pos")

    def __init__(self, mode: DynamicMode, cache, mask: torch.Tensor, next_pos: torch.Tensor):
        self.mode, self.cache, self.mask, self.next_pos = mode, cache, mask, next_pos

    def extend(self, ids, length):
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], -1)
        logits, cache = self.mode.forward(ids, self.cache, attention_mask=mask, position_ids=self.next_pos[:, None])
        return self.mode.lm.next_logprobs(logits[:, -1]), PaddedState(self.mode, cache, mask, self.next_pos + 1)

    def reorder(self, index, length):
        self.cache.reorder_cache(index)
        return PaddedState(self.mode, self.cache, self.mask[index], self.next_pos[index])


class StaticState(KVState):
    """A preallocated ``StaticCache`` of ``capacity`` positions: fixed shapes, written in place."""

    __slots__ = ("__weakref__", "mode", "cache", "capacity")

    def __init__(self, mode: StaticMode, cache, capacity: int):
        self.mode, self.cache, self.capacity = mode, cache, capacity

    def extend(self, ids, length):
        if length >= self.capacity:
            raise ValueError(
                f"the static KV cache of this state holds {self.capacity} positions and all are used "
                f"(prompt and tokens so far: {length}). start() sizes it from the prompt and the "
                "max_new_tokens of the last check_context() call (sample() and lm.sequence() make it); "
                "call lm.check_context(prompt_len, max_new_tokens) before start(), or use kv_cache='dynamic'"
            )
        return self.mode.step(ids, self), self

    def reorder(self, index, length):
        # In place, row by row of the filled prefix: the buffers keep their addresses, which
        # CUDA graphs captured.
        for layer in self.cache.layers:
            layer.keys[:, :, :length] = layer.keys[:, :, :length].index_select(0, index)
            layer.values[:, :, :length] = layer.values[:, :, :length].index_select(0, index)
        return self


# -- the modes: how states start -------------------------------------------------------------
class DynamicMode:
    """``kv_cache="dynamic"``: every state keeps a ``DynamicCache`` (fine on CPU, overhead-bound
    on GPU). The other modes read prompts this way too, then keep the cache their own way."""

    name = "dynamic"

    def __init__(self, lm):
        self.lm = lm
        self.cache_kw = cache_keyword(lm.model)

    def reserve(self, max_new_tokens: int) -> None:
        """Tell the mode how many new tokens later states need room for (static caches only)."""

    def forward(self, ids: torch.Tensor, cache=None, **kwargs) -> tuple[torch.Tensor, Any]:
        """Logits ``[B, L, V]`` of ``ids`` read after ``cache`` (a new ``DynamicCache`` when
        ``None``), and the cache, which now holds them too."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.lm.model.config)
        out = self.lm.model(input_ids=ids, **{self.cache_kw: cache}, use_cache=True, **kwargs)
        return out.logits, cache

    def start(self, cache, batch_size: int, prompt_len: int, shared: bool) -> KVState:
        """The data of a state whose prompt of ``prompt_len`` tokens ``cache`` holds: 1 row when
        ``shared`` (every row's prompt is the same), else ``batch_size`` rows."""
        if shared:
            cache.batch_repeat_interleave(batch_size)
        return DynamicState(self, cache)

    def start_ragged(self, prompt: torch.Tensor, lengths: torch.Tensor) -> LMState:
        """Read right-padded ``prompt [B, P]`` of ``lengths [B]`` as left-padded rows plus a mask."""
        lm = self.lm
        prompt, lengths = prompt.to(lm.device), lengths.to(lm.device)
        empty = lengths == 0
        if bool(empty.any()):  # an empty prompt reads BOS, as in the unbatched path
            prompt = torch.cat([prompt, prompt[:, :1]], -1) if prompt.shape[-1] == 0 else prompt.clone()
            prompt[empty, 0] = lm.bos_id
            lengths = lengths.clamp_min(1)
        P = int(lengths.max())
        src = torch.arange(P, device=lm.device)[None] - (P - lengths)[:, None]
        mask = src >= 0
        ids = prompt.gather(-1, src.clamp_min(0)).masked_fill(~mask, lm.bos_id)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        logits, cache = self.forward(ids, attention_mask=mask.long(), position_ids=positions)
        return LMState(lm.next_logprobs(logits[:, -1]), PaddedState(self, cache, mask.long(), lengths), P)


class StaticMode(DynamicMode):
    """``kv_cache="static"``: a ``StaticCache`` preallocated by ``start`` for the prompt plus the
    ``max_new_tokens`` of the last :meth:`reserve`, rounded up to a multiple of ``STATIC_BLOCK``
    (at most the context window); each decode step then has fixed shapes and writes in place.

    It applies when no gradient is needed (``torch.no_grad()`` or frozen weights); a trainable
    LM under autograd keeps the dynamic cache. Full-attention models only.
    """

    name = "static"

    def __init__(self, lm):
        super().__init__(lm)
        self.new_tokens: int | None = None  # from the last reserve(): sizes the caches
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        layers = StaticCache(config=lm.model.config, max_cache_len=1).layers
        odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
        if odd:
            raise ValueError(
                f"kv_cache={self.name!r} supports full-attention models only; this one has "
                f"{', '.join(odd)} layers. Use kv_cache='dynamic'")

    def reserve(self, max_new_tokens):
        self.new_tokens = max_new_tokens

    def start(self, cache, batch_size, prompt_len, shared):
        if torch.is_grad_enabled() and self.lm.is_trainable():
            return super().start(cache, batch_size, prompt_len, shared)
        # The prompt was read once with a dynamic cache (its length varies), then is copied into
        # the preallocated one that every decode step writes in place.
        kv = self.new_state(batch_size, self.capacity(prompt_len))
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

    def start_ragged(self, prompt, lengths):
        raise ValueError(f"prompts of different lengths need kv_cache='dynamic' (this LM has "
                         f"kv_cache={self.name!r}); use lm.with_kv_cache('dynamic')")

    def capacity(self, prompt_len: int) -> int:
        """Positions a cache preallocates for a prompt of ``prompt_len`` tokens."""
        new = self.new_tokens if self.new_tokens is not None else STATIC_DEFAULT_NEW_TOKENS
        need = prompt_len + new
        cap = -(-need // STATIC_BLOCK) * STATIC_BLOCK
        if self.lm.max_context is not None:
            cap = max(need, min(cap, self.lm.max_context))
        return cap

    def new_state(self, batch_size: int, capacity: int) -> StaticState:
        """An empty static cache of ``batch_size`` rows and ``capacity`` positions."""
        from transformers import StaticCache

        return StaticState(self, StaticCache(config=self.lm.model.config, max_cache_len=capacity), capacity)

    def decode(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """One fixed-shape decode step: next-token log-probs ``[B, V]`` (float32)."""
        logits = self.lm.model(input_ids=ids, **{self.cache_kw: cache}, use_cache=True).logits
        return self.lm.next_logprobs(logits[:, -1])

    def step(self, ids: torch.Tensor, kv: StaticState) -> torch.Tensor:
        """The decode step of ``kv``'s cache (compiled in :class:`CompiledMode`)."""
        return self.decode(ids, kv.cache)


class CompiledMode(StaticMode):
    """``kv_cache="compiled"``: :class:`StaticMode` with the decode step wrapped in ``torch.compile``
    (``mode="reduce-overhead"`` on CUDA: CUDA graphs; the LM's ``compile_options`` on top).

    It specialises on (batch, cache length): the first step of each new shape compiles. Caches
    are pooled by shape and reused across ``start`` calls once no state holds them, so the
    graphs' static addresses stay put.
    """

    name = "compiled"

    def __init__(self, lm):
        super().__init__(lm)
        self.pool: dict[tuple, list[list]] = {}  # [owner weakref, cache] by (batch, capacity, device)
        self.compiled_shapes: set[tuple[int, int]] = set()  # (batch, capacity) compiled so far
        self._compiled = None

    def new_state(self, batch_size, capacity):
        """A pooled cache that no live state holds, or a new one added to the pool."""
        entries = self.pool.setdefault((batch_size, capacity, self.lm.device), [])
        for entry in entries:
            if entry[0]() is None:
                kv = StaticState(self, entry[1], capacity)
                entry[0] = weakref.ref(kv)
                return kv
        kv = super().new_state(batch_size, capacity)
        entries.append([weakref.ref(kv), kv.cache])
        return kv

    def compiled_decode(self):
        """:meth:`decode` compiled (once per mode)."""
        if self._compiled is None:
            options: dict[str, Any] = {"dynamic": False}
            if self.lm.device.type == "cuda":
                options["mode"] = "reduce-overhead"
            options.update(self.lm.compile_options)
            self._compiled = torch.compile(self.decode, **options)
        return self._compiled

    def step(self, ids, kv):
        # A new CUDA-graph step: the previous replay's outputs may be overwritten, so the
        # log-probs are cloned out of the graph's memory pool (states stay independent).
        torch.compiler.cudagraph_mark_step_begin()
        shape = (ids.shape[0], kv.capacity)
        if shape in self.compiled_shapes:
            return self.compiled_decode()(ids, kv.cache).clone()
        # Each (batch, length) compiles once; Dynamo's limit of 8 versions per function is
        # shared by every LM (one code object), so lift it meanwhile. Dynamo's one-time setup
        # also turns off torch.distributions argument validation for the whole process (Pyro's
        # support checks included): keep the user's setting.
        validate = torch.distributions.Distribution._validate_args
        try:
            with torch._dynamo.config.patch(recompile_limit=STATIC_RECOMPILE_LIMIT):
                logprobs = self.compiled_decode()(ids, kv.cache)
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)
        self.compiled_shapes.add(shape)
        return logprobs.clone()


#: The strategy of each ``kv_cache`` setting.
KV_MODES: dict[str, type[DynamicMode]] = {m.name: m for m in (DynamicMode, StaticMode, CompiledMode)}
#: The ``kv_cache`` settings, in the order the docs give them.
KV_CACHES = tuple(KV_MODES)


def check_kv_cache(kv_cache: str) -> None:
    """A clear error now if ``kv_cache`` names no mode (cheap: run it before loading a model)."""
    if kv_cache not in KV_MODES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")


def kv_mode(kv_cache: str, lm) -> DynamicMode:
    """The strategy of ``kv_cache`` for ``lm`` (a :class:`~ppl_lm.lm.hf.TransformersLM`)."""
    check_kv_cache(kv_cache)
    return KV_MODES[kv_cache](lm)
