"""Token proposals (``ppl_lm.prompted``, another LM, a trained guide) in importance sampling and SMC,
against exact answers.

Tolerances come from the problem: for a proposal q the weights are w = π·f/q, and N draws of q
estimate Z = E_q[w] with the exact delta-method standard error sqrt((m2/m1² − 1)/N) and behave
like N·m1²/m2 independent exact draws (m_k = E_q[w^k], by enumeration of every sequence with the
test's own masked scoring of q, not the sampler's). SMC is run without resampling
(``ess_threshold=0``), where it is sequential importance sampling with the same weights, so the
same tolerances hold.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import ppl_lm
from lm_conformance import LMConformance
from ppl_lm.conditions import TokenMask
from ppl_lm.inference import importance as importance_module
from ppl_lm.inference.exact import enumerate_sequences
from ppl_lm.inference.smc.sweep import Sweep
from toys import expected_tv, tv_distance

T = 3
N = 4000
# Row 3 of the transitions strongly favours token 3, row 1 avoids it; the first token is uniform.
TRANS = torch.tensor([[0.0, 0, 0, 0], [0, 2, 1, -1], [0, 0, 1, 0], [0, -1, 0, 3]])
EOS = 0
ALLOWED = torch.tensor([True, True, False, True])  # the token mask forbids token 2


def _lm():
    return ppl_lm.MarkovLM(torch.zeros(4), TRANS, eos_id=EOS)


def _log_f(x: torch.Tensor) -> torch.Tensor:
    """The condition: the first token is 3 (hard), and r = number of 3s with β = 0.5."""
    ok = x[..., 0] == 3
    return torch.where(ok, 2.0 * (x == 3).sum(-1).float(), torch.full(ok.shape, -math.inf))


def _model(lm, masked: bool):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.constraint("first_is_3", x[..., 0] == 3)
        ppl_lm.reward("threes", (x == 3).sum(-1).float(), beta=0.5)
        if masked:
            ppl_lm.token_constraint("no_2", x, TokenMask(lm, ALLOWED))
    return model


def _log_q(q, X: torch.Tensor, allowed: torch.Tensor | None, prompt=()) -> torch.Tensor:
    """log q(x) of every row of X under q started on ``prompt``, each step restricted to
    ``allowed`` and renormalised (the test's own stepping, independent of the samplers')."""
    state = q.start(torch.tensor(prompt, dtype=torch.long), len(X))
    out = torch.zeros(len(X), dtype=torch.float64)
    done = torch.zeros(len(X), dtype=torch.bool)
    for t in range(X.shape[1]):
        logq = state.logprobs.double()
        if allowed is not None:
            logq = logq.masked_fill(~allowed, -math.inf)
            logq = logq - torch.logsumexp(logq, -1, keepdim=True)
        out += torch.where(done, torch.zeros(()), logq.gather(-1, X[:, t : t + 1])[:, 0].double())
        done |= X[:, t] == EOS
        if t + 1 < X.shape[1]:
            state = q.extend(state, X[:, t])
    return out


@torch.no_grad()
def _exact_moments(lm, q, masked: bool, restricted: bool | None = None):
    """(log Z, ESS fraction m1²/m2, log E_q[π f] (q left out of the weight)) for proposal q,
    restricted to the mask's tokens (default: when the target is masked)."""
    restricted = masked if restricted is None else restricted
    X = enumerate_sequences(4, EOS, T)
    log_target = lm.score([], X).double() + _log_f(X).double()
    if masked:
        log_target = torch.where((ALLOWED[X] | (X == EOS)).all(-1), log_target, torch.full_like(log_target, -math.inf))
    log_q = _log_q(q, X, ALLOWED if restricted else None)
    keep = torch.isfinite(log_target)
    lt, lq = log_target[keep], log_q[keep]
    log_m1 = torch.logsumexp(lt, 0)  # E_q[π f / q] = Z
    log_m2 = torch.logsumexp(2 * lt - lq, 0)
    # A sampler that forgets q in the weight estimates E_q[π f] instead.
    log_no_q = torch.logsumexp(lt + lq, 0)
    return float(log_m1), float(torch.exp(2 * log_m1 - log_m2)), float(log_no_q)


def _tolerance(frac: float, n: int) -> float:
    """Four and a half exact standard errors of log Ẑ for n draws with ESS fraction frac."""
    return 4.5 * math.sqrt((1.0 / frac - 1.0) / n)


def _run(method: str, model, proposal, seed: int = 0):
    if method == "importance":
        return ppl_lm.infer(model, method="importance", num_samples=N, proposal=proposal, seed=seed, progress=False)
    return ppl_lm.infer(model, method="smc", num_particles=N, ess_threshold=0.0, proposal=proposal, seed=seed,
                        progress=False)


