"""Guides: start at the prior, sample the model's own site and context, LoRA leaves the prior intact."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch

import ppl_lm
from ppl_lm.lm import LoraLM, PositionalMarkovLM
from ppl_lm.inference.svi.guides import SequenceGuide, make_guide, model_site
from ppl_lm.inference.exact import enumerate_sequences
from toys import LMS, T, V, prefix_prompt, soft_reward

SUPPORT = enumerate_sequences(V, 0, T)


def _perturb(guide, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("lm_name,kind", [("markov", "full"), ("transformer", "full"), ("transformer", "lora")])
def test_guide_starts_at_the_prior(lm_name, kind):
    lm = LMS[lm_name]()
    model, args = prefix_prompt(lm)
    guide = make_guide(model, *args, kind=kind)
    assert isinstance(guide, SequenceGuide) and guide.site == "x" and guide.kind == kind
    with torch.no_grad():
        lq = guide.lm.score(args[0], SUPPORT)
        lp = lm.score(args[0], SUPPORT)
    # LoRA's B matrices start at zero and the Markov table is copied: identical; a copied
    # network is the same computation.
    torch.testing.assert_close(lq, lp, rtol=0, atol=1e-6)


def test_guide_samples_the_model_site_in_the_particle_plate():
    lm = LMS["markov"]()
    model, args = prefix_prompt(lm)
    guide = make_guide(model, *args)
    with ppl_lm.seeding.seeded(0), pyro.plate("particles", 7):
        tr = poutine.trace(guide).get_trace(*args)
    site = tr.nodes["x"]
    assert site["value"].shape == (7, T) and not site["is_observed"]
    d = site["fn"]
    assert d.lm is guide.lm and d.prompt.tolist() == [2, 4] and d.max_new_tokens == T


def test_guide_is_amortised_over_contexts():
    """One guide, two prompts: its first-token law follows the prompt's last token."""
    lm = LMS["markov"]()
    model, _ = prefix_prompt(lm)
    guide = make_guide(model, [2, 4])
    _perturb(guide)
    for prompt in ([2, 4], [1], [3, 1]):
        with pyro.plate("particles", 3):
            tr = poutine.trace(guide).get_trace(prompt)
        assert tr.nodes["x"]["fn"].prompt.tolist() == prompt
        want = torch.log_softmax(guide.module.trans_logits[0, prompt[-1]], -1)
        got = guide.lm.start(torch.tensor(prompt), 1).logprobs[0]
        torch.testing.assert_close(got, want)


def test_model_site_runs_no_lm_and_checks_the_model():
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    name, d = model_site(model, args)
    assert name == "x" and d.lm is lm and d.max_new_tokens == T

    def two_latents():
        n = pyro.sample("n", pyro.distributions.Categorical(torch.ones(3)))
        pyro.sample("x", lm.sequence([], max_new_tokens=T))
        return n

    # a latent before the sequence: model_site finds the sequence; make_guide covers both sites
    assert model_site(two_latents, ())[0] == "x"
    assert make_guide(two_latents).sites == ["n", "x"]

    def no_sequence():
        pyro.sample("n", pyro.distributions.Normal(0.0, 1.0))

    with pytest.raises(TypeError, match="not an lm.sequence"):
        model_site(no_sequence, (), {}, site="n")
    with pytest.raises(ValueError, match="no latent lm.sequence"):
        model_site(no_sequence, (), {})
    # every sequence observed (or none at all): a joint guide over the other latents
    assert make_guide(no_sequence).sites == ["n"] and make_guide(no_sequence).lm is None


def test_bad_guide_kinds():
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    with pytest.raises(ValueError, match="needs a TransformersLM"):
        make_guide(model, *args, kind="lora")
    with pytest.raises(ValueError, match="unknown guide kind"):
        make_guide(model, *args, kind="adapter")


def test_positional_markov_guide_protocol():
    """start/extend/reorder agree with the one-pass score, and positions are relative to the prompt."""
    lm = LMS["markov"]()
    glm = PositionalMarkovLM(lm, T)
    with torch.no_grad():
        for p in (glm.module.init_logits, glm.module.trans_logits):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = SUPPORT[torch.randperm(len(SUPPORT), generator=torch.Generator().manual_seed(0))[:9]]
    for prompt in ([], [3], [1, 2]):
        st = glm.start(torch.tensor(prompt, dtype=torch.long), len(x))
        lp = []
        for t in range(T):
            lp.append(st.logprobs.gather(-1, x[:, t : t + 1])[:, 0])
            if t + 1 < T:
                idx = torch.arange(len(x)).flip(0)
                st = glm.reorder(glm.reorder(st, idx), idx)  # a round trip is the identity
                st = glm.extend(st, x[:, t])
        lp = torch.stack(lp, -1) * ~ppl_lm.tokens.after_eos_mask(x, 0)
        torch.testing.assert_close(lp, glm.token_logprobs(prompt, x))
        # The guide's distribution is normalised over the support.
        total = torch.logsumexp(glm.score(prompt, SUPPORT).detach(), 0)
        assert abs(float(total)) < 1e-5
    with pytest.raises(ValueError, match="max_new_tokens"):
        glm.sequence([], max_new_tokens=T + 1)


