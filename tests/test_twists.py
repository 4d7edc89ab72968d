"""Learned twists for SMC (inference/smc/twists.py) against exact answers on toy Markov LMs.

- The optimal twist (``exact_twist``, by enumeration) gives log Ẑ = log Z at every seed, with 8
  particles, even when sequences end at different positions.
- Any twist keeps SMC unbiased: with a random twist, the mean of 1,000 independent Ẑ_r is Z within
  four of its (iid) standard errors, and the pooled particles match the exact posterior; a
  planted bug (tokens drawn from π·ψ, ψ not divided out of the weights) fails that same check
  (E[Ẑ/Z] 1.51 ± 0.03 where the correct code gives 1.02 ± 0.03).
- Contrastive twist learning approaches the optimum: Var(log Ẑ) over independent runs falls with
  training steps.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from toys import tv_distance, tv_tolerance

import ppl_lm
from ppl_lm.inference.smc import sweep, twists

LM = ppl_lm.MarkovLM.random(5, eos_id=0, seed=2)
T = 5


def pinned_end():
    """A hard condition on the last two tokens (p = 0.010): prefix scores cannot see it before."""
    x = pyro.sample("x", LM.sequence([1], max_new_tokens=T))
    ppl_lm.pin("end", x, {3: 4, 4: 2})


def pinned_middle():
    """A pin at position 2: afterwards sequences end at positions 3, 4 or 5."""
    x = pyro.sample("x", LM.sequence([1], max_new_tokens=T))
    ppl_lm.pin("mid", x, {2: 3})


def soft_pins():
    """Soft pins: prefix rewards the twist replaces, and sequences of every length."""
    x = pyro.sample("x", LM.sequence([1], max_new_tokens=T))
    ppl_lm.pin("soft", x, {1: 2, 3: 4}, lam=2.0)


def _smc(model, **kw):
    kw.setdefault("progress", False)
    return ppl_lm.infer(model, method="smc", **kw)


@pytest.fixture(scope="module")
def exact():
    return {m.__name__: ppl_lm.infer(m, method="exact", progress=False) for m in (pinned_end, pinned_middle, soft_pins)}


@pytest.mark.parametrize("model", [pinned_end, pinned_middle])
def test_exact_twist_gives_zero_variance(model, exact):
    psi = ppl_lm.exact_twist(model)
    z = exact[model.__name__].log_evidence
    for seed in range(5):
        post = _smc(model, twist=psi, num_particles=8, seed=seed)
        # float32 table: exact up to rounding; every weight equal
        assert abs(post.log_evidence - z) < 1e-5, (seed, post.log_evidence, z)
        assert post.ess == pytest.approx(8.0, abs=1e-6)
        assert post.info.twist
    plain = [_smc(model, num_particles=64, seed=s).log_evidence for s in range(5)]
    assert max(abs(p - z) for p in plain) > 0.05  # without the twist it is a noisy estimate


def test_exact_twist_reads_a_batch_of_one_prompt_as_the_shared_prompt():
    def batch_of_one():  # pinned_end with the prompt [[1]] for [1]
        x = pyro.sample("x", LM.sequence(torch.tensor([[1]]), max_new_tokens=T))
        ppl_lm.pin("end", x, {3: 4, 4: 2})

    assert torch.equal(ppl_lm.exact_twist(batch_of_one).table, ppl_lm.exact_twist(pinned_end).table)


def test_exact_twist_refuses_a_twist_a_table_cannot_hold():
    with pytest.raises(ValueError, match="not a function of"):
        ppl_lm.exact_twist(soft_pins)


def _random_twist(seed: int) -> twists.TableTwist:
    g = torch.Generator().manual_seed(seed)
    # log ψ ~ N(0, 0.5²): far from the optimum, yet light enough tails for a 4-se check of E[Ẑ/Z] (at
    # scale 1.5, 2,000 runs of 8 particles gave max Ẑ/Z 111-321 and a mean 0.9-4.1 se off, by random stream)
    return twists.TableTwist(T, LM.vocab_size, 0.5 * torch.randn(T, LM.vocab_size + 1, LM.vocab_size, generator=g))


def _check_unbiased(model, exact, tw) -> None:
    post = _smc(model, twist=tw, num_particles=32, num_replicates=1000, ess_threshold=1.0, seed=0)
    z = torch.exp(torch.tensor(post.info.log_evidence_replicates, dtype=torch.float64) - exact.log_evidence)
    assert abs(float(z.mean()) - 1.0) <= 4 * float(z.std()) / math.sqrt(len(z)), float(z.mean())
    assert tv_distance(post, exact) <= tv_tolerance(exact, post.info.n_eff_genealogy)


@pytest.mark.parametrize("model", [pinned_end, soft_pins])
def test_any_twist_keeps_smc_unbiased(model, exact):
    _check_unbiased(model, exact[model.__name__], _random_twist(1))


def test_planted_bug_twist_not_divided_out_fails(monkeypatch, exact):
    """The same check, with tokens drawn from π·ψ but weighted as if drawn from π (ψ not divided out)."""
    propose = sweep.Sweep._propose

    def not_divided(self, t, gen, log_psi=None):
        tok, lp, inc = propose(self, t, gen, log_psi)
        if log_psi is not None:
            inc = inc + log_psi.gather(-1, tok[:, None])[:, 0].double().cpu()
        return tok, lp, inc

    monkeypatch.setattr(sweep.Sweep, "_propose", not_divided)
    with pytest.raises(AssertionError):
        _check_unbiased(soft_pins, exact["soft_pins"], _random_twist(1))


def _log_z_variance(model, tw, n=12):
    zs = torch.tensor([_smc(model, twist=tw, num_particles=64, seed=100 + s).log_evidence for s in range(n)])
    return float(zs.var())


def test_learned_twist_approaches_the_optimum(exact):
    """Var(log Ẑ) of 64-particle SMC: untrained twist, then 20 and 60 steps of CTL."""
    tw = twists.TableTwist(T, LM.vocab_size)
    rec = twists.TwistTraining()
    var = {0: _log_z_variance(pinned_end, tw)}
    ppl_lm.learn_twist(pinned_end, twist=tw, steps=20, num_particles=32, seed=0, record=rec)
    var[20] = _log_z_variance(pinned_end, tw)
    ppl_lm.learn_twist(pinned_end, twist=tw, steps=40, num_particles=32, seed=20, record=rec)
    var[60] = _log_z_variance(pinned_end, tw)
    print("steps  Var(log Z-hat)", *(f"{k:5d}  {v:.5f}" for k, v in var.items()), sep="\n")
    assert var[20] < 0.5 * var[0] and var[60] < 0.1 * var[0], var
    assert len(rec.loss) == 60 and sum(math.isfinite(x) for x in rec.loss) >= 50


def test_learning_from_exact_draws(exact):
    """Positives from the exact posterior instead of SMC's particles: the same approach."""
    tw = ppl_lm.learn_twist(pinned_end, steps=40, num_particles=32, positives=exact["pinned_end"], seed=0)
    assert _log_z_variance(pinned_end, tw) < 0.1 * _log_z_variance(pinned_end, twists.TableTwist(T, 5))


