"""Trainable copies of a transformer LM: LoRA adapters (peft) on the prior's own network, or a full copy."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Sequence

from torch import nn

from .base import LanguageModel
from .hf import TransformersLM

__all__ = ["LoraLM", "full_transformer"]


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Log records of ``name`` below ERROR dropped for this block only, then the level restored."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class LoraLM(LanguageModel):
    """The guide side of a LoRA-adapted :class:`TransformersLM`: the same network, adapter on.

    peft injects the adapter layers into the prior's network in place (one copy of the
    weights). The adapter is off by default, so the prior computes exactly what it computed
    before injection; every network call of this LM (``start``, ``extend``,
    ``token_logprobs``) switches it on for its own duration.
    """

    def __init__(self, base: TransformersLM, r: int = 8, alpha: float = 16,
                 target_modules: Sequence[str] | str | None = None, dropout: float = 0.0):
        try:
            with _quiet_logger("bitsandbytes"):  # peft imports it if installed; its CPU-kernel notice is noise
                from peft import LoraConfig, inject_adapter_in_model
                from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError as err:  # pragma: no cover - peft is a dependency
            raise ImportError("guide='lora' needs peft: pip install peft") from err
        if not isinstance(base, TransformersLM):
            raise TypeError(f"LoRA needs a TransformersLM, got {type(base).__name__}; use guide='full'")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"lora_r must be a positive integer, got {r!r}")
        if target_modules is None:
            target_modules = ["q_proj", "v_proj"]
        self.base = base
        net = base.model
        existing = getattr(net, "peft_config", {}) or {}
        self.adapter = f"ppl_lm_{len(existing)}"
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            bias="none")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, net, adapter_name=self.adapter)
        self._layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        if not self._layers:
            raise ValueError(f"no module of the network matches target_modules={target_modules!r}")
        for layer in self._layers:
            if not hasattr(layer, "_disable_adapters") or not hasattr(layer, "_active_adapter"):
                raise RuntimeError("this peft version keeps adapter state differently; ppl-lm needs peft>=0.13")
        self._set(None)  # off: the prior is the original network
        self.params = {n: p for n, p in net.named_parameters() if f".{self.adapter}." in n}
        for p in self.params.values():
            p.requires_grad_(True)
        self.module = nn.ParameterDict({n.replace(f".{self.adapter}.", ".").replace(".", "__"): p
                                        for n, p in self.params.items()})
        self.vocab_size, self.eos_id = base.vocab_size, base.eos_id
        self.max_context, self.tokenizer, self.vocab = base.max_context, base.tokenizer, base.vocab

    def _set(self, adapter: str | None):
        # peft's public toggles (enable_adapters / set_adapter) also flip requires_grad of the
        # adapter weights, which would drop the gradient of a graph built while the adapter was on
        # (the score-function loss is differentiated after the prior has run with it off). So the
        # two flags that decide the forward pass are set directly.
        for layer in self._layers:
            if adapter is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter = [adapter] if adapter in layer.lora_A else []
                layer._disable_adapters = False

    @contextlib.contextmanager
    def active(self):
        """Switch this adapter on for the duration of the block (nestable)."""
        saved = [(layer._disable_adapters, list(layer.active_adapters)) for layer in self._layers]
        self._set(self.adapter)
        try:
            yield
        finally:
            for layer, (off, act) in zip(self._layers, saved):
                layer._active_adapter, layer._disable_adapters = act, off

    @property
    def device(self):  # type: ignore[override]
        return self.base.device

    def is_trainable(self) -> bool:
        return True

    def encode(self, text):
        return self.base.encode(text)

    def decode(self, ids):
        return self.base.decode(ids)

    def decode_token(self, token_id):
        return self.base.decode_token(token_id)

    def token_texts(self):
        return self.base.token_texts()

    def start(self, prompt, batch_size, lengths=None):
        with self.active():
            return self.base.start(prompt, batch_size, lengths)

    def extend(self, state, tokens):
        with self.active():
            return self.base.extend(state, tokens)

    def reorder(self, state, index):
        return self.base.reorder(state, index)

    def token_logprobs(self, prompt, tokens):
        with self.active():
            return self.base.token_logprobs(prompt, tokens)


def full_transformer(prior: TransformersLM) -> TransformersLM:
    net = copy.deepcopy(prior.model)
    for p in net.parameters():
        p.requires_grad_(True)
    emb = net.get_input_embeddings()
    if getattr(emb, "padding_idx", None) is not None:
        # nn.Embedding never updates its padding row; when the pad id is also BOS (as in the tiny
        # test transformers) the first-token distribution would be frozen.
        emb.padding_idx = None
    lm = TransformersLM(net, prior.tokenizer, eos_id=prior.eos_id, bos_id=prior.bos_id, vocab=prior.vocab)
    lm.module = net
    return lm


