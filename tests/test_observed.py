"""Observed text: the LM as a likelihood, in every backend, against exact answers.

Rows (MarkovLM and the tiny transformer; tolerances from the problem as in ``test_composition``):
- ``world_one_text``: a world w picks the prompt (ragged prompts), one text is observed;
- ``world_three_texts``: three texts from one world, observed in a ``pyro.plate`` over the corpus;
- ``text_then_continuation``: w, an observed text, a latent continuation prompted by that text
  and then the world's prompt, with a reward on it, then a second observed text prompted by the continuation's
  first token (observed and latent LM sites mixed, in program order);
- ``continuous_scale``: a continuous θ scaling the factor beside an observed text; the truth is
  quadrature over θ times enumeration over w.

The exact backend's own answers are checked first against direct scoring (``lm.sequence(...)
.log_prob`` summed by hand), so the truth the other backends are held to is independent of them.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppl_lm
from ppl_lm.inference.exact import enumerate_sequences
from toys import LMS

T = 3
PRIOR = torch.tensor([0.2, 0.3, 0.5])
PROMPTS = [[1], [2, 3], [4]]  # ragged: one batched LM call per prompt length
TEXT = torch.tensor([2, 3, 0])  # one observed text, EOS-padded
CORPUS = torch.tensor([[2, 3, 0], [1, 0, 0], [3, 3, 2]])  # three observed texts
SECOND = torch.tensor([1, 2, 0])  # the text observed after the continuation
M = torch.tensor([-0.5, 0.3, 1.0])  # continuous_scale: the world's factor slope


def _prompts(w):
    return [PROMPTS[i] for i in w.tolist()]


def world_one_text(lm):
    def model():
        w = pyro.sample("w", dist.Categorical(PRIOR))
        pyro.sample("x", lm.sequence(_prompts(w), max_new_tokens=T), obs=TEXT)

    return model


def world_three_texts(lm):
    def model():
        w = pyro.sample("w", dist.Categorical(PRIOR))
        with pyro.plate("corpus", len(CORPUS)):  # dim -2, beside the particle plate at -1
            pyro.sample("x", lm.sequence(_prompts(w), max_new_tokens=T), obs=CORPUS[:, None])

    return model


def text_then_continuation(lm):
    content = [t for t in TEXT.tolist() if t != lm.eos_id]

    def model():
        w = pyro.sample("w", dist.Categorical(PRIOR))
        pyro.sample("x", lm.sequence(_prompts(w), max_new_tokens=T), obs=TEXT)
        y = pyro.sample("y", lm.sequence([content + p for p in _prompts(w)], max_new_tokens=T))
        ppl_lm.reward("b_in_y", (y == 2).float().sum(-1) - 0.5 * (y == 4).float().sum(-1), beta=1.0)
        pyro.sample("z", lm.sequence(y[..., :1], max_new_tokens=T), obs=SECOND)

    return model


def continuous_scale(lm):
    def model():
        w = pyro.sample("w", dist.Categorical(PRIOR))
        pyro.sample("x", lm.sequence(_prompts(w), max_new_tokens=T), obs=TEXT)
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        pyro.factor("fit", -torch.abs(theta - M[w]) * 1.5)

    return model


PROBLEMS = {"world_one_text": world_one_text, "world_three_texts": world_three_texts,
            "text_then_continuation": text_then_continuation, "continuous_scale": continuous_scale}


# -- the truth, by direct scoring -------------------------------------------------------------------
def _log_lik_texts(lm, texts: torch.Tensor) -> torch.Tensor:
    """log π(texts | PROMPTS[w]) summed over the texts, per world ``[3]``, one unbatched call each."""
    return torch.stack([sum(lm.sequence(p, max_new_tokens=T).log_prob(t).double() for t in texts)
                        for p in PROMPTS])


class Truth:
    """p(w | data), log Z, the law of y (where latent), E[θ] and prior IS's exact ESS fraction f."""

    def __init__(self, lm_name: str, problem: str):
        lm = LMS[lm_name]()
        self.law = None
        self.theta_mean = None
        log_prior = PRIOR.double().log()
        if problem in ("world_one_text", "world_three_texts"):
            texts = TEXT[None] if problem == "world_one_text" else CORPUS
            lj = log_prior + _log_lik_texts(lm, texts)  # [3]
            self._finish(lj, log_prior)
        elif problem == "text_then_continuation":
            content = [t for t in TEXT.tolist() if t != lm.eos_id]
            ys = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
            r = (ys == 2).double().sum(-1) - 0.5 * (ys == 4).double().sum(-1)
            z_lp = torch.stack([lm.sequence([int(y0)], max_new_tokens=T).log_prob(SECOND).double()
                                for y0 in ys[:, 0].tolist()])
            lik_x = _log_lik_texts(lm, TEXT[None])
            rows = []
            for k, p in enumerate(PROMPTS):
                y_lp = lm.sequence(content + p, max_new_tokens=T).log_prob(ys).double()
                rows.append(log_prior[k] + y_lp + lik_x[k] + r + z_lp)  # [M] joint of (w=k, y)
            lj = torch.stack(rows)  # [3, M]; the prior part is log_prior + y_lp
            log_z = float(torch.logsumexp(lj.reshape(-1), 0))
            post = torch.exp(lj - log_z)
            self.p_w = post.sum(1)
            self.log_z = log_z
            self.law = {tuple(y): float(q) for y, q in zip(ys.tolist(), post.sum(0))}
            # prior IS (w, y from the prior; weight = likelihood): f = Z² / E[w²]
            lp_prior = torch.stack([log_prior[k] + lm.sequence(content + p, max_new_tokens=T).log_prob(ys).double()
                                    for k, p in enumerate(PROMPTS)])
            log_w = lj - lp_prior
            self.f = float(torch.exp(2 * log_z - torch.logsumexp((lp_prior + 2 * log_w).reshape(-1), 0)))
        else:  # continuous_scale: quadrature over θ (a fine grid; the integrand is smooth but for a kink)
            grid = torch.linspace(-9.0, 9.0, 72_001, dtype=torch.float64)
            log_n = -0.5 * grid**2 - 0.5 * math.log(2 * math.pi)
            lik_x = _log_lik_texts(lm, TEXT[None])
            dx = float(grid[1] - grid[0])
            f_w = torch.stack([-torch.abs(grid - M[k].double()) * 1.5 for k in range(3)])  # [3, G]
            log_int = torch.logsumexp(log_n + f_w, -1) + math.log(dx)  # log ∫ N(θ) e^{f} dθ
            lj = log_prior + lik_x + log_int
            log_z = float(torch.logsumexp(lj, 0))
            self.p_w = torch.exp(lj - log_z)
            self.log_z = log_z
            dens = torch.exp(log_prior[:, None] + lik_x[:, None] + log_n + f_w - log_z) * dx  # [3, G]
            self.theta_mean = float((dens * grid).sum())
            log_int2 = torch.logsumexp(log_n + 2 * f_w, -1) + math.log(dx)
            log_m2 = torch.logsumexp(log_prior + 2 * lik_x + log_int2, 0)
            self.f = float(torch.exp(2 * log_z - log_m2))

    def _finish(self, lj, log_prior):
        self.log_z = float(torch.logsumexp(lj, 0))
        self.p_w = torch.exp(lj - self.log_z)
        log_w = lj - log_prior
        self.f = float(torch.exp(2 * self.log_z - torch.logsumexp(log_prior + 2 * log_w, 0)))


