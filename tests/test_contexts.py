"""Many contexts in one call (``ppl_lm.infer(model, contexts=[...])``) against exact answers.

Each context's Posterior is checked against ``method="exact"`` on that context, with tolerances from
the problem: the exact effective sample size of prior importance sampling,
n / Σ_x p(x)²/π(x), from enumeration (SMC with ``ess_threshold=0`` never resamples, so it is that
estimator too). log Z within four of its exact standard errors sqrt((Σ p²/π − 1) / n), TV within
three times its expected value at that ESS (see toys.py). With resampling, each context's result is
compared with the single-context call under the derived seed: equal samples, log Z equal up to
float summation order.
"""

from __future__ import annotations

import math
import re

import pyro
import pytest
import torch

import ppl_lm
from ppl_lm.inference import contexts as ctxmod
from ppl_lm.inference.contexts import context_seed
from toys import T, markov_lm, transformer_lm, tv_distance, tv_tolerance

CONTEXTS = [1, 2, 3, 4]  # the first prompt token; the posterior of x depends on it


def make_model(lm):
    """π(x | [c]) · exp(#{x_t = c}) · [x_0 ≠ c]: the prompt, the reward and the constraint all read c."""

    def model(c):
        x = pyro.sample("x", lm.sequence([c], max_new_tokens=T))
        ppl_lm.reward("r", (x == c).float().sum(-1), beta=1.0)
        ppl_lm.constraint("c", x[..., 0] != c, prefix_closed=True)
        return x

    return model


def make_prior(lm):
    def prior(c):
        return pyro.sample("x", lm.sequence([c], max_new_tokens=T))

    return prior


def exact_ess_fraction(lm, c) -> float:
    """ESS / n of prior importance sampling on context c, exactly: 1 / Σ_x p(x)² / π(x)."""
    p = ppl_lm.infer(make_model(lm), c, method="exact").probabilities()
    pi = ppl_lm.infer(make_prior(lm), c, method="exact").probabilities()
    return 1.0 / sum(px * px / pi[k] for k, px in p.items())


def agrees_with_exact(lm, posts, n: int) -> list[bool]:
    """For each context: log Z within 4 exact standard errors and TV within its tolerance."""
    ok = []
    for c, post in zip(CONTEXTS, posts):
        exact = ppl_lm.infer(make_model(lm), c, method="exact")
        frac = exact_ess_fraction(lm, c)
        se = math.sqrt((1.0 / frac - 1.0) / n)
        ok.append(abs(post.log_evidence - exact.log_evidence) <= 4 * se
                  and tv_distance(post, exact) <= tv_tolerance(exact, frac * n))
    return ok


RUNS = {
    "importance": dict(method="importance", num_samples=2000),
    "smc": dict(method="smc", num_particles=2000, ess_threshold=0.0),
}


@pytest.fixture(scope="module")
def markov():
    return markov_lm()


@pytest.mark.parametrize("run", sorted(RUNS))
def test_each_context_matches_its_exact_posterior(markov, run):
    opts = RUNS[run]
    n = opts.get("num_samples", opts.get("num_particles"))
    posts = ppl_lm.infer(make_model(markov), contexts=CONTEXTS, seed=0, progress=False, **opts)
    assert isinstance(posts, list) and len(posts) == len(CONTEXTS)
    assert all(agrees_with_exact(markov, posts, n))
    # the contexts' posteriors really differ: the first token is never the context's own
    for c, post in zip(CONTEXTS, posts):
        assert not bool((post.samples[torch.isfinite(post.log_weights), 0] == c).any())


@pytest.mark.parametrize("lm_name", ["markov", "transformer"])
@pytest.mark.parametrize("method,opts", [("importance", dict(num_samples=300)),
                                         ("importance", dict(num_samples=300, chunk_size=128)),
                                         ("smc", dict(num_particles=64)),
                                         ("smc", dict(num_particles=40, num_replicates=3, chunk_size=50))])
