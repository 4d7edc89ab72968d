"""Tiny random transformers built from a config (no download), for exact tests and smoke runs."""

from __future__ import annotations

from typing import Sequence

import torch

from .hf import TransformersLM
from .markov import ToyVocab

__all__ = ["tiny_transformer", "tiny_char_transformer", "CHARS"]


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