PROPOSALS = {
    "prior": lambda lm: None,
    "prompt_helps": lambda lm: ppl_lm.prompted(lm, [3]),  # "c" before the prompt: favours token 3
    "prompt_hurts": lambda lm: ppl_lm.prompted(lm, [1]),  # "a": avoids token 3
    "text": lambda lm: "prompted:c",  # the command line's spelling of prompt_helps
    "other_lm": lambda lm: ppl_lm.MarkovLM(torch.tensor([0.0, 0, 0, 2]), torch.zeros(4, 4), eos_id=EOS),
}


@pytest.mark.parametrize("method", ["importance", "smc"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", list(PROPOSALS))
def test_proposal_gives_the_exact_target(method, masked, name):
    lm = _lm()
    model = _model(lm, masked)
    exact = ppl_lm.infer(model, method="exact")
    spec = PROPOSALS[name](lm)
    q = ppl_lm.proposal.proposal_lm(spec, lm) or lm
    # Prior importance sampling draws from the unrestricted prior (a mask is then a constraint).
    log_z, frac, _ = _exact_moments(lm, q, masked, restricted=masked and (spec is not None or method == "smc"))
    assert abs(log_z - exact.log_evidence) < 1e-5  # the test's enumeration agrees with method="exact"
    post = _run(method, model, spec)
    assert abs(post.log_evidence - log_z) < _tolerance(frac, N), (post.log_evidence, log_z, frac)
    assert tv_distance(post, exact) < 3.0 * expected_tv(exact, N * frac)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_a_prompt_that_helps_raises_the_ess_and_one_that_hurts_lowers_it(masked):
    lm = _lm()
    fracs = {name: _exact_moments(lm, ppl_lm.proposal.proposal_lm(PROPOSALS[name](lm), lm) or lm, masked,
                                  restricted=masked and name != "prior")[1]
             for name in ("prior", "prompt_helps", "prompt_hurts")}
    assert fracs["prompt_helps"] > 2 * fracs["prior"] > 4 * fracs["prompt_hurts"], fracs
    model = _model(lm, masked)
    ess = {name: _run("importance", model, PROPOSALS[name](lm)).ess / N for name in fracs}
    assert ess["prompt_helps"] > ess["prior"] > ess["prompt_hurts"], ess


def _bug_importance(monkeypatch):
    real = importance_module.sample_tokens

    def no_q(*args, **kwargs):
        tokens, log_q = real(*args, **kwargs)
        return tokens, torch.zeros_like(log_q)

    monkeypatch.setattr(importance_module, "sample_tokens", no_q)


def _bug_smc(monkeypatch):
    real = Sweep._propose

    def no_q(self, t, gen, *rest):
        s = self.state.site
        logq = (s.q_state if s.q_state is not None else s.lm_state).logprobs
        tok, lp, inc = real(self, t, gen, *rest)
        lq = logq.gather(-1, tok[:, None])[:, 0].double().cpu()
        return tok, lp, inc + torch.where(s.done, torch.zeros_like(lq), lq)

    monkeypatch.setattr(Sweep, "_propose", no_q)


@pytest.mark.parametrize("method,plant", [("importance", _bug_importance), ("smc", _bug_smc)])
def test_planted_bug_a_weight_without_q_fails(monkeypatch, method, plant):
    lm = _lm()
    model = _model(lm, masked=False)
    q = ppl_lm.prompted(lm, [3])
    log_z, frac, log_no_q = _exact_moments(lm, q, masked=False)
    assert abs(log_no_q - log_z) > 5 * _tolerance(frac, N)  # the bug is visible at this N
    plant(monkeypatch)
    post = _run(method, model, q)
    assert abs(post.log_evidence - log_z) > _tolerance(frac, N)


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_default_options_with_a_prompted_proposal_and_a_mask(method):
    """Default options (SMC resamples) with a prompted proposal and a token mask, against exact:
    held to prior importance sampling's log-Z error at the same N."""
    lm = _lm()
    model = _model(lm, masked=True)
    log_z, frac_prior, _ = _exact_moments(lm, lm, masked=True, restricted=False)
    kw = dict(num_samples=N) if method == "importance" else dict(num_particles=N)
    post = ppl_lm.infer(model, method=method, proposal=ppl_lm.prompted(lm, [3]), seed=1, progress=False, **kw)
    assert abs(post.log_evidence - log_z) < _tolerance(frac_prior, N)
    assert post.info.proposal == "prompted:<1 token ids>"


def test_trained_guide_is_a_proposal():
    from ppl_lm.inference.svi.guides import make_guide

    lm = _lm()
    model = _model(lm, masked=False)
    guide = make_guide(model, kind="full")
    log_z, frac, _ = _exact_moments(lm, guide.lm, masked=False)
    for method in ("importance", "smc"):
        post = _run(method, model, guide)
        assert abs(post.log_evidence - log_z) < _tolerance(frac, N)


@pytest.mark.parametrize("method", ["importance", "smc"])
def test_a_latent_before_the_sequence_and_ragged_prompts(method):
    """w ~ Bernoulli(0.3) picks the prompt (none, or "a"); the prompted proposal reads "c" before
    it. Exact moments: E_q[W^k] = Σ_w p(w) Σ_x π(x|w)^k f(x)^k / q(x|w)^(k-1)."""
    lm = _lm()
    prompts = ([], [1])

    def model():
        w = pyro.sample("w", pyro.distributions.Bernoulli(torch.tensor(0.3)))
        x = pyro.sample("x", lm.sequence([prompts[int(i)] for i in w.reshape(-1).tolist()], max_new_tokens=T))
        ppl_lm.constraint("first_is_3", x[..., 0] == 3)
        ppl_lm.reward("threes", (x == 3).sum(-1).float(), beta=0.5)

    q = ppl_lm.prompted(lm, [3])
    X = enumerate_sequences(4, EOS, T)
    with torch.no_grad():
        parts = []
        for w, pw in ((0, 0.7), (1, 0.3)):
            lt = math.log(pw) + lm.score(prompts[w], X).double() + _log_f(X).double()
            keep = torch.isfinite(lt)
            parts.append((lt[keep], _log_q(q, X, None, prompts[w])[keep]))
        log_m1 = torch.logsumexp(torch.cat([lt for lt, _ in parts]), 0)
        log_m2 = torch.logsumexp(torch.cat([2 * lt - lq for lt, lq in parts]), 0)
    frac = float(torch.exp(2 * log_m1 - log_m2))
    exact = ppl_lm.infer(model, method="exact")
    assert abs(float(log_m1) - exact.log_evidence) < 1e-5
    post = _run(method, model, q)
    assert abs(post.log_evidence - float(log_m1)) < _tolerance(frac, N)
    p_w1 = exact.marginal("w")[1.0][0]
    assert abs(post.marginal("w")[1.0][0] - p_w1) < 4.5 * math.sqrt(p_w1 * (1 - p_w1) / (N * frac))


# -- errors before any work -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["importance", "smc"])
def test_a_proposal_over_another_vocabulary_is_a_clear_error(method):
    lm = _lm()
    model = _model(lm, masked=False)
    with pytest.raises(ValueError, match="vocabulary 5.*must share the model LM's vocabulary"):
        _run(method, model, ppl_lm.MarkovLM.random(5, eos_id=0))
    other = ppl_lm.MarkovLM(torch.zeros(4), TRANS, eos_id=EOS, token_strings=["", "x", "y", "z"])
    with pytest.raises(ValueError, match="token 1 reads 'x' where the model LM's reads 'a'"):
        _run(method, model, other)
    with pytest.raises(ValueError, match="'prompted:<text>'"):
        _run(method, model, "prompt:c")
    with pytest.raises(TypeError, match="proposal must be"):
        _run(method, model, 3.0)


def test_a_tokenizer_that_differs_is_a_clear_error():
    a, b = ppl_lm.tiny_char_transformer(seed=0), ppl_lm.tiny_char_transformer(seed=1)
    ppl_lm.proposal.check_same_vocabulary(b, a)  # same vocabulary, other weights: a valid proposal

    class Tokenizer:  # what the check reads of a Hugging Face tokenizer
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    vocab = {f"t{i}": i for i in range(a.vocab_size)}
    a.tokenizer, b.tokenizer = Tokenizer(vocab), Tokenizer(vocab)
    ppl_lm.proposal.check_same_vocabulary(b, a)
    b.tokenizer = Tokenizer({**vocab, "t1": 2, "t2": 1})  # two tokens swapped
    with pytest.raises(ValueError, match="tokenizer differs"):
        ppl_lm.proposal.check_same_vocabulary(b, a)


@pytest.mark.parametrize("method", ["mh", "exact"])
def test_a_backend_that_cannot_use_a_proposal_says_so(method):
    lm = _lm()
    with pytest.raises(TypeError, match="unknown option 'proposal'"):
        ppl_lm.infer(_model(lm, masked=False), method=method, proposal=ppl_lm.prompted(lm, [3]))


def test_guide_and_proposal_together_is_a_clear_error():
    from ppl_lm.inference.svi.guides import make_guide

    lm = _lm()
    model = _model(lm, masked=False)
    guide = make_guide(model, kind="full")
    for method in ("importance", "smc"):
        with pytest.raises(ValueError, match="not both"):
            ppl_lm.infer(model, method=method, guide=guide, proposal="prompted:c", progress=False)


# -- the prompted LM is a LanguageModel ------------------------------------------------------------
class TestPromptedLM(LMConformance):
    prompts = ("Hi", "")
    rows = ("ab", "Hi", "\n\n", "zz")
    text = "Hello, world!\n"
    num_samples = 256
    max_new_tokens = 8
    enum_tokens = 2

    def make_lm(self):
        return ppl_lm.prompted(ppl_lm.tiny_char_transformer(seed=0), "Be brief. ")


def test_prompted_reads_its_text_before_every_prompt_ragged_rows_too():
    lm = ppl_lm.tiny_char_transformer(seed=0)
    q = ppl_lm.prompted(lm, "Be brief. ")
    x = torch.tensor([lm.encode("ok"), lm.encode("no")])
    torch.testing.assert_close(q.score("Hi", x), lm.score("Be brief. Hi", x), atol=1e-5, rtol=0)
    # ragged prompt rows (right-padded, with lengths), as SMC and importance start them
    rows = torch.tensor([lm.encode("Hi") + [0], lm.encode("Hey")])
    state = q.start(rows, 2, torch.tensor([2, 3]))
    for i, text in enumerate(("Be brief. Hi", "Be brief. Hey")):
        alone = lm.start(torch.tensor(lm.encode(text)), 1)
        torch.testing.assert_close(state.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)


# -- SVI: prompt, then fine-tune ---------------------------------------------------------------------
def _svi(model, **kw):
    options = dict(guide="full", num_samples=2000, crosscheck_samples=0, progress=False, seed=0)
    return ppl_lm.infer(model, method="svi", **{**options, **kw})


def test_svi_guide_prompt_starts_at_the_prompted_lm():
    lm = _lm()
    post = _svi(_model(lm, masked=False), guide_prompt="c", num_steps=1, lr=1e-9)
    X = enumerate_sequences(4, EOS, T)
    assert isinstance(post.guide.lm, ppl_lm.PromptedLM)
    with torch.no_grad():
        torch.testing.assert_close(post.guide.lm.score([], X), lm.score([3], X), atol=1e-5, rtol=0)


def test_svi_guide_prompt_helps_early_and_stays_exact():
    """After 10 steps the guide started at π(·|"c") has exact ESS fraction 0.76 against 0.40 for the
    guide started at the prior (seed 0); both runs' log Z are exact within their own tolerance."""
    lm = _lm()
    model = _model(lm, masked=False)
    fracs = {}
    for text in (None, "c"):
        post = _svi(model, guide_prompt=text, num_steps=10)
        log_z, fracs[text], _ = _exact_moments(lm, post.guide.lm, masked=False)
        assert abs(post.log_evidence - log_z) < _tolerance(fracs[text], 2000)
    assert fracs["c"] > 1.5 * fracs[None], fracs


def test_svi_guide_prompt_errors():
    from ppl_lm.inference.svi.guides import make_guide

    lm = _lm()
    model = _model(lm, masked=False)
    with pytest.raises(ValueError, match="a guide object keeps the context"):
        _svi(model, guide=make_guide(model, kind="full"), guide_prompt="c", num_steps=1)

    def two_sites():
        w = pyro.sample("w", pyro.distributions.Categorical(torch.ones(2) / 2))
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.reward("r", (x == 3).sum(-1).float() + w.float(), beta=1.0)

    with pytest.raises(ValueError, match="joint guide"):
        _svi(two_sites, guide_prompt="c", num_steps=1)


def test_cli_proposal_flag(tmp_path, monkeypatch, capsys):
    from test_cli import TOY_SCRIPT, script

    from ppl_lm import cli

    path = script(tmp_path, TOY_SCRIPT)
    seen, real = [], ppl_lm.infer
    monkeypatch.setattr(ppl_lm, "infer", lambda *a, **k: seen.append(k) or real(*a, **k))
    for method, n in (("smc", "--num-particles"), ("importance", "--num-samples")):
        assert cli.main(["run", path, "--method", method, "--lm", "tiny", "--quiet", n, "40", "--proposal",
                         "prompted:Write a short one. ", "--set", "max_new_tokens=3", "--top", "0"]) == 0
        assert seen[-1]["proposal"] == "prompted:Write a short one. "
    assert "samples 40" in capsys.readouterr().out
