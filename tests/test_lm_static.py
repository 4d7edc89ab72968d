"""The static-KV-cache decode paths of TransformersLM (``kv_cache="static"`` / ``"compiled"``).

Each is checked against the default dynamic cache on the same weights: per-step log-probs,
samples for a seed, in-place ``reorder`` (SMC resampling), the preallocated length, and the
compiled step (traced by Dynamo with the eager backend here; Inductor and CUDA graphs run on a
GPU, from ``benchmarks/gpu.sh``, or on CPU with ``PPL_LM_INDUCTOR_TESTS=1``).
"""

from __future__ import annotations

import os

import pytest
import torch

import ppl_lm
from ppl_lm.lm.hf import STATIC_BLOCK
from ppl_lm.lm.hf.kv_cache import StaticState
from toys import soft_reward

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run by benchmarks/gpu.sh)")
# Dynamo traces the whole decode step as one graph; the eager backend skips Inductor's codegen.
EAGER_GRAPH = {"backend": "eager", "fullgraph": True}


def _pair(make, kv_cache, compile_options=None):
    """The same weights twice: default dynamic cache, and ``kv_cache``."""
    dyn = make()
    return dyn, dyn.with_kv_cache(kv_cache, compile_options)


def _tiny():
    return ppl_lm.tiny_transformer(6, eos_id=0, seed=0, scale=0.3)


def _char():
    return ppl_lm.tiny_char_transformer(seed=1)


def _teacher_forced(lm, prompt, tokens, reorder_at=None, index=None):
    """Per-step log-probs ``[T, B, V]`` along ``tokens [B, T]``, optionally reordering rows once."""
    B, T = tokens.shape
    lm.check_context(torch.as_tensor(prompt).shape[-1], T)
    state = lm.start(torch.as_tensor(prompt, dtype=torch.long), B)
    out = []
    for t in range(T):
        if t == reorder_at:
            state = lm.reorder(state, index)
            tokens = tokens[index]
        out.append(state.logprobs.clone())
        if t + 1 < T:
            state = lm.extend(state, tokens[:, t])
    return torch.stack(out)


CASES = {
    "shared prompt": (_tiny, [3, 1, 2]),
    "empty prompt (BOS)": (_tiny, []),
    "per-row prompts": (_tiny, [[1, 2, 3], [4, 4, 1], [2, 5, 5], [1, 1, 1]]),
    "char model": (_char, [40, 72, 73]),
}