def test_each_context_equals_its_single_call(lm_name, method, opts):
    """Same derived seed, same result as the single-context call: the samples equal, log Z equal up to
    float summation order (the transformer reads a batch of prompts with padding)."""
    lm = markov_lm() if lm_name == "markov" else transformer_lm()
    model = make_model(lm)
    posts = ppl_lm.infer(model, contexts=CONTEXTS, method=method, seed=7, progress=False, **opts)
    for i, (c, post) in enumerate(zip(CONTEXTS, posts)):
        single = ppl_lm.infer(model, c, method=method, seed=context_seed(7, i), progress=False, **opts)
        assert torch.equal(post.samples, single.samples)
        assert post.log_evidence == pytest.approx(single.log_evidence, abs=1e-5)
        assert torch.allclose(post.log_weights, single.log_weights, atol=1e-5)
        assert post.seed == context_seed(7, i)
    assert context_seed(7, 0) == 7  # context 0 runs under the call's seed


def test_result_of_a_context_does_not_depend_on_the_others(markov):
    model = make_model(markov)
    alone = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="smc", num_particles=64, seed=1, progress=False)
    more = ppl_lm.infer(model, contexts=CONTEXTS, method="smc", num_particles=64, seed=1, progress=False)
    for a, b in zip(alone, more):
        assert torch.equal(a.samples, b.samples) and a.log_evidence == b.log_evidence


def test_contexts_share_lm_batches_and_read_each_prompt_once(monkeypatch):
    lm = transformer_lm()
    starts, extends = [], []
    start, extend = lm.start, lm.extend
    monkeypatch.setattr(lm, "start", lambda p, b, lengths=None: starts.append(b) or start(p, b, lengths))
    monkeypatch.setattr(lm, "extend", lambda s, tok: extends.append(len(tok)) or extend(s, tok))
    ppl_lm.infer(make_model(lm), contexts=CONTEXTS, method="smc", num_particles=32, seed=0, progress=False)
    assert starts == [len(CONTEXTS)]  # one prompt row per context, read once
    assert set(extends) == {32 * len(CONTEXTS)}  # every step: all contexts' particles in one batch
    starts.clear(), extends.clear()
    ppl_lm.infer(make_model(lm), contexts=CONTEXTS, method="importance", num_samples=50, seed=0, progress=False)
    assert starts == [len(CONTEXTS)] and set(extends) == {50 * len(CONTEXTS)}


def test_chunk_size_bounds_the_batch(markov, monkeypatch):
    sizes = []
    extend = markov.extend
    monkeypatch.setattr(markov, "extend", lambda s, tok: sizes.append(len(tok)) or extend(s, tok))
    ppl_lm.infer(make_model(markov), contexts=CONTEXTS, method="importance", num_samples=30, chunk_size=64,
                 seed=0, progress=False)
    assert set(sizes) == {60}  # two contexts' chunks of 30 per batch of at most 64 rows


@pytest.mark.parametrize("bug", ["swap_prompts", "swap_rows"])
def test_planted_bug_fails(markov, monkeypatch, bug):
    """A context's prompt applied to another's rows, or the contexts' sampled rows swapped: caught."""
    if bug == "swap_prompts":
        stack = ctxmod.stack_prompts
        monkeypatch.setattr(ctxmod, "stack_prompts", lambda dists, counts: stack(dists[::-1], counts[::-1]))
    else:
        draw = ctxmod.draw_by_part

        def swapped(parts, offsets):
            inner = draw(parts, offsets)
            return lambda logp: inner(logp).view(len(parts), -1).flip(0).reshape(-1)

        monkeypatch.setattr(ctxmod, "draw_by_part", swapped)
    opts = RUNS["importance"]
    posts = ppl_lm.infer(make_model(markov), contexts=CONTEXTS, seed=0, progress=False, **opts)
    assert not all(agrees_with_exact(markov, posts, opts["num_samples"]))


