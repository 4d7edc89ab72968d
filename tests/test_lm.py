"""Conformance of every LanguageModel: normalisation, sampling law, sample/score agreement."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

import ppl_lm
from ppl_lm.inference.exact import enumerate_sequences

LMS = {
    "markov": lambda: ppl_lm.MarkovLM.random(4, eos_id=0, seed=0, scale=1.5),
    "transformer": lambda: ppl_lm.tiny_transformer(4, eos_id=0, seed=0, scale=0.15),
    "transformer_static": lambda: ppl_lm.tiny_transformer(4, eos_id=0, seed=0, scale=0.15).with_kv_cache("static"),
    "char_transformer": lambda: ppl_lm.tiny_char_transformer(seed=0),
}
PROMPTS = {"markov": [[], [2, 1]], "transformer": [[], [3, 1, 2]], "transformer_static": [[], [3, 1, 2]],
           "char_transformer": ["Hi", ""]}


@pytest.fixture(params=list(LMS))
def lm_case(request):
    return request.param, LMS[request.param]()


def _prompts(name, lm):
    return PROMPTS[name]


def test_normalises_to_one_over_the_support(lm_case):
    name, lm = lm_case
    if lm.vocab_size > 10:
        pytest.skip("support too large to enumerate")
    for prompt in _prompts(name, lm):
        seqs = enumerate_sequences(lm.vocab_size, lm.eos_id, 4)
        total = lm.score(prompt, seqs).double().exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-5)


def test_sample_logprobs_equal_fresh_scoring(lm_case):
    name, lm = lm_case
    for prompt in _prompts(name, lm):
        g = torch.Generator().manual_seed(1)
        tokens, lps = lm.sample(prompt, 64, 6, generator=g)
        assert tokens.dtype == torch.int64 and tokens.shape == (64, 6)
        scored = lm.token_logprobs(prompt, tokens)
        assert torch.allclose(lps, scored, atol=1e-4), (lps - scored).abs().max()
        # canonical padding: after the first EOS, only EOS, with log-prob 0
        after = ppl_lm.tokens.after_eos_mask(tokens, lm.eos_id)
        assert (tokens[after] == lm.eos_id).all() and (lps[after] == 0).all()


def test_incremental_score_equals_single_pass(lm_case):
    name, lm = lm_case
    prompt = _prompts(name, lm)[-1]
    tokens, _ = lm.sample(prompt, 16, 5, generator=torch.Generator().manual_seed(2))
    generic = ppl_lm.LanguageModel.token_logprobs(lm, prompt, tokens)
    assert torch.allclose(generic, lm.token_logprobs(prompt, tokens), atol=1e-4)


def test_batch_equals_unbatched(lm_case):
    name, lm = lm_case
    prompt = _prompts(name, lm)[-1]
    tokens, _ = lm.sample(prompt, 8, 5, generator=torch.Generator().manual_seed(3))
    batched = lm.score(prompt, tokens)
    single = torch.stack([lm.score(prompt, tokens[i : i + 1])[0] for i in range(8)])
    assert torch.allclose(batched, single, atol=1e-4)


def test_same_seed_same_samples(lm_case):
    name, lm = lm_case
    a = lm.sample(_prompts(name, lm)[0], 32, 5, generator=torch.Generator().manual_seed(7))[0]
    b = lm.sample(_prompts(name, lm)[0], 32, 5, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_reorder_follows_rows(lm_case):
    name, lm = lm_case
    prompt = _prompts(name, lm)[-1]
    tokens, _ = lm.sample(prompt, 4, 3, generator=torch.Generator().manual_seed(4))
    state = lm.start(ppl_lm.tokens.as_prompt_tensor(prompt, lm), 4)
    state = lm.extend(state, tokens[:, 0])
    idx = torch.tensor([2, 2, 0, 1])
    state = lm.reorder(state, idx)
    state = lm.extend(state, tokens[idx, 1])
    fresh = lm.start(ppl_lm.tokens.as_prompt_tensor(prompt, lm), 4)
    fresh = lm.extend(lm.extend(fresh, tokens[idx, 0]), tokens[idx, 1])
    assert torch.allclose(state.logprobs, fresh.logprobs, atol=1e-4)


@pytest.mark.parametrize("name", ["markov", "transformer"])
def test_sampled_frequencies_match_exact_probabilities(name):
    """Chi-square goodness of fit of 20k samples against the enumerated law (fixed seed)."""
    lm = LMS[name]()
    T = 3
    seqs = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
    probs = lm.score([], seqs).double().exp()
    tokens, _ = lm.sample([], 20_000, T, generator=torch.Generator().manual_seed(0))
    index = {tuple(r): i for i, r in enumerate(seqs.tolist())}
    counts = torch.zeros(len(seqs), dtype=torch.float64)
    for row in tokens.tolist():
        counts[index[tuple(row)]] += 1
    expected = probs / probs.sum() * 20_000  # renormalise away float rounding
    keep = expected >= 5  # the chi-square approximation needs expected counts >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    pvalue = chisquare(obs.numpy(), exp.numpy()).pvalue
    assert pvalue > 1e-3, pvalue


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
    with pytest.raises(ValueError, match="could not load the language model 'nobody/no-such-model'"):
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
