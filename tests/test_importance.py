"""Importance sampling: chunking, seeds, guides, PSIS k-hat, error paths, against exact answers.

Tolerances are Monte Carlo errors at a fixed seed: log Z within four of its standard errors,
TV within three times its expected value (see toys.py).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from pyro.distributions import TorchDistribution, constraints

import ppl_lm
from ppl_lm.distribution import SequenceDistribution
from ppl_lm.inference import importance
from toys import markov_lm, soft_reward, hard_constraint, tv_distance, tv_tolerance


def _run(model, *args, **kw):
    kw.setdefault("progress", False)
    return ppl_lm.infer(model, *args, method="importance", **kw)


def test_same_seed_same_samples_and_different_seed_differs(soft):
    _, model, args, _ = soft
    a = _run(model, *args, num_samples=500, chunk_size=128, seed=3)
    b = _run(model, *args, num_samples=500, chunk_size=128, seed=3)
    c = _run(model, *args, num_samples=500, chunk_size=128, seed=4)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights)
    assert a.log_evidence == b.log_evidence
    assert not torch.equal(a.samples, c.samples)


def test_chunking_agrees_within_standard_error(soft):
    """Chunks draw from one random stream, so another chunk size gives other samples (by design);
    the estimates must agree within their Monte Carlo error, and with the exact answer."""
    _, model, args, exact = soft
    one = _run(model, *args, num_samples=6000, chunk_size=6000, seed=0)
    many = _run(model, *args, num_samples=6000, chunk_size=700, seed=0)  # 9 chunks, the last one short
    assert len(many) == 6000
    se = math.hypot(one.log_evidence_se, many.log_evidence_se)
    assert abs(one.log_evidence - many.log_evidence) <= 4 * se
    for post in (one, many):
        assert abs(post.log_evidence - exact.log_evidence) <= 4 * post.log_evidence_se
        assert tv_distance(post, exact) <= tv_tolerance(exact, post.ess)


def test_prior_proposal_scores_the_sequence_once(soft):
    """The weight is the likelihood; the sampler's log-probs are reused for log_prior."""
    lm, model, args, _ = soft
    calls = []
    orig = lm.token_logprobs
    lm.token_logprobs = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        post = _run(model, *args, num_samples=300, seed=0)
    finally:
        del lm.token_logprobs
    assert calls == []
    x = post.samples
    assert torch.allclose(post.stats["log_prior"], lm.score([], x), atol=1e-5)


def test_hundred_thousand_samples_in_bounded_chunks():
    """100k samples: the LM never sees more than chunk_size rows, only tokens and scalars are
    kept, and the estimate is right (its se is tiny at this size)."""
    lm = markov_lm()
    model, args = soft_reward(lm)
    exact = ppl_lm.infer(model, *args, method="exact")
    batch = []
    orig = lm.sample
    lm.sample = lambda prompt, n, *a, **k: batch.append(n) or orig(prompt, n, *a, **k)
    try:
        post = _run(model, *args, num_samples=100_000, chunk_size=8192, seed=0)
    finally:
        del lm.sample
    assert max(batch) <= 8192 and sum(batch) == 100_000
    assert post.samples.shape == (100_000, 4)
    assert set(post.values) == {"x"} and all(v.dim() == 1 for v in post.stats.values())
    se = post.log_evidence_se
    assert se < 0.02  # about 3.2 / sqrt(N) on this problem
    assert abs(post.log_evidence - exact.log_evidence) <= 4 * se


def test_log_evidence_se_is_the_delta_method():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(1000, generator=g, dtype=torch.float64) - 3.0
    w = log_w.exp()
    direct = math.sqrt(float(w.var(unbiased=True)) / len(w)) / float(w.mean())
    assert importance.log_evidence_se(log_w) == pytest.approx(direct, rel=1e-6)
    assert importance.log_evidence_se(torch.zeros(50, dtype=torch.float64)) == 0.0


def test_pareto_khat_degenerate_and_regular_cases():
    k = importance.pareto_khat
    assert math.isnan(k(torch.zeros(10)))  # too few samples for a tail fit
    assert k(torch.zeros(1000)) == -math.inf  # all equal: bounded
    tied = torch.cat([torch.zeros(300), torch.full((700,), -math.inf)])
    assert k(tied) == -math.inf  # hard constraint with the prior: {0, -inf}
    few = torch.cat([torch.zeros(3), torch.full((997,), -math.inf)])
    assert k(few) == math.inf  # three non-zero weights: unreliable
    g = torch.Generator().manual_seed(1)
    light = 0.3 * torch.randn(4000, generator=g, dtype=torch.float64)
    assert k(light) < 0.5
    # Pareto(alpha) weights have k = 1/alpha: alpha = 0.8 is far beyond 0.7.
    u = torch.rand(4000, generator=g, dtype=torch.float64)
    heavy = -torch.log(u) / 0.8  # log of Pareto(0.8) draws
    assert k(heavy) > 0.9


class _MarkovGuide:
    """A proposal: the same site from another Markov LM."""

    def __init__(self, lm, T):
        self.lm, self.T = lm, T

    def __call__(self, prompt=()):
        return pyro.sample("x", self.lm.sequence(list(prompt), max_new_tokens=self.T))


def test_guide_proposal_matches_exact(soft):
    lm, model, args, exact = soft
    q = ppl_lm.MarkovLM(lm.init_logits * 0.5, lm.trans_logits * 0.5 + 0.3, eos_id=0)
    post = _run(model, *args, num_samples=8000, guide=_MarkovGuide(q, 4), seed=0)
    assert post.info["proposal"] == "guide"
    assert abs(post.log_evidence - exact.log_evidence) <= 4 * post.log_evidence_se
    assert tv_distance(post, exact) <= tv_tolerance(exact, post.ess)
    assert torch.allclose(post.stats["log_prior"], lm.score([], post.samples), atol=1e-5)


