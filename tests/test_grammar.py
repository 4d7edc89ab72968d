"""Grammar masks (regex, Lark, JSON) against exact enumeration, in every backend.

The toy LMs' tokens are multi-character strings ("a", "b", "ab", "ba", "c"), so one text has
several tokenisations ("abab" = ab·ab = a·b·ab = a·ba·b ...). The exact answer is computed here
by brute force, independently of the mask: every token sequence of at most T tokens, its text
decoded, kept when ``re.fullmatch`` matches. Tolerances come from the problem:

- prior importance sampling: weights are indicators, so the exact ESS fraction
  (E_π w)² / E_π w² is Z, and log Ẑ has sd √((1 − Z)/(nZ));
- SMC without resampling is sequential importance sampling from the locally constrained
  proposal q; its exact ESS fraction Z² / E_q w² (with E_q w² = Σ_{x∈L} π(x) w(x), w(x) the
  product of the allowed masses along x, allowed sets found with ``regex``'s partial matching)
  is computed by enumeration too, and so is the sd of log Ẑ;
- SMC with resampling and MH: i.i.d. exact draws at a reference size (stated per test).
TV tolerances are three times the expected TV of that many i.i.d. exact draws (toys.py).
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pyro
import pytest
import regex as partial_re  # transformers' dependency: partial matching for the independent oracle
import torch
from toys import tv_distance, tv_tolerance

import ppl_lm
from ppl_lm.conditions import grammar
from ppl_lm.conditions.grammar import GrammarState

STRINGS = ["", "a", "b", "ab", "ba", "c"]
T = 5
PATTERN = "(ab|ba)+c?"


def markov_lm():
    base = ppl_lm.MarkovLM.random(len(STRINGS), eos_id=0, seed=2, scale=0.8)
    return ppl_lm.MarkovLM(base.init_logits, base.trans_logits, eos_id=0, token_strings=STRINGS)


def transformer_lm():
    return ppl_lm.tiny_transformer(len(STRINGS), eos_id=0, seed=3, scale=0.1, token_strings=STRINGS)


LMS = {"markov": markov_lm, "transformer": transformer_lm}


@pytest.fixture(scope="module", params=list(LMS))
def lm(request):
    return LMS[request.param]()


# The planted-bug tests need one LM only (they show the checks have teeth; the LM is not the point).
markov_only = pytest.mark.parametrize("lm", ["markov"], indirect=True)


def regex_model(lm, mask, T=T):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.token_constraint("re", x, mask)
        return x

    return model


def sequences(V, T, eos=0):
    """Every token sequence of at most T tokens (ending at EOS, or T tokens without one), EOS-padded."""
    out = []
    for n in range(T + 1):  # n tokens of text, then EOS if there is room
        for body in itertools.product([v for v in range(V) if v != eos], repeat=n):
            out.append(list(body) + [eos] * (T - n))
    return torch.tensor(out)


class Brute:
    """The exact answer by enumeration: the matching sequences, their prior log-probabilities."""

    def __init__(self, lm, pattern, T=T):
        self.lm, self.pattern, self.T = lm, pattern, T
        self._cache: dict = {}
        self._sis = None
        x = sequences(lm.vocab_size, T, lm.eos_id)
        texts = [lm.decode(r) for r in x.tolist()]
        keep = torch.tensor([re.fullmatch(pattern, s) is not None for s in texts])
        self.x = x[keep]
        self.logp = lm.score([], self.x).double()
        self.log_z = float(torch.logsumexp(self.logp, 0))
        self.Z = math.exp(self.log_z)
        self.probs = {tuple(r): float(p) for r, p in zip(self.x.tolist(), torch.exp(self.logp - self.log_z))}
        matched = [lm.decode(r) for r in self.x.tolist()]
        self.num_tokenisations = max(matched.count(s) for s in set(matched))

    def sis(self):
        """SIS from the locally constrained proposal: exact ESS fraction and sd of log Ẑ at n = 1."""
        if self._sis is None:
            self._sis = self._compute_sis()
        return self._sis

    def _compute_sis(self):
        lm, eos = self.lm, self.lm.eos_id
        strings = lm.token_texts()
        log_w = []
        for row in self.x.tolist():
            n = row.index(eos) + 1 if eos in row else self.T
            lw = 0.0
            for t in range(n):
                prefix = row[:t]
                text = lm.decode(prefix)
                last = t + 1 == self.T
                ok = []
                for v in range(lm.vocab_size):
                    if v == eos:
                        ok.append(re.fullmatch(self.pattern, text) is not None)
                    elif last:
                        ok.append(re.fullmatch(self.pattern, text + strings[v]) is not None)
                    else:
                        ok.append(partial_re.fullmatch(self.pattern, text + strings[v], partial=True) is not None)
                lw += float(torch.logsumexp(self._next_logp(prefix)[torch.tensor(ok)], 0))
            log_w.append(lw)
        log_w = torch.tensor(log_w, dtype=torch.float64)
        # E_q w = Z; E_q w² = Σ_{x∈L} π(x) w(x)
        log_ew2 = float(torch.logsumexp(self.logp + log_w, 0))
        rel_var = math.exp(log_ew2 - 2 * self.log_z) - 1.0  # Var_q(w)/Z² for one particle
        return 1.0 / (1.0 + rel_var), math.sqrt(rel_var)

    def _next_logp(self, prefix):
        key = tuple(prefix)
        if key not in self._cache:
            state = self.lm.start(torch.tensor([], dtype=torch.long), 1)
            for tok in prefix:
                state = self.lm.extend(state, torch.tensor([tok]))
            self._cache[key] = state.logprobs[0].double()
        return self._cache[key]


@pytest.fixture(scope="module")
def brute(lm):
    return Brute(lm, PATTERN)


@pytest.fixture(scope="module")
def mask(lm):
    return ppl_lm.rewards.regex_mask(lm, PATTERN)


@pytest.fixture(scope="module")
def exact(lm, mask):
    return ppl_lm.infer(regex_model(lm, mask), method="exact")


def _matches(post, pattern=PATTERN):
    live = torch.isfinite(post.log_weights).tolist()
    return all(re.fullmatch(pattern, s) for s, ok in zip(post.texts, live) if ok)


# -- the mask itself --------------------------------------------------------------------------


def test_problem_has_several_tokenisations_per_text(brute):
    assert brute.num_tokenisations >= 4 and 0.01 < brute.Z < 0.5, (brute.num_tokenisations, brute.Z)


def test_check_is_fullmatch_on_every_sequence(lm, mask):
    x = sequences(lm.vocab_size, T, lm.eos_id)
    want = torch.tensor([re.fullmatch(PATTERN, lm.decode(r)) is not None for r in x.tolist()])
    assert torch.equal(mask.check(x), want)


def test_allowed_tokens_are_exactly_the_viable_ones(lm, mask):
    """After every prefix of up to 3 tokens: a token is allowed iff some continuation of the text
    matches (regex partial matching); EOS iff the text matches; at the last position only tokens
    completing it."""
    strings = lm.token_texts()
    for n in range(4):
        for prefix in itertools.product(range(1, lm.vocab_size), repeat=n):
            text = "".join(strings[t] for t in prefix)
            if partial_re.fullmatch(PATTERN, text, partial=True) is None:
                continue
            state = mask.start(1)
            for tok in prefix:
                state.advance(torch.tensor([tok]))
            got, got_last = state.allowed()[0], state.allowed(last=True)[0]
            want = [re.fullmatch(PATTERN, text) is not None] + [
                partial_re.fullmatch(PATTERN, text + s, partial=True) is not None for s in strings[1:]]
            want_last = [want[0]] + [re.fullmatch(PATTERN, text + s) is not None for s in strings[1:]]
            assert got.tolist() == want, (text, got.tolist(), want)
            assert got_last.tolist() == want_last, (text, got_last.tolist(), want_last)


def test_state_reorder_copies_parser_states(lm, mask):
    state = mask.start(2)
    state.advance(torch.tensor([lm.encode("a")[0], lm.encode("b")[0]]))  # "a" | "b"
    state.reorder(torch.tensor([0, 0]))  # both rows become "a"
    state.advance(torch.tensor([lm.encode("b")[0], lm.encode("ba")[0]]))  # "ab" | "aba"
    got = state.allowed()
    eos = lm.eos_id
    assert got[0, eos] and not got[1, eos]  # "ab" matches, "aba" does not (yet)
    assert isinstance(state, GrammarState) and state.matchers[0] is not state.matchers[1]


# -- every backend against the exact answer -------------------------------------------------


def test_exact_backend_equals_brute_force(brute, exact):
    assert exact.log_evidence == pytest.approx(brute.log_z, abs=1e-5)
    p = exact.probabilities()
    assert sum(abs(p.get(k, 0.0) - v) for k, v in brute.probs.items()) < 1e-5


def test_importance_matches_exact(lm, mask, brute, exact):
    n = 20_000
    post = ppl_lm.infer(regex_model(lm, mask), method="importance", num_samples=n, seed=0, progress=False)
    assert _matches(post)
    sd = math.sqrt((1 - brute.Z) / (n * brute.Z))
    assert abs(post.log_evidence - brute.log_z) <= 4 * sd
    assert tv_distance(post, exact) <= tv_tolerance(exact, n * brute.Z)


def test_smc_without_resampling_matches_exact_sis_errors(lm, mask, brute, exact):
    """ess_threshold=0: sequential importance sampling from the masked proposal, whose exact ESS
    fraction and log Ẑ spread are computed by enumeration."""
    N = 4000
    ess_frac, rel_sd = brute.sis()
    post = ppl_lm.infer(regex_model(lm, mask), method="smc", num_particles=N, ess_threshold=0.0, seed=0,
                        progress=False)
    assert _matches(post) and torch.isfinite(post.log_weights).all()  # the lookahead: no particle dies
    assert abs(post.log_evidence - brute.log_z) <= 4 * rel_sd / math.sqrt(N)
    assert tv_distance(post, exact) <= tv_tolerance(exact, N * ess_frac)


def test_smc_with_resampling_matches_exact(lm, mask, brute, exact):
    """Resampling at every step (parser states reordered each time). Reference: i.i.d. exact
    draws at a quarter of the SIS effective size; log Z: 20 replicates' mean Ẑ/Z within 4 of its
    empirical standard errors."""
    N, R = 1000, 20
    ess_frac, _ = brute.sis()
    post = ppl_lm.infer(regex_model(lm, mask), method="smc", num_particles=N, num_replicates=R, ess_threshold=1.0,
                        seed=1, progress=False)
    assert sum(post.info["num_resampling"]) >= R and _matches(post)
    z = torch.exp(torch.tensor(post.info["log_evidence_replicates"], dtype=torch.float64) - brute.log_z)
    assert abs(float(z.mean()) - 1.0) <= 4 * float(z.std()) / math.sqrt(R)
    assert tv_distance(post, exact) <= tv_tolerance(exact, N * R * ess_frac / 4)


def test_mh_matches_exact(lm, mask, exact):
    """MH over edits: 256 independent chains; each chain's 100 (correlated, stationary) draws
    carry at least the information of one exact draw, so the reference is 256 i.i.d. draws."""
    chains = 256
    post = ppl_lm.infer(regex_model(lm, mask), method="mh", num_samples=100, num_chains=chains, warmup_steps=100,
                        seed=0, progress=False)
    assert _matches(post)
    assert tv_distance(post, exact) <= tv_tolerance(exact, chains)


# -- planted bugs: the same checks fail ------------------------------------------------------


def _sis_ok(lm, mask, brute, N=4000, seed=0):
    """SMC without resampling against the exact SIS errors: (log Z within 4 sd, TV within tolerance)."""
    ess_frac, rel_sd = brute.sis()
    post = ppl_lm.infer(regex_model(lm, mask), method="smc", num_particles=N, ess_threshold=0.0, seed=seed,
                        progress=False)
    p = post.probabilities()
    tv = 0.5 * sum(abs(p.get(k, 0.0) - brute.probs.get(k, 0.0)) for k in set(p) | set(brute.probs))
    sd = torch.sqrt(torch.tensor([q * (1 - q) / (N * ess_frac) for q in brute.probs.values()]))
    tol = 3.0 * 0.5 * math.sqrt(2 / math.pi) * float(sd.sum())
    return abs(post.log_evidence - brute.log_z) <= 4 * rel_sd / math.sqrt(N), tv <= tol


@markov_only
def test_planted_bug_canonical_forcing_loses_tokenisations(lm):
    """llguidance's default forcing of fixed strings lets the mask allow only the canonical split of
    a forced literal ("aba" then "b": only ab·ab, never a·b·ab or a·ba·b), while the text check accepts every split: SMC then
    samples a smaller support. With forcing off (ours) SMC passes the exact SIS check; with it on,
    it fails."""
    lark = 'start: "aba" X\nX: /b+/'
    brute = Brute(lm, "abab+")
    assert all(_sis_ok(lm, ppl_lm.rewards.grammar_mask(lm, lark), brute))
    forced = grammar.GrammarMask(lm, lark, "forcing grammar")  # without the no_forcing option
    assert not all(_sis_ok(lm, forced, brute))


@markov_only
def test_planted_bug_reorder_without_moving_states_fails(lm, mask, brute, exact, monkeypatch):
    """If resampling left the parser states in place, particles would be proposed from another
    particle's mask: the estimate leaves the exact tolerance (or particles die)."""
    monkeypatch.setattr(GrammarState, "reorder", lambda self, index: None)
    N, R = 1000, 20
    ess_frac, _ = brute.sis()
    try:
        post = ppl_lm.infer(regex_model(lm, mask), method="smc", num_particles=N, num_replicates=R,
                            ess_threshold=1.0, seed=1, progress=False)
    except ValueError:  # every particle died
        return
    z = torch.exp(torch.tensor(post.info["log_evidence_replicates"], dtype=torch.float64) - brute.log_z)
    ok_z = abs(float(z.mean()) - 1.0) <= 4 * float(z.std()) / math.sqrt(R)
    ok_tv = tv_distance(post, exact) <= tv_tolerance(exact, N * R * ess_frac / 4)
    assert not (ok_z and ok_tv)


