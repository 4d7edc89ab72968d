"""The conformance tests every :class:`~ppl_lm.lm.base.LanguageModel` runs (a reusable mixin).

Subclass :class:`LMConformance` in a ``Test...`` class, give it ``make_lm()`` and the prompts to
try, and pytest runs every check on that LM (genlm-control's ``PotentialTests`` idea)::

    class TestMyLM(LMConformance):
        prompts = ([], [3, 1, 2])                 # shared prompts (text, ids; [] is allowed)
        rows = ([1, 2], [3, 3], [2, 1], [1, 1])   # one prompt per row, all of one length
        text = "cab"                              # None when the LM has no text

        def make_lm(self):
            return MyLM(...)

What is checked, with the quantities defined by the protocol (``ppl_lm/lm/base.py``):

- ``sample`` returns EOS-padded tokens whose log-probs equal a fresh ``token_logprobs`` of the
  same tokens (EOS included, 0 after it), and ``score`` is their sum; padding content is ignored;
- the law: the scores of every sequence up to ``enum_tokens`` tokens sum to one (the LM is an
  autoregressive factorisation of a normalised distribution), and sampled frequencies match it
  (chi-square, fixed seed) where the support is small;
- the incremental state (``start`` / ``extend``) gives the same log-probs as one-pass scoring,
  rows are normalised, ``reorder`` moves every part of the state with its row;
- batched scoring equals row-by-row scoring, a shared prompt equals the same prompt per row,
  per-row prompts equal scoring each row alone;
- a generator seed fixes the samples (and the global RNG is left alone);
- ``vocab_size`` / ``eos_id`` / ``token_texts`` agree, ``encode`` / ``decode`` round-trip text;
- a trainable LM (a guide) scores differentiably.

Tolerances are float32 round-off (the same numbers computed along two code paths; a class
with bfloat16 weights may set ``atol = BF16_ATOL``), not statistical, except the chi-square
test (p > 1e-3 at a fixed seed). Row normalisation stays at 1e-5 in every dtype: log-probs are
float32 whatever the weights.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scipy.stats import chisquare

from ppl_lm.inference.exact import enumerate_sequences, support_size
from ppl_lm.lm.base import LanguageModel
from ppl_lm.tokens import after_eos_mask, as_prompt_tensor

__all__ = ["LMConformance", "teacher_forced", "ATOL", "BF16_ATOL"]

ATOL = 1e-4  # float32 log-probs of the same tokens along two code paths
# bfloat16 weights: one bfloat16 ulp at 1 (2^-8), the rounding of an O(1) logit when two code
# paths (a static cache and one-pass scoring) round the same products differently.
BF16_ATOL = 2.0**-8
MAX_ENUMERATED = 20_000  # sequences scored in the normalisation check
# Few batch sizes: a compiled decode step compiles once per (batch, cache length).
SMALL_BATCH = 4
MAX_LAW_SUPPORT = 400  # sequences in the chi-square check (20k draws: expected counts >= 5 mostly)


def teacher_forced(lm: LanguageModel, prompt: Any, tokens: torch.Tensor, reorder_at: int | None = None,
                   index: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token log-probs ``[B, T, V]`` along ``tokens [B, T]`` from ``start`` / ``extend``,
    optionally reordering the rows once before step ``reorder_at`` (as SMC resampling does)."""
    prompt = as_prompt_tensor(prompt, lm)
    B, T = tokens.shape
    lm.check_context(prompt.shape[-1], T)  # sizes a static KV cache
    state = lm.start(prompt, B)
    out = []
    for t in range(T):
        if t == reorder_at:
            state = lm.reorder(state, index)
            tokens = tokens[index]
        out.append(state.logprobs.float())
        if t + 1 < T:
            state = lm.extend(state, tokens[:, t])
    return torch.stack(out, 1)


