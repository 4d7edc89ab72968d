"""Posterior -> arviz.InferenceData for every backend, and the numbers a report shows.

Layout checks compare every array of the InferenceData with the Posterior it came from (values,
order, chain × draw placement); statistical checks (R-hat, k-hat, ESS) use inputs whose right
answer is known: chains that mix or do not, weights with a light or a Pareto tail.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import ppl_lm
from ppl_lm import diagnostics as D
from ppl_lm.diagnostics.inference_data import import_arviz
from ppl_lm.posterior import Posterior, normalise
from toys import PROBLEMS, markov_lm

az = import_arviz()


@pytest.fixture(scope="module")
def lm():
    return markov_lm()


@pytest.fixture(scope="module")
def soft(lm):
    return PROBLEMS["soft_reward"](lm)


@pytest.fixture(scope="module")
def exact(soft):
    model, args = soft
    return ppl_lm.infer(model, *args, method="exact")


def _np(t):
    return t.detach().cpu().double().numpy()


def check_arviz_works(idata):
    """The ArviZ calls users make first: all run and return finite numbers where defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summ = az.summary(idata)
        ess = az.ess(idata)
        rhat = az.rhat(idata)
        axes = az.plot_trace(idata, show=False)
    assert set(summ.index) == set(idata.posterior.data_vars)
    assert set(ess.data_vars) == set(idata.posterior.data_vars) == set(rhat.data_vars)
    fin = np.isfinite(summ["mean"].to_numpy())
    assert fin.any()
    assert axes.shape == (len(idata.posterior.data_vars), 2)
    import matplotlib.pyplot as plt

    plt.close("all")


def check_weighted_layout(post: Posterior, idata):
    """Weighted draws (positive weight) in ``weighted_*``; equal-weight resampled draws in ``posterior``."""
    keep = np.flatnonzero(np.isfinite(_np(post.log_weights)))
    assert dict(idata.weighted_posterior.sizes) == {"chain": 1, "draw": len(keep)}
    assert dict(idata.posterior.sizes) == {"chain": 1, "draw": D.default_num_draws(post)}
    idx = idata.sample_stats["sample_index"].values[0]
    for k in D.stat_names(post):
        np.testing.assert_array_equal(idata.weighted_posterior[k].values[0], _np(post.stats[k])[keep])
        np.testing.assert_array_equal(idata.posterior[k].values[0], _np(post.stats[k])[idx])
    np.testing.assert_allclose(idata.weighted_sample_stats["log_weight"].values[0], _np(post.log_weights)[keep])
    np.testing.assert_array_equal(idata.weighted_sample_stats["sample_index"].values[0], keep)
    np.testing.assert_allclose(np.exp(idata.weighted_sample_stats["log_weight"].values).sum(), 1.0, rtol=1e-5)
    assert idata.attrs["method"] == post.method
    assert idata.attrs["weighted"] == 1
    assert idata.attrs["ess"] == pytest.approx(post.ess)
    if post.log_evidence is not None:
        assert idata.attrs["log_evidence"] == pytest.approx(post.log_evidence)
    if post.log_evidence_se is not None:
        assert idata.attrs["log_evidence_se"] == pytest.approx(post.log_evidence_se)


# -- exact --------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["soft_reward", "hard_constraint", "pin_soft"])
def test_exact_inference_data(lm, problem):
    model, args = PROBLEMS[problem](lm)
    post = ppl_lm.infer(model, *args, method="exact")
    idata = post.to_inference_data()
    assert set(idata.groups()) == {"posterior", "sample_stats", "weighted_posterior", "weighted_sample_stats"}
    assert set(idata.posterior.data_vars) == set(post.stats) | {"log_joint"}
    check_weighted_layout(post, idata)
    np.testing.assert_allclose(idata.weighted_posterior["log_joint"].values[0],
                               _np(post.stats["log_prior"]) + _np(post.stats["log_likelihood"]))
    np.testing.assert_allclose(idata.sample_stats["lp"].values, idata.posterior["log_joint"].values)
    # Exact weights are the posterior: log_weight = log_joint - log Z.
    np.testing.assert_allclose(idata.weighted_sample_stats["log_weight"].values[0],
                               idata.weighted_posterior["log_joint"].values[0] - post.log_evidence, atol=1e-4)
    assert idata.attrs["seed"] == 0 and idata.attrs["wall_time"] > 0
    assert "khat" not in idata.attrs  # nothing to diagnose for exact weights
    check_arviz_works(idata)


