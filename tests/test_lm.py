"""Every LanguageModel runs the conformance mixin (tests/lm_conformance.py); LM-specific checks after."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

import ppl_lm
from lm_conformance import LMConformance
from ppl_lm.lm import LMState, LoraLM, PositionalMarkovLM
from ppl_lm.lm.hf import kv_cache
from ppl_lm.lm.lora import full_transformer
from ppl_lm.tokens import as_prompt_tensor

# Dynamo traces the compiled decode step as one graph; the eager backend skips Inductor's codegen
# (CPU-cheap). tests/test_lm_static.py compares the static paths with the dynamic cache.
EAGER_GRAPH = {"backend": "eager", "fullgraph": True}


def _perturb(module: torch.nn.Module, seed: int, scale: float) -> None:
    """Move a guide's weights off the prior's, so the guide is a different LM."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _tiny(**kw):
    return ppl_lm.tiny_transformer(4, eos_id=0, seed=0, scale=0.15, **kw)


class TransformerPrompts:
    prompts = ([], [3, 1, 2])
    rows = ([1, 2, 3], [3, 3, 1], [2, 1, 1], [1, 1, 2])
    text = "cab"


class TestMarkovLM(LMConformance):
    prompts = ([], [2, 1])
    rows = ([1, 2], [3, 3], [2, 1], [1, 1])
    text = "bca"

    def make_lm(self):
        return ppl_lm.MarkovLM.random(4, eos_id=0, seed=0, scale=1.5)


class TestTinyTransformer(TransformerPrompts, LMConformance):
    def make_lm(self):
        return _tiny()


class TestTinyTransformerStaticCache(TransformerPrompts, LMConformance):
    def make_lm(self):
        return _tiny().with_kv_cache("static")


class TestTinyTransformerCompiled(TransformerPrompts, LMConformance):
    def make_lm(self):
        return _tiny().with_kv_cache("compiled", EAGER_GRAPH)


class TestTinyCharTransformer(LMConformance):
    prompts = ("Hi", "")
    rows = ("ab", "Hi", "\n\n", "zz")
    text = "Hello, world!\n"
    num_samples = 256  # EOS has probability ~1% a step: ~18 samples end early (the padding checks need some)
    max_new_tokens = 8
    enum_tokens = 2  # 9,121 sequences

    def make_lm(self):
        return ppl_lm.tiny_char_transformer(seed=0)


class TestPositionalMarkovLM(LMConformance):
    prompts = ([], [2, 1])
    rows = ([1, 2], [3, 3], [2, 1], [1, 1])
    text = "bca"
    max_new_tokens = 5

    def make_lm(self):
        lm = PositionalMarkovLM(ppl_lm.MarkovLM.random(4, eos_id=0, seed=0, scale=1.5), max_new_tokens=6)
        _perturb(lm.module, seed=1, scale=1.0)
        return lm


