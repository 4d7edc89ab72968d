"""Property-based tests (hypothesis) of SequenceDistribution and the conditions.

Random toy LMs (vocabulary sizes, EOS ids, logits with -inf entries), random batch shapes,
random token tensors with EOS anywhere, and reward values with NaN and inf. Every property is
checked against an independent computation (a Python loop over log-softmax rows, a direct
evaluation of the condition), not against the code under test. Runs derandomised (fixed seed)
with few examples, so it stays fast and reproducible.
"""

from __future__ import annotations

import contextlib
import itertools
import math

from pyro import poutine
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppl_lm
from ppl_lm.conditions import TokenMask, partial_prefix
from ppl_lm.tokens import after_eos_mask, lengths

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# Logits: ordinary values or -inf (a token that never follows); each row keeps one finite entry.
LOGIT = st.one_of(st.floats(-4.0, 4.0, allow_nan=False), st.just(-math.inf))


@st.composite
def markov_lms(draw, max_vocab: int = 4):
    v = draw(st.integers(2, max_vocab))
    eos = draw(st.integers(0, v - 1))
    init = draw(st.lists(LOGIT, min_size=v, max_size=v))
    trans = [draw(st.lists(LOGIT, min_size=v, max_size=v)) for _ in range(v)]
    for row in [init, *trans]:  # every row needs a finite entry to be a distribution
        if not any(math.isfinite(x) for x in row):
            row[draw(st.integers(0, v - 1))] = 0.0
    return ppl_lm.MarkovLM(torch.tensor(init), torch.tensor(trans), eos_id=eos)


def reference_log_prob(lm, seq: list[int]) -> float:
    """log π(seq) by a loop over the chain's rows: up to and including the first EOS; -inf for
    a token after EOS that is not EOS (non-canonical padding)."""
    total, prev, ended = 0.0, None, False
    for tok in seq:
        if ended:
            if tok != lm.eos_id:
                return -math.inf
            continue
        row = lm.init_logits if prev is None else lm.trans_logits[prev]
        total += float(torch.log_softmax(row.double(), -1)[tok])
        prev, ended = tok, tok == lm.eos_id
    return total


@FAST
@given(lm=markov_lms(), T=st.integers(1, 3))
def test_log_prob_matches_the_chain_and_sums_to_one(lm, T):
    seqs = torch.tensor(list(itertools.product(range(lm.vocab_size), repeat=T)))
    d = lm.sequence([], max_new_tokens=T)
    lp = d.log_prob(seqs)
    ref = torch.tensor([reference_log_prob(lm, s) for s in seqs.tolist()], dtype=lp.dtype)
    assert torch.equal(torch.isinf(lp), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(lp[fin], ref[fin], atol=1e-5)
    # Canonical sequences are the whole support: their probabilities sum to 1.
    canonical = d.canonical(seqs)
    assert not torch.isfinite(lp[~canonical]).any()
    assert lp[canonical].double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)


@FAST
@given(lm=markov_lms(), T=st.integers(1, 4),
       batch=st.lists(st.integers(1, 3), min_size=0, max_size=2), seed=st.integers(0, 2**31 - 1))
def test_samples_have_the_batch_shape_canonical_padding_and_positive_probability(lm, T, batch, seed):
    d = lm.sequence([], max_new_tokens=T).expand(torch.Size(batch))
    with ppl_lm.seeding.seeded(seed):
        x = d.sample()
    assert x.shape == (*batch, T) and x.dtype == torch.long
    assert bool(((x >= 0) & (x < lm.vocab_size)).all())
    # After the first EOS every position holds EOS again.
    assert not bool((after_eos_mask(x, lm.eos_id) & (x != lm.eos_id)).any())
    lp = d.log_prob(x)
    assert lp.shape == tuple(batch)
    assert bool(torch.isfinite(lp).all()), "a sampled sequence has probability 0 (a -inf logit was drawn)"
    for idx in itertools.product(*map(range, batch)):
        assert float(lp[idx]) == pytest.approx(reference_log_prob(lm, x[idx].tolist()), abs=1e-5)


@st.composite
def token_tensors(draw, max_vocab: int = 5):
    """Random token tensors ``[*batch, T]`` with EOS at random places (or nowhere)."""
    v = draw(st.integers(2, max_vocab))
    eos = draw(st.integers(0, v - 1))
    batch = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    T = draw(st.integers(1, 6))
    n = math.prod(batch) * T
    vals = draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n))
    return torch.tensor(vals).reshape(*batch, T), v, eos


@FAST
@given(data=token_tensors())
def test_lengths_count_up_to_the_first_eos(data):
    x, _, eos = data
    got = lengths(x, eos)
    flat = x.reshape(-1, x.shape[-1]).tolist()
    want = [row.index(eos) + 1 if eos in row else len(row) for row in flat]
    assert got.reshape(-1).tolist() == want
    after = after_eos_mask(x, eos).reshape(len(flat), -1).tolist()
    assert after == [[eos in row[:t] for t in range(len(row))] for row in flat]


