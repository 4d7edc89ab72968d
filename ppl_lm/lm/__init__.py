"""Language-model backends behind one small protocol (:class:`LanguageModel`).

- :mod:`.base`: the protocol, with batched sampling and scoring written once;
- :mod:`.markov`: :class:`MarkovLM`, an exact toy LM, and :class:`ToyVocab` text;
- :mod:`.hf`: :class:`TransformersLM` (any Hugging Face causal LM) and :func:`load_lm`;
- :mod:`.cache`: the cache of converted GGUF models, which checks and heals its entries;
- :mod:`.lora`, :mod:`.positional`: trainable guide LMs (LoRA adapters; a positional Markov chain);
- :mod:`.prompts`: :func:`chat`, a conversation in the tokenizer's chat template;
- :mod:`.testing`: tiny random transformers for tests.
"""

from .base import LanguageModel, LMState
from .hf import EMBEDDED_GGUF, TransformersLM, load_lm
from .lora import LoraLM
from .markov import MarkovLM, ToyVocab
from .positional import PositionalMarkovLM
from .prompts import chat
from .testing import tiny_char_transformer, tiny_transformer

__all__ = [
    "LanguageModel", "LMState", "MarkovLM", "ToyVocab", "TransformersLM", "load_lm", "EMBEDDED_GGUF",
    "LoraLM", "PositionalMarkovLM", "tiny_transformer", "tiny_char_transformer", "chat",
]