class TestLoraLM(TransformerPrompts, LMConformance):
    def make_lm(self):
        lm = LoraLM(_tiny(), r=4, target_modules=["q_proj", "v_proj", "o_proj"])
        _perturb(lm.module, seed=1, scale=0.5)
        return lm

    def test_differs_from_the_prior_which_stays_intact(self, lm):
        tokens, _ = lm.sample([3, 1, 2], 16, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            guide, prior, fresh = (m.score([3, 1, 2], tokens) for m in (lm, lm.base, _tiny()))
        assert (guide - prior).abs().max() > 0.1  # the adapter changes the LM...
        torch.testing.assert_close(prior, fresh, atol=1e-6, rtol=0)  # ...and only inside its calls


class TestFullTransformerCopy(TransformerPrompts, LMConformance):
    def make_lm(self):
        lm = full_transformer(_tiny())
        _perturb(lm.module, seed=1, scale=0.05)
        return lm

    def test_differs_from_the_prior(self, lm):
        tokens, _ = lm.sample([3, 1, 2], 16, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (lm.score([3, 1, 2], tokens) - _tiny().score([3, 1, 2], tokens)).abs().max() > 0.1


# -- the mixin fails on planted bugs ---------------------------------------------------------------
def _reorder_logprobs_only(self, state, index):
    return LMState(state.logprobs[index.to(state.logprobs.device)], state.data, state.length)


def _cache_not_reordered(self, index, length):
    return self


def _eos_not_scored(tokens, eos_id):
    return torch.cumsum((tokens == eos_id).long(), -1) > 0  # masks the first EOS too


def _plant_prompt_off_by_one(monkeypatch):
    one_pass = ppl_lm.TransformersLM.token_logprobs
    monkeypatch.setattr(ppl_lm.TransformersLM, "token_logprobs",
                        lambda self, prompt, tokens: one_pass(self, as_prompt_tensor(prompt, self)[..., :-1], tokens))


def _plant_sampler(monkeypatch, change):
    sampler = ppl_lm.lm.base.categorical
    monkeypatch.setattr(ppl_lm.lm.base, "categorical", lambda logp, generator: change(sampler, logp, generator))


def _plant_first_row_prompt(monkeypatch):
    start = ppl_lm.MarkovLM.start

    def first_row(self, prompt, batch_size):
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        return start(self, prompt[0] if prompt.dim() == 2 else prompt, batch_size)

    monkeypatch.setattr(ppl_lm.MarkovLM, "start", first_row)


PLANTED = {
    # bug: (a conformance class, the check that must fail, how to plant it)
    "reorder forgets the KV cache (LM)": (
        TestTinyTransformer, "test_reorder_follows_rows",
        lambda mp: mp.setattr(ppl_lm.TransformersLM, "reorder", _reorder_logprobs_only)),
    "reorder forgets the KV cache (dynamic strategy)": (
        TestTinyTransformer, "test_reorder_follows_rows",
        lambda mp: mp.setattr(kv_cache.DynamicState, "reorder", _cache_not_reordered)),
    "reorder forgets the KV cache (static strategy)": (
        TestTinyTransformerStaticCache, "test_reorder_follows_rows",
        lambda mp: mp.setattr(kv_cache.StaticState, "reorder", _cache_not_reordered)),
    "reorder forgets the KV cache (compiled strategy)": (
        TestTinyTransformerCompiled, "test_reorder_follows_rows",
        lambda mp: mp.setattr(kv_cache.StaticState, "reorder", _cache_not_reordered)),
    "one-pass scoring drops the first EOS": (
        TestTinyTransformer, "test_sample_logprobs_equal_fresh_scoring",
        lambda mp: mp.setattr(ppl_lm.lm.hf.model, "after_eos_mask", _eos_not_scored)),
    "EOS not scored breaks normalisation": (
        TestTinyTransformer, "test_sequences_sum_to_one",
        lambda mp: mp.setattr(ppl_lm.lm.hf.model, "after_eos_mask", _eos_not_scored)),
    "one-pass scoring reads the prompt one token short": (
        TestTinyTransformer, "test_incremental_state_equals_one_pass_scoring", _plant_prompt_off_by_one),
    "sampler at temperature 2/3, reporting the model's log-probs": (
        TestMarkovLM, "test_sampled_frequencies_match_the_law",
        lambda mp: _plant_sampler(mp, lambda f, logp, g: f(torch.log_softmax(1.5 * logp, -1), g))),
    "sampler ignores the generator": (
        TestMarkovLM, "test_generator_seed_fixes_the_samples",
        lambda mp: _plant_sampler(mp, lambda f, logp, g: f(logp, None))),
    "per-row prompts read as the first row's": (
        TestMarkovLM, "test_shared_and_per_row_prompts_agree", _plant_first_row_prompt),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_fails_the_conformance_mixin(bug, monkeypatch):
    case, check, plant = PLANTED[bug]
    plant(monkeypatch)
    lm = case().make_lm()
    with pytest.raises(AssertionError):
        getattr(case(), check)(lm)


def test_markov_lm_prompt_uses_last_token():
    lm = ppl_lm.MarkovLM(torch.zeros(3), torch.tensor([[0.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]]), eos_id=0)
    p = lm.score([2, 1], torch.tensor([[0, 0]])).exp().item()
    assert p == pytest.approx(math.exp(5) / (math.exp(5) + 2))


def test_bad_markov_inputs():
    with pytest.raises(ValueError, match="init_logits"):
        ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="eos_id"):
        ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=5)


def test_prompt_longer_than_context_window():
    lm = ppl_lm.tiny_transformer(4, max_context=8)
    with pytest.raises(ValueError, match="context window"):
        lm.sample([1] * 6, 2, 4)
    with pytest.raises(ValueError, match="context window"):
        lm.sequence([1] * 6, max_new_tokens=4)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no such file or folder: '/no/such/model-folder'"):
        ppl_lm.load_lm("/no/such/model-folder")
    # A Hugging Face id not in the local cache: read from the cache only, never downloaded.
    with pytest.raises(ValueError, match="'nobody/no-such-model' is not a known model: .*ppl-lm never downloads"):
        ppl_lm.load_lm("nobody/no-such-model", progress=False)


def test_toy_vocab_round_trip():
    lm = ppl_lm.MarkovLM.random(5)
    assert lm.decode(lm.encode("bcd")) == "bcd" and lm.encode("a") == [1]
    with pytest.raises(ValueError, match="cannot encode"):
        lm.encode("z")


def test_categorical_sampler_is_exact_and_never_draws_zero_mass():
    """The CDF-inversion sampler: chi-square against the law, probability-0 tokens never drawn,
    and an unnormalised rounding of the total (sum != 1) does not bias it."""
    from ppl_lm.tokens import categorical as _categorical

    probs = torch.tensor([0.0, 0.5, 1e-3, 0.2, 0.0, 0.299])
    logp = probs.log().expand(200_000, -1)
    draws = _categorical(logp, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep].double() / probs.sum() * len(draws)
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
    # a row that is all zero mass but one token: always that token
    one = torch.full((4, 50_000), -math.inf)
    one[:, 49_999] = 0.0
    assert (_categorical(one, torch.Generator().manual_seed(1)) == 49_999).all()


@pytest.mark.parametrize("vocab", [37, 64])  # padded last block; whole blocks (the numpy path)
def test_two_level_sampler_is_exact_and_never_draws_zero_mass(monkeypatch, vocab):
    """Blocks of 2 tokens (so these vocabularies take the two-level search): chi-square against
    the law restricted to the allowed tokens, zero-mass and forbidden tokens never drawn, the
    allowed mass exact, and the same draws as one full cumulative sum on the same uniforms."""
    from ppl_lm import tokens

    monkeypatch.setattr(tokens, "CATEGORICAL_BLOCK", 2)
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(vocab, generator=g) ** 4
    probs[::5] = 0.0  # zero mass, some at block edges
    probs[-1] = 0.0  # the last token: a position past the CDF must not land on it
    logp = (probs / probs.sum()).log()
    allowed = torch.rand(vocab, generator=g) > 0.3
    n = 200_000
    draws, log_mass = tokens.masked_categorical(logp.expand(n, -1), allowed, torch.Generator().manual_seed(0))
    law = torch.where(allowed, probs, 0.0).double()
    assert torch.allclose(log_mass, (law.sum() / probs.double().sum()).log().expand(n), atol=1e-6)
    counts = torch.bincount(draws, minlength=vocab).double()
    assert counts[law == 0].sum() == 0
    keep = law > 0
    assert chisquare(counts[keep].numpy(), (law[keep] / law.sum() * n).numpy()).pvalue > 1e-3
    # the same uniforms through one full cumulative sum (the small-vocabulary path) draw the same
    monkeypatch.setattr(tokens, "CATEGORICAL_BLOCK", 10_000)
    full, _ = tokens.masked_categorical(logp.expand(n, -1), allowed, torch.Generator().manual_seed(0))
    assert (full != draws).sum() <= 2  # ties only within float64 rounding of a boundary


def test_masked_sampler_rows_without_allowed_mass_die():
    """A row whose allowed tokens have no mass gets log mass -inf and a token (drawn uniformly,
    so the random stream stays aligned); the other rows are unaffected."""
    from ppl_lm.tokens import masked_categorical

    logp = torch.log_softmax(torch.randn(3, 50_000, generator=torch.Generator().manual_seed(0)), -1)
    allowed = torch.ones(3, 50_000, dtype=torch.bool)
    allowed[1] = False
    tok, log_mass = masked_categorical(logp, allowed, torch.Generator().manual_seed(1))
    assert log_mass[1] == -math.inf and torch.isfinite(log_mass[[0, 2]]).all()
    assert torch.allclose(log_mass[[0, 2]], torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert tok.shape == (3,) and bool(((tok >= 0) & (tok < 50_000)).all())


@pytest.mark.parametrize("vocab", [7, 64])  # one cumulative sum; the two-level search (blocks of 2)
@pytest.mark.parametrize("shift", [100.0, -200.0])
def test_masked_sampler_takes_unnormalised_rows(monkeypatch, vocab, shift):
    """Rows shifted by a constant (a twist's logp + log ψ): the log-mass is log Σ exp exactly (the
    shift plus the allowed mass), and the draws are those of the normalised row on the same uniforms."""
    from ppl_lm import tokens

    monkeypatch.setattr(tokens, "CATEGORICAL_BLOCK", 2)
    logp = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(4)), -1).expand(2000, -1)
    allowed = torch.arange(vocab) % 3 != 1
    for mask in (None, allowed):
        base, base_mass = tokens.masked_categorical(logp, mask, torch.Generator().manual_seed(0))
        tok, log_mass = tokens.masked_categorical(logp + shift, mask, torch.Generator().manual_seed(0))
        assert torch.allclose(log_mass, base_mass + shift, atol=1e-4, rtol=0)
        assert (tok != base).sum() <= 2  # ties only within float32 rounding of the shifted row