_truths: dict = {}


def truth(lm_name, problem) -> Truth:
    if (lm_name, problem) not in _truths:
        _truths[(lm_name, problem)] = Truth(lm_name, problem)
    return _truths[(lm_name, problem)]


# -- exact against direct scoring ---------------------------------------------------------------------
@pytest.mark.parametrize("problem", ["world_one_text", "world_three_texts", "text_then_continuation"])
@pytest.mark.parametrize("lm_name", list(LMS))
def test_exact_matches_direct_scoring(problem, lm_name):
    t = truth(lm_name, problem)
    post = ppl_lm.infer(PROBLEMS[problem](LMS[lm_name]()), method="exact", progress=False)
    assert abs(post.log_evidence - t.log_z) < 1e-4
    got = torch.tensor([post.marginal("w")[k][0] for k in range(3)], dtype=torch.float64)
    assert torch.allclose(got, t.p_w, atol=1e-5), (got, t.p_w)
    if t.law is not None:
        p = post.probabilities()
        assert max(abs(p.get(k, 0.0) - v) for k, v in t.law.items()) < 1e-5
    else:
        assert post.samples is None and post.site is None  # no latent sequence: the draws are in values


# -- every backend against the truth ------------------------------------------------------------------
ROWS = {
    # method: (options, reference number of exact draws; None: prior IS's exact ESS N·f)
    "importance": (dict(num_samples=8_000), None),
    "smc": (dict(num_particles=8_000), None),
    "mh": (dict(num_samples=150, num_chains=32, warmup_steps=50), 1_000.0),
    # the trained guide's draws importance-weighted: held to prior IS with as many draws
    "svi": (dict(num_steps=150, num_particles=16, num_samples=8_000), None),
}


