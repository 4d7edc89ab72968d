"""Language-model backends behind one small protocol (:class:`LanguageModel`).

- :mod:`.base`: the protocol, with batched sampling and scoring written once;
- :mod:`.markov`: :class:`MarkovLM`, an exact toy LM, and :class:`ToyVocab` text;
- :mod:`.hf`: :class:`TransformersLM` (any Hugging Face causal LM), its KV-cache modes, and
  :func:`load_lm`;
- :mod:`.cache`: the cache of converted GGUF models, which checks and heals its entries;
- :mod:`.lora`, :mod:`.positional`: trainable guide LMs (LoRA adapters; a positional Markov chain);
- :mod:`.prompts`: :func:`chat`, a conversation in the tokenizer's chat template;
- :mod:`.testing`: tiny random transformers for tests.

The transformers side (:mod:`.hf`, :mod:`.lora`, :mod:`.testing`) is imported on first use of one
of its names, so the protocol and the toy LMs load without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .base import LanguageModel, LMState
from .markov import MarkovLM, ToyVocab
from .positional import PositionalMarkovLM
from .prompts import chat

if TYPE_CHECKING:
    from .hf import EMBEDDED_GGUF, TransformersLM, load_lm
    from .lora import LoraLM
    from .testing import tiny_char_transformer, tiny_transformer

# name -> the submodule that defines it, imported when the name is first read (PEP 562)
_LAZY = {"TransformersLM": "hf", "load_lm": "hf", "EMBEDDED_GGUF": "hf", "LoraLM": "lora",
         "tiny_transformer": "testing", "tiny_char_transformer": "testing"}
_SUBMODULES = ("base", "cache", "hf", "lora", "markov", "positional", "prompts", "testing")

__all__ = [
    "LanguageModel", "LMState", "MarkovLM", "ToyVocab", "TransformersLM", "load_lm", "EMBEDDED_GGUF",
    "LoraLM", "PositionalMarkovLM", "tiny_transformer", "tiny_char_transformer", "chat",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
