"""DPO as an SVI objective, against the exact minimiser of its loss on an enumerable toy.

The toy: the conformance Markov LM (vocabulary 5) with 2 new tokens, 21 texts. With two
positions, the ``full`` guide (one transition table per position) can be any distribution over
them, so the exact minimiser of the DPO loss over the guide family is the one over all
distributions (:func:`exact_dpo_optimum`). The pairs come from a Bradley–Terry rater with a known
utility u; the model is π·e^{u/β}, whose β DPO reads.

Tolerance from the problem: the optimisation error of SVI, KL(q_svi‖q*_DPO), must be below a
hundredth of DPO's own statistical error on these pairs, KL(q*_DPO‖π′_u) (how far the exact
minimiser lies from the truth it estimates). Planted bugs (the reference term's sign flipped,
β dropped) must fail that check.
"""

from __future__ import annotations

import pyro
import pytest
import torch

import ppl_lm
from ppl_lm.inference.exact import enumerate_sequences
from ppl_lm.inference.svi import dpo
from toys import LMS, PREF_BETA, PREF_T, kl_logp, pref_model, pref_utility, support_index

T, BETA, N_PAIRS = PREF_T, PREF_BETA, 1000
utility = pref_utility
_lm = LMS["markov"]()
_xs = enumerate_sequences(_lm.vocab_size, _lm.eos_id, T)
_log_pi = _lm.sequence([], max_new_tokens=T).log_prob(_xs).double()
_prefs = ppl_lm.preferences.simulate_preferences(_lm, [], utility, N_PAIRS, T, seed=0)
model = pref_model(_lm)
_kl = kl_logp


def _index(y: torch.Tensor) -> torch.Tensor:
    return support_index(_xs, y)


_optimum = dpo.exact_dpo_optimum(_log_pi, _index(_prefs.chosen), _index(_prefs.rejected), BETA)
_truth = torch.log_softmax(_log_pi + utility(_xs) / BETA, 0)
TOL = 0.01 * _kl(_optimum, _truth)


def _guide_log_q(post) -> torch.Tensor:
    with torch.no_grad():
        return post.guide.lm.sequence([], max_new_tokens=T).log_prob(_xs).double()


def _train(**opts):
    opts = {"num_steps": 150, "batch_size": N_PAIRS, "num_samples": 200, "crosscheck_samples": 0, **opts}
    return ppl_lm.infer(model, method="svi", objective="dpo", preferences=_prefs, seed=0, progress=False, **opts)


def test_the_toy_is_a_fair_problem():
    """Every text is seen in a pair and the DPO minimum exists; it is neither π nor the truth."""
    assert len(torch.unique(torch.cat([_index(_prefs.chosen), _index(_prefs.rejected)]))) == len(_xs)
    assert TOL > 1e-4
    assert _kl(_optimum, _log_pi) > 0.1


def test_svi_dpo_reaches_the_exact_dpo_optimum():
    post = _train()
    lq = _guide_log_q(post)
    assert _kl(lq, _optimum) < TOL and _kl(_optimum, lq) < TOL, (_kl(lq, _optimum), _kl(_optimum, lq), TOL)
    assert post.info.objective == "dpo" and post.info.beta == BETA and post.info.num_pairs == N_PAIRS
    tr = post.info.trace
    assert tr["dpo_loss"][0] == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)  # q = π at the start
    assert post.method == "svi" and len(post) == 200  # the guide's draws, weighted against π·e^{u/β}


@pytest.mark.parametrize("bug", ["reference_sign", "beta_dropped"])
def test_planted_bugs_fail(monkeypatch, bug):
    if bug == "reference_sign":
        monkeypatch.setattr(dpo, "implicit_reward", lambda log_q, log_ref, beta: beta * (log_q + log_ref))
    else:
        monkeypatch.setattr(dpo, "implicit_reward", lambda log_q, log_ref, beta: log_q - log_ref)
    lq = _guide_log_q(_train())
    assert _kl(lq, _optimum) > TOL


def test_exact_optimum_is_stationary_and_keeps_unseen_texts_at_the_prior():
    """The exact minimiser: the loss's gradient over log q (on the simplex) vanishes; with a text left
    out of every pair, q/π is the same for all unseen texts (the chosen member of the solution set)."""
    c, r = _index(_prefs.chosen), _index(_prefs.rejected)
    h = (_optimum - _log_pi).clone().requires_grad_(True)
    loss = dpo.dpo_loss(dpo.implicit_reward(h[c], 0.0, BETA), dpo.implicit_reward(h[r], 0.0, BETA))
    (g,) = torch.autograd.grad(loss, h)
    assert float(g.abs().max()) < 1e-8
    keep = (c != 5) & (r != 5) & (c != 9) & (r != 9)
    opt = dpo.exact_dpo_optimum(_log_pi, c[keep], r[keep], BETA)
    ratio = opt - _log_pi
    assert float((ratio[5] - ratio[9]).abs()) < 1e-12


def test_no_minimum_is_a_clear_error():
    with pytest.raises(ValueError, match="no minimum"):
        dpo.exact_dpo_optimum(_log_pi, torch.tensor([1, 2]), torch.tensor([2, 3]), BETA)


# -- bad input, before any training ------------------------------------------------------------------------
def _bare_model():
    pyro.sample("x", _lm.sequence([], max_new_tokens=T))


def _two_betas():
    x = pyro.sample("x", _lm.sequence([], max_new_tokens=T))
    ppl_lm.reward("a", utility(x).float(), beta=0.5)
    ppl_lm.reward("b", utility(x).float(), beta=1.0)