def test_inference_data_writes_to_netcdf(exact, tmp_path):
    if not any(importlib.util.find_spec(m) for m in ("h5netcdf", "netCDF4", "scipy")):
        pytest.skip("no netCDF engine installed")
    idata = exact.to_inference_data()
    path = tmp_path / "post.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_allclose(back.posterior["reward:r"].values, idata.posterior["reward:r"].values)
    assert back.attrs["log_evidence"] == pytest.approx(exact.log_evidence)


# -- hand-made posteriors: MCMC layout, SVI trace -----------------------------------------------

def mcmc_posterior(values: np.ndarray, order: str = "chain-major"):
    """A hand-made MH Posterior whose stat ``v`` is ``values[c, d]`` at chain c, draw d."""
    C, S = values.shape
    chain = np.repeat(np.arange(C), S)
    draw = np.tile(np.arange(S), C)
    if order == "interleaved":  # the draws of the chains alternate: d0c0, d0c1, ...
        perm = np.lexsort((chain, draw))
        chain, draw = chain[perm], draw[perm]
    v = torch.tensor(values[chain, draw])
    n = C * S
    accepted = torch.tensor((chain * 7 + draw) % 3 == 0)
    move = torch.tensor((chain + draw) % 5)
    stats = {"v": v.float(), "log_prior": -v.float().abs(), "log_likelihood": torch.zeros(n)}
    info = {"seed": 3, "wall_time": 1.0, "acceptance": {"suffix": 0.25, "insert": 0.5},
            "move_names": ["suffix", "insert"]}
    stats.update(accepted=accepted.float(), move=move.float())
    post = Posterior(torch.zeros(n, 3, dtype=torch.long), normalise(torch.zeros(n)), None, "mh",
                     stats=stats, chain=torch.tensor(chain), info=info)
    return post, accepted.numpy(), move.numpy(), chain, draw


@pytest.mark.parametrize("order", ["chain-major", "interleaved"])
def test_mcmc_layout_is_chain_by_draw(order):
    C, S = 3, 7
    values = np.arange(C)[:, None] * 100.0 + np.arange(S)[None, :]
    post, accepted, move, chain, draw = mcmc_posterior(values, order)
    idata = post.to_inference_data()
    assert dict(idata.posterior.sizes) == {"chain": C, "draw": S}
    np.testing.assert_array_equal(idata.posterior["v"].values, values)
    # sample_index maps (chain, draw) back to the Posterior's rows.
    idx = idata.sample_stats["sample_index"].values
    np.testing.assert_array_equal(chain[idx], np.repeat(np.arange(C)[:, None], S, 1))
    np.testing.assert_array_equal(draw[idx], np.repeat(np.arange(S)[None, :], C, 0))
    np.testing.assert_array_equal(idata.sample_stats["accepted"].values, accepted[idx])
    assert idata.sample_stats["accepted"].dtype == bool
    np.testing.assert_array_equal(idata.sample_stats["move"].values, move[idx])
    assert set(idata.posterior.data_vars) == {"v", "log_prior", "log_likelihood", "log_joint"}
    assert idata.attrs["weighted"] == 0 and idata.attrs["num_chains"] == C
    assert idata.attrs["acceptance_suffix"] == 0.25 and idata.attrs["move_names"] == "suffix, insert"
    assert idata.attrs["acceptance"] == pytest.approx(accepted.mean())


