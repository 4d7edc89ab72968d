"""Toy problems with exact answers, shared by the conformance tests of every backend.

Each problem is a vectorised model on a small LM (vocab 5, at most 4 new tokens: 341
sequences), so the exact backend gives the true posterior and log Z.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyro
import torch

import ppl_lm
from ppl_lm import rewards

V, T = 5, 4


def markov_lm():
    return ppl_lm.MarkovLM.random(V, eos_id=0, seed=3)


def transformer_lm():
    return ppl_lm.tiny_transformer(V, eos_id=0, seed=1, scale=0.15)


LMS = {"markov": markov_lm, "transformer": transformer_lm}


def soft_reward(lm):
    """π(x)·exp(r/β) with r = number of 'b' tokens minus a length cost."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        r = (x == 2).float().sum(-1) - 0.3 * rewards.length(lm, x)
        ppl_lm.reward("r", r, beta=0.5)
        return x

    return model, ()


def hard_constraint(lm):
    """No token 'c' anywhere (a text condition, not declared prefix-closed)."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.constraint("no_c", ~rewards.contains(lm, x, "c"))
        return x

    return model, ()


def token_constraint(lm):
    """No token 'c', as a token mask (SMC proposes only allowed tokens)."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.token_constraint("no_c", x, rewards.forbid_chars(lm, "c"))
        return x

    return model, ()


def pin_soft(lm):
    """Prompt as reward, finite λ: r = λ·[x_0 = b] + λ·[x_2 = d]."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.pin("pin", x, {0: 2, 2: 4}, lam=1.5)
        return x

    return model, ()


def pin_hard(lm):
    """Prompt as hard condition, λ = None: x_1 = b."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.pin("pin", x, {1: 2}, lam=None)
        return x

    return model, ()


def prefix_prompt(lm):
    """A prefix prompt (tokens 'b d') plus a soft reward on the continuation."""

    def model(prompt):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        ppl_lm.reward("r", (x == 3).float().sum(-1), beta=1.0)
        return x

    return model, ([2, 4],)


def two_modes(lm, lam=4.0):
    """A posterior with two modes the positional Markov guide cannot represent exactly: the
    reward pays for x_0 = x_2 ∈ {a, c} (the guide sees x_2 only through x_1)."""

    def model(prompt=()):
        x = pyro.sample("x", lm.sequence(list(prompt), max_new_tokens=T))
        mode = ((x[..., 0] == 1) & (x[..., 2] == 1)) | ((x[..., 0] == 3) & (x[..., 2] == 3))
        ppl_lm.reward("r", lam * mode.float(), beta=1.0)
        return x

    return model, ()


PROBLEMS = {
    "soft_reward": soft_reward,
    "hard_constraint": hard_constraint,
    "token_constraint": token_constraint,
    "pin_soft": pin_soft,
    "pin_hard": pin_hard,
    "prefix_prompt": prefix_prompt,
}


def tv_distance(post, exact) -> float:
    """Total variation between a Posterior's weighted empirical law and the exact one."""
    p, q = post.probabilities(), exact.probabilities()
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def expected_tv(exact, n_eff: float) -> float:
    """E[TV] of an empirical law from ``n_eff`` independent draws: Σ sqrt(2/π)·sd / 2."""
    probs = torch.tensor(list(exact.probabilities().values()), dtype=torch.float64)
    sd = torch.sqrt(probs * (1 - probs) / n_eff)
    return float(0.5 * math.sqrt(2 / math.pi) * sd.sum())


def tv_tolerance(exact, n_eff: float) -> float:
    """Three times the expected TV: the TV of a correct estimator stays below it at any seed
    with overwhelming probability (its fluctuation is far smaller than its mean)."""
    return 3.0 * expected_tv(exact, n_eff)


# -- a preference toy: DPO against exact (tests/test_dpo.py, benchmarks/dpo_exact.py) -----------------
#: Two new tokens: the positional "full" guide can then be any distribution over the 21 texts.
PREF_T, PREF_BETA = 2, 0.5
PREF_THETA = torch.tensor([1.0, -0.5], dtype=torch.float64)


def pref_features(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = [count of token 2, count of token 3] ``[N, 2]``."""
    return torch.stack([(x == 2).double().sum(-1), (x == 3).double().sum(-1)], -1)


def pref_utility(x: torch.Tensor) -> torch.Tensor:
    """The rater's utility u = θ*·φ ``[N]``."""
    return pref_features(x) @ PREF_THETA


def pref_model(lm):
    """π·e^{u/β}: the true-utility posterior, whose β DPO reads."""

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=PREF_T))
        ppl_lm.reward("u", pref_utility(x).float(), beta=PREF_BETA)
        return x

    return model


def support_index(support: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row of ``y`` as its index among the rows of the enumerated ``support``."""
    return (y[:, None, :] == support[None]).all(-1).long().argmax(-1)


def kl_logp(a: torch.Tensor, b: torch.Tensor) -> float:
    """KL(a‖b) of two log-probability vectors over one support."""
    return float((a.exp() * (a - b)).sum())


# -- the two-mode toy: what the guide family can reach (tests/test_svi_taught.py, benchmarks/svi_two_modes.py) --
def enumerated_log_q(model, args, guide) -> torch.Tensor:
    """The guide's log q of every sequence of the support (differentiable), ``[341]``."""
    from ppl_lm.inference.exact import enumerate_sequences
    from ppl_lm.inference.svi.elbo import particle_terms

    support = enumerate_sequences(V, 0, T)
    return particle_terms(model, guide, args, {}, len(support), values={"x": support}).log_q.double()


def enumerated_log_posterior(model, args) -> torch.Tensor:
    """log π′ of every sequence of the support, ``[341]`` (support order of ``enumerated_log_q``)."""
    from ppl_lm.inference.exact import enumerate_sequences
    from ppl_lm.inference.svi.elbo import particle_terms
    from ppl_lm.inference.svi.guides import make_guide

    support = enumerate_sequences(V, 0, T)
    exact = ppl_lm.infer(model, *args, method="exact")
    with torch.no_grad():
        t = particle_terms(model, make_guide(model, *args), args, {}, len(support), values={"x": support})
    return (t.log_prior + t.log_likelihood).double() - exact.log_evidence


def coverage(log_post: torch.Tensor, log_q: torch.Tensor) -> tuple[float, float]:
    """Exact KL(π′‖q) and the exact ESS/N of importance sampling with proposal q, 1/Σ π′²/q."""
    p = log_post.exp()
    keep = p > 0
    kl = float((p[keep] * (log_post[keep] - log_q[keep])).sum())
    return kl, float(1 / (p[keep] ** 2 / log_q[keep].exp()).sum())


def family_optimum(model, args, log_post: torch.Tensor, steps: int = 600) -> tuple[float, float]:
    """The ``full`` guide family's best forward KL and that guide's ESS/N (Adam on the enumerated
    KL(π′‖q), exact gradients)."""
    from ppl_lm.inference.svi.guides import make_guide

    guide = make_guide(model, *args)
    opt = torch.optim.Adam(guide.module.parameters(), lr=0.05)
    for _ in range(steps):
        loss = -(log_post.exp() * enumerated_log_q(model, args, guide)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return coverage(log_post, enumerated_log_q(model, args, guide))


# -- the benchmark scripts, for tests of what they compute (tests/test_rarity_table.py, test_bench_harness.py) --
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
