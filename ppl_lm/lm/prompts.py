"""Chat prompts: a conversation in the tokenizer's own chat template, as prompt token ids."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["chat"]


def _messages(messages: Any) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    bad = TypeError("messages must be a text (one user message) or a list of {'role': ..., 'content': ...} "
                    f"dicts, got {messages!r}")
    if not isinstance(messages, Sequence) or not messages:
        raise bad
    for m in messages:
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and "content" in m):
            raise bad
    return [dict(m) for m in messages]


def chat(lm, messages: str | Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of ``messages`` in ``lm``'s chat template, ending with the assistant's turn
    opened (the generation prompt): a prompt for ``lm.sequence(...)``, whose continuation is
    the assistant's reply.

    Exactly the tokenizer's ``apply_chat_template(messages, add_generation_prompt=True)``, with
    its defaults (SmolLM2's template adds its system message when the conversation has none).
    The reply ends at the model's end-of-turn token when that token ends a sequence of ``lm``:
    SmolLM2-Instruct's EOS is its end of turn, ``<|im_end|>``; for a model whose EOS is another
    token, use ``lm.for_chat()`` (a warning says so).

    Args:
        lm: a :class:`~ppl_lm.TransformersLM` (or a guide over one) whose tokenizer has a chat template.
        messages: a text (one user message), or ``[{"role": "user", "content": ...}, ...]``.
        add_generation_prompt: open the assistant's turn at the end (default).

    >>> import ppl_lm
    >>> lm = ppl_lm.lm.testing.tiny_chat_transformer()
    >>> lm.decode(ppl_lm.chat(lm, "ab"))
    '<|im_start|>user\\nab<|im_end|>\\n<|im_start|>assistant\\n'
    """
    messages = _messages(messages)
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        why = "its tokenizer defines none" if tokenizer is not None else "it has no tokenizer"
        raise ValueError(f"this {type(lm).__name__} has no chat template ({why}); write the prompt as text, "
                         "or load an instruct model (ppl_lm.load_lm() is SmolLM2-Instruct)")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=True)
    ids = [int(i) for i in out["input_ids"]]
    _warn_if_turns_run_on(lm)
    return ids


def _warn_if_turns_run_on(lm) -> None:
    base = getattr(lm, "base", lm)  # a LoRA guide shares its prior's network and stop tokens
    if not hasattr(base, "end_of_turn_ids"):
        return
    ends = {base.eos_id, *base.stop_ids}
    missing = [i for i in base.end_of_turn_ids() if i not in ends]
    if missing:
        names = base.tokenizer.convert_ids_to_tokens(missing)
        warnings.warn(f"the end-of-turn token(s) {', '.join(names)} do not end a sequence of this LM (its EOS is "
                      f"{base.tokenizer.convert_ids_to_tokens(base.eos_id)}): a reply would run past its turn. "
                      "Use lm = lm.for_chat()", UserWarning, stacklevel=3)
