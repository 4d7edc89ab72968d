"""One conformance table: every backend × every toy problem × both toy LMs, against exact.

Adding a backend is adding a row to ``BACKENDS``. Tolerances come from the *problem*, never
from what a backend reports about itself:

- prior importance sampling with N samples is judged as N·f independent exact draws, where
  f = (E_π w)² / E_π w² is the exact ESS fraction of its weights w = exp(log-likelihood),
  computed by enumeration; its log Z error by the exact delta-method standard error
  sqrt((1/f − 1)/N);
- every other backend is judged against a fixed reference: it must be at least as accurate as
  a stated number of independent exact draws (``reference`` in its row) and its log Z at
  least as accurate as prior importance sampling with that many samples.

The TV tolerance is three times the expected TV of the reference's empirical law, the log-Z
tolerance four reference standard errors. ``test_planted_bugs_fail_the_table`` shows the table
rejects a backend whose weights are off by a factor or whose pin sits one position off;
``test_reported_errors_are_calibrated`` checks separately that what the backends *report*
(log-evidence standard errors, SMC's genealogy count) matches their observed spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pytest
import torch

import ppl_lm
from toys import LMS, PROBLEMS, T, expected_tv, tv_distance


@dataclass(frozen=True)
class Row:
    options: dict
    # The number of independent exact draws the run must match, from the problem's exact ESS
    # fraction f (prior IS) and the run's options.
    reference: callable
    # Its log Z must be at least as accurate as prior importance sampling with this many samples.
    is_samples: int


BACKENDS = {
    "importance": Row(dict(num_samples=20_000), lambda f: 20_000 * f, 20_000),
    # SMC with 4000 particles is held to 2 000 independent exact draws (more than prior IS's
    # 4000·f for every problem here, where f ≤ 0.7) and to prior IS's log Z error at N = 4000.
    "smc": Row(dict(num_particles=4_000), lambda f: 2_000.0, 4_000),
    # 128 chains × 200 draws = 25 600 correlated draws, held to 4 000 independent exact ones.
    "mh": Row(dict(num_samples=200, num_chains=128, warmup_steps=200), lambda f: 4_000.0, 0),
    # 4000 importance-corrected guide draws, held to 2 500 independent exact draws.
    "svi": Row(dict(num_steps=300, guide="full", num_samples=4_000, num_particles=32), lambda f: 2_500.0, 4_000),
}


_exact_cache: dict = {}


def exact_posterior(lm_name, problem):
    key = (lm_name, problem)
    if key not in _exact_cache:
        model, args = PROBLEMS[problem](LMS[lm_name]())
        _exact_cache[key] = ppl_lm.infer(model, *args, method="exact")
    return _exact_cache[key]


def prior_is_ess_fraction(exact) -> float:
    """(E_π w)² / E_π w² for w = exp(log-likelihood): exact, by enumeration of the support."""
    log_prior = exact.stats["log_prior"].double()
    log_w = exact.stats["log_likelihood"].double()
    log_m1 = torch.logsumexp(log_prior + log_w, 0)
    log_m2 = torch.logsumexp(log_prior + 2 * log_w, 0)
    return float(torch.exp(2 * log_m1 - log_m2))


def failures(post, exact, row: Row, f: float) -> list[str]:
    """What is wrong with ``post`` against ``exact`` at the row's reference (empty: it conforms)."""
    out = []
    n_ref = row.reference(f)
    tv, tol = tv_distance(post, exact), 3.0 * expected_tv(exact, n_ref)
    if not tv <= tol:
        out.append(f"TV {tv:.4f} > {tol:.4f} (reference {n_ref:.0f} exact draws)")
    if post.log_evidence is not None and row.is_samples:
        se_ref = math.sqrt(max(1.0 / f - 1.0, 0.0) / row.is_samples)
        err = abs(post.log_evidence - exact.log_evidence)
        if not err <= 4 * se_ref + 1e-6:
            out.append(f"log Z off by {err:.4f} > 4 × {se_ref:.4f}")
    return out


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", list(BACKENDS))
@pytest.mark.parametrize("lm_name", list(LMS))
def test_backend_matches_exact(method, problem, lm_name):
    exact = exact_posterior(lm_name, problem)
    f = prior_is_ess_fraction(exact)
    row = BACKENDS[method]
    model, args = PROBLEMS[problem](LMS[lm_name]())
    post = ppl_lm.infer(model, *args, method=method, seed=0, progress=False, **row.options)
    if method != "mh":
        assert post.log_evidence is not None and math.isfinite(post.log_evidence)
    bad = failures(post, exact, row, f)
    assert not bad, f"{method} on {problem}/{lm_name}: " + "; ".join(bad)


# -- the table can fail --------------------------------------------------------------------------

def _soft_reward_twice(lm):
    """The soft-reward problem with its factor doubled (β halved): weights off by a factor."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        r = (x == 2).float().sum(-1) - 0.3 * ppl_lm.rewards.length(lm, x)
        ppl_lm.reward("r", r, beta=0.25)

    return model, ()


def _pin_one_off(lm):
    """The hard-pin problem (x_1 = b) with the pin at position 2 instead."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.pin("pin", x, {2: 2}, lam=None)

    return model, ()


@pytest.mark.parametrize("method", list(BACKENDS))
@pytest.mark.parametrize("bug, problem", [(_soft_reward_twice, "soft_reward"), (_pin_one_off, "pin_hard")])
def test_planted_bugs_fail_the_table(method, bug, problem):
    exact = exact_posterior("markov", problem)
    f = prior_is_ess_fraction(exact)
    row = BACKENDS[method]
    model, args = bug(LMS["markov"]())
    post = ppl_lm.infer(model, *args, method=method, seed=0, progress=False, **row.options)
    assert failures(post, exact, row, f), f"{method} passed the table with a planted bug"


# -- what the backends report is calibrated ------------------------------------------------------

@pytest.mark.parametrize("method, options", [("importance", dict(num_samples=400)), ("smc", dict(num_particles=200))])
def test_reported_errors_are_calibrated(method, options):
    """Over 40 seeds, the spread of log Ẑ matches the mean reported standard error, and (SMC) the
    observed TV matches the TV expected at the reported genealogy count."""
    exact = exact_posterior("markov", "soft_reward")
    model, args = PROBLEMS["soft_reward"](LMS["markov"]())
    posts = [ppl_lm.infer(model, *args, method=method, seed=s, progress=False, **options) for s in range(40)]
    logz = torch.tensor([p.log_evidence for p in posts], dtype=torch.float64)
    se = torch.tensor([p.log_evidence_se for p in posts], dtype=torch.float64)
    # The sd of 40 draws is within ±35% of the truth with overwhelming probability (χ² with 39 dof).
    assert 0.65 < float(logz.std()) / float(se.mean()) < 1.5
    if method == "smc":
        tv = sum(tv_distance(p, exact) for p in posts) / len(posts)
        expected = sum(expected_tv(exact, p.info.n_eff_genealogy) for p in posts) / len(posts)
        assert 0.6 < tv / expected < 1.6, (tv, expected)