def test_lora_prior_is_bit_identical_and_guide_moves():
    lm = LMS["transformer"]()
    model, args = prefix_prompt(lm)
    ids = torch.tensor([[2, 4, 1, 3, 0, 0], [1, 1, 2, 2, 3, 3]])
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits.clone()
    guide = make_guide(model, *args, kind="lora", lora_targets="all-linear")
    assert isinstance(guide.lm, LoraLM)
    assert guide.lm.base is lm  # one copy of the network
    assert all("lora_" in n for n, _ in guide.module.named_parameters())
    _perturb(guide, scale=0.3)
    with torch.no_grad():
        after = lm.model(input_ids=ids).logits
        on = guide.lm.token_logprobs(args[0], SUPPORT[:50])
        off = lm.token_logprobs(args[0], SUPPORT[:50])
    assert torch.equal(before, after), "the prior changed after LoRA injection and training"
    assert (on - off).abs().max() > 1e-2, "the adapter has no effect on the guide"
    # The adapter is switched on only inside the guide's calls.
    assert all(layer._disable_adapters for layer in guide.lm._layers)


def test_lora_incremental_state_survives_prior_calls_in_between():
    """The guide's KV cache path (adapter on) matches its one-pass score even when the prior
    (adapter off) runs between steps, as in SMC with a guide proposal."""
    lm = LMS["transformer"]()
    model, args = prefix_prompt(lm)
    guide = make_guide(model, *args, kind="lora")
    _perturb(guide, scale=0.5)
    x = SUPPORT[100:108]
    with torch.no_grad():
        st = guide.lm.start(torch.tensor(args[0]), len(x))
        pst = lm.start(torch.tensor(args[0]), len(x))
        lq, lp = [], []
        for t in range(T):
            lq.append(st.logprobs.gather(-1, x[:, t : t + 1])[:, 0])
            lp.append(pst.logprobs.gather(-1, x[:, t : t + 1])[:, 0])
            if t + 1 < T:
                st = guide.lm.extend(st, x[:, t])
                pst = lm.extend(pst, x[:, t])
        mask = ~ppl_lm.tokens.after_eos_mask(x, 0)
        torch.testing.assert_close(torch.stack(lq, -1) * mask, guide.lm.token_logprobs(args[0], x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.stack(lp, -1) * mask, lm.token_logprobs(args[0], x), atol=1e-5, rtol=1e-5)


def test_two_lora_guides_share_one_network():
    lm = LMS["transformer"]()
    model, args = prefix_prompt(lm)
    with torch.no_grad():
        prior = lm.token_logprobs(args[0], SUPPORT[:40])
    g1 = make_guide(model, *args, kind="lora")
    g2 = make_guide(model, *args, kind="lora", lora_r=4)
    _perturb(g1, seed=1)
    _perturb(g2, seed=2)
    with torch.no_grad():
        a, b = g1.lm.token_logprobs(args[0], SUPPORT[:40]), g2.lm.token_logprobs(args[0], SUPPORT[:40])
        assert torch.equal(lm.token_logprobs(args[0], SUPPORT[:40]), prior)
    assert (a - b).abs().max() > 1e-2
    # Each guide's gradient reaches its own adapter only.
    g1.lm.token_logprobs(args[0], SUPPORT[:40]).sum().backward()
    assert all(p.grad is not None for p in g1.module.parameters())
    assert all(p.grad is None for p in g2.module.parameters())


def test_state_dict_round_trip():
    lm = LMS["markov"]()
    model, args = soft_reward(lm)
    g = make_guide(model, *args)
    _perturb(g)
    saved = g.state_dict()
    h = make_guide(model, *args)
    h.load_state_dict(saved)
    torch.testing.assert_close(h.lm.score([], SUPPORT), g.lm.score([], SUPPORT), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different parameters"):
        h.load_state_dict({"init_logits": saved["init_logits"]})


def test_lora_guide_log_q_and_gradient_equal_one_pass():
    """The guide's scoring pass (prompt read once, KV cache repeated) gives the same log q and
    the same gradient w.r.t. the adapter as one adapter-on pass over prompt + continuation."""
    lm = LMS["transformer"]()
    model, args = prefix_prompt(lm)
    guide = make_guide(model, *args, kind="lora")
    _perturb(guide, scale=0.5)
    params = list(guide.module.parameters())
    x = SUPPORT[60:90]
    prompt = torch.as_tensor(args[0])
    lq = guide.lm.token_logprobs(prompt, x)
    with guide.lm.active():
        ids = torch.cat([prompt.expand(len(x), -1), x], -1)
        P = len(prompt)
        logits = lm.model(input_ids=ids, use_cache=False).logits[:, P - 1 : P - 1 + T]
    one = torch.log_softmax(logits.float(), -1).gather(-1, x[..., None])[..., 0] * ~ppl_lm.tokens.after_eos_mask(x, 0)
    torch.testing.assert_close(lq, one, atol=1e-5, rtol=1e-5)
    w = torch.linspace(-1, 1, len(x))[:, None]
    ga, gb = torch.autograd.grad((w * lq).sum(), params), torch.autograd.grad((w * one).sum(), params)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in gb) > 1e-3  # the test has power
