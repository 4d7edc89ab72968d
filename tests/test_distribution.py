"""SequenceDistribution: a proper Pyro distribution over EOS-padded sequences."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.ops.provenance import get_provenance, track_provenance

import ppl_lm
from ppl_lm import rewards


@pytest.fixture
def lm():
    return ppl_lm.MarkovLM.random(4, eos_id=0, seed=0)


def test_shapes_under_plate_and_expand(lm):
    d = lm.sequence([], max_new_tokens=5)
    assert d.event_shape == (5,) and d.batch_shape == ()
    with pyro.plate("p", 7):
        x = pyro.sample("x", d)
    assert x.shape == (7, 5) and x.dtype == torch.int64
    e = d.expand((3, 2))
    assert e.sample().shape == (3, 2, 5) and e.log_prob(e.sample()).shape == (3, 2)
    assert d.sample((4,)).shape == (4, 5)


def test_log_prob_is_exact_sum_and_padding_adds_nothing(lm):
    d = lm.sequence([], max_new_tokens=4)
    x = torch.tensor([2, 1, 0, 0])
    init = torch.log_softmax(lm.init_logits, -1)
    trans = torch.log_softmax(lm.trans_logits, -1)
    expected = init[2] + trans[2, 1] + trans[1, 0]
    assert d.log_prob(x).item() == pytest.approx(expected.item(), abs=1e-6)
    # a sequence that reaches T without EOS has no EOS term
    y = torch.tensor([1, 1, 1, 1])
    assert d.log_prob(y).item() == pytest.approx((init[1] + 3 * trans[1, 1]).item(), abs=1e-6)


def test_non_canonical_padding_gets_minus_inf(lm):
    d = lm.sequence([], max_new_tokens=4)
    assert d.log_prob(torch.tensor([2, 0, 1, 0])).item() == -math.inf


def test_support_is_validated(lm):
    d = lm.sequence([], max_new_tokens=3)
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([9, 0, 0]))
    with pytest.raises(ValueError, match="length"):
        d.log_prob(torch.tensor([1, 0]))


def test_sample_cache_is_not_used_for_other_values(lm):
    d = lm.sequence([], max_new_tokens=3)
    x = d.sample((5,))
    cached = d.log_prob(x)
    fresh = lm.sequence([], max_new_tokens=3).log_prob(x.clone())
    assert torch.allclose(cached, fresh, atol=1e-5)


def test_seeded_sampling_is_reproducible(lm):
    def draw(seed):
        with ppl_lm.seeding.seeded(seed):
            with pyro.plate("p", 50):
                return pyro.sample("x", lm.sequence([], 4))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_bad_max_new_tokens(lm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.sequence([], max_new_tokens=0)


def test_prompt_ids_out_of_vocab(lm):
    with pytest.raises(ValueError, match="prompt token ids"):
        lm.sequence([7], max_new_tokens=2)


def test_text_rewards_keep_provenance(lm):
    """The provenance trap: a reward computed through decoding still depends on the sample."""
    x = track_provenance(torch.tensor([[1, 2, 0]]), frozenset({"x"}))
    for r in (rewards.contains(lm, x, "b"), rewards.sentiment(lm, x), rewards.length(lm, x)):
        assert get_provenance(r) == frozenset({"x"})


def test_tracegraph_elbo_sees_text_reward(lm):
    """TraceGraph_ELBO's gradient includes a reward computed through decoding.

    With the guide equal to the prior, the ELBO gradient is exactly d/dθ E_q[r]: compare the
    estimate with the gradient computed by enumeration. Had the reward lost its provenance,
    the estimate would be near 0 instead.
    """
    from ppl_lm.inference.exact import enumerate_sequences

    def model():
        x = pyro.sample("x", lm.sequence([], 2))
        ppl_lm.reward("r", rewards.contains(lm, x, "b"), beta=1.0)

    def guide():
        logits = pyro.param("logits", lm.init_logits.clone())
        q = ppl_lm.MarkovLM(logits, lm.trans_logits, eos_id=0)
        pyro.sample("x", q.sequence([], 2))

    theta = lm.init_logits.clone().requires_grad_(True)
    seqs = enumerate_sequences(4, 0, 2)
    q = ppl_lm.MarkovLM(theta, lm.trans_logits, eos_id=0).score([], seqs).exp()
    r = rewards.contains(lm, seqs, "b").float()
    (exact_grad,) = torch.autograd.grad((q * r).sum(), theta)

    pyro.clear_param_store()
    n = 20_000
    with ppl_lm.seeding.seeded(0):
        elbo = pyro.infer.TraceGraph_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=0)
        elbo.loss_and_grads(model, guide)
    grad = -pyro.param("logits").unconstrained().grad
    # Score-function estimate: per-coordinate sd <= sqrt(E[(r - b)^2 (d log q)^2] / n) < 1 / sqrt(n).
    assert torch.allclose(grad, exact_grad, atol=5 / n**0.5), (grad, exact_grad)
    assert exact_grad.abs().max() > 10 / n**0.5  # the check can tell a lost reward from a kept one


def test_prompt_as_sample_site_conditioned(lm):
    """Per-element prompts: a prompt that is itself a (conditioned) sequence sample."""

    def model():
        p = pyro.sample("prompt", lm.sequence([], 2))
        return pyro.sample("x", lm.sequence(p, 3))

    y = torch.tensor([2, 3])
    with pyro.plate("p", 6):
        tr = poutine.trace(poutine.condition(model, {"prompt": y})).get_trace()
    x = tr.nodes["x"]["value"]
    assert x.shape == (6, 3)
    assert torch.allclose(tr.nodes["x"]["fn"].log_prob(x), lm.score(y.tolist(), x), atol=1e-5)


@pytest.mark.parametrize("method, options", [
    ("importance", {"num_samples": 16}),
    ("smc", {"num_particles": 16}),
    ("mh", {"num_samples": 4, "warmup_steps": 2, "num_chains": 2}),
    ("exact", {}),
])
@pytest.mark.filterwarnings("ignore::ppl_lm.diagnostics.warnings.PplLmWarning")  # few draws, on purpose
def test_a_batch_of_one_prompt_is_the_shared_prompt(lm, method, options):
    """A ``[1, P]`` prompt means the ``[P]`` prompt in every backend: the same draws and log Z under
    one seed (SMC and MH used to fail reading one prompt row as a row per particle)."""

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=3))
        ppl_lm.reward("r", (x == 2).float().sum(-1), beta=0.5)

    flat, batch = (ppl_lm.infer(model, p, method=method, seed=0, progress=False, **options)
                   for p in (torch.tensor([1, 2]), torch.tensor([[1, 2]])))
    assert torch.equal(flat.samples, batch.samples)
    assert torch.equal(flat.log_weights, batch.log_weights)
    assert flat.log_evidence == batch.log_evidence
