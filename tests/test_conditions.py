"""Conditions are likelihood factors with bookkeeping; bad input is a clear error."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

import ppl_lm
from ppl_lm.conditions.factors import factor_of
from ppl_lm.conditions import partial_prefix


def _trace(fn):
    with pyro.plate("particles", 3):
        return poutine.trace(fn).get_trace()


def test_reward_is_factor_r_over_beta_and_records_r():
    r = torch.tensor([1.0, -2.0, 0.5])
    tr = _trace(lambda: ppl_lm.reward("r", r, beta=0.25))
    site = tr.nodes["r"]
    assert site["is_observed"]
    assert torch.allclose(site["fn"].log_prob(site["value"]), r / 0.25)
    meta = factor_of(site)
    assert meta.kind == "reward" and torch.equal(meta.r, r) and meta.beta == 0.25


@pytest.mark.parametrize("beta", [0, -1.0, math.inf, math.nan])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        _trace(lambda: ppl_lm.reward("r", torch.zeros(3), beta=beta))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward(bad):
    with pytest.raises(ValueError, match="non-finite"):
        _trace(lambda: ppl_lm.reward("r", torch.tensor([0.0, bad, 1.0]), beta=1.0))


def test_reward_must_be_tensor():
    with pytest.raises(TypeError, match="tensor"):
        _trace(lambda: ppl_lm.reward("r", [1.0, 2.0], beta=1.0))


def test_constraint_is_zero_or_minus_inf():
    ok = torch.tensor([True, False, True])
    tr = _trace(lambda: ppl_lm.constraint("c", ok))
    lp = tr.nodes["c"]["fn"].log_prob(tr.nodes["c"]["value"])
    assert lp.tolist() == [0.0, -math.inf, 0.0]


def test_constraint_needs_bool():
    with pytest.raises(TypeError, match="boolean"):
        _trace(lambda: ppl_lm.constraint("c", torch.tensor([1.0, 0.0, 1.0])))


def test_constraint_on_prefix_is_deferred_unless_prefix_closed():
    ok = torch.tensor([True, False, True])
    with partial_prefix(2):
        assert ppl_lm.is_partial()
        deferred = _trace(lambda: ppl_lm.constraint("c", ok))
        pruned = _trace(lambda: ppl_lm.constraint("c", ok, prefix_closed=True))
    assert not ppl_lm.is_partial()
    assert deferred.nodes["c"]["fn"].log_prob(deferred.nodes["c"]["value"]).tolist() == [0.0, 0.0, 0.0]
    assert pruned.nodes["c"]["fn"].log_prob(pruned.nodes["c"]["value"]).tolist() == [0.0, -math.inf, 0.0]


def test_pin_soft_is_lambda_times_matches():
    x = torch.tensor([[1, 2, 3], [1, 0, 0], [2, 2, 3]])
    tr = _trace(lambda: ppl_lm.pin("p", x, {0: 1, 2: 3}, lam=2.0))
    assert tr.nodes["p"]["fn"].log_prob(tr.nodes["p"]["value"]).tolist() == [4.0, 2.0, 2.0]


def test_pin_hard_and_on_prefixes():
    x = torch.tensor([[1, 2, 3], [1, 0, 0], [2, 2, 3]])
    tr = _trace(lambda: ppl_lm.pin("p", x, {0: 1, 2: 3}))
    assert tr.nodes["p"]["fn"].log_prob(tr.nodes["p"]["value"]).tolist() == [0.0, -math.inf, -math.inf]
    with partial_prefix(1):  # only position 0 exists yet: row 1 is still admissible
        tr = _trace(lambda: ppl_lm.pin("p", x, {0: 1, 2: 3}))
    assert tr.nodes["p"]["fn"].log_prob(tr.nodes["p"]["value"]).tolist() == [0.0, 0.0, -math.inf]


def test_pin_errors():
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="outside"):
        ppl_lm.pin("p", x, {5: 1})
    with pytest.raises(ValueError, match="at least one"):
        ppl_lm.pin("p", x, {})
    with pytest.raises(TypeError, match="LongTensor"):
        ppl_lm.pin("p", x.float(), {0: 1})
    with pytest.raises(ValueError, match="finite"):
        ppl_lm.pin("p", x, {0: 1}, lam=math.inf)


def test_token_constraint_checks_every_token():
    lm = ppl_lm.MarkovLM.random(4)
    mask = ppl_lm.rewards.forbid_chars(lm, "b")
    x = torch.tensor([[1, 3, 0], [3, 2, 0], [3, 3, 3]])  # "ac", "cb", "ccc" (token 1 is "a")
    assert mask.check(x).tolist() == [True, False, True]
    with pytest.raises(TypeError, match="TokenMask"):
        ppl_lm.token_constraint("t", x, "b")


def test_token_constraint_on_a_prefix_checks_only_the_generated_tokens():
    """A mask that forbids EOS at position 1 (as a pin does) must not prune a prefix of length 1,
    whose position 1 is only EOS padding; on the full sequence it does."""
    from ppl_lm.conditions import TokenMask

    lm = ppl_lm.MarkovLM.random(4, eos_id=0)

    class NoEosSecond(TokenMask):
        def allowed(self, prefix):
            a = torch.ones(prefix.shape[0], 4, dtype=torch.bool)
            if prefix.shape[1] == 1:
                a[:, 0] = False
            return a

    mask = NoEosSecond(lm)
    x = torch.tensor([[1, 0, 0], [2, 0, 0], [2, 3, 0]])  # "a", "b", "bc" (EOS = 0 pads)

    def log_factor():
        tr = _trace(lambda: ppl_lm.token_constraint("t", x, mask))
        return tr.nodes["t"]["fn"].log_prob(tr.nodes["t"]["value"]).tolist()

    with partial_prefix(1):
        assert log_factor() == [0.0, 0.0, 0.0]
    with partial_prefix(2):
        assert log_factor() == [-math.inf, -math.inf, 0.0]
    assert log_factor() == [-math.inf, -math.inf, 0.0]
