"""The protocol every LM backend implements.

A :class:`LanguageModel` knows its vocabulary size and EOS id, encodes and decodes text, and
exposes an incremental state (``start`` / ``extend`` / ``reorder``) whose ``logprobs`` are the
next-token log-probabilities of every row. Batched ancestral sampling and batched scoring are
written once, on top of that state, in this base class; a backend may override ``score`` with a
faster single pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..distribution import SequenceDistribution
from ..tokens import after_eos_mask, as_prompt_tensor, categorical

__all__ = ["LanguageModel", "LMState", "ragged_rows", "start_rows", "sample_from"]


@dataclass
class LMState:
    """Incremental state of a batch of sequences: next-token log-probs plus backend data."""

    logprobs: torch.Tensor  # [B, V] float32, log-probabilities of the next token
    data: Any = None  # backend-specific (last token, KV cache, ...)
    length: int = 0  # number of tokens seen so far (prompt included)


def ragged_rows(prompt: torch.Tensor, batch_size: int, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a ragged batch for ``start``: ``(prompt [B, P], lengths [B])`` on the prompt's device."""
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=prompt.device)
    if prompt.dim() != 2 or prompt.shape[0] != batch_size or lengths.shape != (batch_size,):
        raise ValueError(
            f"ragged prompts need prompt [B, P] and lengths [B] with B = batch size {batch_size}; got "
            f"prompt {tuple(prompt.shape)} and lengths {tuple(lengths.shape)}")
    if batch_size and (int(lengths.min()) < 0 or int(lengths.max()) > prompt.shape[-1]):
        raise ValueError(f"prompt lengths must lie in [0, {prompt.shape[-1]}] (the padded width)")
    return prompt, lengths


def start_rows(lm: LanguageModel, prompt: torch.Tensor, batch_size: int, lengths=None) -> LMState:
    """``lm.start(prompt, batch_size, lengths)``, without ``lengths`` when the rows are not ragged,
    so an LM written to the two-argument ``start`` keeps working for prompts of one length."""
    if lengths is None:
        return lm.start(prompt, batch_size)
    return lm.start(prompt, batch_size, lengths)


def sample_from(lm: LanguageModel, state: LMState, max_new_tokens: int, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling of ``max_new_tokens`` tokens for every row of ``state``, each token drawn by
    ``draw(logprobs [B, V]) -> tokens [B]`` (:meth:`LanguageModel.sample` draws from one generator;
    a batch of contexts draws each context's rows from its own, ``ppl_lm.inference.contexts``).

    Returns ``(tokens [B, T], logprobs [B, T])`` as :meth:`LanguageModel.sample`.
    """
    num_samples = state.logprobs.shape[0]
    tokens = torch.full((num_samples, max_new_tokens), lm.eos_id, dtype=torch.long, device=lm.device)
    lps = torch.zeros(num_samples, max_new_tokens, dtype=torch.float32, device=lm.device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=lm.device)
    for t in range(max_new_tokens):
        logp = state.logprobs
        tok = draw(logp)
        tok = torch.where(done, torch.full_like(tok, lm.eos_id), tok)
        lp = logp.gather(-1, tok[:, None])[:, 0].float()
        lps[:, t] = torch.where(done, torch.zeros_like(lp), lp)
        tokens[:, t] = tok
        done = done | (tok == lm.eos_id)
        if t + 1 < max_new_tokens:
            # Finished rows keep reading EOS: the work is wasted but every row stays the same
            # length, so no attention mask is needed and the batch never syncs to the host.
            state = lm.extend(state, tok)
    return tokens, lps


class LanguageModel:
    """The protocol every LM backend implements.

    Subclasses set ``vocab_size`` and ``eos_id`` and implement ``encode``, ``decode``,
    ``start``, ``extend`` and ``reorder``. ``sample`` and ``score`` come for free.
    """

    vocab_size: int
    eos_id: int
    max_context: int | None = None
    device: torch.device = torch.device("cpu")
    #: The network's parameter dtype (``torch.bfloat16`` after ``load_lm(dtype="bfloat16")``);
    #: ``None`` for an LM that is a table. Log-probs are float32 or wider whatever it is.
    dtype: torch.dtype | None = None

    def is_trainable(self) -> bool:
        """Whether log-probs depend on parameters that require gradients (a guide)."""
        return False

    # -- text ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode_token(self, token_id: int) -> str:
        """The text of one token on its own (used by token-level constraints)."""
        return self.decode([token_id])

    def token_texts(self) -> list[str]:
        """The text of every token on its own (EOS is the empty string)."""
        return [self.decode_token(t) for t in range(self.vocab_size)]

    # -- incremental state --------------------------------------------------------------
    def start(self, prompt: torch.Tensor, batch_size: int, lengths: torch.Tensor | None = None) -> LMState:
        """State after reading ``prompt`` (``[P]`` or ``[B, P]``), for ``batch_size`` rows.

        ``lengths`` (``[B]``) makes the rows ragged: row ``i`` reads ``prompt[i, :lengths[i]]``
        (``prompt`` is right-padded, as ``SequenceDistribution`` stores ragged prompts); every
        row's next-token log-probs then equal those of its own prompt read alone.
        """
        raise NotImplementedError

    def extend(self, state: LMState, tokens: torch.Tensor) -> LMState:
        """State after appending one token per row (``tokens``: ``[B]``)."""
        raise NotImplementedError

    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        """State whose row ``i`` is row ``index[i]`` of ``state`` (resampling)."""
        raise NotImplementedError

    # -- generic batched algorithms ------------------------------------------------------
    def check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.max_context is not None and prompt_len + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's context window of {self.max_context} tokens; shorten the prompt or "
                "ask for fewer new tokens"
            )

    @torch.no_grad()
    def sample(
        self,
        prompt: Any,
        num_samples: int,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched ancestral sampling.

        Returns ``(tokens [N, T], logprobs [N, T])``: EOS-padded tokens and the log-probability
        of each token given its prefix (0 at padding).
        """
        prompt = as_prompt_tensor(prompt, self)
        self.check_context(prompt.shape[-1], max_new_tokens)
        return sample_from(self, self.start(prompt, num_samples), max_new_tokens,
                           lambda logp: categorical(logp, generator))

    def token_logprobs(self, prompt: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probability of each token of ``tokens [B, T]`` given prompt and prefix.

        Positions after the first EOS get 0. Differentiable with respect to the LM's
        parameters (used by trainable guides).
        """
        prompt = as_prompt_tensor(prompt, self)
        B, T = tokens.shape
        self.check_context(prompt.shape[-1], T)
        state = self.start(prompt, B)
        out = []
        for t in range(T):
            out.append(state.logprobs.gather(-1, tokens[:, t : t + 1])[:, 0].float())
            if t + 1 < T:
                state = self.extend(state, tokens[:, t])
        lp = torch.stack(out, -1) if out else torch.zeros(B, 0)
        # masked_fill, not a product: a padding position of probability 0 (-inf) times 0 is NaN.
        return lp.masked_fill(after_eos_mask(tokens, self.eos_id), 0.0)

    def score(self, prompt: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Total log-probability ``[B]`` of each continuation (EOS included, padding ignored)."""
        return self.token_logprobs(prompt, tokens).sum(-1)

    def sequence(self, prompt: Any = None, max_new_tokens: int = 16) -> SequenceDistribution:
        """The Pyro distribution of continuations of ``prompt``: π(x | prompt)."""
        return SequenceDistribution(self, prompt, max_new_tokens)

