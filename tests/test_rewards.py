"""Reward functions: vectorised, correct on known texts."""

from __future__ import annotations

import pytest
import torch

import ppl_lm
from ppl_lm import rewards


@pytest.fixture(scope="module")
def lm():
    return ppl_lm.tiny_char_transformer(seed=0)


def batch(lm, *texts, T=None):
    ids = [lm.encode(t) for t in texts]
    T = T or max(len(i) for i in ids) + 1
    return torch.tensor([i + [lm.eos_id] * (T - len(i)) for i in ids])


def test_substring_regex_keywords(lm):
    x = batch(lm, "the cat sat", "a dog", "CAT")
    assert rewards.contains(lm, x, "cat").tolist() == [True, False, False]
    assert rewards.regex(lm, x, r"^a\b").tolist() == [False, True, False]
    assert rewards.keywords(lm, x, ["cat", "dog"]).tolist() == [1.0, 1.0, 1.0]
    assert rewards.ends_with(lm, x, "dog").tolist() == [False, True, False]
    assert rewards.starts_with(lm, x, "the").tolist() == [True, False, False]


def test_batch_shape_is_kept(lm):
    x = batch(lm, "ab", "cd", "ef", "gh").reshape(2, 2, -1)
    assert rewards.contains(lm, x, "c").shape == (2, 2)
    assert rewards.length(lm, x).tolist() == [[3.0, 3.0], [3.0, 3.0]]


def test_sentiment_sign(lm):
    x = batch(lm, "I love this, it is wonderful!", "This is terrible and awful.", "The table.")
    s = rewards.sentiment(lm, x)
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0


def test_chess_game(lm):
    x = batch(lm, "1. e4 e5 2. Nf3 Nc6 3. Bb5", "1. e4 e5 2. Ke3", "1. e5 e4", "no game here")
    ok = rewards.chess_game(lm, x, min_moves=4)
    assert ok.tolist() == [True, False, False, False]


def test_factorisation(lm):
    x = batch(lm, "3 * 5 * 7 is it", "3*35", "5 x 3", "15", "2 * 2 * 3 * 5")
    assert rewards.factorisation(lm, x, 105).tolist() == [True, False, False, False, False]
    assert rewards.factorisation(lm, x, 15).tolist() == [False, False, True, False, False]
    assert rewards.factorisation(lm, x, 60).tolist() == [False, False, False, False, True]


def test_token_masks(lm):
    no_e = rewards.forbid_chars(lm, "eE")
    digits = rewards.only_chars(lm, "0123456789 ")
    x = batch(lm, "abc", "abe", "123 4")
    assert no_e.check(x).tolist() == [True, False, True]
    assert digits.check(x).tolist() == [False, False, True]
    allowed = no_e.allowed(x[:, :1])
    assert allowed.shape == (3, lm.vocab_size) and allowed[:, lm.eos_id].all()
    assert not allowed[0, lm.encode("e")[0]]


def test_reward_rejects_float_input(lm):
    with pytest.raises(TypeError, match="LongTensor"):
        rewards.contains(lm, torch.zeros(2, 3), "a")
