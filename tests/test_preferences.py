"""Preferences, the Bayesian Bradley–Terry reward model and the three ways its uncertainty enters the
conditional, against exact answers: the posterior of θ by quadrature on a grid, the conditionals
π′ by enumeration of the toy LM's texts."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import ppl_lm
from ppl_lm.inference.exact import enumerate_sequences
from toys import LMS

T = 3
BETA = 0.7
PRIOR_SCALE = 1.5
TRUE_THETA = torch.tensor([1.0, -0.5], dtype=torch.float64)


def features(x: torch.Tensor) -> torch.Tensor:
    """[count of token 2, count of token 3]: the toy's two reward features."""
    return torch.stack([(x == 2).double().sum(-1), (x == 3).double().sum(-1)], -1)


def simulated_prefs(n: int = 40, seed: int = 0) -> ppl_lm.Preferences:
    """Pairs of prior draws of the toy LM, chosen by a Bradley–Terry rater with utility TRUE_THETA · φ."""
    lm = LMS["markov"]()
    return ppl_lm.preferences.simulate_preferences(lm, [], lambda x: features(x) @ TRUE_THETA, n, T, seed=seed)


class GridPosterior:
    """p(θ | prefs) on a 401 x 401 grid over [-6, 6]²: mean, sd and mode."""

    def __init__(self, prefs: ppl_lm.Preferences):
        delta = features(prefs.chosen) - features(prefs.rejected)  # [n, 2]
        g = torch.linspace(-6, 6, 401, dtype=torch.float64)
        th = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        lp = -0.5 * (th**2).sum(-1) / PRIOR_SCALE**2 + torch.nn.functional.logsigmoid(th @ delta.T).sum(-1)
        p = torch.softmax(lp, 0)
        self.mean = (p[:, None] * th).sum(0)
        self.sd = ((p[:, None] * (th - self.mean) ** 2).sum(0)).sqrt()
        self.mode = th[lp.argmax()]
        self.spacing = float(g[1] - g[0])


_prefs = simulated_prefs()
_grid = GridPosterior(_prefs)


# -- preference data ---------------------------------------------------------------------------------
def test_simulated_rater_recovers_its_utility():
    """400 pairs from a rater with utility θ*·φ: the exact posterior of θ puts θ* within 4 sd, and
    the rater is seeded (same seed, same pairs)."""
    prefs = simulated_prefs(400, seed=1)
    grid = GridPosterior(prefs)
    assert torch.all((grid.mean - TRUE_THETA).abs() <= 4 * grid.sd), (grid.mean, grid.sd)
    again = simulated_prefs(400, seed=1)
    assert torch.equal(prefs.chosen, again.chosen) and torch.equal(prefs.rejected, again.rejected)
def test_bad_preferences_are_clear_errors():
    t = torch.tensor([[1, 2, 0]])
    with pytest.raises(ValueError, match="one of each per pair"):
        ppl_lm.Preferences(torch.tensor([[1, 0, 0], [2, 0, 0]]), t)
    with pytest.raises(ValueError, match="same text"):
        ppl_lm.Preferences(t, t.clone())
    with pytest.raises(ValueError, match="empty text"):
        ppl_lm.Preferences(["good", ""], ["bad", "meh"])
    with pytest.raises(ValueError, match="pad both sides"):
        ppl_lm.Preferences(t, torch.tensor([[1, 0]]))
    with pytest.raises(TypeError, match="both be token ids or both be strings"):
        ppl_lm.Preferences(t, ["x"])
    with pytest.raises(ValueError, match="list of 1 strings"):
        ppl_lm.Preferences(["a"], ["b"], context="c")


