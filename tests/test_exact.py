"""The exact backend against hand enumeration, and prompting as conditioning both ways."""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

import ppl_lm
from ppl_lm.inference.exact import enumerate_sequences, support_size


@pytest.fixture
def lm():
    return ppl_lm.MarkovLM.random(3, eos_id=0, seed=5, scale=1.2)


def _hand_prob(lm, seq):
    """P(seq) by the definition of the Markov LM, token by token."""
    init = torch.softmax(lm.init_logits, -1)
    trans = torch.softmax(lm.trans_logits, -1)
    p, prev = 1.0, None
    for tok in seq:
        p *= float(init[tok] if prev is None else trans[prev, tok])
        if tok == lm.eos_id:
            break
        prev = tok
    return p


def test_enumeration_is_the_canonical_support():
    seqs = enumerate_sequences(3, 0, 3)
    assert len(seqs) == support_size(3, 3) == 1 + 2 + 4 + 8
    assert len({tuple(r) for r in seqs.tolist()}) == len(seqs)


def test_exact_matches_hand_enumeration(lm):
    T, beta = 3, 0.7

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.reward("r", (x == 1).float().sum(-1), beta=beta)
        ppl_lm.constraint("not_2_first", x[..., 0] != 2)

    post = ppl_lm.infer(model, method="exact")
    # by hand: every sequence of length <= T over {1, 2} then EOS, or length T without EOS
    weights = {}
    for n in range(T + 1):
        for prefix in itertools.product([1, 2], repeat=n):
            seq = list(prefix) + [0] * (T - n)
            if seq[0] == 2:
                continue
            weights[tuple(seq)] = _hand_prob(lm, seq) * math.exp(sum(t == 1 for t in seq) / beta)
    z = sum(weights.values())
    assert post.log_evidence == pytest.approx(math.log(z), abs=1e-5)
    probs = post.probabilities()
    assert set(probs) == set(weights)
    for k, w in weights.items():
        assert probs[k] == pytest.approx(w / z, abs=1e-6)
    assert post.stats["reward:r"].shape == (len(post),)


def test_prompt_as_prefix_equals_prompt_as_condition(lm):
    """lm.sequence(prompt) is π(x | prompt); conditioning a prompt site gives the same
    continuation law, with log Z = log π(prompt)."""
    y = torch.tensor([1, 2])

    def direct():
        return pyro.sample("x", lm.sequence(y, max_new_tokens=3))

    def two_sites():
        p = pyro.sample("prompt", lm.sequence([], max_new_tokens=2))
        return pyro.sample("x", lm.sequence(p, max_new_tokens=3))

    a = ppl_lm.infer(direct, method="exact")
    b = ppl_lm.infer(poutine.condition(two_sites, {"prompt": y}), method="exact")
    assert a.log_evidence == pytest.approx(0.0, abs=1e-6)
    assert b.log_evidence == pytest.approx(math.log(_hand_prob(lm, [1, 2])), abs=1e-6)
    pa, pb = a.probabilities(), b.probabilities()
    assert set(pa) == set(pb)
    assert all(pa[k] == pytest.approx(pb[k], abs=1e-6) for k in pa)


def test_support_too_large_is_a_clear_error():
    lm = ppl_lm.MarkovLM.random(30)

    def model():
        pyro.sample("x", lm.sequence([], max_new_tokens=8))

    with pytest.raises(ValueError, match="exact enumeration is for toy LMs"):
        ppl_lm.infer(model, method="exact")


def test_unsatisfiable_condition_is_a_clear_error(lm):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
        ppl_lm.constraint("never", x[..., 0] > 5)

    with pytest.raises(ValueError, match="no sequence"):
        ppl_lm.infer(model, method="exact")


def test_unknown_method(lm):
    with pytest.raises(ValueError, match="unknown inference method"):
        ppl_lm.infer(lambda: None, method="magic")


def test_exact_on_tiny_transformer_normalises():
    lm = ppl_lm.tiny_transformer(4, seed=2, scale=0.2)

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
        ppl_lm.reward("len", ppl_lm.rewards.length(lm, x), beta=2.0)

    post = ppl_lm.infer(model, method="exact")
    assert float(post.weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert post.info["prior_mass"] == pytest.approx(1.0, abs=1e-5)