@pytest.mark.parametrize("kv_cache", ["static", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_per_step_logprobs_equal_the_dynamic_cache(case, kv_cache):
    make, prompt = CASES[case]
    dyn, other = _pair(make, kv_cache, EAGER_GRAPH)
    B, T = 4, 7
    tokens = torch.randint(1, dyn.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    index = torch.tensor([2, 2, 0, 3])
    with torch.no_grad():
        a = _teacher_forced(dyn, prompt, tokens, reorder_at=3, index=index)
        b = _teacher_forced(other, prompt, tokens, reorder_at=3, index=index)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("kv_cache", ["static", "compiled"])
def test_same_samples_for_the_same_seed(kv_cache):
    dyn, other = _pair(_char, kv_cache, EAGER_GRAPH)
    tok_a, lp_a = dyn.sample("Hi", 32, 12, generator=torch.Generator().manual_seed(3))
    tok_b, lp_b = other.sample("Hi", 32, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tok_a, tok_b)
    assert torch.allclose(lp_a, lp_b, atol=1e-5, rtol=0)
    # the sampler's log-probs are the model's: a fresh one-pass scoring agrees
    assert torch.allclose(lp_b, other.token_logprobs("Hi", tok_b), atol=1e-4)


@pytest.mark.parametrize("kv_cache", ["static", "compiled"])
def test_smc_resampling_gives_the_dynamic_result(kv_cache):
    dyn, other = _pair(lambda: ppl_lm.tiny_transformer(5, eos_id=0, seed=1, scale=0.15), kv_cache, EAGER_GRAPH)
    posts = []
    for lm in (dyn, other):
        model, args = soft_reward(lm)
        posts.append(ppl_lm.infer(model, *args, method="smc", num_particles=64, seed=4, progress=False))
    a, b = posts
    assert sum(a.info["num_resampling"]) > 0  # reorder was exercised
    assert torch.equal(a.samples, b.samples)
    assert torch.allclose(a.log_weights, b.log_weights, atol=1e-5)
    assert a.log_evidence == pytest.approx(b.log_evidence, abs=1e-5)


def test_cache_is_sized_from_check_context_and_overflow_is_a_clear_error():
    lm = ppl_lm.tiny_transformer(6, eos_id=0, max_context=1024).with_kv_cache("static")
    prompt = torch.tensor([1, 2, 3])
    with torch.no_grad():
        lm.check_context(3, STATIC_BLOCK + 10)  # needs 3 + 74 positions: two blocks
        state = lm.start(prompt, 2)
        assert isinstance(state.data, StaticState) and state.data.capacity == 2 * STATIC_BLOCK
        lm.check_context(3, 5)
        state = lm.start(prompt, 2)
        assert state.data.capacity == STATIC_BLOCK
        tok = torch.ones(2, dtype=torch.long)
        for _ in range(STATIC_BLOCK - 3):
            state = lm.extend(state, tok)
        assert state.length == STATIC_BLOCK
        with pytest.raises(ValueError, match=r"static KV cache .* holds 64 positions"):
            lm.extend(state, tok)


def test_cache_never_exceeds_the_context_window():
    lm = ppl_lm.tiny_transformer(6, eos_id=0, max_context=40).with_kv_cache("static")
    with torch.no_grad():
        lm.check_context(4, 30)
        assert lm.start(torch.tensor([1, 2, 3, 4]), 3).data.capacity == 40


def test_compiled_caches_are_pooled_only_once_no_state_holds_them():
    _, lm = _pair(_tiny, "compiled", EAGER_GRAPH)
    prompt = torch.tensor([1, 2])
    with torch.no_grad():
        lm.check_context(2, 4)
        a = lm.start(prompt, 3)
        b = lm.start(prompt, 3)  # a is alive: a second buffer
        assert a.data.cache is not b.data.cache
        cache_a = a.data.cache
        tok = torch.ones(3, dtype=torch.long)
        for _ in range(3):
            a = lm.extend(a, tok)
        b = lm.extend(b, tok)
        del a
        c = lm.start(prompt, 3)  # a's buffer is free again, b's is not
        assert c.data.cache is cache_a
        # c's buffer still holds a's keys past the prompt: the causal mask hides them, so c
        # agrees with a brand-new buffer (the third)
        fresh = lm.start(prompt, 3)
        assert fresh.data.cache is not cache_a and fresh.data.cache is not b.data.cache
        assert torch.allclose(lm.extend(c, tok).logprobs, lm.extend(fresh, tok).logprobs, atol=1e-6)
        assert len(lm.kv_mode.pool[(3, STATIC_BLOCK, lm.device)]) == 3


def test_compiled_step_takes_more_shapes_than_dynamos_default_limit():
    # fullgraph=True turns Dynamo's "recompile limit reached" fallback into an error
    _, lm = _pair(lambda: ppl_lm.tiny_transformer(6, eos_id=0, num_layers=1), "compiled", EAGER_GRAPH)
    limit = torch._dynamo.config.recompile_limit
    with torch.no_grad():
        for B in range(1, limit + 3):
            lm.sample([1, 2], B, 2, generator=torch.Generator().manual_seed(B))
    assert len(lm.kv_mode.compiled_shapes) == limit + 2


def test_trainable_lm_under_autograd_keeps_the_dynamic_cache():
    lm = ppl_lm.tiny_transformer(6, eos_id=0).with_kv_cache("static")
    lm.model.lm_head.weight.requires_grad_(True)
    state = lm.start(torch.tensor([1, 2]), 2)
    assert not isinstance(state.data, StaticState)
    with torch.no_grad():
        assert isinstance(lm.start(torch.tensor([1, 2]), 2).data, StaticState)


def test_bad_kv_cache_name():
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        ppl_lm.tiny_transformer().with_kv_cache("paged")


@pytest.mark.skipif(not os.environ.get("PPL_LM_INDUCTOR_TESTS"),
                    reason="Inductor's CPU compile takes ~30 s; set PPL_LM_INDUCTOR_TESTS=1")
def test_inductor_compiled_step_on_cpu():
    dyn, other = _pair(_char, "compiled")
    tok_a, lp_a = dyn.sample("Hi", 8, 6, generator=torch.Generator().manual_seed(0))
    tok_b, lp_b = other.sample("Hi", 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok_a, tok_b) and torch.allclose(lp_a, lp_b, atol=1e-4)


# -- CUDA (benchmarks/gpu.sh runs these) ------------------------------------------------------
def _cuda_char(dtype):
    lm = ppl_lm.tiny_char_transformer(seed=1, hidden_size=64)
    lm.model.to(device="cuda", dtype=dtype)
    return lm


@gpu
@pytest.mark.parametrize("kv_cache", ["static", "compiled"])
def test_cuda_float32_matches_dynamic(kv_cache):
    dyn, other = _pair(lambda: _cuda_char(torch.float32), kv_cache)
    tokens = torch.randint(1, dyn.vocab_size, (16, 10), generator=torch.Generator().manual_seed(0)).cuda()
    index = torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        a = _teacher_forced(dyn, [40, 72, 73], tokens, reorder_at=4, index=index)
        b = _teacher_forced(other, [40, 72, 73], tokens, reorder_at=4, index=index)
        # a second run on the compiled path replays the captured graphs on a pooled cache
        c = _teacher_forced(other, [40, 72, 73], tokens, reorder_at=4, index=index)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
    assert torch.allclose(b, c, atol=1e-6, rtol=0)


@gpu
@pytest.mark.parametrize("kv_cache", ["static", "compiled"])
def test_cuda_bfloat16_sampling_and_smc(kv_cache):
    dyn, other = _pair(lambda: _cuda_char(torch.bfloat16), kv_cache)
    for lm in (dyn, other):
        g = torch.Generator(device="cuda").manual_seed(0)
        tok, lp = lm.sample("Hi", 256, 12, generator=g)
        assert tok.device.type == "cuda" and torch.isfinite(lp).all()
        assert torch.allclose(lp.sum(-1), lm.score("Hi", tok), atol=0.5)  # bf16: a sanity bound
    posts = []
    for lm in (dyn, other):
        model, args = soft_reward(lm)
        posts.append(ppl_lm.infer(model, *args, method="smc", num_particles=128, seed=4, progress=False))
    assert all(sum(p.info["num_resampling"]) > 0 for p in posts)
    # bf16 kernels differ between the paths, so samples may too: compare the estimates loosely
    assert abs(posts[0].log_evidence - posts[1].log_evidence) < 0.5


def test_compiling_keeps_distribution_validation_on():
    """Dynamo's first compile in a process turns off torch.distributions validation globally
    (Pyro's support checks with it); the compiled path restores the user's setting. Run in a
    fresh process: the switch happens once per process."""
    import subprocess
    import sys

    code = (
        "import torch, ppl_lm\n"
        "from torch.distributions import Distribution as D\n"
        "lm = ppl_lm.tiny_transformer(6, eos_id=0, seed=0).with_kv_cache('compiled', "
        "{'backend': 'eager', 'fullgraph': True})\n"
        "lm.sample([3, 1], 2, 3, generator=torch.Generator().manual_seed(0))\n"
        "print('VALIDATE', D._validate_args)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "VALIDATE True" in out.stdout, out.stdout + out.stderr[-2000:]