@pytest.mark.parametrize("kind", ["tokens", "text"])
def test_jsonl_round_trip(tmp_path, kind):
    prefs = _prefs if kind == "tokens" else ppl_lm.Preferences(["it was great", "fine"], ["it was bad", "awful"],
                                                                context=["Review:", "Review:"])
    path = tmp_path / "prefs.jsonl"
    prefs.to_jsonl(path)
    back = ppl_lm.Preferences.from_jsonl(path)
    if kind == "tokens":
        assert torch.equal(back.chosen, prefs.chosen) and torch.equal(back.rejected, prefs.rejected)
    else:
        assert (back.chosen, back.rejected, back.context) == (prefs.chosen, prefs.rejected, prefs.context)
    (tmp_path / "bad.jsonl").write_text('{"chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key\(s\) \['rejected'\]"):
        ppl_lm.Preferences.from_jsonl(tmp_path / "bad.jsonl")


# -- the reward model against the exact posterior of θ -------------------------------------------------
def check_theta(rm, grid: GridPosterior, method: str) -> None:
    if method == "nuts":
        # 4 sd of a mean of 100 effective draws (a reference number, not NUTS's own ESS)
        tol = 4 * grid.sd / math.sqrt(100)
        got = rm.mean
    elif method == "map":
        tol = torch.full((2,), 2 * grid.spacing + 0.02, dtype=torch.float64)
        got = rm.samples[0]
        assert torch.all((got - grid.mode).abs() <= tol), (method, got, grid.mode)
        return
    else:  # a Gaussian approximation of a near-Gaussian posterior (n = 40 pairs): 0.3 sd, plus draws' error
        tol = 0.3 * grid.sd + 4 * grid.sd / math.sqrt(len(rm.samples))
        got = rm.mean
    assert torch.all((got - grid.mean).abs() <= tol), (method, got, grid.mean, tol)


@pytest.mark.parametrize("method", ["nuts", "svi", "laplace", "map"])
def test_fit_reward_matches_the_exact_posterior(method):
    opts = dict(num_samples=200, warmup_steps=150) if method == "nuts" else dict(num_samples=2000, num_steps=800)
    rm = ppl_lm.fit_reward(_prefs, features, method=method, prior_scale=PRIOR_SCALE, seed=0, **opts)
    check_theta(rm, _grid, method)
    # the share of training pairs ordered right by the mean reward, as the exact posterior mean orders them
    assert rm.diagnostics["train_accuracy"] == rm.accuracy(_prefs)
    delta = features(_prefs.chosen) - features(_prefs.rejected)
    d = delta @ _grid.mean
    assert abs(rm.diagnostics["train_accuracy"] - float(((d > 0).double() + 0.5 * (d == 0).double()).mean())) <= 0.1
    if method == "nuts":
        assert len(rm.samples) == 400 and max(rm.diagnostics["rhat"]) < 1.05
        assert min(rm.diagnostics["ess_bulk"]) > 100


def test_planted_bug_flipped_preferences_fail():
    """The reward sign flipped (every pair read the wrong way round) fails the posterior check."""
    flipped = ppl_lm.Preferences(_prefs.rejected, _prefs.chosen)
    rm = ppl_lm.fit_reward(flipped, features, method="map", prior_scale=PRIOR_SCALE, num_steps=800)
    with pytest.raises(AssertionError):
        check_theta(rm, _grid, "map")


# -- the three conditionals, exact on the toy ------------------------------------------------------------
DRAWS = torch.tensor([[1.2, -0.2], [0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)  # a 3-draw "posterior"


def _truth(mode: str, rm, lm):
    xs = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
    log_pi = lm.sequence([], max_new_tokens=T).log_prob(xs).double()
    r_s = rm.reward(xs, rm.samples)  # [S, M]
    if mode == "mean":
        lj = log_pi + rm.reward(xs) / BETA
    elif mode == "marginal":
        lj = log_pi + torch.logsumexp(r_s / BETA, 0) - math.log(len(rm.samples))
    else:
        log_z = torch.logsumexp(log_pi + r_s / BETA, -1)  # [S]
        lj = torch.logsumexp(log_pi + r_s / BETA - log_z[:, None], 0) - math.log(len(rm.samples))
    p = torch.softmax(lj, 0)
    return {tuple(x): float(q) for x, q in zip(xs.tolist(), p)}


def _model(lm, rm, mode, log_z=None):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.learned_reward("rm", rm, x, BETA, uncertainty=mode, log_normalizers=log_z)
    return model


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


@pytest.mark.parametrize("mode", ["mean", "marginal", "mixture"])
def test_learned_reward_modes_are_exact(mode):
    lm = LMS["markov"]()
    rm = ppl_lm.RewardModel(DRAWS, features)
    log_z = rm.log_normalizers(lm, [], T, BETA) if mode == "mixture" else None
    post = ppl_lm.infer(_model(lm, rm, mode, log_z), method="exact", progress=False)
    truth = _truth(mode, rm, lm)
    assert _tv(post.probabilities(), truth) < 1e-5
    # the three modes are different conditionals here (else the test could not tell them apart)
    others = [_truth(m, rm, lm) for m in ("mean", "marginal", "mixture") if m != mode]
    assert min(_tv(truth, o) for o in others) > 0.01


def test_planted_bug_marginal_over_rewards_fails():
    """Averaging the rewards (the mean mode) where the likelihoods should be averaged is caught."""
    lm = LMS["markov"]()
    rm = ppl_lm.RewardModel(DRAWS, features)
    post = ppl_lm.infer(_model(lm, rm, "mean"), method="exact", progress=False)
    assert _tv(post.probabilities(), _truth("marginal", rm, lm)) > 0.01


@pytest.mark.parametrize("method,mode", [("importance", "marginal"), ("smc", "marginal"), ("importance", "mixture"),
                                         ("mh", "mixture")])
def test_learned_reward_in_the_backends(method, mode):
    lm = LMS["markov"]()
    rm = ppl_lm.RewardModel(DRAWS, features)
    log_z = rm.log_normalizers(lm, [], T, BETA) if mode == "mixture" else None
    model = _model(lm, rm, mode, log_z)
    exact = ppl_lm.infer(model, method="exact", progress=False)
    truth = _truth(mode, rm, lm)
    opts = {"importance": dict(num_samples=8000), "smc": dict(num_particles=8000),
            "mh": dict(num_samples=200, num_chains=32, warmup_steps=50)}[method]
    post = ppl_lm.infer(model, method=method, seed=0, progress=False, **opts)
    # prior IS's exact ESS (N·f) for the weighted backends, 1,000 exact draws for MH
    lp, ll = exact.stats["log_prior"].double(), exact.stats["log_likelihood"].double()
    f = float(torch.exp(2 * torch.logsumexp(lp + ll, 0) - torch.logsumexp(lp + 2 * ll, 0)))
    n_ref = 1000.0 if method == "mh" else 8000 * f
    exp_tv = 0.5 * sum(math.sqrt(2 * q * (1 - q) / (math.pi * n_ref)) for q in truth.values())
    assert _tv(post.probabilities(), truth) <= 3 * exp_tv, (_tv(post.probabilities(), truth), 3 * exp_tv)


def test_mixture_without_normalizers_names_the_fix():
    lm = LMS["markov"]()
    rm = ppl_lm.RewardModel(DRAWS, features)
    with pytest.raises(ValueError, match="log_normalizers=rm.log_normalizers"):
        ppl_lm.infer(_model(lm, rm, "mixture"), method="exact", progress=False)


# -- ambiguous raters: "kinder world" and "restricted text" explain the same pairs -----------------------------
from ppl_lm.models import preferences as model_prefs  # noqa: E402

_amb = model_prefs.ambiguous_raters()
_amb_xs = enumerate_sequences(_amb.lm.vocab_size, _amb.lm.eos_id, _amb.max_new_tokens)
_amb_prefs = ppl_lm.Preferences.from_jsonl(model_prefs.AMBIGUOUS_DATA)


def _amb_grid():
    """The exact posterior of θ (prior N(0, I), fit_reward's default) on a 801² grid over [-4, 4]²."""
    c, r = _amb_prefs.tokens(_amb.lm, _amb.max_new_tokens)
    delta = _amb.features(c) - _amb.features(r)
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    th = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lp = -0.5 * (th**2).sum(-1) + torch.nn.functional.logsigmoid(th @ delta.T).sum(-1)
    return th, torch.softmax(lp, 0), float(g[1] - g[0])


def _kinder_side(theta: torch.Tensor) -> torch.Tensor:
    """r_θ(kinder probe) − r_θ(restricted probe) = θ_e − 2·θ_w: > 0 is the kinder-world explanation."""
    return theta[..., 1] - 2 * theta[..., 0]


def test_ambiguous_utilities_agree_on_every_shown_text_and_not_on_probes():
    T_ = _amb.max_new_tokens
    shown = torch.isfinite(_amb.shown.sequence([], max_new_tokens=T_).log_prob(_amb_xs))
    assert int(shown.sum()) > 20 and not bool(shown.all())
    assert torch.equal(_amb.kinder(_amb_xs[shown]), _amb.restricted(_amb_xs[shown]))
    k, r = _amb.probe("kinder")[None], _amb.probe("restricted")[None]
    assert float(_amb.kinder(k) - _amb.restricted(k)) == 1.5 and float(_amb.restricted(r) - _amb.kinder(r)) == 1.5
    # the pairs cannot tell them apart: same seed, same pairs from either rater
    a = ppl_lm.preferences.simulate_preferences(_amb.shown, [], _amb.kinder, 50, T_, seed=3)
    b = ppl_lm.preferences.simulate_preferences(_amb.shown, [], _amb.restricted, 50, T_, seed=3)
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)


def test_shipped_ambiguous_file_is_what_its_recipe_makes():
    made = model_prefs.make_ambiguous_prefs()
    assert (made.chosen, made.rejected) == (_amb_prefs.chosen, _amb_prefs.rejected)
    assert len(_amb_prefs) == 200


def test_bayesian_reward_keeps_both_explanations_and_map_picks_one():
    """NUTS's share of draws on the kinder side matches the exact posterior's (30%: both explanations
    kept); MAP is one point, the exact mode, on the restricted side (only because the wording feature has
    the larger scale: nothing in the pairs chooses)."""
    th, p, spacing = _amb_grid()
    exact = float((p * (_kinder_side(th) > 0)).sum())
    assert 0.15 < exact < 0.85
    T_ = _amb.max_new_tokens
    rm = ppl_lm.fit_reward(_amb_prefs, _amb.features, method="nuts", num_samples=300, warmup_steps=200,
                           lm=_amb.lm, max_new_tokens=T_, seed=0)
    got = float((_kinder_side(rm.samples) > 0).double().mean())
    assert abs(got - exact) <= 4 * math.sqrt(exact * (1 - exact) / 100), (got, exact)  # 100 effective draws
    rm_map = ppl_lm.fit_reward(_amb_prefs, _amb.features, method="map", lm=_amb.lm, max_new_tokens=T_)
    assert torch.all((rm_map.samples[0] - th[p.argmax()]).abs() <= 2 * spacing + 0.02), (rm_map.samples, th[p.argmax()])
    assert float(_kinder_side(rm_map.samples[0])) < -0.5


def test_probe_shifts_per_uncertainty_mode():
    """With exact draws of θ (from the grid posterior), the probes' log-odds shift (kinder minus restricted
    probe, log q/π) of each conditional, by the exact backend: "mean" leans to "restricted" as MAP does;
    "mixture", the average of both explanations' optima, lies between MAP and the kinder truth, nearer 0."""
    th, p, _ = _amb_grid()
    g = torch.Generator().manual_seed(0)
    rm = ppl_lm.RewardModel(th[torch.multinomial(p, 500, replacement=True, generator=g)], _amb.features)
    T_ = _amb.max_new_tokens
    log_z = rm.log_normalizers(_amb.lm, [], T_, 1.0)
    shift = {}
    for mode in ("mean", "marginal", "mixture"):
        def model(mode=mode):
            x = pyro.sample("x", _amb.lm.sequence([], max_new_tokens=T_))
            ppl_lm.learned_reward("rm", rm, x, 1.0, uncertainty=mode, log_normalizers=log_z if mode == "mixture" else None)

        probs = ppl_lm.infer(model, method="exact", progress=False).probabilities()
        k, r = (tuple(_amb.probe(n).tolist()) for n in ("kinder", "restricted"))
        shift[mode] = math.log(probs[k] / probs[r])  # the prior gives both probes the same probability
    assert shift["mean"] < -0.5 and shift["marginal"] < -0.5
    assert shift["mean"] < shift["mixture"] < 0, shift
