"""The exact toy LM (a Markov chain over a small vocabulary) and toy-vocabulary text."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import LanguageModel, LMState, ragged_rows

__all__ = ["MarkovLM", "ToyVocab"]


class ToyVocab:
    """Text for small vocabularies: the non-EOS tokens are the letters a, b, c... in id order;
    EOS is the empty string (with ``eos_id=0``, token 1 is "a", token 2 is "b", ...)."""

    def __init__(self, vocab_size: int, eos_id: int, strings: Sequence[str] | None = None):
        if strings is None:
            letters = iter("abcdefghijklmnopqrstuvwxyz" + "".join(chr(c) for c in range(0x3b1, 0x3ca)))
            strings = ["" if i == eos_id else next(letters) for i in range(vocab_size)]
        if len(strings) != vocab_size:
            raise ValueError(f"need {vocab_size} token strings, got {len(strings)}")
        self.strings = list(strings)
        self.eos_id = eos_id
        self._index = {s: i for i, s in enumerate(self.strings) if s}

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for j in range(len(text), i, -1):  # longest match first
                if text[i:j] in self._index:
                    ids.append(self._index[text[i:j]])
                    i = j
                    break
            else:
                raise ValueError(f"cannot encode {text[i]!r} with this toy vocabulary {self.strings}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if int(i) == self.eos_id:
                break
            out.append(self.strings[int(i)])
        return "".join(out)


class MarkovLM(LanguageModel):
    """An exact toy LM: P(x_1)=softmax(init_logits), P(x_t|x_{t-1})=softmax(trans_logits[x_{t-1}]).

    The prompt is a list of token ids (possibly empty): an empty prompt uses ``init_logits``,
    otherwise the row of the last prompt token.

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> lm.score([], torch.tensor([[1, 0]])).exp().item()  # (1/3) * (1/3)
    0.1111111...
    """

    def __init__(self, init_logits, trans_logits, eos_id: int = 0, token_strings=None):
        init_logits = torch.as_tensor(init_logits, dtype=torch.float32)
        trans_logits = torch.as_tensor(trans_logits, dtype=torch.float32)
        V = init_logits.shape[-1]
        if init_logits.dim() != 1 or trans_logits.shape != (V, V):
            raise ValueError(
                f"MarkovLM needs init_logits [V] and trans_logits [V, V]; got {tuple(init_logits.shape)}"
                f" and {tuple(trans_logits.shape)}"
            )
        if not (0 <= eos_id < V):
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary of size {V}")
        for what, logits in (("init_logits", init_logits), ("trans_logits", trans_logits)):
            bad = (logits.isnan() | logits.isposinf()).nonzero()
            if len(bad):
                at = tuple(bad[0].tolist())
                raise ValueError(
                    f"MarkovLM: {what}[{', '.join(map(str, at))}] is {logits[at].item()} ({len(bad)} NaN or +inf "
                    f"entries in {what}); logits must be real numbers, or -inf for a token of probability 0")
        if not (torch.isfinite(init_logits).any() and torch.isfinite(trans_logits).any(-1).all()):
            raise ValueError("MarkovLM: every row of logits needs at least one finite entry (a row of -inf is "
                             "not a distribution)")
        self.init_logits = init_logits
        self.trans_logits = trans_logits
        self.vocab_size = V
        self.eos_id = eos_id
        self.vocab = ToyVocab(V, eos_id, token_strings)

    @classmethod
    def random(cls, vocab_size: int = 4, eos_id: int = 0, seed: int = 0, scale: float = 1.0) -> "MarkovLM":
        g = torch.Generator().manual_seed(seed)
        return cls(
            scale * torch.randn(vocab_size, generator=g),
            scale * torch.randn(vocab_size, vocab_size, generator=g),
            eos_id=eos_id,
        )

    def is_trainable(self) -> bool:
        return self.init_logits.requires_grad or self.trans_logits.requires_grad

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def decode_token(self, token_id: int) -> str:
        return self.vocab.strings[int(token_id)]

    def _row(self, last: torch.Tensor | None, B: int) -> torch.Tensor:
        if last is None:
            return torch.log_softmax(self.init_logits, -1).expand(B, -1)
        return torch.log_softmax(self.trans_logits[last], -1)

    def start(self, prompt, batch_size, lengths=None):
        if lengths is not None and prompt.shape[-1]:  # only each row's last prompt token matters
            prompt, lengths = ragged_rows(prompt, batch_size, lengths)
            last = prompt.gather(-1, (lengths - 1).clamp_min(0)[:, None])[:, 0]
            logprobs = self._row(last, batch_size)
            logprobs = torch.where((lengths == 0)[:, None], self._row(None, batch_size), logprobs)
            return LMState(logprobs, last, prompt.shape[-1])
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if prompt.shape[-1] == 0:
            return LMState(self._row(None, batch_size), None, 0)
        last = prompt[..., -1].expand(batch_size) if prompt.dim() == 1 else prompt[:, -1]
        return LMState(self._row(last, batch_size), last, prompt.shape[-1])

    def extend(self, state, tokens):
        return LMState(self._row(tokens, tokens.shape[0]), tokens, state.length + 1)

    def reorder(self, state, index):
        data = None if state.data is None else state.data[index]
        return LMState(state.logprobs[index], data, state.length)