def test_weighted_groups_stay_one_weighted_chain():
    n = 6
    post = Posterior(torch.zeros(n, 2, dtype=torch.long), normalise(torch.arange(n).double()), 0.0, "smc",
                     stats={"v": torch.arange(n).float()}, chain=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert not D.is_mcmc(post)
    idata = post.to_inference_data()
    assert dict(idata.weighted_posterior.sizes) == {"chain": 1, "draw": n}
    np.testing.assert_array_equal(idata.weighted_posterior["v"].values[0], np.arange(n))
    assert idata.posterior.sizes["chain"] == 1


def test_rhat_and_ess_tell_mixing_from_not():
    g = np.random.default_rng(0)
    mixed = g.normal(size=(4, 400))
    stuck = mixed + np.arange(4)[:, None] * 3.0  # every chain in its own mode
    good, _, _, _, _ = mcmc_posterior(mixed)
    bad, _, _, _, _ = mcmc_posterior(stuck)
    r_good, r_bad = D.rhat(good), D.rhat(bad)
    # Split R-hat of 1600 iid draws is 1 within a few 1e-3; chains 3 sd apart give R-hat near 2.
    assert max(r_good.values()) < 1.02
    assert r_bad["v"] > 1.5
    assert D.summary(bad)["rhat"] == pytest.approx(max(r_bad.values()))
    # MCMC ESS comes from ArviZ (bulk), not from the uniform weights: iid draws keep ~all of it.
    assert D.ess(good) > 1000 and D.ess(bad) < 100
    check_arviz_works(good.to_inference_data())


def test_backend_rhat_and_ess_win_over_computed():
    post, *_ = mcmc_posterior(np.random.default_rng(1).normal(size=(2, 50)))
    post.rhat, post.bulk_ess = 1.5, 12.0
    s = D.summary(post)
    assert s["rhat"] == 1.5 and s["ess"] == 12.0


def test_svi_trace_group():
    n = 5
    post = Posterior(torch.zeros(n, 2, dtype=torch.long), normalise(torch.randn(n)), -1.0, "svi",
                     stats={"reward:r": torch.arange(n).float()},
                     info={"trace": {"elbo": np.linspace(-3, -1, 10), "kl_prior": torch.linspace(2, 1, 10),
                                     "kl_posterior": np.ones(4)}, "log_evidence_se": 0.1, "seed": 0})
    idata = post.to_inference_data()
    assert "svi_trace" in idata.groups()
    tr = idata.svi_trace
    np.testing.assert_allclose(tr["elbo"].values, np.linspace(-3, -1, 10))
    np.testing.assert_allclose(tr["kl_prior"].values, np.linspace(2, 1, 10), rtol=1e-6)
    assert tr["elbo"].dims == ("step",) and tr["kl_posterior"].dims == ("kl_posterior_step",)
    assert "trace" not in idata.attrs


# -- weighted estimates -------------------------------------------------------------------------

def test_weighted_mean_ignores_zero_weight_minus_inf():
    post = Posterior(torch.tensor([[1, 0], [2, 0], [3, 0]]),
                     torch.tensor([-math.inf, math.log(0.25), math.log(0.75)]), 0.0, "importance",
                     stats={"log_likelihood": torch.tensor([-math.inf, 0.0, 2.0])})
    st = D.weighted_stats(post, "log_likelihood")
    assert st["mean"] == pytest.approx(1.5)
    assert st["sd"] == pytest.approx(math.sqrt(0.25 * 1.5**2 + 0.75 * 0.5**2))
    with pytest.raises(ValueError, match="one value per sample"):
        D.weighted_mean(post, torch.zeros(4))


def test_summary_means_are_posterior_expectations(exact):
    s = D.summary(exact)
    p = exact.weights
    assert s["means"]["reward:r"] == pytest.approx(float((p * exact.stats["reward:r"].double()).sum()))
    assert s["means"]["length"] == pytest.approx(float((p * exact.stats["length"].double()).sum()))
    assert s["log_evidence"] == exact.log_evidence and s["log_evidence_se"] == 0.0
    assert s["khat"] is None and s["rhat"] is None and s["acceptance"] is None
    assert s["ess"] == pytest.approx(exact.ess) and s["num_samples"] == len(exact)


def test_psis_khat_separates_light_and_heavy_tails():
    g = np.random.default_rng(0)
    n = 4000

    def post_with(log_w):
        return Posterior(torch.zeros(n, 1, dtype=torch.long), normalise(torch.tensor(log_w)), 0.0, "importance")

    light = post_with(0.1 * g.normal(size=n))
    # w ~ Pareto with tail index 1/k = 1/0.8: PSIS recovers k = 0.8 (sd about 0.05 at n = 4000).
    heavy = post_with(-0.8 * np.log(g.uniform(size=n)))
    assert D.psis_khat(light) < 0.3
    assert 0.65 < D.psis_khat(heavy) < 0.95
    light.khat = 0.42  # the backend's own estimate wins
    assert D.psis_khat(light) == 0.42


def test_top_samples_merge_duplicates():
    lm = ppl_lm.MarkovLM(torch.zeros(4), torch.zeros(4, 4), eos_id=0)
    samples = torch.tensor([[1, 2, 0], [3, 0, 0], [1, 2, 0], [2, 0, 0]])
    w = torch.tensor([0.2, 0.3, 0.4, 0.1]).log()
    post = Posterior(samples, w, None, "importance", lm=lm, stats={"reward:r": torch.tensor([1.0, 2.0, 1.0, 3.0])})
    top = D.top_samples(post, 2)
    assert [t["text"] for t in top] == ["ab", "c"]
    assert top[0]["weight"] == pytest.approx(0.6) and top[0]["count"] == 2 and top[0]["index"] == 0
    assert top[1]["stats"] == {"reward:r": 2.0}
    no_lm = Posterior(samples, w, None, "importance")
    assert D.top_samples(no_lm, 1)[0]["text"] == "1 2 0"


def test_bad_input():
    with pytest.raises(TypeError, match="Posterior"):
        D.to_inference_data("not a posterior")
    with pytest.raises(ValueError, match="no samples"):
        D.summary(Posterior(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), None, "importance"))