def test_other_methods_loop_with_the_same_seeds(markov):
    model = make_model(markov)
    posts = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="exact")
    for c, post in zip(CONTEXTS, posts):
        assert post.log_evidence == pytest.approx(ppl_lm.infer(model, c, method="exact").log_evidence)
    # a token mask is not batched: a plain loop, one infer per context, same derived seeds
    posts = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="importance", num_samples=100, seed=3,
                         proposal=ppl_lm.prompted(markov, [2]), progress=False)
    single = ppl_lm.infer(model, CONTEXTS[1], method="importance", num_samples=100, seed=context_seed(3, 1),
                          proposal=ppl_lm.prompted(markov, [2]), progress=False)
    assert torch.equal(posts[1].samples, single.samples)


def test_svi_keeps_its_own_contexts_option(markov):
    """method="svi": contexts= trains one amortised guide over them and returns one Posterior."""
    post = ppl_lm.infer(make_model(markov), 1, method="svi", contexts=[1, 2], num_steps=3, num_particles=8,
                        num_samples=16, crosscheck_samples=0, seed=0, progress=False)
    assert isinstance(post, ppl_lm.Posterior)


@pytest.mark.parametrize("contexts,error,match", [
    ([], ValueError, "empty"),
    ("a prompt", TypeError, "one string"),
    ({"a": 1}, TypeError, "list of contexts"),
])
def test_bad_contexts_are_clear_errors(markov, contexts, error, match):
    with pytest.raises(error, match=match):
        ppl_lm.infer(make_model(markov), contexts=contexts, method="smc", num_particles=8)


def test_a_context_the_model_refuses_is_named_before_the_lm_runs(markov, monkeypatch):
    calls = []
    monkeypatch.setattr(markov, "start", lambda *a, **k: calls.append(1))

    def picky(c):
        if c > 3:
            raise ValueError(f"no prompt for {c}")
        return make_model(markov)(c)

    with pytest.raises(ValueError, match="no prompt for 4") as err:
        ppl_lm.infer(picky, contexts=CONTEXTS, method="importance", num_samples=10)
    assert err.value.__notes__ == ["context 3 (4): the model refused it"]
    assert not calls


def test_a_refused_context_keeps_the_models_exception(markov, tmp_path, capsys):
    """The model's own exception, whatever its constructor takes (JSONDecodeError needs three
    arguments), with a note naming the context; the CLI prints that note."""
    import json

    def parses(c):
        json.loads('{"ok": 1}' if c < 3 else "{bad")
        return make_model(markov)(c)

    with pytest.raises(json.JSONDecodeError, match="Expecting property name") as err:
        ppl_lm.infer(parses, contexts=CONTEXTS, method="smc", num_particles=8)
    assert err.value.__notes__ == ["context 2 (3): the model refused it"] and err.value.pos == 1
    script = tmp_path / "parses.py"
    script.write_text("import json, pyro\ncontext = 'a'\n\n\ndef build(lm):\n    def model(prompt):\n"
                      "        json.loads('{bad' if prompt == 'b' else '1')\n"
                      "        return pyro.sample('x', lm.sequence(prompt, max_new_tokens=2))\n    return model\n")
    (tmp_path / "contexts.txt").write_text("a\nb\n")
    from ppl_lm import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["run", str(script), "--lm", "tiny", "--method", "smc", "--num-particles", "4", "--quiet",
                  "--contexts", str(tmp_path / "contexts.txt")])
    assert stop.value.code == 2
    assert re.search(r"JSONDecodeError: Expecting property name.*\n\s+context 1 \('b'\): the model refused it",
                     capsys.readouterr().err)


# -- the CLI: ppl-lm run MODEL --contexts FILE ---------------------------------------------------
def _cli_run(tmp_path, lines: str, *extra):
    from ppl_lm import cli

    path = tmp_path / "contexts.txt"
    path.write_text(lines)
    return cli.main(["run", "no_e", "--lm", "tiny", "--method", "smc", "--num-particles", "16", "--quiet",
                     "--contexts", str(path), *extra])