def check_against_truth(post, t: Truth, n_ref: float, what: str) -> None:
    """p(w | data), the law of y, E[θ] and log Z within four sd of n_ref exact (or prior IS) draws."""
    got = post.marginal("w")
    for k in range(3):
        p_exact = float(t.p_w[k])
        p = got.get(k, (0.0, 0.0))[0]
        sd = math.sqrt(p_exact * (1 - p_exact) / n_ref)
        assert abs(p - p_exact) <= 4 * sd + 1e-9, f"{what}: p(w={k}) {p:.4f} vs exact {p_exact:.4f} (sd {sd:.4f})"
    if t.law is not None:
        p = post.probabilities()
        tv = 0.5 * sum(abs(p.get(k, 0.0) - t.law.get(k, 0.0)) for k in set(p) | set(t.law))
        # expected TV of n_ref iid draws, 3x (as test_composition's tv_tol)
        exp_tv = 0.5 * sum(math.sqrt(2 * q * (1 - q) / (math.pi * n_ref)) for q in t.law.values())
        assert tv <= 3 * exp_tv, f"{what}: TV {tv:.4f} > {3 * exp_tv:.4f}"
    if t.theta_mean is not None:
        mean = float((post.weights * post.values["theta"].double()).sum())
        # sd(θ | data) <= 1.5 here (a N(0,1) prior pulled towards M[w] in [-0.5, 1]): 4 sd of n_ref draws
        assert abs(mean - t.theta_mean) <= 6 / math.sqrt(n_ref), (what, mean, t.theta_mean)
    if post.log_evidence is not None:
        sd = math.sqrt(max(1.0 - t.f, 0.0) / n_ref)
        assert abs(post.log_evidence - t.log_z) <= 4 * sd + 1e-3, (what, post.log_evidence, t.log_z, sd)


def _n_ref(method, t: Truth) -> float:
    options, ref = ROWS[method]
    n = options.get("num_samples", options.get("num_particles"))
    return ref if ref is not None else n * t.f


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", list(ROWS))
@pytest.mark.parametrize("lm_name", list(LMS))
def test_observed_text_matches_exact(method, problem, lm_name):
    t = truth(lm_name, problem)
    options, _ = ROWS[method]
    post = ppl_lm.infer(PROBLEMS[problem](LMS[lm_name]()), method=method, seed=0, progress=False, **options)
    check_against_truth(post, t, _n_ref(method, t), f"{method} {problem}/{lm_name}")
    assert (post.samples is None) == (problem != "text_then_continuation")


def test_exact_refuses_the_continuous_row_clearly():
    with pytest.raises(ValueError, match="cannot enumerate the latent site 'theta'"):
        ppl_lm.infer(continuous_scale(LMS["markov"]()), method="exact")


# -- planted bugs fail ------------------------------------------------------------------------------------
def _drop_observed(monkeypatch):
    import ppl_lm.inference._runtime as rt

    monkeypatch.setattr(rt, "observed_log_prob", lambda site: torch.zeros(()))