@pytest.mark.parametrize("case,match", [
    ("no_prefs", "pass preferences="),
    ("prefs_other_objective", "option of objective='dpo'"),
    ("not_prefs", "must be a ppl_lm.Preferences"),
    ("vocab", "outside the LM's vocabulary"),
    ("length", "max_new_tokens=2"),
    ("after_eos", "probability zero"),
    ("no_beta", "pass beta="),
    ("two_betas", "different temperatures"),
    ("contexts", "contexts= is for the sampling"),
    ("batch_size", "batch_size must be a positive integer"),
    ("composed", "one latent lm.sequence"),
])
def test_bad_input_is_a_clear_error(case, match):
    m, opts = model, {"objective": "dpo", "preferences": _prefs}
    if case == "no_prefs":
        opts.pop("preferences")
    elif case == "prefs_other_objective":
        opts["objective"] = "reverse"
    elif case == "not_prefs":
        opts["preferences"] = (_prefs.chosen, _prefs.rejected)
    elif case == "vocab":
        opts["preferences"] = ppl_lm.Preferences(torch.tensor([[7, 0]]), torch.tensor([[1, 0]]))
    elif case == "length":
        opts["preferences"] = ppl_lm.Preferences(torch.tensor([[2, 0, 0]]), torch.tensor([[1, 0, 0]]))
    elif case == "after_eos":
        opts["preferences"] = ppl_lm.Preferences(torch.tensor([[0, 2]]), torch.tensor([[1, 0]]))
    elif case == "no_beta":
        m = _bare_model
    elif case == "two_betas":
        m = _two_betas
    elif case == "contexts":
        opts["contexts"] = [(), ()]
    elif case == "batch_size":
        opts["batch_size"] = 0
    elif case == "composed":
        def m():
            w = pyro.sample("w", pyro.distributions.Categorical(torch.ones(2)))
            x = pyro.sample("x", _lm.sequence([], max_new_tokens=T))
            ppl_lm.reward("u", utility(x).float() + w.float(), beta=BETA)
    with pytest.raises((ValueError, TypeError), match=match):
        ppl_lm.infer(m, method="svi", num_steps=5, progress=False, **opts)


def test_explicit_beta_overrides_the_models():
    """beta= trains against its own β: the exact optimum at that β, not the model's."""
    post = _train(beta=1.0, num_steps=150)
    opt1 = dpo.exact_dpo_optimum(_log_pi, _index(_prefs.chosen), _index(_prefs.rejected), 1.0)
    lq = _guide_log_q(post)
    assert _kl(lq, opt1) < TOL < _kl(lq, _optimum)


def test_minibatches_resume_from_a_checkpoint(tmp_path):
    """Minibatches of pairs come from the run's seeded generator, saved in checkpoints: a run stopped at
    step 12 and resumed from its step-10 checkpoint ends with the uninterrupted run's guide."""
    opts = {"num_steps": 20, "batch_size": 100, "checkpoint_every": 10, "num_samples": 100}

    class Stop(Exception):
        pass

    def stop_at_12(step, guide, stats):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        _train(checkpoint_dir=str(tmp_path), callback=stop_at_12, **opts)
    resumed = _train(checkpoint_dir=str(tmp_path), **opts)
    straight = _train(**opts)
    assert resumed.info.start_step == 10
    for k, v in straight.guide.state_dict().items():
        assert torch.equal(v, resumed.guide.state_dict()[k]), k
    # a checkpoint of other pairs is refused
    with pytest.raises(ValueError, match="pairs"):
        ppl_lm.infer(model, method="svi", objective="dpo", seed=0, progress=False, checkpoint_dir=str(tmp_path),
                     preferences=ppl_lm.Preferences(_prefs.rejected, _prefs.chosen), **opts)


def test_text_pairs_with_contexts_on_a_lora_guide():
    """Text preferences with a context per pair, on a transformer (LoRA guide): each pair's implicit
    reward is read under its own context, both for the guide and the reference (checked against direct
    scoring), and training moves the chosen texts up against the rejected ones."""
    lm = ppl_lm.tiny_char_transformer(seed=0)

    def chat(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=4))
        ppl_lm.reward("len", ppl_lm.rewards.length(lm, x).float(), beta=0.5)

    prefs = ppl_lm.Preferences(["good", "fine", "yes"], ["bad", "poor", "no"], context=["Q: a", "Q: b", "Q: a"])
    post = ppl_lm.infer(chat, "Q: a", method="svi", objective="dpo", preferences=prefs, num_steps=30, lr=0.01,
                        num_samples=100, crosscheck_samples=0, seed=0, progress=False)
    assert post.info.guide == "lora" and post.info.beta == 0.5
    tr = post.info.trace
    assert tr["dpo_loss"][-1] < tr["dpo_loss"][0] - 0.05 and tr["dpo_accuracy"][-1] == 1.0
    loss = dpo.DPOLoss(dpo.prepare_pairs(chat, ("Q: a",), {}, prefs), 0.5)
    with torch.no_grad():
        got = loss.margins(post.guide, {}, torch.arange(3))
    expected = []
    for c in ("Q: a", "Q: b"):  # the loss groups pairs by context, in order of first appearance
        for i in [i for i, ctx in enumerate(prefs.context) if ctx == c]:
            y = torch.stack([ppl_lm.distribution.encode_texts(lm, t, 4) for t in (prefs.chosen[i], prefs.rejected[i])])
            with torch.no_grad():
                lq = post.guide.lm.sequence(c, max_new_tokens=4).log_prob(y).double()
                lp = lm.sequence(c, max_new_tokens=4).log_prob(y).double()
            expected.append(0.5 * ((lq[0] - lp[0]) - (lq[1] - lp[1])))
    assert torch.allclose(got, torch.stack(expected), atol=1e-4), (got, expected)
