"""Tiny random transformers built from a config (no download), for exact tests and smoke runs."""

from __future__ import annotations

from typing import Sequence

import torch

from .hf import TransformersLM
from .markov import ToyVocab

__all__ = ["tiny_transformer", "tiny_char_transformer", "tiny_chat_transformer", "CHARS", "ARCHITECTURES",
           "CHAT_TOKENS", "CHAT_TEMPLATE"]


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


#: The architectures :func:`tiny_transformer` builds (``model_type`` of their transformers config).
ARCHITECTURES = ("llama", "gpt2", "gpt_neox", "qwen2", "gemma2")


def _config(architecture: str, vocab_size: int, eos_id: int, hidden_size: int, num_layers: int, num_heads: int,
            max_context: int):
    """A transformers config of ``architecture`` with these sizes (untied head, EOS = BOS = pad)."""
    import transformers

    ids = {"eos_token_id": eos_id, "bos_token_id": eos_id, "pad_token_id": eos_id, "tie_word_embeddings": False,
           "vocab_size": vocab_size}
    if architecture == "gpt2":
        return transformers.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                       n_positions=max_context, **ids)
    common = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "max_position_embeddings": max_context, **ids}
    if architecture == "gpt_neox":
        return transformers.GPTNeoXConfig(**common)
    kv = {"num_key_value_heads": num_heads}
    if architecture == "llama":
        return transformers.LlamaConfig(**common, **kv)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**common, **kv)
    if architecture == "gemma2":
        # Gemma 2's traits: sliding-window layers alternating with global ones, soft-capped
        # logits and attention scores, embeddings scaled by sqrt(hidden_size).
        return transformers.Gemma2Config(**common, **kv, head_dim=hidden_size // num_heads, sliding_window=4)
    raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")


def tiny_transformer(vocab_size: int = 6, eos_id: int = 0, seed: int = 0, hidden_size: int = 16,
                     num_layers: int = 2, num_heads: int = 2, max_context: int = 64,
                     scale: float = 1.0, token_strings: Sequence[str] | None = None,
                     architecture: str = "llama") -> TransformersLM:
    """A tiny random causal LM built from a config (no download), for exact tests.

    ``scale`` multiplies the output embedding so the next-token distributions are far from
    uniform (a more telling test). ``architecture`` is one of :data:`ARCHITECTURES`.

    >>> lm = tiny_transformer(architecture="gpt2")
    >>> type(lm.model).__name__, lm.vocab_size
    ('GPT2LMHeadModel', 6)
    """
    from transformers import AutoModelForCausalLM

    cfg = _config(architecture, vocab_size, eos_id, hidden_size, num_layers, num_heads, max_context)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale * 20.0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TransformersLM(model, None, eos_id=eos_id, bos_id=eos_id,
                          vocab=ToyVocab(vocab_size, eos_id, token_strings))


#: The vocabulary of :func:`tiny_chat_transformer`: EOS, the two turn markers, then words.
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "\n", "a", "b"]
#: A ChatML template (SmolLM2's, without its default system message).
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def tiny_chat_transformer(seed: int = 0, scale: float = 0.15) -> TransformersLM:
    """A tiny random Llama with a real tokenizer and a ChatML chat template (built offline).

    EOS is ``<|endoftext|>`` (id 0) and the end of turn ``<|im_end|>`` (id 2), as in a base model
    of the Qwen2 family: ``lm.for_chat()`` makes the end of turn end a sequence. The words are
    ``user``, ``assistant``, newline, ``a`` and ``b`` (8 tokens in all: small enough to enumerate).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(CHAT_TOKENS)}, unk_token=CHAT_TOKENS[0]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("user|assistant|\n|a|b"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=CHAT_TOKENS[0], pad_token=CHAT_TOKENS[0],
                                        additional_special_tokens=CHAT_TOKENS[1:3])
    tokenizer.chat_template = CHAT_TEMPLATE
    net = tiny_transformer(len(CHAT_TOKENS), eos_id=0, seed=seed, scale=scale).model
    net.generation_config.eos_token_id = 0
    return TransformersLM(net, tokenizer, eos_id=0, bos_id=0)