def test_heavy_tailed_weights_warn():
    """A proposal much narrower than the target over long sequences: heavy-tailed weights."""
    lm = ppl_lm.MarkovLM.random(5, eos_id=0, seed=2, scale=1.0)
    T = 12

    def model():
        pyro.sample("x", lm.sequence([], max_new_tokens=T))

    q = ppl_lm.MarkovLM(lm.init_logits * 3.0, lm.trans_logits * 3.0, eos_id=0)
    with pytest.warns(UserWarning, match=r"\[khat\] Pareto k-hat is .* > 0\.7.*unreliable"):
        post = _run(model, num_samples=4000, guide=_MarkovGuide(q, T), seed=0)
    assert post.khat > 0.7


def test_bounded_weights_do_not_warn(soft):
    lm = soft[0]
    model, args = hard_constraint(lm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post = _run(model, *args, num_samples=2000, seed=0)
    assert post.khat == -math.inf


def test_all_zero_weights_is_a_clear_error(soft):
    lm = soft[0]

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
        ppl_lm.constraint("impossible", x[..., 0] < 0)

    with pytest.raises(ValueError, match="no sample satisfies the condition"):
        _run(model, num_samples=200)


def test_bad_options_and_guides(soft):
    lm, model, args, _ = soft
    with pytest.raises(ValueError, match="num_samples"):
        _run(model, *args, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        _run(model, *args, num_samples=10, chunk_size=0)
    with pytest.raises(TypeError, match="guide"):
        _run(model, *args, num_samples=10, guide="lora")

    def stray(prompt=()):
        pyro.sample("y", lm.sequence([], max_new_tokens=4))

    with pytest.raises(ValueError, match="does not have"):
        _run(model, *args, num_samples=10, guide=stray)


def test_svi_guide_object_is_a_proposal(soft):
    """The guide made by ppl_lm.inference.svi.guides (untrained here) is a callable proposal: exact weights."""
    from ppl_lm.inference.svi.guides import make_guide

    _, model, args, exact = soft
    post = _run(model, *args, num_samples=4000, guide=make_guide(model, *args, kind="full"), seed=0)
    assert post.info["proposal"] == "guide"
    assert abs(post.log_evidence - exact.log_evidence) <= 4 * post.log_evidence_se
    assert tv_distance(post, exact) <= tv_tolerance(exact, post.ess)


# -- SmolLM2 -------------------------------------------------------------------------------


class _DefensivePrefix(TorchDistribution):
    """Proposal for a hard pin: half the draws start with the pinned tokens ``y`` (the rest
    continued by the LM), half come from the LM prior. Its density is the mixture's, so the
    importance weights are exact; the prior half almost never hits ``y``, so log Ẑ has real
    (binomial) Monte Carlo error for its standard error to cover."""

    arg_constraints: dict = {}

    def __init__(self, lm, prompt, y, T, batch_shape=torch.Size()):
        self.lm, self.prompt_ids, self.y, self.T = lm, list(prompt), list(y), T
        self.prior = SequenceDistribution(lm, self.prompt_ids, T)
        self.cont = SequenceDistribution(lm, self.prompt_ids + self.y, T - len(y))
        super().__init__(torch.Size(batch_shape), torch.Size([T]), validate_args=False)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.lm.vocab_size - 1), 1)

    def expand(self, batch_shape, _instance=None):
        return _DefensivePrefix(self.lm, self.prompt_ids, self.y, self.T, batch_shape)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        gen = ppl_lm.seeding.generator(self.lm.device)
        prior, _ = self.lm.sample(self.prompt_ids, n, self.T, generator=gen)
        cont, _ = self.lm.sample(self.prompt_ids + self.y, n, self.T - len(self.y), generator=gen)
        pinned = torch.cat([torch.tensor(self.y).expand(n, -1), cont], -1)
        coin = torch.rand(n, generator=gen) < 0.5
        return torch.where(coin[:, None], pinned, prior).reshape(*shape, self.T)

    def log_prob(self, x):
        k = len(self.y)
        hit = (x[..., :k] == torch.tensor(self.y)).all(-1)
        lp_prior = self.prior.log_prob(x)
        lp_pinned = torch.where(hit, self.cont.log_prob(x[..., k:]), torch.full_like(lp_prior, -math.inf))
        return torch.logaddexp(lp_prior, lp_pinned) - math.log(2.0)


@pytest.mark.integration
def test_smollm_hard_pin_evidence_matches_lm_score():
    """Z = π(x_1:3 = y | prompt) exactly, for a hard pin on the first three tokens."""
    lm = ppl_lm.load_lm()
    prompt = lm.encode("The weather today is")
    y = lm.encode(" purple elephants dancing")[:3]
    T = 6

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.pin("y", x, dict(enumerate(y)), lam=None)
        return x

    def guide(prompt):
        return pyro.sample("x", _DefensivePrefix(lm, prompt, y, T))

    log_pi_y = float(lm.score(prompt, torch.tensor([y])))
    assert log_pi_y < -10  # the prior alone would essentially never hit y
    post = _run(model, prompt, num_samples=64, guide=guide, seed=0)
    se = post.log_evidence_se
    assert 0.05 < se < 0.5  # binomial noise from the prior half of the proposal
    assert abs(post.log_evidence - log_pi_y) <= 4 * se
    assert all(row[:3] == y for row in post.samples[post.log_weights > -math.inf].tolist())
