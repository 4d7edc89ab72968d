"""Model scripts in models/: the contract, a smoke run on the tiny char LM, and per-model checks.

Every module found in ``ppl_lm.models`` is covered automatically (pkgutil). The per-model
checks score hand-written texts through the model (the sequence site fixed to their tokens)
and test the condition's factor: 0 / -inf for constraints, r/β for rewards.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

import ppl_lm
from ppl_lm.conditions.factors import factor_of
import ppl_lm.models as models
from ppl_lm.conditions import partial_prefix
from ppl_lm.inference._runtime import run_model

NAMES = models.names()


@pytest.fixture(scope="module")
def lm():
    return ppl_lm.tiny_char_transformer(seed=0)


def batch(lm, *texts, T):
    """Token ids ``[B, T]`` of ``texts``, EOS-padded."""
    rows = []
    for t in texts:
        ids = lm.encode(t)
        assert len(ids) <= T, f"{t!r} does not fit in {T} tokens"
        rows.append(ids + [lm.eos_id] * (T - len(ids)))
    return torch.tensor(rows)


def score(model, args, x, partial: int | None = None):
    """Run ``model(*args)`` with the sequence site fixed to ``x`` (optionally as a prefix)."""
    if partial is None:
        return run_model(model, args, {}, len(x), data={"x": x})
    with partial_prefix(partial):
        return run_model(model, args, {}, len(x), data={"x": x})


def has_soft_mode(mod) -> bool:
    return "mode" in inspect.signature(mod.build).parameters


# -- contract ---------------------------------------------------------------------------------

def test_registry_lists_every_script():
    assert set(models.NAMES) == set(NAMES)
    with pytest.raises(ValueError, match="unknown model"):
        models.load("no_such_model")


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
    mod = models.load(name)
    assert mod.__doc__ and len(mod.__doc__.strip()) > 80, "explain the conditional in the docstring"
    assert isinstance(mod.description, str) and mod.description and "\n" not in mod.description
    assert hasattr(mod, "context")
    assert isinstance(mod.methods, dict) and mod.methods
    for method, opts in mod.methods.items():
        assert method in ppl_lm.METHODS and isinstance(opts, dict)
    assert callable(mod.build) and list(inspect.signature(mod.build).parameters)[0] == "lm"
    source = inspect.getsource(mod)
    assert 'if __name__ == "__main__":' in source and "from ppl_lm.cli import main" in source


# -- smoke run on the tiny LM -----------------------------------------------------------------

def smoke(mod, lm, **kw):
    model = mod.build(lm, **kw)
    args = models.model_args(mod, toy=True)
    try:
        post = ppl_lm.infer(model, *args, method="importance", num_samples=32, seed=0, progress=False)
    except ValueError as err:
        # A hard condition a random LM never meets: the backend must say so clearly.
        assert "no sample satisfies" in str(err)
        return None
    assert isinstance(post, ppl_lm.Posterior)
    if post.samples is None:  # every text observed (which_world): the draws are the other latents
        assert post.values and all(len(v) == 32 for v in post.values.values())
        assert math.isclose(float(torch.logsumexp(post.log_weights.double(), 0)), 0.0, abs_tol=1e-5)
        return post
    T = inspect.signature(mod.build).parameters["max_new_tokens"].default
    assert post.samples.shape == (32, T) and post.samples.dtype == torch.long
    assert math.isclose(float(torch.logsumexp(post.log_weights.double(), 0)), 0.0, abs_tol=1e-5)
    assert post.log_evidence is not None and math.isfinite(post.log_evidence)
    alive = post.log_weights > -math.inf
    for key, ok in post.stats.items():
        if key.startswith("ok:"):  # only admissible samples carry weight
            assert bool((ok[alive] == 1).all()), key
    assert len(post.texts) == 32
    return post


@pytest.mark.parametrize("name", NAMES)
def test_smoke_importance_on_tiny_lm(name, lm):
    mod = models.load(name)
    post = smoke(mod, lm)
    if has_soft_mode(mod):
        assert smoke(mod, lm, mode="soft") is not None, "the soft variant must always run"
    elif post is None:
        assert name in ("factorisation",), f"{name}: no soft mode and no satisfying sample"


SMALL = {"importance": {"num_samples": 16}, "smc": {"num_particles": 16}}


@pytest.mark.parametrize("name", NAMES)
def test_recommended_methods(name, lm):
    """The script's ``methods`` options are ones its backends take (the CLI passes them on), and
    the cheap ones run on the tiny LM; every surviving sample satisfies the hard conditions."""
    from ppl_lm.infer import backend

    mod = models.load(name)
    for method, opts in mod.methods.items():
        params = inspect.signature(backend(method).run).parameters
        named = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
        assert set(opts) <= named, f"{name}: {method} does not take {set(opts) - named}"
        if method not in SMALL:
            continue
        model = mod.build(lm)
        try:
            post = ppl_lm.infer(model, *models.model_args(mod, toy=True), method=method, seed=0,
                                progress=False, **SMALL[method])
        except ValueError as err:
            assert "satisf" in str(err), err
            continue
        alive = post.log_weights > -math.inf
        for key, ok in post.stats.items():
            if key.startswith("ok:"):
                assert bool((ok[alive] == 1).all()), (method, key)


# -- per-model checks on known texts ----------------------------------------------------------

def test_prefix_conditions_on_the_prompt(lm):
    mod = models.load("prefix")
    model = mod.build(lm, max_new_tokens=8)
    x = batch(lm, " lamb", " goat.", "", T=8)
    s = score(model, (mod.context,), x)
    assert torch.allclose(s.log_prior, lm.score(mod.context, x), atol=1e-5)
    assert not torch.allclose(s.log_prior, lm.score("", x), atol=1e-3)  # the prompt matters
    assert torch.equal(s.log_likelihood, torch.zeros(3))


def test_prefix_equals_a_hard_pin_of_the_prompt():
    """The docstring's claim, exactly (enumeration on a Markov LM): prompting with c is the same
    conditional as pinning the first tokens of an unprompted sequence to c."""
    import pyro

    mk = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)
    c, T = [2, 4], 3
    prompted = ppl_lm.infer(models.load("prefix").build(mk, max_new_tokens=T), c, method="exact")

    def pinned(prompt):
        y = pyro.sample("x", mk.sequence(None, max_new_tokens=len(prompt) + T))
        ppl_lm.pin("prefix", y, dict(enumerate(prompt)), lam=None)
        return y

    post = ppl_lm.infer(pinned, c, method="exact")
    assert bool((post.samples[:, :2] == torch.tensor(c)).all())
    rest = {}
    for row, w in zip(post.samples[:, 2:].tolist(), post.weights.tolist()):
        rest[tuple(row)] = rest.get(tuple(row), 0.0) + w
    want = prompted.probabilities()
    assert set(rest) == set(want)
    assert max(abs(rest[k] - want[k]) for k in want) < 1e-6


def test_suffix(lm):
    mod = models.load("suffix")
    x = batch(lm, "They lived happily ever after.", "happily ever after. The end", "ever after",
              "Nothing.", T=32)
    s = score(mod.build(lm), (mod.context,), x)
    assert s.constraints["ends_with"].tolist() == [True, False, False, False]
    assert s.log_likelihood[0] == 0 and torch.isinf(s.log_likelihood[1:]).all()
    soft = score(mod.build(lm, mode="soft", beta=0.5), (mod.context,), x)
    r = soft.rewards["ending"]
    assert torch.allclose(r, torch.tensor([2.0, 1.0, 2 / 3, 0.0]))
    assert torch.allclose(soft.log_likelihood, r / 0.5)


def test_sentiment(lm):
    mod = models.load("sentiment")
    x = batch(lm, " loved it, wonderful!", " terrible and awful.", " the chair.", T=24)
    s = score(mod.build(lm, beta=0.25), (mod.context,), x)
    r = s.rewards["sentiment"]
    assert r[0] > 0.5 and r[1] < -0.5 and r[2] == 0
    assert torch.allclose(s.log_likelihood, r / 0.25)


def test_no_violence(lm):
    mod = models.load("no_violence")
    assert len(mod.LEXICON) >= 40
    x = batch(lm, " they shared bread.", " he KILLED the king.", " the killer had a gun", " a skillful bow",
              T=24)
    hard = score(mod.build(lm), (mod.context,), x)
    assert hard.constraints["no_violence"].tolist() == [True, False, False, True]
    soft = score(mod.build(lm, mode="soft", beta=0.5), (mod.context,), x)
    assert soft.rewards["violence"].tolist() == [0.0, -1.0, -2.0, 0.0]
    assert torch.allclose(soft.log_likelihood, soft.rewards["violence"] / 0.5)
    # On prefixes a word touching the end may still grow ("kill" -> "killjoy"): not yet a failure.
    p = batch(lm, " I will kill", " I will kill him", T=24)
    partial = score(mod.build(lm), (mod.context,), p, partial=16)
    assert partial.constraints["no_violence"].tolist() == [True, False]
    assert not score(mod.build(lm), (mod.context,), p).constraints["no_violence"].any()


def test_chess(lm):
    mod = models.load("chess")
    assert mod.context.rstrip().endswith("3.")  # the condition reads the prompt's opening too
    x = batch(lm, " Bb5 a6 4. Ba4", " Bb5 Qxh1 4. Ba4", " Zz9", "", T=24)
    hard = score(mod.build(lm, min_moves=2), (mod.context,), x)
    assert hard.constraints["legal_game"].tolist() == [True, False, False, False]
    soft = score(mod.build(lm, min_moves=2, mode="soft"), (mod.context,), x)
    assert soft.rewards["legal_moves"].tolist() == [2.0, 1.0, 0.0, 0.0]  # new legal half-moves, capped
    # A prompt without movetext: the generated text alone must hold the game.
    y = batch(lm, "1. e4 e5 2. Nf3", "1. e4 e5 2. Ke3", "[Date 2021.01.01]", T=24)
    alone = score(mod.build(lm, min_moves=3), ("[Date 2021.01.01]\n",), y)
    assert alone.constraints["legal_game"].tolist() == [True, False, False]


def test_factorisation(lm):
    mod = models.load("factorisation")
    model = mod.build(lm)
    x = batch(lm, " 3 * 5.", " 3 x 5 = 15", " 3 * 7", " 15", " five", " 3*5 + 1", " 3 * 5 *a", T=12)
    assert score(model, (15,), x).constraints["factorises"].tolist() == [
        True, True, False, False, False, False, False]
    x = batch(lm, " 43 * 47", " 2021", " 43 * 47 * 1", T=12)
    assert score(model, ("2021",), x).constraints["factorises"].tolist() == [True, False, False]
    x = batch(lm, " 3 * 5 * 7", " 3 * 5 * 7-", T=12)
    assert score(model, (105,), x).constraints["factorises"].tolist() == [True, False]
    with pytest.raises(TypeError, match="integer"):
        score(model, ("many",), x)


def test_pin_soft_and_hard(lm):
    mod = models.load("pin")
    prompt, target = mod.context
    x = batch(lm, target + "!", target[:3] + "xyz", "", T=16)
    soft = score(mod.build(lm, lam=2.0), mod.context, x)
    n = len(lm.encode(target))
    assert soft.rewards["pin"].tolist() == [2.0 * n, 2.0 * 3, 0.0]
    hard = score(mod.build(lm, lam=None), mod.context, x)
    assert hard.constraints["pin"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="target"):
        score(mod.build(lm, max_new_tokens=4), (prompt, "a long target"), batch(lm, "ab", T=4))


def test_keyword(lm):
    mod = models.load("keyword")
    x = batch(lm, " a Dragon and a castle", " a dragonfly", " the castle", T=24)
    hard = score(mod.build(lm), (mod.context,), x)
    assert hard.constraints["keywords"].tolist() == [True, False, False]
    soft = score(mod.build(lm, keywords="dragon, castle", mode="soft"), (mod.context,), x)
    assert soft.rewards["keywords"].tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="keyword"):
        mod.build(lm, keywords=" ,")


def test_no_e_is_a_token_mask(lm):
    mod = models.load("no_e")
    x = batch(lm, " a big cat sat.", " the cat", " An Ox", T=32)
    s = score(mod.build(lm), (mod.context,), x)
    assert s.constraints["no_e"].tolist() == [True, False, True]
    meta = factor_of(s.trace.nodes["no_e"])
    assert isinstance(meta.mask, ppl_lm.TokenMask) and meta.prefix_closed and meta.site == "x"


_AS_SCRIPT = """
import sys
sys.path.insert(0, {folder!r})  # what `python models/NAME.py` does
import types
cli = types.ModuleType("ppl_lm.cli")
def main(argv):
    import chess, keyword
    assert hasattr(chess, "Board") and hasattr(keyword, "iskeyword"), "shadowed by models/"
    assert argv[:2] == ["run", {path!r}] and argv[2:] == ["--method", "smc"], argv
cli.main = main
sys.modules["ppl_lm.cli"] = cli  # stands in for the CLI: only the script's own imports are tested
sys.argv = [{path!r}, "--method", "smc"]
exec(compile(open({path!r}).read(), {path!r}, "exec"), {{"__name__": "__main__", "__file__": {path!r}}})
"""


def test_run_as_script_does_not_shadow_imports():
    """``python models/chess_game.py`` must import python-chess, not itself (keyword.py has the same guard)."""
    path = os.path.join(os.path.dirname(models.__file__), "chess_game.py")
    code = _AS_SCRIPT.format(folder=os.path.dirname(path), path=path)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
