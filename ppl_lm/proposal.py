"""Token proposals for importance sampling and SMC: the same LM under another prompt, a smaller LM
over the same vocabulary, or a trained guide's LM.

A proposal is a :class:`~ppl_lm.LanguageModel` ``q`` over the target LM's vocabulary. The sampler
starts it on the model's own prompt rows for the first latent sequence site, draws every token from
``q`` (restricted to the tokens the site's token masks allow, renormalised) and weights the draw by
π/q exactly, so the target and log Z do not depend on the proposal; only the variance does.

:func:`prompted` makes "the same LM under another prompt": a :class:`PromptedLM` reads a fixed
instruction before every prompt it is started on, so ``q(x | prompt) = π(x | instruction + prompt)``
(the seed's "pre-conditioning via prompts", as a proposal, corrected). :func:`proposal_lm` turns
every accepted form of ``proposal=`` into the LM a sampler draws from, with a clear error before
any work when the vocabularies differ.

>>> import torch, ppl_lm
>>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.tensor([[0., 0, 0], [0, 5, 0], [0, 0, 5]]), eos_id=0)
>>> q = ppl_lm.prompted(lm, "b")        # q(x | prompt) = π(x | "b" + prompt)
>>> x = torch.tensor([[2, 2, 0]])
>>> bool(torch.allclose(q.score([], x), lm.score("b", x)))
True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .lm.base import LanguageModel, LMState, start_rows
from .tokens import as_prompt_tensor, categorical

__all__ = ["PromptedLM", "prompted", "proposal_lm", "proposal_name", "check_same_vocabulary", "sample_tokens",
           "PROMPTED"]

#: The text form of a prompted proposal (the CLI's ``--proposal "prompted:<text>"``).
PROMPTED = "prompted:"


class PromptedLM(LanguageModel):
    """``base`` reading ``prefix`` before every prompt: ``q(x | prompt) = base(x | prefix + prompt)``.

    The prefix is joined token for token (its ids, then the prompt's), so a ragged batch of prompt
    rows stays ragged with every length ``len(prefix)`` longer.
    """

    def __init__(self, base: LanguageModel, prefix: Any):
        if not isinstance(base, LanguageModel):
            raise TypeError(f"prompted(lm, text) needs a ppl_lm.LanguageModel, got {type(base).__name__}")
        self.base = base
        self.text = prefix if isinstance(prefix, str) else None
        self.prefix = as_prompt_tensor(prefix, base)
        if self.prefix.dim() != 1:
            raise ValueError(f"a proposal prompt is one text or one list of token ids, got shape {tuple(self.prefix.shape)}")
        if len(self.prefix) and (int(self.prefix.min()) < 0 or int(self.prefix.max()) >= base.vocab_size):
            raise ValueError(f"the proposal prompt holds token ids outside the LM's vocabulary of {base.vocab_size}")
        self.vocab_size, self.eos_id, self.device = base.vocab_size, base.eos_id, base.device
        self.max_context = None if base.max_context is None else base.max_context - len(self.prefix)

    def __repr__(self) -> str:
        shown = repr(self.text) if self.text is not None else f"{len(self.prefix)} token ids"
        return f"PromptedLM({type(self.base).__name__}, {shown})"

    def is_trainable(self) -> bool:
        return self.base.is_trainable()

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids) -> str:
        return self.base.decode(ids)

    def decode_token(self, token_id: int) -> str:
        return self.base.decode_token(token_id)

    def start(self, prompt, batch_size: int, lengths=None) -> LMState:
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        pre = self.prefix.to(prompt.device)
        if prompt.dim() == 1:
            return start_rows(self.base, torch.cat([pre, prompt]), batch_size)
        rows = torch.cat([pre.expand(prompt.shape[0], -1), prompt], -1)
        return start_rows(self.base, rows, batch_size, None if lengths is None else torch.as_tensor(lengths) + len(pre))

    def extend(self, state: LMState, tokens: torch.Tensor) -> LMState:
        return self.base.extend(state, tokens)

    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        return self.base.reorder(state, index)


def prompted(lm: LanguageModel, text: Any) -> PromptedLM:
    """The same LM under another prompt, as a proposal: ``q(x | prompt) = lm(x | text + prompt)``.

    Pass it as ``proposal=`` to ``method="importance"`` or ``"smc"``: draws come from ``q`` and
    are weighted by π/q, so the posterior and log Z are those of the model whatever ``text`` says;
    a prompt that moves ``q`` toward the condition raises the ESS, one that moves it away lowers it.

    Args:
        lm: the model's LM (or any LM over its vocabulary).
        text: the instruction read before the model's prompt (text, or token ids: e.g.
            ``ppl_lm.chat(lm, ...)`` for a chat turn).
    """
    return PromptedLM(lm, text)


def _tokenizer(lm):
    while lm is not None:
        tok = getattr(lm, "tokenizer", None)
        if tok is not None:
            return tok
        lm = getattr(lm, "base", None)
    return None


def check_same_vocabulary(q: LanguageModel, lm: LanguageModel, what: str = "the proposal") -> None:
    """A clear error unless ``q`` and ``lm`` share vocabulary size, EOS and token texts (the
    tokenizers' vocabularies when both have one; each token's text for small vocabularies)."""
    if q.vocab_size != lm.vocab_size or q.eos_id != lm.eos_id:
        raise ValueError(
            f"{what}'s LM (vocabulary {q.vocab_size}, EOS {q.eos_id}) must share the model LM's vocabulary "
            f"(vocabulary {lm.vocab_size}, EOS {lm.eos_id}): a proposal draws the model's token ids. Use an LM "
            "with the same tokenizer (e.g. a smaller model of the same family), or ppl_lm.prompted(lm, text)")
    tq, tl = _tokenizer(q), _tokenizer(lm)
    if tq is not None and tl is not None:
        if tq is tl:
            return
        vq, vl = tq.get_vocab(), tl.get_vocab()
        if vq != vl:
            diff = sorted(set(vq.items()) ^ set(vl.items()), key=lambda kv: kv[1])[:3]
            raise ValueError(f"{what}'s tokenizer differs from the model LM's (same size, other tokens: e.g. "
                             f"{diff}); a proposal must use the model's tokenizer")
        return
    if lm.vocab_size <= 4096:  # small vocabularies: compare each token's text
        try:
            same = q.token_texts() == lm.token_texts()
        except NotImplementedError:
            return
        if not same:
            bad = next(i for i, (a, b) in enumerate(zip(q.token_texts(), lm.token_texts())) if a != b)
            raise ValueError(f"{what}'s token {bad} reads {q.decode_token(bad)!r} where the model LM's reads "
                             f"{lm.decode_token(bad)!r}; a proposal must use the model's vocabulary")


def proposal_lm(proposal: Any, lm: LanguageModel) -> LanguageModel | None:
    """The LM a sampler draws the first sequence site's tokens from; ``None`` for the prior.

    Accepted: ``None`` or ``"prior"``; ``"prompted:<text>"`` (:func:`prompted` on the model's LM);
    a :class:`LanguageModel` over the model's vocabulary (:func:`prompted`'s result, a smaller LM
    with the same tokenizer); an object whose ``.lm`` is one (a trained SVI guide, ``post.guide``).
    """
    if proposal is None or (isinstance(proposal, str) and proposal == "prior"):
        return None
    if isinstance(proposal, str):
        if not proposal.startswith(PROMPTED):
            raise ValueError(f"proposal must be 'prior', '{PROMPTED}<text>', a LanguageModel or a trained guide; "
                             f"got {proposal!r}")
        return prompted(lm, proposal[len(PROMPTED):])
    q = proposal if isinstance(proposal, LanguageModel) else getattr(proposal, "lm", None)
    if not isinstance(q, LanguageModel):
        raise TypeError(
            "proposal must be 'prior', 'prompted:<text>', a ppl_lm.LanguageModel over the model's vocabulary "
            "(e.g. ppl_lm.prompted(lm, text)) or an object whose .lm is one (the guide trained by method='svi'); "
            f"got {type(proposal).__name__}")
    check_same_vocabulary(q, lm)
    return q


def proposal_name(q: LanguageModel | None) -> str:
    """How run facts name a proposal: ``"prior"``, ``"prompted:<text>"`` or the LM's type."""
    if q is None:
        return "prior"
    if isinstance(q, PromptedLM):
        return PROMPTED + (q.text if q.text is not None else f"<{len(q.prefix)} token ids>")
    return type(q).__name__