# -- real backends ------------------------------------------------------------------------------

def _backend_available(method: str) -> bool:
    return importlib.util.find_spec(f"ppl_lm.inference.{method}") is not None


BACKEND_RUNS = {
    "importance": dict(num_samples=300),
    "smc": dict(num_particles=64),
    "mh": dict(num_samples=25, num_chains=3, warmup_steps=5),
    "svi": dict(num_steps=5, guide="full", num_samples=100, num_particles=4),
}


@pytest.mark.parametrize("method", list(BACKEND_RUNS))
def test_backend_inference_data(method, soft):
    if not _backend_available(method):
        pytest.skip(f"backend {method} not written yet")
    model, args = soft
    post = ppl_lm.infer(model, *args, method=method, seed=0, progress=False, **BACKEND_RUNS[method])
    idata = post.to_inference_data()
    assert {"log_prior", "log_likelihood", "length", "reward:r", "log_joint"} <= set(idata.posterior.data_vars)
    if method == "mh":
        opts = BACKEND_RUNS["mh"]
        assert dict(idata.posterior.sizes) == {"chain": opts["num_chains"], "draw": opts["num_samples"]}
        for c in range(opts["num_chains"]):
            rows = torch.nonzero(post.chain == c).flatten().numpy()
            np.testing.assert_array_equal(idata.posterior["reward:r"].values[c], _np(post.stats["reward:r"])[rows])
        assert {"accepted", "move"} <= set(idata.sample_stats.data_vars)
        assert 0 <= idata.attrs["acceptance"] <= 1
        assert idata.attrs["ess"] == pytest.approx(D.ess(post))
        s = D.summary(post)
        assert s["acceptance_moves"] and s["rhat"] is not None
    else:
        check_weighted_layout(post, idata)
        assert math.isfinite(idata.attrs["log_evidence"]) and idata.attrs["log_evidence_se"] > 0
        assert idata.attrs["seed"] == 0 and idata.attrs["wall_time"] > 0
    if method == "svi":
        assert "svi_trace" in idata.groups()
        np.testing.assert_allclose(idata.svi_trace["elbo"].values, post.info["trace"]["elbo"])
        assert idata.svi_trace.sizes["step"] == BACKEND_RUNS["svi"]["num_steps"]
    check_arviz_works(idata)