def test_bad_twists_are_clear_errors():
    with pytest.raises(TypeError, match="twist= takes"):
        _smc(pinned_end, twist="learned", num_particles=4)
    with pytest.raises(ValueError, match="learn the twist on this model"):
        _smc(pinned_end, twist=twists.TableTwist(T, 7), num_particles=4)
    with pytest.raises(ValueError, match="learn the twist on this model"):
        _smc(pinned_end, twist=twists.TableTwist(T - 1, 5), num_particles=4)
    with pytest.raises(ValueError, match=r"\[T, V \+ 1, V\]"):
        twists.TableTwist(T, 5, torch.zeros(T, 5, 5))


def pinned_start():
    x = pyro.sample("x", LM.sequence([1], max_new_tokens=T))
    ppl_lm.pin("start", x, {0: 3, 1: 4, 2: 2})


def test_position_twist_holds_the_optimum_of_pins_on_the_first_tokens():
    """For pins on the first tokens, the one prefix the pins keep makes ψ* a function of (t, v):
    the PositionTwist read off the exact table gives zero variance; learned by CTL it approaches it."""
    table = ppl_lm.exact_twist(pinned_start).table.detach()
    path = [LM.vocab_size, 3, 4, 2, 2]  # the start row, the pins, then any token (the table is flat there)
    psi = twists.PositionTwist(T, LM.vocab_size)
    with torch.no_grad():
        psi.table.copy_(torch.stack([table[t, path[t]] for t in range(T)]))
    z = ppl_lm.infer(pinned_start, method="exact", progress=False).log_evidence
    for seed in range(3):
        assert abs(_smc(pinned_start, twist=psi, num_particles=8, seed=seed).log_evidence - z) < 1e-5
    learned = ppl_lm.learn_twist(pinned_start, twist=twists.PositionTwist(T, LM.vocab_size), steps=40,
                                 num_particles=32, seed=0)
    assert _log_z_variance(pinned_start, learned) < 0.1 * _log_z_variance(pinned_start, None)


def test_learn_twist_errors():
    with pytest.raises(ValueError, match="objective"):
        ppl_lm.learn_twist(pinned_end, steps=1, objective="reinforce")
    with pytest.raises(ValueError, match="vocabulary"):
        ppl_lm.learn_twist(pinned_end, twist=twists.TableTwist(T, 7), steps=1)


def test_regression_objective_has_no_signal_from_dead_particles():
    """Why CTL is the default (benchmarks/RESULTS.md section 18): under a hard condition the zero
    twist satisfies the one-step identity on every surviving particle, so the regression objective
    does not move it, while CTL does."""
    reg = ppl_lm.learn_twist(pinned_end, steps=5, num_particles=32, objective="regression", seed=0)
    ctl = ppl_lm.learn_twist(pinned_end, steps=5, num_particles=32, objective="ctl", seed=0)
    assert float(reg.table.abs().max()) < 1e-3  # float32 rounding of log Σ π = 0 only
    assert float(ctl.table.abs().max()) > 0.1


@pytest.mark.parametrize("c", [100.0, -200.0])
def test_a_constant_twist_leaves_log_z_unchanged(c):
    """log ψ = c everywhere: q = π·e^c is unnormalised far beyond float32's exp range. Without
    resampling ψ telescopes, so the draws and log Ẑ are those of ψ = 0 (the sampler shifts each row by
    its max and adds the shift back). With resampling the run completes (ended rows carry no ψ, so
    their weights differ from live ones by e^c: the same law, other draws)."""
    tw = twists.TableTwist(T, LM.vocab_size, torch.full((T, LM.vocab_size + 1, LM.vocab_size), c))
    zero = _smc(pinned_middle, twist=twists.TableTwist(T, LM.vocab_size), num_particles=64, ess_threshold=0.0, seed=3)
    post = _smc(pinned_middle, twist=tw, num_particles=64, ess_threshold=0.0, seed=3)
    assert torch.equal(post.samples, zero.samples)
    assert post.log_evidence == pytest.approx(zero.log_evidence, abs=1e-4)
    assert math.isfinite(_smc(pinned_middle, twist=tw, num_particles=64, seed=3).log_evidence)
