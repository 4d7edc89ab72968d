"""Trainable copies of a transformer LM: LoRA adapters (peft) on the prior's own network, or a full copy."""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import warnings
from collections.abc import Sequence

from torch import nn

from .base import LanguageModel
from .hf import TransformersLM

__all__ = ["LoraLM", "full_transformer", "lora_targets", "ALL_LINEAR"]

#: ``lora_targets`` value for every linear layer but the output head (peft's shorthand).
ALL_LINEAR = "all-linear"
# Attention projections adapted by default when the architecture is not in peft's table, by the
# names transformers gives them (Llama-like; GPT-2; GPT-NeoX, Falcon, Bloom; Phi-3; MPT).
_ATTENTION_NAMES = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",), ("qkv_proj",), ("Wqkv",))


def _module_names(net: nn.Module) -> set[str]:
    """The last component of every module name (``"q_proj"`` for ``model.layers.0.self_attn.q_proj``)."""
    return {name.rsplit(".", 1)[-1] for name, _ in net.named_modules() if name}


def _linear_names(net: nn.Module) -> list[str]:
    """Last name components of the linear layers (``nn.Linear`` or GPT-2's ``Conv1D``), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in net.named_modules()
                   if name and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")})


def lora_targets(net: nn.Module) -> list[str] | str:
    """The modules LoRA adapts by default in ``net`` (a transformers causal LM): its attention
    query and value projections, found from the architecture.

    peft's table by ``config.model_type`` first (Llama, Qwen, Mistral, Gemma: ``q_proj``,
    ``v_proj``; GPT-2: ``c_attn``; GPT-NeoX: ``query_key_value``; ...), then the usual names of
    fused or separate projections, else :data:`ALL_LINEAR` (every linear layer but the head).

    >>> import ppl_lm
    >>> lora_targets(ppl_lm.tiny_transformer(architecture="gpt2").model)
    ['c_attn']
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    names = _module_names(net)
    model_type = getattr(getattr(net, "config", None), "model_type", None)
    for candidate in (known.get(model_type), *_ATTENTION_NAMES):
        if candidate and set(candidate) <= names:
            return list(candidate)
    return ALL_LINEAR


def _check_targets(net: nn.Module, targets) -> None:
    """A clear error, before peft runs, for target names that no module of ``net`` has."""
    if isinstance(targets, str):
        return  # "all-linear", or a regular expression peft matches against full module names
    if not (isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets)):
        raise TypeError(f"lora_targets must be a non-empty list of module names, {ALL_LINEAR!r} or None "
                        f"(found from the architecture), got {targets!r}")
    names = _module_names(net)
    missing = [t for t in targets if t not in names and not any(n.endswith("." + t) for n, _ in net.named_modules())]
    if missing:
        linear = _linear_names(net)
        near = difflib.get_close_matches(missing[0], linear, n=1)
        raise ValueError(
            f"lora_targets {missing!r}: no module of this {_arch(net)} network is named so"
            + (f"; did you mean {near[0]!r}?" if near else ".")
            + f" Its linear layers are {', '.join(linear)}. Pass lora_targets=[...] with some of them "
            f"(CLI: --lora-targets {','.join(linear[:2])}), {ALL_LINEAR!r}, or None to find them from the architecture")


def _arch(net: nn.Module) -> str:
    return getattr(getattr(net, "config", None), "model_type", None) or type(net).__name__



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
        self.base = base
        net = base.model
        if target_modules is None:
            target_modules = lora_targets(net)
        _check_targets(net, target_modules)
        self.target_modules = target_modules
        existing = getattr(net, "peft_config", {}) or {}
        self.adapter = f"ppl_lm_{len(existing)}"
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            bias="none")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                inject_adapter_in_model(config, net, adapter_name=self.adapter)
        except Exception as err:  # peft's own errors name neither this network's layers nor our option
            raise ValueError(
                f"LoRA could not adapt this {_arch(net)} network with lora_targets={target_modules!r}: "
                f"{type(err).__name__}: {err}. Its linear layers are {', '.join(_linear_names(net))}; pass "
                f"lora_targets=[...] with some of them (CLI: --lora-targets NAME,NAME) or {ALL_LINEAR!r}") from err
        self._layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
        if not self._layers:
            raise ValueError(f"no module of the network matches lora_targets={target_modules!r}; "
                             f"its linear layers are {', '.join(_linear_names(net))}")
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

    @property
    def dtype(self):  # type: ignore[override]
        return self.base.dtype

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
    lm = TransformersLM(net, prior.tokenizer, eos_id=prior.eos_id, bos_id=prior.bos_id, vocab=prior.vocab,
                        stop_ids=prior.stop_ids)
    lm.module = net
    return lm