# -- detectors: a run built to fail warns; a sound run on a tiny support does not ----------------
def test_few_distinct_fires_on_a_guide_collapsed_onto_one_sequence():
    """Importance sampling from a guide that always proposes one text: the weights are all equal
    (ESS = N, k-hat fine), so only the distinct-sequence count can tell."""
    import pyro

    lm = ppl_lm.MarkovLM.random(40, seed=0)
    init, trans = torch.full((40,), -math.inf), torch.full((40, 40), -math.inf)
    trans[:, lm.eos_id] = 0.0
    init[3] = trans[3, 5] = trans[5, 7] = trans[7, 9] = 0.0
    trans[3, lm.eos_id] = trans[5, lm.eos_id] = trans[7, lm.eos_id] = -math.inf
    peaked = ppl_lm.MarkovLM(init, trans, eos_id=lm.eos_id)  # the one text 3 5 7 9

    def model():
        pyro.sample("x", lm.sequence([], max_new_tokens=4))

    def collapsed():
        return pyro.sample("x", peaked.sequence([], max_new_tokens=4))

    post = ppl_lm.infer(model, method="importance", guide=collapsed, num_samples=500, progress=False)
    assert [w.code for w in post.warnings] == ["few_distinct"]


def test_few_distinct_is_quiet_on_a_tiny_support():
    """Prior IS over a support of 7 sequences: 7 distinct among 2000 is the whole support, not a collapse."""
    import pyro

    lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)

    def model():
        pyro.sample("x", lm.sequence([], max_new_tokens=2))

    post = ppl_lm.infer(model, method="importance", num_samples=2000, progress=False)
    assert len(torch.unique(post.samples, dim=0)) == 7
    assert "few_distinct" not in [w.code for w in post.warnings]


@pytest.mark.parametrize("n, threshold, fires", [(4, 0.0, False), (64, 1.0, True)])
def test_path_degeneracy_is_judged_against_the_run_size(n, threshold, fires):
    """Resampling at every token under a steep reward: 64 particles end with fewer than 10 time-0
    ancestors (the warning). 4 particles never resampled keep their 4 ancestors: they cannot have
    10, and are judged against half their size (the old rule warned on every run with N < 10)."""
    import pyro

    lm = ppl_lm.MarkovLM.random(6, seed=1)

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=12))
        ppl_lm.reward("r", 3.0 * (x == 2).float().sum(-1), beta=1.0)

    post = ppl_lm.infer(model, method="smc", num_particles=n, ess_threshold=threshold, progress=False, seed=0)
    eves = post.info.num_eves
    assert ("path_degeneracy" in [w.code for w in post.warnings]) == fires, eves
    assert (eves < 10) if fires else (eves == n)


def test_low_ess_of_weights_warns_when_few_draws_are_admissible():
    """Prior IS under a condition that 1/8 of the prior satisfies: the admissible draws have equal
    weights (k-hat -inf, no heavy tail), so only the weights' ESS can tell that 500 draws are
    worth about 62. Below 100 draws the run is too small to judge at all: ``too_few_draws`` instead."""
    import pyro

    lm = ppl_lm.MarkovLM(torch.zeros(8), torch.zeros(8, 8), eos_id=0)

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=3))
        ppl_lm.constraint("starts_b", x[..., 0] == 2)

    post = ppl_lm.infer(model, method="importance", num_samples=500, progress=False, seed=0)
    assert post.khat == -math.inf and 30 < post.ess < 100
    assert [w.code for w in post.warnings] == ["low_ess"]
    small = ppl_lm.infer(model, method="importance", num_samples=99, progress=False, seed=0)
    assert [w.code for w in small.warnings] == ["too_few_draws"]


@pytest.mark.parametrize("shape,low,high", [((500, 6), 0, 3), ((2000, 24), 0, 49152), ((300, 1), -5, 5), ((1, 4), 0, 2)])
def test_row_groups_is_unique_dim0(shape, low, high):
    from ppl_lm.diagnostics.estimators import row_groups

    g = torch.Generator().manual_seed(shape[0])
    x = torch.randint(low, high, shape, generator=g)
    x[::3] = x[0].clone()  # repeated rows
    assert torch.equal(row_groups(x), torch.unique(x, dim=0, return_inverse=True)[1])
    f = x.double() / 7  # float rows keep every distinct value
    assert torch.equal(row_groups(f), torch.unique(f, dim=0, return_inverse=True)[1])