def test_masked_sampler_draws_a_row_of_tiny_allowed_mass():
    """Allowed tokens of log-prob about −110 (exp underflows float32) are drawn with their law, and
    the log-mass is theirs; a NaN row dies instead of drawing silently."""
    from ppl_lm.tokens import masked_categorical

    n, V = 20_000, 9
    logp = torch.full((n, V), math.log(1 / 7))
    logp[:, 3], logp[:, 7] = -110.0, -110.0 - math.log(3.0)  # odds 3 : 1 between the allowed tokens
    logp[0] = float("nan")
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 7]] = True
    tok, log_mass = masked_categorical(logp, allowed, torch.Generator().manual_seed(2))
    assert log_mass[0] == -math.inf
    expected = -110.0 + math.log(4 / 3)
    assert torch.allclose(log_mass[1:], torch.full((n - 1,), expected, dtype=torch.float64), atol=1e-5, rtol=0)
    counts = torch.bincount(tok[1:], minlength=V).double()
    assert counts.sum() == counts[3] + counts[7]
    assert chisquare(counts[[3, 7]].numpy(), [0.75 * (n - 1), 0.25 * (n - 1)]).pvalue > 1e-3


def test_shared_prompt_scoring_equals_one_pass_with_gradients():
    """Rows sharing a prompt read it once (KV cache repeated): same log-probs and same
    gradients as one forward pass over prompt + continuation for every row."""
    lm = ppl_lm.tiny_transformer(11, eos_id=0, seed=4, scale=0.15)
    params = [p for p in lm.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    prompt = torch.tensor([3, 1, 2, 7])
    tokens = torch.randint(1, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    tokens[1, 2:] = 0  # an EOS-padded row
    shared = lm.token_logprobs(prompt, tokens)
    ids = torch.cat([prompt.expand(6, -1), tokens], -1)
    logits = lm.model(input_ids=ids, use_cache=False).logits[:, 3:8]
    one = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0]
    one = one * ~ppl_lm.tokens.after_eos_mask(tokens, 0)
    torch.testing.assert_close(shared, one, atol=1e-5, rtol=1e-5)
    w = torch.randn(shared.shape, generator=torch.Generator().manual_seed(1))
    ga = torch.autograd.grad((w * shared).sum(), params)
    gb = torch.autograd.grad((w * one).sum(), params)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # per-row prompts take the single pass; one row and T = 1 work too
    rows = torch.stack([prompt, prompt.flip(0)] * 3)
    assert lm.token_logprobs(rows, tokens).shape == (6, 5)
    torch.testing.assert_close(lm.token_logprobs(prompt, tokens[:1]), one[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm.token_logprobs(prompt, tokens[:, :1]), one[:, :1], atol=1e-5, rtol=1e-5)


def _fresh_interpreter(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_core_and_toy_lms_load_without_the_transformers_side():
    """``import ppl_lm`` (or ``ppl_lm.distribution``) and a toy LM's run import neither
    transformers nor ``ppl_lm.lm.hf``; the first use of one of its names loads it."""
    out = _fresh_interpreter(
        "import sys, pyro, ppl_lm.distribution\n"
        "import ppl_lm\n"
        "lm = ppl_lm.MarkovLM.random(3, eos_id=0, seed=0)\n"
        "def model():\n"
        "    pyro.sample('x', lm.sequence([], max_new_tokens=2))\n"
        "ppl_lm.infer(model, method='smc', num_particles=8, seed=0, progress=False)\n"
        "heavy = ('transformers', 'peft', 'ppl_lm.lm.hf', 'ppl_lm.lm.lora', 'ppl_lm.lm.testing')\n"
        "print('TOY', sorted(m for m in heavy if m in sys.modules))\n"
        "print('LAZY', ppl_lm.TransformersLM is ppl_lm.lm.hf.TransformersLM, 'ppl_lm.lm.hf' in sys.modules)\n")
    assert "TOY []" in out and "LAZY True True" in out, out