@markov_only
def test_planted_bug_mask_dropping_a_token_fails_the_smc_check(lm, mask, brute, exact, monkeypatch):
    """A mask that forgets one multi-character token ("ab") proposes a subset of the support; the
    SIS tolerance catches it."""
    ab = lm.encode("ab")[0]
    allowed = GrammarState.allowed

    def drop(self, last=False):
        out = allowed(self, last)
        out[:, ab] = False
        return out

    monkeypatch.setattr(GrammarState, "allowed", drop)
    N = 4000
    ess_frac, rel_sd = brute.sis()
    post = ppl_lm.infer(regex_model(lm, mask), method="smc", num_particles=N, ess_threshold=0.0, seed=0,
                        progress=False)
    ok_z = abs(post.log_evidence - brute.log_z) <= 4 * rel_sd / math.sqrt(N)
    ok_tv = tv_distance(post, exact) <= tv_tolerance(exact, N * ess_frac)
    assert not (ok_z and ok_tv)


# -- grammars and JSON ------------------------------------------------------------------------


def test_lark_grammar_of_nested_brackets_equals_brute_force():
    """A context-free language (balanced brackets around "a"), on tokens "(", ")", "()", "a", "(a": exact
    log Z equals the sum over every token sequence whose text is a sentence."""
    strings = ["", "(", ")", "()", "a", "(a"]
    base = ppl_lm.MarkovLM.random(len(strings), eos_id=0, seed=5)
    lm = ppl_lm.MarkovLM(base.init_logits, base.trans_logits, eos_id=0, token_strings=strings)
    mask = ppl_lm.rewards.grammar_mask(lm, 'start: item+\nitem: "a" | "(" item* ")"')

    def sentence(s):
        depth, ok = 0, bool(s)
        for ch in s:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            ok &= depth >= 0
        return ok and depth == 0

    x = sequences(len(strings), T, 0)
    want = torch.tensor([sentence(lm.decode(r)) for r in x.tolist()])
    assert torch.equal(mask.check(x), want)
    exact = ppl_lm.infer(regex_model(lm, mask), method="exact")
    assert exact.log_evidence == pytest.approx(float(torch.logsumexp(lm.score([], x[want]).double(), 0)), abs=1e-5)
    post = ppl_lm.infer(regex_model(lm, mask), method="smc", num_particles=500, seed=0, progress=False)
    live = torch.isfinite(post.log_weights).tolist()
    assert any(live) and all(sentence(s) for s, ok in zip(post.texts, live) if ok)