@pytest.mark.parametrize("lines", ["Once upon a time\nThe cat sat\n\nIn the morning\n",
                                   '{"context": "Once upon a time"}\n{"context": "The cat sat"}\n'
                                   '{"context": "In the morning"}\n'])
def test_cli_contexts_one_row_each_and_one_report(tmp_path, capsys, lines):
    import json

    assert _cli_run(tmp_path, lines, "--report", str(tmp_path / "rep")) == 0
    out = capsys.readouterr().out
    assert "3 contexts" in out
    for i, c in enumerate(["Once upon a time", "The cat sat", "In the morning"]):
        assert any(line.lstrip().startswith(f"{i} ") and c in line for line in out.splitlines())
    rows = json.loads((tmp_path / "rep" / "summary.json").read_text())["rows"]
    assert [r["name"].split(":")[0] for r in rows] == ["0", "1", "2"]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Contexts: one per row below, from" in html and "Context: &#x27;" not in html  # not the default context


@pytest.mark.parametrize("lines,extra,match", [
    ("", (), "holds no context"),
    ('{"context": "a"}\n{"prompt": "b"}\n', (), r"contexts.txt:2 has no \"context\" key"),
    ('{"context": "a"}\nnot json\n', (), r"contexts.txt:2 is not a JSON object"),
    ("a\n", ("--context", "b"), "not both"),
])
def test_cli_contexts_bad_input(tmp_path, capsys, lines, extra, match):
    with pytest.raises(SystemExit):
        _cli_run(tmp_path, lines, *extra)
    assert re.search(match, capsys.readouterr().err)


def test_a_shared_token_mask_is_batched_and_equals_single_calls(markov, monkeypatch):
    from ppl_lm import rewards

    mask = rewards.forbid_chars(markov, "c")  # built once, as a model script does

    def model(c):
        x = pyro.sample("x", markov.sequence([c], max_new_tokens=T))
        ppl_lm.token_constraint("no_c", x, mask)
        ppl_lm.reward("r", (x == c).float().sum(-1), beta=1.0)

    sizes = []
    extend = markov.extend
    monkeypatch.setattr(markov, "extend", lambda s, tok: sizes.append(len(tok)) or extend(s, tok))
    posts = ppl_lm.infer(model, contexts=CONTEXTS, method="smc", num_particles=50, seed=2, progress=False)
    assert set(sizes) == {50 * len(CONTEXTS)} and posts[0].info.token_masks == 1
    for i, (c, post) in enumerate(zip(CONTEXTS, posts)):
        single = ppl_lm.infer(model, c, method="smc", num_particles=50, seed=context_seed(2, i), progress=False)
        assert torch.equal(post.samples, single.samples)
        assert post.log_evidence == pytest.approx(single.log_evidence, abs=1e-9)
        assert not any("c" in t for t in post.texts)


def test_model_kwargs_and_extra_args_reach_every_context(markov):
    def model(c, shift, beta=1.0):
        x = pyro.sample("x", markov.sequence([c], max_new_tokens=T))
        ppl_lm.reward("r", (x == (c + shift) % 5).float().sum(-1), beta=beta)

    posts = ppl_lm.infer(model, 1, contexts=CONTEXTS[:2], method="smc", num_particles=32, seed=4,
                         model_kwargs={"beta": 0.5}, progress=False)
    for i, (c, post) in enumerate(zip(CONTEXTS, posts)):
        single = ppl_lm.infer(model, c, 1, method="smc", num_particles=32, seed=context_seed(4, i),
                              model_kwargs={"beta": 0.5}, progress=False)
        assert torch.equal(post.samples, single.samples) and post.log_evidence == single.log_evidence


@pytest.mark.parametrize("method,opts", [("importance", dict(num_samples=50)), ("smc", dict(num_particles=16))])
def test_a_context_whose_particles_all_die_is_named(markov, method, opts):
    def model(c):
        x = pyro.sample("x", markov.sequence([c], max_new_tokens=T))
        ppl_lm.constraint("impossible_for_4", (x[..., 0] >= 0) & (c != 4), prefix_closed=True)

    with pytest.raises(ValueError, match=r"context 3 \(4\)"):
        ppl_lm.infer(model, contexts=CONTEXTS, method=method, seed=0, progress=False, **opts)


