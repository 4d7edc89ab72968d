"""models/worlds.py: the world latent picks the preamble the LM reads, on the tiny char LM."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import ppl_lm
from ppl_lm import models, rewards

worlds = models.load("worlds")
T = 8


@pytest.fixture(scope="module")
def lm():
    return ppl_lm.tiny_char_transformer(seed=0)


def test_log_joint_is_prior_times_lm_of_preamble_plus_context_times_tilt(lm):
    beta = 0.25
    model = worlds.build(lm, beta=beta, max_new_tokens=T)
    ctx = worlds.toy_context
    ids = lm.encode(" nice!")
    x = torch.tensor(ids + [lm.eos_id] * (T - len(ids)))
    prior = torch.tensor(worlds.PRIOR)
    for w in range(len(worlds.WORLDS)):
        tr = pyro.poutine.trace(pyro.condition(model, data={"w": torch.tensor(w), "x": x})).get_trace(ctx)
        want = (math.log(prior[w]) + float(lm.score(worlds.PREAMBLES[worlds.WORLDS[w]] + ctx, x[None])[0])
                + float(rewards.sentiment(lm, x[None])[0]) / beta)
        assert abs(float(tr.log_prob_sum()) - want) < 1e-4, worlds.WORLDS[w]
    # the preamble matters: the worlds' LM terms differ
    scores = [float(lm.score(p, x[None])[0]) for p in worlds.prompts(lm, ctx)]
    assert max(scores) - min(scores) > 1e-3


def test_bad_prior_is_refused():
    with pytest.raises(ValueError, match="summing to 1"):
        worlds.build(None, prior=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="3 worlds"):
        worlds.build(None, prior=(0.5, 0.5))


@pytest.mark.parametrize("method,options", [
    ("smc", dict(num_particles=16)),
    ("mh", dict(num_samples=4, num_chains=2, warmup_steps=2)),
])
def test_ragged_preambles_run_in_smc_and_mh(lm, method, options):
    lengths = {len(p) for p in worlds.prompts(lm, worlds.toy_context)}
    assert len(lengths) == 3  # the three prompts have different lengths: the ragged path
    model = worlds.build(lm, max_new_tokens=T)
    post = ppl_lm.infer(model, worlds.toy_context, method=method, seed=0, progress=False, **options)
    w = post.values["w"]
    assert w.shape == post.log_weights.shape and set(w.tolist()) <= {0, 1, 2}
    assert abs(sum(p for p, _ in post.marginal("w").values()) - 1) < 1e-6