@torch.no_grad()
def sample_tokens(q: LanguageModel, prompt: torch.Tensor, lengths: torch.Tensor | None, n: int, T: int,
                  mask_states: list, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of at most ``T`` tokens from ``q`` started on ``prompt`` rows, each token drawn
    from ``q`` restricted to the tokens every mask state allows (renormalised).

    Returns ``(tokens [n, T], log_q [n])``: EOS-padded tokens and the log-probability of each sequence
    under that renormalised proposal (``-inf`` for a row where no allowed token had mass: the
    proposal does not cover the target there, and the row gets weight 0).
    """
    state = start_rows(q, prompt, n, lengths)
    tokens = torch.full((n, T), q.eos_id, dtype=torch.long, device=q.device)
    log_q = torch.zeros(n, dtype=torch.float64, device=q.device)
    done = torch.zeros(n, dtype=torch.bool, device=q.device)
    for t in range(T):
        logq = state.logprobs.float()
        if mask_states:
            allowed = mask_states[0].allowed(t + 1 == T)
            for m in mask_states[1:]:
                allowed = allowed & m.allowed(t + 1 == T)
            logq = logq.masked_fill(~allowed.to(logq.device), -math.inf)
        log_mass = torch.logsumexp(logq, -1, keepdim=True)
        stuck = ~torch.isfinite(log_mass[:, 0])
        logq = torch.where(stuck[:, None], torch.zeros_like(logq), logq - log_mass)  # renormalised
        tok = torch.where(done, torch.full((n,), q.eos_id, device=q.device), categorical(logq, generator))
        lq = logq.gather(-1, tok[:, None])[:, 0].double()
        lq = torch.where(stuck, torch.full_like(lq, -math.inf), lq)
        log_q += torch.where(done, torch.zeros_like(lq), lq)
        tokens[:, t] = tok
        for m in mask_states:
            m.advance(tok.cpu())
        done = done | (tok == q.eos_id)
        if bool(done.all()):
            break
        if t + 1 < T:
            state = q.extend(state, tok)
    return tokens, log_q