# -- review fixes ---------------------------------------------------------------------------------
def test_smc_contexts_with_a_guide_or_proposal_behave_like_the_loop(markov):
    """guide= is used (not dropped) and checked as the single call checks it; proposal="lm" is refused
    as the single call refuses it, and "prior" is the LM itself."""
    import types

    model = make_model(markov)
    for bad in (dict(guide=object()), dict(proposal="lm")):
        with pytest.raises((TypeError, ValueError)) as single:
            ppl_lm.infer(model, CONTEXTS[0], method="smc", num_particles=8, progress=False, **bad)
        with pytest.raises(type(single.value)) as many:
            ppl_lm.infer(model, contexts=CONTEXTS[:2], method="smc", num_particles=8, progress=False, **bad)
        assert str(many.value) == str(single.value)
    guide = types.SimpleNamespace(lm=ppl_lm.MarkovLM.random(5, eos_id=0, seed=9))  # another LM, same vocabulary
    posts = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="smc", num_particles=32, seed=5, guide=guide,
                         progress=False)
    prior = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="smc", num_particles=32, seed=5, progress=False)
    for i, (c, post) in enumerate(zip(CONTEXTS, posts)):
        single = ppl_lm.infer(model, c, method="smc", num_particles=32, seed=context_seed(5, i), guide=guide,
                              progress=False)
        assert torch.equal(post.samples, single.samples) and post.log_evidence == single.log_evidence
        assert post.info.proposal == "guide" and not torch.equal(post.samples, prior[i].samples)
    same = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="smc", num_particles=32, seed=5, proposal="prior",
                        progress=False)
    assert all(torch.equal(a.samples, b.samples) for a, b in zip(same, prior))


def test_importance_batches_respect_observed_tokens(markov, monkeypatch):
    """The batch bound is the contexts' chunk size, which counts observed sequence tokens as well as
    latent ones (here 4 rows: 5 latent + 17 observed tokens in a 100-token chunk), not 20 rows from
    the latent site alone."""
    from ppl_lm.inference import importance

    monkeypatch.setattr(importance, "TOKENS_PER_CHUNK", 100)
    text = torch.tensor([1, 2, 3] + [0] * 13)

    def model(c):
        x = pyro.sample("x", markov.sequence([c], max_new_tokens=T))
        pyro.sample("y", markov.sequence([c], max_new_tokens=16), obs=text)
        ppl_lm.reward("r", (x == c).float().sum(-1), beta=1.0)

    sizes = []
    extend = markov.extend
    monkeypatch.setattr(markov, "extend", lambda s, tok: sizes.append(len(tok)) or extend(s, tok))
    posts = ppl_lm.infer(model, contexts=CONTEXTS, method="importance", num_samples=8, seed=0, progress=False)
    assert max(sizes) == 4
    single = ppl_lm.infer(model, CONTEXTS[2], method="importance", num_samples=8, seed=context_seed(0, 2),
                          progress=False)
    assert torch.equal(posts[2].samples, single.samples)


def test_contexts_whose_sequence_sites_differ_in_name_run_the_loop(markov):
    """A model naming its site after the context: each context keeps its own site (the plain loop),
    as the single calls give it."""

    def model(c):
        x = pyro.sample(f"x{c % 2}", markov.sequence([c], max_new_tokens=T))
        ppl_lm.reward("r", (x == c).float().sum(-1), beta=1.0)

    for method, opts in [("importance", dict(num_samples=40)), ("smc", dict(num_particles=16))]:
        posts = ppl_lm.infer(model, contexts=CONTEXTS, method=method, seed=6, progress=False, **opts)
        for i, (c, post) in enumerate(zip(CONTEXTS, posts)):
            single = ppl_lm.infer(model, c, method=method, seed=context_seed(6, i), progress=False, **opts)
            assert list(post.values) == [f"x{c % 2}"]
            assert torch.equal(post.samples, single.samples) and post.log_evidence == single.log_evidence


