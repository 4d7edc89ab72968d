"""ArviZ on every backend: ``az.summary`` of ``to_inference_data()`` against exact enumeration.

The toy is ``world_prompt`` of ``test_composition`` on the Markov LM: a discrete world w picks the
prompt, a reward reads both. Exact enumeration gives the posterior mean and sd of the length, the
reward and w.

Tolerance (from the problem, never the estimator's own se): the mean of ``M`` equal-weight draws
resampled from weighted draws worth ``n_ref`` exact draws errs by at most
sd·sqrt(1/n_ref + 1/M) (the estimate's error, plus the resampling's, which is at most a
multinomial draw's); four of those. ``n_ref`` is prior importance sampling's exact ESS N·f for the
weighted backends (SVI and SMC are held to it, as in ``test_composition``), infinite for exact,
and a fixed reference for MH.
"""

from __future__ import annotations

import math
import warnings

import matplotlib
import numpy as np
import pytest
import torch

import ppl_lm
from ppl_lm import resampling
from ppl_lm.diagnostics.warnings import PplLmWarning
from test_composition import truth, world_prompt
from toys import LMS, hard_constraint

matplotlib.use("Agg")

NAMES = ("length", "reward:r", "w")
ROWS = {
    # method: (options, reference number of exact draws; None: prior IS's N·f; inf: exact)
    "exact": ({}, math.inf),
    "importance": (dict(num_samples=4_000), None),
    "smc": (dict(num_particles=2_000), None),
    # 32 chains × 150 draws: test_composition holds 64 × 150 to 1,500 exact draws; half of that.
    "mh": (dict(num_samples=150, num_chains=32, warmup_steps=100), 750.0),
    "svi": (dict(num_steps=100, num_particles=16, num_samples=4_000), None),
}


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def exact_moments() -> dict[str, tuple[float, float]]:
    """Exact posterior mean and sd of each checked summary."""
    ex = truth("markov", "world_prompt").exact
    out = {}
    for k in NAMES:
        v = ex.stats[k].double()
        mean = float((ex.weights * v).sum())
        out[k] = (mean, float((ex.weights * (v - mean) ** 2).sum()) ** 0.5)
    return out


def reference_draws(method: str, post) -> float:
    options, ref = ROWS[method]
    if ref is not None:
        return ref
    return options.get("num_samples", options.get("num_particles")) * truth("markov", "world_prompt").f


def misses(idata, n_ref: float) -> list[str]:
    """The summaries whose ``az.summary`` mean is off the exact mean by more than four sd."""
    summ = _az().summary(idata, var_names=list(NAMES))
    m = idata.posterior.sizes["draw"] * idata.posterior.sizes["chain"]
    # MCMC draws are not resampled: only the chains' own error counts.
    resampled = 0.0 if idata.attrs["weighted"] == 0 else 1.0 / m
    out = []
    for k, (mean, sd) in exact_moments().items():
        tol = 4 * sd * math.sqrt(1.0 / n_ref + resampled)
        got = float(summ.loc[k, "mean"])
        if not abs(got - mean) <= tol:
            out.append(f"{k}: az.summary mean {got:.4f}, exact {mean:.4f}, tolerance {tol:.4f}")
    return out


_posts: dict = {}


def run(method: str):
    if method not in _posts:
        options, _ = ROWS[method]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PplLmWarning)
            _posts[method] = ppl_lm.infer(world_prompt(LMS["markov"]()), method=method, seed=0, progress=False,
                                          **options)
    return _posts[method]


@pytest.mark.parametrize("method", list(ROWS))
def test_summary_means_match_exact(method):
    post = run(method)
    idata = post.to_inference_data()
    bad = misses(idata, reference_draws(method, post))
    assert not bad, f"{method}: " + "; ".join(bad)


@pytest.mark.parametrize("method", ["importance", "exact"])
def test_planted_unweighted_draws_fail_the_check(method, monkeypatch):
    """The check above catches the old bug: the weighted draws put in ``posterior`` as they are."""
    post = run(method)

    def unweighted(weights, num=None, scheme="multinomial", generator=None):
        return torch.arange(len(weights))[weights > 0]  # every draw once, weights ignored

    monkeypatch.setattr(resampling, "resample", unweighted)
    assert misses(post.to_inference_data(), reference_draws(method, post))


@pytest.mark.parametrize("method", ["importance", "smc", "svi"])
def test_arviz_ess_does_not_overclaim(method):
    """ArviZ's ESS of the resampled draws is about the weighted draws' effective count, not N.

    Over 40 seeds of importance sampling on this toy the ratio ranged 0.44-1.14 (mean 0.84);
    N draws in ``posterior`` would give about N / Kish ESS (5.6 for importance here).
    """
    post = run(method)
    n_eff = ppl_lm.diagnostics.effective_draws(post)
    idata = post.to_inference_data()
    ess = _az().ess(idata, var_names=list(NAMES), method="bulk")
    assert max(float(ess[k]) for k in NAMES) <= 1.5 * n_eff
    assert idata.posterior.sizes["draw"] == round(n_eff) < len(post) or method == "svi"