def _wrong_prompt_row(monkeypatch):
    from ppl_lm.distribution import SequenceDistribution

    orig = SequenceDistribution._flat_prompt_for

    def shifted(self, shape, n):
        p = orig(self, shape, n)
        return p if p.dim() == 1 else p.roll(1, 0)  # each row scored under its neighbour's prompt

    monkeypatch.setattr(SequenceDistribution, "_flat_prompt_for", shifted)
    orig_len = SequenceDistribution._flat_lengths_for
    monkeypatch.setattr(SequenceDistribution, "_flat_lengths_for",
                        lambda self, shape, n: None if (v := orig_len(self, shape, n)) is None else v.roll(1, 0))


@pytest.mark.parametrize("bug", [_drop_observed, _wrong_prompt_row])
@pytest.mark.parametrize("method", ["exact", "importance", "smc", "mh"])
def test_planted_bugs_fail(method, bug, monkeypatch):
    # MH's Gibbs step scores every chain under one world at a time (all rows share a prompt), so a
    # shifted prompt row shows in MH only where chains hold different prompts: the continuation row.
    problem = "text_then_continuation" if (method, bug) == ("mh", _wrong_prompt_row) else "world_one_text"
    t = truth("markov", problem)
    bug(monkeypatch)
    options = {} if method == "exact" else ROWS[method][0]
    post = ppl_lm.infer(PROBLEMS[problem](LMS["markov"]()), method=method, seed=0, progress=False, **options)
    n_ref = 1e6 if method == "exact" else _n_ref(method, t)
    with pytest.raises(AssertionError):
        check_against_truth(post, t, n_ref, f"{method} with {bug.__name__}")


# -- inputs: text, shapes, errors --------------------------------------------------------------------------
def test_text_is_encoded_as_samples_decode():
    lm = LMS["markov"]()
    d = lm.sequence([1], max_new_tokens=T)
    texts = [lm.decode(row) for row in enumerate_sequences(lm.vocab_size, lm.eos_id, T).tolist()]
    ids = enumerate_sequences(lm.vocab_size, lm.eos_id, T)
    # EOS is appended to a text shorter than max_new_tokens; a text of exactly T tokens ends without it
    for text, row in zip(texts, ids):
        assert torch.equal(d.as_value(text), row), (text, row)
    assert torch.allclose(d.log_prob(texts), d.log_prob(ids))


def test_text_longer_than_max_new_tokens_is_a_clear_error():
    lm = LMS["markov"]()
    text = lm.decode([1, 2, 3, 4])
    with pytest.raises(ValueError, match="raise max_new_tokens"):
        lm.sequence([], max_new_tokens=T).log_prob(text)


def test_per_particle_texts_and_shared_text_agree():
    lm = LMS["transformer"]()
    d = lm.sequence([[1], [2, 3], [4], [1]], max_new_tokens=T)
    shared = d.log_prob(TEXT)
    per = d.log_prob(TEXT.expand(4, T).clone())
    assert torch.allclose(shared, per)
    direct = torch.stack([lm.sequence(p, max_new_tokens=T).log_prob(TEXT) for p in ([1], [2, 3], [4], [1])])
    assert torch.allclose(shared, direct, atol=1e-5)


def test_plate_over_a_corpus_equals_a_loop():
    lm = LMS["markov"]()

    def loop():
        w = pyro.sample("w", dist.Categorical(PRIOR))
        for i, text in enumerate(CORPUS):
            pyro.sample(f"x{i}", lm.sequence(_prompts(w), max_new_tokens=T), obs=text)

    a = ppl_lm.infer(loop, method="exact", progress=False)
    b = ppl_lm.infer(world_three_texts(lm), method="exact", progress=False)
    assert abs(a.log_evidence - b.log_evidence) < 1e-6


def test_a_model_with_nothing_latent_names_the_fix():
    lm = LMS["markov"]()

    def model():
        pyro.sample("x", lm.sequence([1], max_new_tokens=T), obs=TEXT)

    for method in ("exact", "importance", "smc", "mh", "svi"):
        with pytest.raises(ValueError, match="no latent site.*log_prob"):
            ppl_lm.infer(model, method=method, progress=False)