def test_json_mask_on_a_char_lm_returns_valid_objects():
    lm = ppl_lm.tiny_char_transformer(seed=0)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    mask = ppl_lm.rewards.json_mask(lm, schema)
    post = ppl_lm.infer(regex_model(lm, mask, T=10), method="smc", num_particles=32, seed=0, progress=False)
    for s, w in zip(post.texts, post.log_weights.tolist()):
        if math.isfinite(w):
            obj = json.loads(s)
            assert set(obj) == {"n"} and isinstance(obj["n"], int), s


def test_bad_grammars_are_clear_errors(lm):
    with pytest.raises(ValueError, match="regex"):
        ppl_lm.rewards.regex_mask(lm, "(ab")
    with pytest.raises(ValueError, match="Lark"):
        ppl_lm.rewards.grammar_mask(lm, "start: undefined_rule")
    with pytest.raises(ValueError, match="JSON"):
        ppl_lm.rewards.json_mask(lm, "{not json")


@pytest.mark.integration
def test_smollm2_json_parses_and_validates(smollm2):
    schema = {"type": "object",
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    mask = ppl_lm.rewards.json_mask(smollm2, schema)
    prompt = ("<|im_start|>user\nGive a JSON object with a person's name and age.<|im_end|>\n"
              "<|im_start|>assistant\n")

    def model(p):
        x = pyro.sample("x", smollm2.sequence(p, max_new_tokens=24))
        ppl_lm.token_constraint("json", x, mask)
        return x

    post = ppl_lm.infer(model, prompt, method="smc", num_particles=8, seed=0, progress=False)
    assert math.isfinite(post.log_evidence)
    live = [s for s, w in zip(post.texts, post.log_weights.tolist()) if math.isfinite(w)]
    assert live
    for s in live:
        obj = json.loads(s)
        assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int), s


