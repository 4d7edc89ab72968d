"""A Markov LM whose transitions depend on the position: the "full" guide of a MarkovLM.

With one transition matrix per position, the exact posterior of any condition that factorises
over (position, previous token, token) is representable.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LanguageModel, LMState, ragged_rows
from .markov import MarkovLM

__all__ = ["PositionalMarkovLM"]


class PositionalMarkovLM(LanguageModel):
    """A Markov LM whose transitions depend on the position: the "full" guide of a MarkovLM.

    ``P(x_0) = softmax(init_logits)`` after an empty prompt, ``softmax(trans_logits[0, last])``
    after a prompt ending in ``last``; ``P(x_t | x_{t-1}) = softmax(trans_logits[t, x_{t-1}])``.
    Positions count new tokens, so the same guide serves every prompt. Both tensors are
    ``nn.Parameter``\\ s of :attr:`module`.
    """

    def __init__(self, prior: MarkovLM, max_new_tokens: int):
        self.prior = prior
        self.vocab_size, self.eos_id, self.vocab = prior.vocab_size, prior.eos_id, prior.vocab
        self.max_new_tokens = max_new_tokens
        self.module = nn.Module()
        self.module.init_logits = nn.Parameter(prior.init_logits.detach().clone())
        self.module.trans_logits = nn.Parameter(
            prior.trans_logits.detach().clone().expand(max_new_tokens, -1, -1).contiguous())

    def is_trainable(self) -> bool:
        return True

    def encode(self, text):
        return self.prior.encode(text)

    def decode(self, ids):
        return self.prior.decode(ids)

    def decode_token(self, token_id):
        return self.prior.decode_token(token_id)

    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"this guide was built for max_new_tokens <= {self.max_new_tokens}, asked for "
                f"{max_new_tokens}; build a new guide for longer sequences")

    def _row(self, pos: int, last: torch.Tensor | None, B: int) -> torch.Tensor:
        if last is None:
            return torch.log_softmax(self.module.init_logits, -1).expand(B, -1)
        return torch.log_softmax(self.module.trans_logits[pos][last], -1)

    def start(self, prompt, batch_size, lengths=None):
        if lengths is not None and prompt.shape[-1]:  # only each row's last prompt token matters
            prompt, lengths = ragged_rows(prompt, batch_size, lengths)
            last = prompt.gather(-1, (lengths - 1).clamp_min(0)[:, None])[:, 0]
            logprobs = torch.where((lengths == 0)[:, None], self._row(0, None, batch_size),
                                   self._row(0, last, batch_size))
            return LMState(logprobs, (last, 0), prompt.shape[-1])
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if prompt.shape[-1] == 0:
            return LMState(self._row(0, None, batch_size), (None, 0), 0)
        last = prompt[..., -1].expand(batch_size) if prompt.dim() == 1 else prompt[:, -1]
        return LMState(self._row(0, last, batch_size), (last, 0), prompt.shape[-1])

    def extend(self, state, tokens):
        pos = state.data[1] + 1
        if pos >= self.max_new_tokens:
            raise ValueError(f"this guide has no transitions beyond position {self.max_new_tokens - 1}")
        return LMState(self._row(pos, tokens, tokens.shape[0]), (tokens, pos), state.length + 1)

    def reorder(self, state, index):
        last, pos = state.data
        return LMState(state.logprobs[index], (None if last is None else last[index], pos), state.length)

