"""One conformance table: every backend × every toy problem × both toy LMs, against exact.

Adding a backend is adding a row to ``BACKENDS``. A row gives the options of the run, the
effective number of independent draws its TV error should be judged by, and the standard
error of its log Z. Tolerances derive from those Monte Carlo errors at a fixed seed; they are
never loosened to make a test pass.
"""

from __future__ import annotations

import math

import pytest

import ppl_lm
from toys import LMS, PROBLEMS, tv_distance, tv_tolerance


def _is_logz_se(post):
    return post.log_evidence_se


BACKENDS = {
    # method: (options, n_eff(post), log Z standard error(post) or None)
    "importance": (dict(num_samples=20_000), lambda p: p.ess, _is_logz_se),
    "smc": (dict(num_particles=4_000), lambda p: p.info.n_eff_genealogy, lambda p: p.log_evidence_se),
    # mh: chains are a batch, so many short chains are cheap. n_eff is the between-chain ESS of
    # the law over whole sequences (info["ess_sequences"]): it matches the observed TV error,
    # while the min ESS over scalar summaries (p.ess) is 3-10x smaller on these toys (slow
    # summaries such as the number of rewarded tokens), which would make the tolerance loose.
    "mh": (dict(num_samples=200, num_chains=128, warmup_steps=200),
           lambda p: p.info["ess_sequences"], None),
    "svi": (dict(num_steps=300, guide="full", num_samples=4_000, num_particles=32),
            lambda p: p.ess, _is_logz_se),
}


@pytest.fixture(scope="module", params=list(LMS))
def lm(request):
    return LMS[request.param]()


_exact_cache: dict = {}


def exact_posterior(lm_name, lm, problem):
    key = (lm_name, problem)
    if key not in _exact_cache:
        model, args = PROBLEMS[problem](lm)
        _exact_cache[key] = ppl_lm.infer(model, *args, method="exact")
    return _exact_cache[key]


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", list(BACKENDS))
@pytest.mark.parametrize("lm_name", list(LMS))
def test_backend_matches_exact(method, problem, lm_name):
    lm = LMS[lm_name]()
    exact = exact_posterior(lm_name, lm, problem)
    options, n_eff, logz_se = BACKENDS[method]
    model, args = PROBLEMS[problem](lm)
    post = ppl_lm.infer(model, *args, method=method, seed=0, **options)

    tv = tv_distance(post, exact)
    tol = tv_tolerance(exact, n_eff(post))
    assert tv <= tol, f"{method} on {problem}/{lm_name}: TV {tv:.4f} > {tol:.4f} (n_eff {n_eff(post):.0f})"

    if logz_se is not None:
        se = logz_se(post)
        assert post.log_evidence is not None and math.isfinite(post.log_evidence)
        err = abs(post.log_evidence - exact.log_evidence)
        # Four standard errors, plus a floor for a zero-variance estimator.
        assert err <= 4 * se + 1e-6, f"{method} log Z off by {err:.4f} (se {se:.4f})"
