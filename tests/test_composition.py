"""Composition: Pyro programs with LM sites beside other latents, in every backend, against exact.

Rows (MarkovLM and the tiny transformer):
- ``world_prompt``: a discrete world w chooses the prompt; the reward reads both w and x;
- ``two_sequences``: a second sequence prompted by the first token of the first, a constraint on both;
- ``mixture_factor``: a discrete latent that appears only in a factor (a mixture likelihood);
- ``continuous_factor``: a Gaussian parameter in a factor; the truth is closed-form (a Gaussian
  integral per sequence), checked for the sequence law, log Z and E[θ].

Tolerances come from the problem as in ``test_conformance``: prior importance sampling is held
to its exact ESS fraction, the other backends to fixed reference numbers of exact draws.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lm
from ppl_lm.inference.exact import enumerate_sequences
from toys import LMS, expected_tv

T = 3
SIGMA = 0.7  # the continuous row's observation scale


def world_prompt(lm):
    def model():
        w = pyro.sample("w", dist.Categorical(torch.tensor([0.3, 0.7])))
        prompt = torch.where(w == 0, 1, 2)[..., None]  # [N, 1]: the world's preamble token
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.reward("r", (x == 3).float().sum(-1) * (w.float() + 0.5) - 0.2 * (x == 1).float().sum(-1), beta=1.0)

    return model


def two_sequences(lm):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
        y = pyro.sample("y", lm.sequence(x[..., :1], max_new_tokens=T))
        ppl_lm.constraint("no_d", ~((x == 4).any(-1) | (y == 4).any(-1)))
        ppl_lm.reward("b_in_y", (y == 2).float().sum(-1), beta=1.0)

    return model


def mixture_factor(lm):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.4)))
        c = (x == 2).float().sum(-1)
        pyro.factor("lik", torch.where(z.bool(), 1.2 * c, -0.8 * c))

    return model


def continuous_factor(lm):
    def model():
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        c = (x == 2).float().sum(-1)
        ppl_lm.reward("fit", -((c - theta) ** 2) / (2 * SIGMA**2), beta=1.0)

    return model


PROBLEMS = {"world_prompt": world_prompt, "two_sequences": two_sequences, "mixture_factor": mixture_factor,
            "continuous_factor": continuous_factor}


class Truth:
    """The exact law of the main sequence x, log Z and exact marginals, by enumeration."""

    def __init__(self, lm_name: str, problem: str):
        lm = LMS[lm_name]()
        model = PROBLEMS[problem](lm)
        self.marginals: dict = {}
        if problem == "continuous_factor":
            # ∫ N(θ; 0, 1) exp(-(c - θ)² / 2σ²) dθ = sqrt(σ²/(1+σ²)) exp(-c² / 2(1+σ²)), and E[θ | x] = c/(1+σ²).
            xs = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
            log_pi = lm.sequence([], max_new_tokens=T).log_prob(xs).double()
            c = (xs == 2).double().sum(-1)
            s2 = SIGMA**2
            log_joint = log_pi + 0.5 * math.log(s2 / (1 + s2)) - c**2 / (2 * (1 + s2))
            self.log_z = float(torch.logsumexp(log_joint, 0))
            p = torch.exp(log_joint - self.log_z)
            self.law = {tuple(r): float(q) for r, q in zip(xs.tolist(), p)}
            self.theta_mean = float((p * c / (1 + s2)).sum())
            # Prior IS draws (θ, x) with weight exp(r): E w² integrates exp(2r) over θ,
            # sqrt(σ²/(2+σ²))·exp(-c²/(2+σ²)) per x.
            log_m2 = torch.logsumexp(log_pi + 0.5 * math.log(s2 / (2 + s2)) - c**2 / (2 + s2), 0)
            self.f = float(torch.exp(2 * self.log_z - log_m2))
            return
        exact = ppl_lm.infer(model, method="exact")
        self.log_z = exact.log_evidence
        self.law = exact.probabilities()
        for k, v in exact.values.items():
            if v.dim() == 1:
                self.marginals[k] = exact.marginal(k)
        lp, ll = exact.stats["log_prior"].double(), exact.stats["log_likelihood"].double()
        self.f = float(torch.exp(2 * torch.logsumexp(lp + ll, 0) - torch.logsumexp(lp + 2 * ll, 0)))
        self.exact = exact


_truths: dict = {}


def truth(lm_name, problem) -> Truth:
    if (lm_name, problem) not in _truths:
        _truths[(lm_name, problem)] = Truth(lm_name, problem)
    return _truths[(lm_name, problem)]


def law_tv(post, law: dict) -> float:
    p = post.probabilities()
    return 0.5 * sum(abs(p.get(k, 0.0) - law.get(k, 0.0)) for k in set(p) | set(law))


def tv_tol(law: dict, n: float) -> float:
    class _L:  # expected_tv reads .probabilities()
        def probabilities(self):
            return law

    return 3.0 * expected_tv(_L(), n)


ROWS = {
    # method: (options, reference exact draws for the law and the marginals; None: prior IS's N·f)
    "importance": (dict(num_samples=20_000), None),
    # SMC is held to prior IS with as many particles. It advances every sequence site token by
    # token (two_sequences: x, then y), but a factor that follows a latent drawn from its prior at
    # the end (mixture_factor: z) gives no twist before it, so on that row it is importance
    # sampling with resampling; prior IS's exact ESS is the bound that holds on every row.
    "smc": (dict(num_particles=4_000), None),
    "mh": (dict(num_samples=150, num_chains=64, warmup_steps=100), 1_500.0),
    # SVI's result is its trained guide's draws importance-weighted against the exact target:
    # held to prior importance sampling with as many draws (a guide worse than the prior fails).
    "svi": (dict(num_steps=300, num_particles=16, num_samples=4_000), None),
}
SUPPORTED = {
    "exact": {"world_prompt", "two_sequences", "mixture_factor"},
    "importance": set(PROBLEMS),
    "smc": set(PROBLEMS),
    "mh": set(PROBLEMS),
    "svi": set(PROBLEMS),
}


def _reference(method, t: Truth) -> float:
    options, ref = ROWS[method]
    n = options.get("num_samples", options.get("num_particles"))
    return ref if ref is not None else n * t.f


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", list(ROWS))
@pytest.mark.parametrize("lm_name", list(LMS))
def test_composition_matches_exact(method, problem, lm_name):
    if problem not in SUPPORTED[method]:
        pytest.skip(f"{method} does not support {problem}")
    t = truth(lm_name, problem)
    model = PROBLEMS[problem](LMS[lm_name]())
    options, _ = ROWS[method]
    post = ppl_lm.infer(model, method=method, seed=0, progress=False, **options)
    n_ref = _reference(method, t)
    tv, tol = law_tv(post, t.law), tv_tol(t.law, n_ref)
    assert tv <= tol, f"{method} {problem}/{lm_name}: TV {tv:.4f} > {tol:.4f}"
    for name, exact_m in t.marginals.items():
        got = post.marginal(name)
        for value, (p_exact, _) in exact_m.items():
            p, se = got.get(value, (0.0, 0.0))
            # A binomial proportion from n_ref exact draws: four standard errors.
            sd = math.sqrt(p_exact * (1 - p_exact) / n_ref)
            assert abs(p - p_exact) <= 4 * sd + 1e-9, f"{name}={value}: {p:.4f} vs exact {p_exact:.4f} (sd {sd:.4f})"
    if problem == "continuous_factor":
        theta = post.values["theta"].double()
        mean = float((post.weights * theta).sum())
        # E[θ] from n_ref exact draws: sd(θ | data) ≤ 1 (the prior's), so 4/sqrt(n_ref) bounds the error.
        assert abs(mean - t.theta_mean) <= 4 / math.sqrt(n_ref), (mean, t.theta_mean)
    if post.log_evidence is not None:
        # Prior IS with N draws: Var(Ẑ)/Z² = (1/f − 1)/N, so log Ẑ has sd √((1 − f)/n_ref) with
        # n_ref = N·f; the backends held to prior IS are held to that (four sd), not to their own se.
        sd = math.sqrt(max(1.0 - t.f, 0.0) / n_ref)
        assert abs(post.log_evidence - t.log_z) <= 4 * sd + 1e-3, (post.log_evidence, t.log_z, sd)


def test_values_are_aligned_with_log_weights():
    model = world_prompt(LMS["markov"]())
    post = ppl_lm.infer(model, method="importance", num_samples=500, seed=0, progress=False)
    assert set(post.values) == {"w", "x"} and len(post.values["w"]) == len(post.log_weights)
    assert torch.equal(post.values["x"], post.samples)
    m = post.marginal("w")
    assert set(m) == {0, 1} and abs(sum(p for p, _ in m.values()) - 1.0) < 1e-6
    idata = post.to_inference_data()
    assert "w" in idata.posterior.data_vars


def test_exact_refuses_continuous_latents_clearly():
    model = continuous_factor(LMS["markov"]())
    with pytest.raises(ValueError, match="cannot enumerate the latent site 'theta'"):
        ppl_lm.infer(model, method="exact")


def _weighted_law(values: list, weights) -> dict:
    law: dict = {}
    for v, w in zip(values, weights.tolist()):
        law[v] = law.get(v, 0.0) + w
    return law


@pytest.mark.parametrize("method", ["smc", "mh"])
def test_every_sequence_site_against_the_exact_joint(method):
    """two_sequences beyond the row above (which sees x only): the law of y, the joint law of the
    first tokens (x_0, y_0) (y is prompted by x_0) and the mean reward on y match exact
    enumeration within what the row's reference number of exact draws allows. For MH, editing x
    only (y stays at its admissible prior start) moves y's law by TV 0.3-0.4 (tolerance 0.21); not
    rescoring y when an edit of x changes y's prompt moves the (x_0, y_0) law by TV 0.22-0.26
    (tolerance 0.15)."""
    t = truth("markov", "two_sequences")
    model = two_sequences(LMS["markov"]())
    options, _ = ROWS[method]
    # MH edits x and y in turn, so each site gets half the edits of a one-site chain: half the
    # row's reference draws.
    n_ref = _reference(method, t) / (2 if method == "mh" else 1)
    post = ppl_lm.infer(model, method=method, seed=0, progress=False, **options)
    W, V = t.exact.weights.double(), t.exact.values
    checks = {
        "y": (lambda v: [tuple(r) for r in v["y"].tolist()]),
        "(x_0, y_0)": (lambda v: list(zip(v["x"][:, 0].tolist(), v["y"][:, 0].tolist()))),
    }
    for what, key in checks.items():
        law, got = _weighted_law(key(V), W), _weighted_law(key(post.values), post.weights.double())
        tv = 0.5 * sum(abs(got.get(k, 0.0) - law.get(k, 0.0)) for k in set(got) | set(law))
        assert tv <= tv_tol(law, n_ref), (what, tv, tv_tol(law, n_ref))
    b = (V["y"] == 2).double().sum(-1)
    mean = float((W * b).sum())
    sd = math.sqrt(float((W * (b - mean) ** 2).sum()) / n_ref)
    got_b = float((post.weights.double() * (post.values["y"] == 2).double().sum(-1)).sum())
    assert abs(got_b - mean) <= 4 * sd, (got_b, mean, sd)
    if method == "mh":
        assert set(post.info.ess_sequences_by_site) == {"x", "y"}
        assert post.info.ess_sequences_by_site["x"] == post.info.ess_sequences
