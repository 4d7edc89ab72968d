"""Any Hugging Face causal LM behind the protocol (:class:`TransformersLM`), with a hand-written
KV-cached loop; how the keys and values are kept is a strategy from :mod:`.kv_cache`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...tokens import after_eos_mask, as_prompt_tensor
from ..base import LanguageModel, LMState, ragged_rows
from ..markov import ToyVocab
from .kv_cache import kv_mode

__all__ = ["TransformersLM"]


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


class TransformersLM(LanguageModel):
    """Any Hugging Face causal LM, with a hand-written KV-cached loop (not ``generate``).

    ``generate`` in transformers 5 applies top-k=50 unless told otherwise and can mask prompt
    tokens equal to the pad id; sampling here is exact ancestral sampling from the softmax.

    Args:
        model: a transformers causal LM (eval mode).
        tokenizer: its tokenizer, or ``None`` for token ids only (``vocab`` gives toy text).
        kv_cache: how decode steps (``extend``) keep keys and values (one strategy each, in
            :mod:`ppl_lm.lm.hf.kv_cache`):

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
        self.kv_cache = kv_cache
        self.compile_options = dict(compile_options or {})
        #: The strategy of ``kv_cache`` (:mod:`ppl_lm.lm.hf.kv_cache`), chosen once: it starts
        #: states, and each state's data extends and reorders itself.
        self.kv_mode = kv_mode(kv_cache, self)

    @property
    def device(self):  # type: ignore[override]
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        """The parameters' dtype: the model every backend targets is the network in this dtype."""
        return next(self.model.parameters()).dtype

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

    def next_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
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

    def start(self, prompt, batch_size, lengths=None):
        if lengths is not None:
            prompt, lengths = ragged_rows(prompt, batch_size, lengths)
            if bool((lengths != lengths[:1]).any()):
                return self.kv_mode.start_ragged(prompt, lengths)
            prompt = prompt[:, : int(lengths[0])] if batch_size else prompt  # one length after all
        prompt = self._prompt_rows(torch.as_tensor(prompt, dtype=torch.long), batch_size)
        # Rows with a shared prompt compute it once, then the cache is repeated (or copied).
        shared = prompt.shape[0] > 1 and bool((prompt == prompt[:1]).all())
        logits, cache = self.kv_mode.forward(prompt[:1] if shared else prompt)
        logprobs = self.next_logprobs(logits[:, -1])
        data = self.kv_mode.start(cache, batch_size, prompt.shape[-1], shared)
        if shared:
            logprobs = logprobs.expand(batch_size, -1)
        return LMState(logprobs, data, prompt.shape[-1])

    def extend(self, state, tokens):
        logprobs, data = state.data.extend(tokens.to(self.device)[:, None], state.length)
        return LMState(logprobs, data, state.length + 1)

    def reorder(self, state, index):
        index = index.to(self.device)
        return LMState(state.logprobs[index], state.data.reorder(index, state.length), state.length)

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        super().check_context(prompt_len, max_new_tokens)
        self.kv_mode.reserve(max_new_tokens)  # static caches are sized from it

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
            first, cache = self.kv_mode.forward(prompt[:1])
            logits = first[:, -1:].expand(B, 1, -1)
            if T > 1:
                cache.batch_repeat_interleave(B)
                logits = torch.cat([logits, self.kv_mode.forward(tokens[:, :-1], cache)[0]], 1)
        else:
            logits = self.model(input_ids=torch.cat([prompt, tokens], -1), use_cache=False).logits
            logits = logits[:, P - 1 : P - 1 + T]
        logp = self.next_logprobs(logits)
        lp = logp.gather(-1, tokens[..., None])[..., 0]
        # masked_fill, not a product: a padding position of probability 0 (-inf) times 0 is NaN.
        return lp.masked_fill(after_eos_mask(tokens, self.eos_id), 0.0)