def test_weighted_draws_are_kept_with_their_weights():
    post = run("importance")
    idata = post.to_inference_data()
    lw = post.log_weights.double().numpy()
    keep = np.isfinite(lw)
    got = idata.weighted_sample_stats
    np.testing.assert_array_equal(got["sample_index"].values[0], np.flatnonzero(keep))
    np.testing.assert_allclose(got["log_weight"].values[0], lw[keep], rtol=1e-6)
    np.testing.assert_array_equal(idata.weighted_posterior["length"].values[0], post.stats["length"].numpy()[keep])
    assert idata.attrs["kish_ess"] == pytest.approx(ppl_lm.diagnostics.kish_ess(post.log_weights))
    assert idata.attrs["num_weighted_draws"] + idata.attrs["num_zero_weight"] == len(post)
    # The weighted mean of the kept group is the posterior's own weighted estimate.
    w = np.exp(got["log_weight"].values[0])
    assert float((w * idata.weighted_posterior["w"].values[0]).sum()) == pytest.approx(
        post.expectation(post.stats["w"]), rel=1e-5)


def test_resampling_is_seeded_and_draws_map_back():
    post = run("smc")
    a, b = post.to_inference_data(), post.to_inference_data()
    np.testing.assert_array_equal(a.posterior["length"].values, b.posterior["length"].values)
    c = post.to_inference_data(seed=1)
    assert not np.array_equal(a.sample_stats["sample_index"].values, c.sample_stats["sample_index"].values)
    idx = a.sample_stats["sample_index"].values[0]
    np.testing.assert_array_equal(a.posterior["reward:r"].values[0], post.stats["reward:r"].numpy()[idx])
    assert bool((post.log_weights[torch.as_tensor(idx)] > -math.inf).all())
    assert post.to_inference_data(num_draws=77).posterior.sizes["draw"] == 77
    with pytest.raises(ValueError, match="num_draws must be a positive integer"):
        post.to_inference_data(num_draws=0)


def test_mcmc_layout_is_unchanged():
    post = run("mh")
    idata = post.to_inference_data()
    assert dict(idata.posterior.sizes) == {"chain": 32, "draw": 150}
    assert "weighted_posterior" not in idata.groups()
    np.testing.assert_array_equal(idata.posterior["w"].values.reshape(-1), post.stats["w"].numpy())


# -- hard constraints: every plot a user would call runs ------------------------------------------
@pytest.mark.parametrize("method", ["importance", "exact", "smc", "mh"])
def test_plots_run_on_a_hard_constraint_posterior(method):
    az = _az()
    import matplotlib.pyplot as plt

    model, args = hard_constraint(LMS["markov"]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PplLmWarning)
        post = ppl_lm.infer(model, *args, method=method, seed=0, progress=False,
                            **{"importance": {"num_samples": 400}, "smc": {"num_particles": 400}, "exact": {},
                               "mh": {"num_samples": 50, "num_chains": 2, "warmup_steps": 20}}[method])
    if method == "importance":  # the weighted draws hold rejected ones: the old layout's -inf
        assert not torch.isfinite(post.stats["log_likelihood"]).all()
    idata = post.to_inference_data()
    for name in idata.posterior.data_vars:
        assert np.isfinite(idata.posterior[name].values).all(), name
        if "weighted_posterior" in idata.groups():
            assert np.isfinite(idata.weighted_posterior[name].values).all(), name
    assert (idata.posterior["ok:no_c"].values == 1).all()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_posterior(idata, show=False)
            az.plot_trace(idata, show=False)
            az.plot_forest(idata, show=False)
    finally:
        plt.close("all")


def test_observed_text_posterior_has_no_sequence_but_converts():
    """Every LM site observed (``post.samples is None``): the draws are the other latents."""
    import pyro
    import pyro.distributions as dist

    lm = LMS["markov"]()

    def model():
        w = pyro.sample("w", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))
        prompt = torch.where(w == 0, 1, torch.where(w == 1, 2, 4))[..., None]
        pyro.sample("x", lm.sequence(prompt, max_new_tokens=3), obs=torch.tensor([2, 3, 0]))

    ex = ppl_lm.infer(model, method="exact", progress=False)
    assert ex.samples is None
    idata = ex.to_inference_data()
    p_w = ex.marginal("w")
    mean = sum(k * p for k, (p, _) in p_w.items())
    sd = math.sqrt(sum((k - mean) ** 2 * p for k, (p, _) in p_w.items()))
    got = float(_az().summary(idata, var_names=["w"]).loc["w", "mean"])
    assert abs(got - mean) <= 4 * sd / math.sqrt(idata.posterior.sizes["draw"])
    assert idata.weighted_posterior.sizes["draw"] == 3