def _global_rng_states():
    import random

    import numpy as np

    mt = np.random.get_state()
    states = [torch.get_rng_state(), np.append(mt[1], mt[2:4]), random.getstate()]
    return states + ([torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("method,opts", [("importance", dict(num_samples=40)), ("smc", dict(num_particles=16))])
def test_contexts_leave_global_rngs_alone_and_seed_numpy(markov, method, opts):
    """A model drawing from numpy and Python's random: two calls with one seed agree (each part seeds
    them as seeded() does), and the caller's torch, CUDA, numpy and random states are untouched."""
    import random

    import numpy as np

    def model(c):
        x = pyro.sample("x", markov.sequence([c], max_new_tokens=T))
        noise = np.random.normal(size=x.shape[:-1]) + random.random()
        ppl_lm.reward("r", (x == c).float().sum(-1) + torch.as_tensor(noise, dtype=torch.float32), beta=1.0)

    torch.manual_seed(11), np.random.seed(11), random.seed(11)
    before = _global_rng_states()
    a = ppl_lm.infer(model, contexts=CONTEXTS, method=method, seed=8, progress=False, **opts)
    after = _global_rng_states()
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]
    if torch.cuda.is_available():
        assert all(torch.equal(u, v) for u, v in zip(before[3], after[3]))
    np.random.seed(12), random.seed(12)  # another caller state: the same result
    b = ppl_lm.infer(model, contexts=CONTEXTS, method=method, seed=8, progress=False, **opts)
    for p, q in zip(a, b):
        assert torch.equal(p.samples, q.samples) and p.log_evidence == q.log_evidence


def test_stream_resumes_numpy_and_random_and_restores_the_callers():
    """A Stream's numpy and random draws continue across visits as one seeded() block's would, and
    outside seeded() leaving it restores the caller's states."""
    import random

    import numpy as np

    from ppl_lm import seeding

    np.random.seed(5), random.seed(5)
    before = _global_rng_states()
    s = seeding.Stream(3)
    with s:
        a = [np.random.rand(), random.random()]
    assert np.random.get_state()[2] == before[1][-2] and random.getstate() == before[2]
    with s:
        b = [np.random.rand(), random.random()]
    after = _global_rng_states()
    assert (before[1] == after[1]).all() and before[2] == after[2]
    with seeding.seeded(3):
        ref = [np.random.rand(), random.random(), np.random.rand(), random.random()]
    assert a + b == ref


def test_stack_prompts_takes_one_prompt_or_one_per_particle(markov):
    """3 prompt rows for 4 particles is a clear error (it was reshaped into 4 wrong rows); one row
    [1, P] is the shared prompt, as the single call reads it."""
    three = markov.sequence(torch.tensor([[1, 2, 3, 4]] * 3), max_new_tokens=T)
    with pytest.raises(ValueError, match=r"prompt holds 3 rows for 4 particles: give one prompt"):
        ctxmod.stack_prompts([three], [4])
    one = markov.sequence(torch.tensor([[1, 2]]), max_new_tokens=T)
    prompt, lengths = ctxmod.stack_prompts([one, three], [2, 3])
    assert prompt.tolist() == [[1, 2, 0, 0]] * 2 + [[1, 2, 3, 4]] * 3 and lengths.tolist() == [2, 2, 4, 4, 4]

    def model(c):
        x = pyro.sample("x", markov.sequence(torch.tensor([[c, c]]), max_new_tokens=T))
        ppl_lm.reward("r", (x == c).float().sum(-1), beta=1.0)

    posts = ppl_lm.infer(model, contexts=CONTEXTS[:2], method="importance", num_samples=16, seed=0, progress=False)
    single = ppl_lm.infer(model, CONTEXTS[1], method="importance", num_samples=16, seed=context_seed(0, 1),
                          progress=False)
    assert torch.equal(posts[1].samples, single.samples)