def _count_scored_rows(lm, monkeypatch) -> list[int]:
    """A list that records the number of rows of every ``lm.token_logprobs`` call from now on."""
    rows: list[int] = []
    orig = type(lm).token_logprobs

    def counting(self, prompt, tokens):
        rows.append(len(tokens))
        return orig(self, prompt, tokens)

    monkeypatch.setattr(type(lm), "token_logprobs", counting)
    return rows


def test_distinct_prompt_text_pairs_are_scored_once(monkeypatch):
    """K worlds, N particles: the observed text costs K scored rows, not N, and the run's cache
    scores each (prompt, text) once however many model runs read it."""
    lm = LMS["markov"]()
    rows = _count_scored_rows(lm, monkeypatch)
    ppl_lm.infer(world_one_text(lm), method="importance", num_samples=3000, chunk_size=500, seed=0, progress=False)
    assert sum(rows) == 3, rows  # 3 worlds, 6 chunks: one row per distinct (prompt, text) in the whole run


# -- calibrated standard errors ------------------------------------------------------------------------------
CALIBRATION = {
    # method: (row, options). SMC resamples at every token (ess_threshold=1): the draws share the
    # most ancestors, where a standard error that ignores the genealogy is most wrong.
    "importance": ("text_then_continuation", dict(num_samples=4000)),
    "smc": ("text_then_continuation", dict(num_particles=1000, ess_threshold=1.0)),
    "mh": ("continuous_scale", dict(num_samples=100, num_chains=8, warmup_steps=30)),
    "svi": ("world_one_text", dict(num_steps=30, num_particles=8, num_samples=1000, crosscheck_samples=0)),
}
SEEDS = 16


@pytest.mark.parametrize("method", list(CALIBRATION))
def test_reported_standard_errors_are_calibrated(method):
    """Over seeds, the spread of the error of p(w | data) and of log Z is 0.6-1.6x the mean standard
    error the run reports (``marginal``, ``log_evidence_se``). With 16 seeds the sd is known to
    about 18%, and the three p(w) errors are pooled (root mean square over worlds and seeds, against
    the mean reported se).
    Measured: importance 0.8, SMC 0.9 (1.5 when draws are not grouped by ancestor), MH 1.0 (0.4
    with the run's smallest bulk ESS in place of the ESS of 1[w = k]), SVI 1.0."""
    problem, options = CALIBRATION[method]
    t = truth("markov", problem)
    model = PROBLEMS[problem](LMS["markov"]())
    err, se, lz_err, lz_se = [], [], [], []
    for seed in range(SEEDS):
        post = ppl_lm.infer(model, method=method, seed=seed, progress=False, **options)
        m = post.marginal("w")
        err += [m.get(k, (0.0, 0.0))[0] - float(t.p_w[k]) for k in range(3)]
        se += [m.get(k, (0.0, 0.0))[1] for k in range(3)]
        if post.log_evidence is not None:
            lz_err.append(post.log_evidence - t.log_z)
            lz_se.append(post.log_evidence_se)
    err, se = torch.tensor(err, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)
    ratio = float(err.pow(2).mean().sqrt() / se.mean())
    assert 0.6 <= ratio <= 1.6, f"{method}: p(w) error rms / reported se rms = {ratio:.2f}"
    if lz_err:
        lz_err = torch.tensor(lz_err, dtype=torch.float64)
        ratio = float(lz_err.std() / (sum(lz_se) / len(lz_se)))
        assert 0.6 <= ratio <= 1.6, f"{method}: log Z error sd / mean reported se = {ratio:.2f}"