def _factor_log_prob(fn, name: str) -> torch.Tensor:
    tr = poutine.trace(fn).get_trace()
    site = tr.nodes[name]
    return site["fn"].log_prob(site["value"])


REWARD_VALUE = st.one_of(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
                         st.just(math.nan), st.just(math.inf), st.just(-math.inf))


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=2), data=st.data(),
       beta=st.floats(1e-3, 1e3))
def test_reward_is_r_over_beta_and_rejects_every_non_finite_value(shape, data, beta):
    n = math.prod(shape)
    vals = data.draw(st.lists(REWARD_VALUE, min_size=n, max_size=n))
    r = torch.tensor(vals, dtype=torch.float64).reshape(shape)
    bad = int((~torch.isfinite(r)).sum())
    if bad:
        with pytest.raises(ValueError) as err:
            _factor_log_prob(lambda: ppl_lm.reward("r", r, beta=beta), "r")
        # The message counts the bad values of this call correctly.
        assert f"{bad} of {n}" in str(err.value)
    else:
        lf = _factor_log_prob(lambda: ppl_lm.reward("r", r, beta=beta), "r")
        assert torch.allclose(lf.double(), r / beta, rtol=1e-6, atol=0)


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=2), data=st.data(),
       prefix_closed=st.booleans(), partial=st.booleans())
def test_constraint_is_zero_or_minus_infinity(shape, data, prefix_closed, partial):
    n = math.prod(shape)
    ok = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    with partial_prefix(1) if partial else contextlib.nullcontext():
        lf = _factor_log_prob(lambda: ppl_lm.constraint("c", ok, prefix_closed=prefix_closed), "c")
    if partial and not prefix_closed:  # deferred to the finished sequence
        assert bool((lf == 0).all())
    else:
        assert torch.equal(lf == 0, ok) and torch.equal(torch.isneginf(lf), ~ok)


@FAST
@given(data=token_tensors(), picks=st.data(), lam=st.one_of(st.none(), st.floats(0.1, 10.0)))
def test_pin_counts_the_pinned_tokens(data, picks, lam):
    x, v, _ = data
    T = x.shape[-1]
    positions = picks.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=T, unique=True))
    tokens = {p: picks.draw(st.integers(0, v - 1)) for p in positions}
    lf = _factor_log_prob(lambda: ppl_lm.pin("p", x, tokens, lam=lam), "p")
    hits = sum((x[..., p] == t).long() for p, t in tokens.items())
    if lam is None:
        assert torch.equal(lf == 0, hits == len(tokens))
        assert torch.equal(torch.isneginf(lf), hits < len(tokens))
    else:
        assert torch.allclose(lf, hits.float() * lam)


@FAST
@given(data=token_tensors(), picks=st.data())
def test_pin_outside_the_sequence_is_an_error(data, picks):
    x, v, _ = data
    T = x.shape[-1]
    pos = picks.draw(st.one_of(st.integers(T, T + 5), st.integers(-5, -1)))
    with pytest.raises(ValueError, match="outside"):
        _factor_log_prob(lambda: ppl_lm.pin("p", x, {pos: 0}), "p")


@FAST
@given(data=token_tensors(), picks=st.data())
def test_token_constraint_holds_iff_every_token_is_allowed(data, picks):
    x, v, eos = data
    allowed = torch.tensor(picks.draw(st.lists(st.booleans(), min_size=v, max_size=v)))
    allowed[eos] = True  # EOS is always allowed (the padding after it too)
    mask = TokenMask(ppl_lm.MarkovLM(torch.zeros(v), torch.zeros(v, v), eos_id=eos), allowed)
    lf = _factor_log_prob(lambda: ppl_lm.token_constraint("m", x, mask), "m")
    ok = allowed[x].all(-1)
    assert torch.equal(lf == 0, ok) and torch.equal(torch.isneginf(lf), ~ok)


@FAST
@given(lm=markov_lms(), where=st.data(), bad=st.sampled_from([math.nan, math.inf]))
def test_markov_lm_rejects_nan_and_plus_inf_logits(lm, where, bad):
    v = lm.vocab_size
    init, trans = lm.init_logits.clone(), lm.trans_logits.clone()
    if where.draw(st.booleans()):
        init[where.draw(st.integers(0, v - 1))] = bad
    else:
        trans[where.draw(st.integers(0, v - 1)), where.draw(st.integers(0, v - 1))] = bad
    with pytest.raises(ValueError, match="nan|inf"):
        ppl_lm.MarkovLM(init, trans, eos_id=lm.eos_id)