def _gather(logprobs: torch.Tensor, tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    lp = logprobs.gather(-1, tokens[..., None])[..., 0]
    return lp * ~after_eos_mask(tokens, eos_id)


class LMConformance:
    """Checks any :class:`LanguageModel`; subclass it with ``make_lm`` and the prompts."""

    prompts: tuple = ([],)  # shared prompts to try (text or ids)
    rows: tuple | None = None  # one prompt per row (equal lengths), B = len(rows)
    text: str | None = None  # a text the LM encodes (None: the LM has no text)
    max_new_tokens: int = 6  # T of the sampling checks
    num_samples: int = 48
    enum_tokens: int = 3  # T of the normalisation check (capped by MAX_ENUMERATED)
    law_samples: int = 20_000
    atol: float = ATOL  # log-probs of the same tokens along two code paths (BF16_ATOL for bfloat16 weights)

    def make_lm(self) -> LanguageModel:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def lm(self):
        return self.make_lm()

    # -- helpers -----------------------------------------------------------------------------
    def _sample(self, lm, prompt, n=None, T=None, seed=0):
        n, T = n or self.num_samples, T or self.max_new_tokens
        return lm.sample(prompt, n, T, generator=torch.Generator(device=lm.device).manual_seed(seed))

    def _row_prompts(self, lm) -> torch.Tensor:
        if self.rows is None:
            pytest.skip("no per-row prompts given")
        return torch.stack([as_prompt_tensor(p, lm) for p in self.rows])

    # -- the protocol's constants ------------------------------------------------------------
    def test_vocab_and_eos_are_consistent(self, lm):
        assert isinstance(lm.vocab_size, int) and lm.vocab_size >= 2
        assert isinstance(lm.eos_id, int) and 0 <= lm.eos_id < lm.vocab_size
        texts = lm.token_texts()
        assert len(texts) == lm.vocab_size and texts[lm.eos_id] == ""
        B = SMALL_BATCH
        with torch.no_grad():
            for prompt in self.prompts:
                lm.check_context(len(as_prompt_tensor(prompt, lm)), 2)
                state = lm.start(as_prompt_tensor(prompt, lm), B)
                assert state.logprobs.shape == (B, lm.vocab_size) and state.logprobs.dtype == torch.float32
                torch.testing.assert_close(state.logprobs.logsumexp(-1), torch.zeros(B), atol=1e-5, rtol=0)
                nxt = lm.extend(state, torch.full((B,), lm.eos_id, dtype=torch.long))
                assert nxt.length == state.length + 1
                torch.testing.assert_close(nxt.logprobs.logsumexp(-1), torch.zeros(B), atol=1e-5, rtol=0)

    def test_encode_decode_round_trip(self, lm):
        if self.text is None:
            pytest.skip("this LM has no text")
        ids = lm.encode(self.text)
        assert all(isinstance(i, int) and 0 <= i < lm.vocab_size and i != lm.eos_id for i in ids)
        assert lm.decode(ids) == self.text
        assert lm.decode(ids + [lm.eos_id] + ids) == self.text  # decoding stops at EOS
        # text prompts are their token ids
        tokens, _ = self._sample(lm, ids, n=SMALL_BATCH, T=3)
        torch.testing.assert_close(lm.score(self.text, tokens), lm.score(ids, tokens), atol=self.atol, rtol=0)

    # -- sampling and scoring agree ----------------------------------------------------------
    def test_sample_logprobs_equal_fresh_scoring(self, lm):
        N, T = self.num_samples, self.max_new_tokens
        for prompt in self.prompts:
            tokens, lps = self._sample(lm, prompt, seed=1)
            assert tokens.dtype == torch.int64 and tokens.shape == (N, T) and lps.shape == (N, T)
            assert ((tokens >= 0) & (tokens < lm.vocab_size)).all()
            after = after_eos_mask(tokens, lm.eos_id)
            # canonical padding: after the first EOS only EOS, with log-prob 0; EOS itself is scored
            assert (tokens[after] == lm.eos_id).all() and (lps[after] == 0).all()
            first_eos = (tokens == lm.eos_id) & ~after
            assert first_eos[:, :-1].any(), "no sample ended early: the padding checks would be vacuous"
            assert (lps[first_eos] < 0).all() and torch.isfinite(lps).all()
            scored = lm.token_logprobs(prompt, tokens)
            torch.testing.assert_close(scored.detach(), lps, atol=self.atol, rtol=0)
            torch.testing.assert_close(lm.score(prompt, tokens).detach(), lps.sum(-1), atol=self.atol, rtol=0)

    def test_padding_is_ignored(self, lm):
        prompt = self.prompts[-1]
        tokens, lps = self._sample(lm, prompt, seed=2)
        after = after_eos_mask(tokens, lm.eos_id)
        noisy = tokens.clone()
        noise = torch.randint(0, lm.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(0))
        noisy[after] = noise[after].to(tokens.device)
        assert not torch.equal(noisy, tokens)
        torch.testing.assert_close(lm.token_logprobs(prompt, noisy).detach(), lps, atol=self.atol, rtol=0)

    def test_sequences_sum_to_one(self, lm):
        """The autoregressive factorisation is normalised: Σ_x exp(score(x)) = 1 over every
        canonical sequence of ``T`` tokens (exact enumeration)."""
        T = self.enum_tokens
        while T > 1 and support_size(lm.vocab_size, T) > MAX_ENUMERATED:
            T -= 1
        seqs = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
        assert len(seqs) <= MAX_ENUMERATED
        with torch.no_grad():
            for prompt in self.prompts:
                total = lm.score(prompt, seqs.to(lm.device)).double().exp().sum().item()
                assert total == pytest.approx(1.0, abs=1e-4), (prompt, T, total)

    def test_sampled_frequencies_match_the_law(self, lm):
        """Chi-square of ``law_samples`` draws against the enumerated law (fixed seed), at the
        longest ``T <= max_new_tokens`` whose support is small enough."""
        T = self.max_new_tokens
        while T > 1 and support_size(lm.vocab_size, T) > MAX_LAW_SUPPORT:
            T -= 1
        if support_size(lm.vocab_size, T) > MAX_LAW_SUPPORT:
            pytest.skip("vocabulary too large for a chi-square test")
        prompt = self.prompts[-1]
        seqs = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
        with torch.no_grad():
            probs = lm.score(prompt, seqs.to(lm.device)).double().exp().cpu()
        tokens, _ = self._sample(lm, prompt, n=self.law_samples, T=T, seed=0)
        index = {tuple(r): i for i, r in enumerate(seqs.tolist())}
        counts = torch.zeros(len(seqs), dtype=torch.float64)
        for row in tokens.tolist():
            counts[index[tuple(row)]] += 1
        expected = probs / probs.sum() * self.law_samples  # renormalise away float rounding
        keep = expected >= 5  # the chi-square approximation needs expected counts >= 5
        obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
        exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
        if exp[-1] < 5:  # fold a small remainder into the smallest kept cell
            obs, exp = obs[:-1], exp[:-1]
            obs[exp.argmin()] += counts[~keep].sum()
            exp[exp.argmin()] += expected[~keep].sum()
        assert keep.sum() >= 3, "too few cells for a telling chi-square test"
        pvalue = chisquare(obs.numpy(), exp.numpy()).pvalue
        assert pvalue > 1e-3, pvalue

    # -- the incremental state ---------------------------------------------------------------
    def test_incremental_state_equals_one_pass_scoring(self, lm):
        for prompt in self.prompts:
            tokens, _ = self._sample(lm, prompt, seed=3)
            with torch.no_grad():
                steps = teacher_forced(lm, prompt, tokens)
                one_pass = lm.token_logprobs(prompt, tokens)
            torch.testing.assert_close(_gather(steps, tokens, lm.eos_id), one_pass, atol=self.atol, rtol=0)

    def test_reorder_follows_rows(self, lm):
        """Reordering in the middle (duplicates, a dropped row) gives every later step the log-probs
        of the reordered rows' own histories."""
        prompt = self.prompts[-1]
        index = torch.tensor([2, 2, 0, 3])
        tokens, _ = self._sample(lm, prompt, n=len(index), seed=4)
        tokens = tokens.clone()
        # four different histories before the reorder, ending in different tokens
        tokens[:, :3] = torch.tensor([[1, 2, 1], [2, 1, 1], [1, 1, 2], [2, 2, 2]]) % lm.vocab_size
        tokens[tokens == lm.eos_id] = (lm.eos_id + 1) % lm.vocab_size  # no EOS: every step counts
        with torch.no_grad():
            reordered = teacher_forced(lm, prompt, tokens, reorder_at=2, index=index)
            fresh = teacher_forced(lm, prompt, tokens[index])
        torch.testing.assert_close(reordered[:, 2:], fresh[:, 2:], atol=self.atol, rtol=0)

    # -- batching and prompts ----------------------------------------------------------------
    def test_batched_scoring_equals_unbatched(self, lm):
        for prompt in self.prompts:
            tokens, _ = self._sample(lm, prompt, n=SMALL_BATCH, seed=5)
            with torch.no_grad():
                batched = lm.token_logprobs(prompt, tokens)
                single = torch.cat([lm.token_logprobs(prompt, tokens[i : i + 1]) for i in range(len(tokens))])
            torch.testing.assert_close(batched, single, atol=self.atol, rtol=0)

    def test_shared_and_per_row_prompts_agree(self, lm):
        rows = self._row_prompts(lm)
        B = len(rows)
        tokens, lps = self._sample(lm, rows, n=B, seed=6)
        with torch.no_grad():
            # per-row prompts: each row as if scored alone
            alone = torch.cat([lm.token_logprobs(rows[i], tokens[i : i + 1]) for i in range(B)])
            torch.testing.assert_close(lps, alone, atol=self.atol, rtol=0)
            torch.testing.assert_close(lm.token_logprobs(rows, tokens), alone, atol=self.atol, rtol=0)
            steps = teacher_forced(lm, rows, tokens)
            torch.testing.assert_close(_gather(steps, tokens, lm.eos_id), alone, atol=self.atol, rtol=0)
            # one prompt shared by every row equals the same prompt written out per row
            shared = lm.token_logprobs(rows[1], tokens)
            written_out = lm.token_logprobs(rows[1].expand(B, -1), tokens)
            torch.testing.assert_close(shared, written_out, atol=self.atol, rtol=0)
            torch.testing.assert_close(teacher_forced(lm, rows[1], tokens),
                                       teacher_forced(lm, rows[1].expand(B, -1), tokens), atol=self.atol, rtol=0)

    # -- randomness --------------------------------------------------------------------------
    def test_generator_seed_fixes_the_samples(self, lm):
        prompt = self.prompts[0]
        global_state = torch.get_rng_state()
        a, lp_a = self._sample(lm, prompt, seed=7)
        b, lp_b = self._sample(lm, prompt, seed=7)
        assert torch.equal(torch.get_rng_state(), global_state), "sampling touched the global RNG"
        assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
        assert not torch.equal(a, self._sample(lm, prompt, seed=8)[0])

    # -- guides ------------------------------------------------------------------------------
    def test_trainable_scores_are_differentiable(self, lm):
        if not lm.is_trainable():
            pytest.skip("not a trainable LM")
        module = getattr(lm, "module", None)  # guides keep their trainable weights in .module
        assert module is not None, "a trainable LM (a guide) needs .module, the nn.Module of its weights"
        params = [p for p in module.parameters() if p.requires_grad]
        assert params, "is_trainable() but lm.module has no parameter that requires a gradient"
        prompt = self.prompts[-1]
        tokens, _ = self._sample(lm, prompt, seed=9)
        score = lm.score(prompt, tokens)
        assert score.requires_grad
        grads = torch.autograd.grad(score.sum(), params, allow_unused=True)
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