def test_marginal_se_groups_draws_by_ancestor():
    """Each of n independent weighted draws copied m times under one ancestor carries no more
    information than the n draws: the grouped standard error equals theirs exactly (a standard
    error that treats the copies as independent is √m times too small)."""
    g = torch.Generator().manual_seed(0)
    n, m = 200, 5
    w = torch.randint(0, 3, (n,), generator=g)
    log_w = torch.randn(n, generator=g, dtype=torch.float64)
    one = ppl_lm.Posterior(samples=None, log_weights=log_w - log_w.logsumexp(0), log_evidence=None, method="importance",
                           site=None, values={"w": w})
    copies = ppl_lm.Posterior(samples=None, log_weights=(log_w - log_w.logsumexp(0) - math.log(m)).repeat_interleave(m),
                              log_evidence=None, method="smc", site=None, values={"w": w.repeat_interleave(m)},
                              ancestor=torch.arange(n).repeat_interleave(m))
    for k in range(3):
        (p1, se1), (p2, se2) = one.marginal("w")[k], copies.marginal("w")[k]
        assert abs(p1 - p2) < 1e-6 and abs(se1 - se2) < 1e-6, (k, se1, se2)


def test_cli_compare_and_report_without_a_latent_sequence(tmp_path, capsys):
    """`ppl-lm compare` on a model whose only latent is w: p(w | data) per backend, TV against exact
    over the law of w, and an HTML report with a discrete-latents table."""
    from ppl_lm.cli import main

    script = tmp_path / "worlds_toy.py"
    script.write_text(
        "import pyro, torch, pyro.distributions as dist, ppl_lm\n"
        "context = ()\nlabels = {'w': ('a', 'b', 'c')}\n"
        "def build(lm):\n"
        "    def model():\n"
        "        w = pyro.sample('w', dist.Categorical(torch.tensor([0.2, 0.3, 0.5])))\n"
        "        p = [[[1], [2, 3], [4]][i] for i in w.tolist()]\n"
        "        pyro.sample('x', lm.sequence(p, max_new_tokens=3), obs=torch.tensor([2, 3, 0]))\n"
        "    return model\n")
    lm = LMS["markov"]()
    import ppl_lm.cli as cli

    orig = cli.load_language_model
    cli.load_language_model = lambda spec, device, dtype=None: lm
    try:
        assert main(["compare", str(script), "--methods", "exact,importance,smc", "--num-samples", "2000",
                     "--num-particles", "2000", "--report", str(tmp_path / "rep")]) == 0
    finally:
        cli.load_language_model = orig
    out = capsys.readouterr().out
    t = truth("markov", "world_one_text")
    assert f"p(w | data): a {float(t.p_w[0]):.4f} ± 0.0000" in out, out
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Discrete latents" in html and "no sampled text" in html


def test_cache_keeps_prompts_apart():
    """One text observed under two shared prompts of the same length (and under batched rows):
    each site's log-prob is its own, however the run's cache holds them."""
    lm = LMS["transformer"]()

    def model():
        w = pyro.sample("w", dist.Categorical(PRIOR))
        pyro.sample("a", lm.sequence([1, 2], max_new_tokens=T), obs=TEXT)
        pyro.sample("b", lm.sequence([3, 4], max_new_tokens=T), obs=TEXT)
        pyro.sample("c", lm.sequence(_prompts(w), max_new_tokens=T), obs=TEXT)

    post = ppl_lm.infer(model, method="exact", progress=False)
    direct = (lm.sequence([1, 2], max_new_tokens=T).log_prob(TEXT) + lm.sequence([3, 4], max_new_tokens=T).log_prob(TEXT)
              + torch.logsumexp(_log_lik_texts(lm, TEXT[None]) + PRIOR.double().log(), 0))
    assert abs(post.log_evidence - float(direct)) < 1e-4, (post.log_evidence, float(direct))


def test_a_prior_carrying_a_lora_guide_still_caches_observed_text(monkeypatch):
    """A LoRA guide trained on the same network (as in tutorial 06) leaves the prior frozen: its
    observed rows are still scored once per run (they were re-scored at every model run)."""
    from ppl_lm.lm.lora import LoraLM

    lm = LMS["transformer"]()
    LoraLM(lm, r=2)  # adapters injected in place, trainable, off for the prior
    assert not lm.is_trainable()
    rows = _count_scored_rows(lm, monkeypatch)
    ppl_lm.infer(world_one_text(lm), method="mh", num_samples=20, num_chains=4, warmup_steps=5, seed=0, progress=False)
    assert sum(rows) == 3, rows  # one row per world for the whole run
