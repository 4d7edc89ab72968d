"""Ragged prompts in the incremental LM state (``start(prompt, B, lengths)``) and in SMC and MH.

The LM rows are checked token by token against each prompt read alone (through ``extend`` and
``reorder``); the backends against the exact posterior of a world model whose preambles have
three different lengths (tolerances as in ``test_composition``: prior IS's exact ESS for SMC,
a fixed reference number of exact draws for MH).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_composition import law_tv, tv_tol
from toys import LMS

import ppl_lm

T = 3
PREAMBLES = [[], [1], [2, 3, 1]]  # three worlds, three prompt lengths (the empty one included)
ROWS = [[1, 2, 3, 4], [3], [], [2, 4, 1], [4]]


def _padded(rows):
    P = max(len(r) for r in rows)
    prompt = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        prompt[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return prompt, torch.tensor([len(r) for r in rows])


def _lora():
    from ppl_lm.lm.lora import LoraLM

    lm = LoraLM(LMS["transformer"](), r=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (B = 0 at init would make it the base LM)
        for p in lm.params.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return lm


def _positional():
    from ppl_lm.lm.positional import PositionalMarkovLM

    return PositionalMarkovLM(LMS["markov"](), max_new_tokens=4)


STATE_LMS = {**LMS, "lora": _lora, "positional": _positional}


@pytest.mark.parametrize("lm_name", list(STATE_LMS))
def test_ragged_start_extend_reorder_equal_one_prompt_at_a_time(lm_name):
    lm = STATE_LMS[lm_name]()
    prompt, lengths = _padded(ROWS)
    tokens = torch.tensor([[1, 2, 3], [4, 4, 1], [2, 0, 0], [3, 1, 2], [1, 1, 4]])
    index = torch.tensor([3, 0, 4, 1, 2])  # a resampling between the first and second new token
    with torch.no_grad():
        st = lm.start(prompt, len(ROWS), lengths)
        got = [st.logprobs]
        st = lm.extend(st, tokens[:, 0])
        got.append(st.logprobs)
        st = lm.reorder(st, index)
        st = lm.extend(st, tokens[index, 1])
        got.append(st.logprobs[torch.argsort(index)])
        for i, row in enumerate(ROWS):
            one = lm.start(torch.tensor(row, dtype=torch.long), 1)
            want = [one.logprobs[0]]
            for t in range(2):
                one = lm.extend(one, tokens[i : i + 1, t])
                want.append(one.logprobs[0])
            for step, (g, w) in enumerate(zip(got, want)):
                assert torch.allclose(g[i], w, atol=1e-5), f"row {i} (length {len(row)}), step {step}"


def test_ragged_prompts_refused_by_static_cache_clearly():
    lm = LMS["transformer"]().with_kv_cache("static")
    prompt, lengths = _padded(ROWS)
    with torch.no_grad(), pytest.raises(ValueError, match="need kv_cache='dynamic'"):
        lm.start(prompt, len(ROWS), lengths)


def test_ragged_lengths_checked():
    lm = LMS["markov"]()
    prompt, lengths = _padded(ROWS)
    with pytest.raises(ValueError, match="lengths must lie in"):
        lm.start(prompt, len(ROWS), lengths + 1)


def ragged_world(lm):
    def model():
        w = pyro.sample("w", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))
        x = pyro.sample("x", lm.sequence([PREAMBLES[i] for i in w.tolist()], max_new_tokens=T))
        ppl_lm.reward("r", (x == 3).float().sum(-1) * (w.float() - 0.5) + 0.4 * (x == 2).float().sum(-1), beta=2.0)

    return model


METHODS = {
    # options, reference exact draws (None: prior IS's N·f; SMC, with prefix twists, is held to at least that)
    "smc": (dict(num_particles=10_000), None),
    "mh": (dict(num_samples=150, num_chains=64, warmup_steps=100), 1_500.0),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("lm_name", list(LMS))
def test_backends_match_exact_with_ragged_world_prompts(method, lm_name):
    model = ragged_world(LMS[lm_name]())
    exact = ppl_lm.infer(model, method="exact")
    options, n_ref = METHODS[method]
    if n_ref is None:
        lp, ll = exact.stats["log_prior"].double(), exact.stats["log_likelihood"].double()
        f = float(torch.exp(2 * torch.logsumexp(lp + ll, 0) - torch.logsumexp(lp + 2 * ll, 0)))
        n_ref = options["num_particles"] * f
    post = ppl_lm.infer(model, method=method, seed=0, progress=False, **options)
    law = exact.probabilities()
    tv, tol = law_tv(post, law), tv_tol(law, n_ref)
    assert tv <= tol, f"{method}/{lm_name}: TV {tv:.4f} > {tol:.4f}"
    got = post.marginal("w")
    for value, (p_exact, _) in exact.marginal("w").items():
        p = got.get(value, (0.0, 0.0))[0]
        sd = math.sqrt(p_exact * (1 - p_exact) / n_ref)
        assert abs(p - p_exact) <= 4 * sd + 1e-9, f"w={value}: {p:.4f} vs exact {p_exact:.4f} (sd {sd:.4f})"
    if post.log_evidence is not None:
        assert abs(post.log_evidence - exact.log_evidence) <= 4 * (post.log_evidence_se or 0) + 0.05