# -- chess as a prefix potential ----------------------------------------------------------------


def test_chess_prefix_mode_prunes_an_illegal_move_once_it_is_finished():
    """models/chess_game.py, mode="prefix": on a prefix, a finished illegal move (whitespace after
    it) fails the prefix-closed legality constraint at once; an unfinished last move is not judged;
    the movetext mask rejects text that is not SAN; the finished text needs min_moves legal moves."""
    from ppl_lm.inference._runtime import run_model
    from ppl_lm.models import chess_game

    from ppl_lm.conditions import partial_prefix

    lm = ppl_lm.tiny_char_transformer(seed=0)
    model = chess_game.build(lm, min_moves=2, mode="prefix")

    def scores(texts, partial=None):
        x = torch.tensor([lm.encode(t) + [lm.eos_id] * (24 - len(lm.encode(t))) for t in texts])
        if partial is None:
            return run_model(model, (chess_game.context,), {}, len(x), data={"x": x})
        with partial_prefix(partial):
            return run_model(model, (chess_game.context,), {}, len(x), data={"x": x})

    texts = [" Bb5 a6", " Bb5 Qxh1 ", " Bb5 Qx", " Zz9 a6"]
    pre = scores(texts, partial=7)
    assert pre.constraints["legal_so_far"].tolist() == [True, False, True, False]  # "a6" unfinished at 7
    assert pre.constraints["movetext"].tolist() == [True, True, True, False]
    full = scores([" Bb5 a6", " Bb5 a6 4. Ba4 Zz9", " Bb5", " Bb5 Qxh1"])
    assert full.constraints["legal_game"].tolist() == [True, True, False, False]  # after 2 moves: free
    assert full.constraints["legal_so_far"].tolist() == [True, True, True, False]
    assert re.fullmatch(chess_game.movetext(2), " Bb5 a6 4. Ba4 Zz9") and not re.fullmatch(
        chess_game.movetext(2), " Bb5 Zz9")
