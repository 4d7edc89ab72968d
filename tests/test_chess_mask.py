"""The legal-move mask (``rewards.chess_mask``) against brute force, in every backend.

The oracle is independent of the mask: the language is built by python-chess alone (every
sequence of legal moves from the position, up to the horizon, written by
``Board.variation_san``), and a token sequence is admissible when its decoded text is in it.

Toy problem: a king-and-rook-and-pawn ending ("k7/6P1/1K6/8/8/8/8/7R w"), games of exactly two
half-moves or one mating move, over a 12-token vocabulary whose tokens span move boundaries
("2 K") and split moves in several ways ("Rh" | "R"·"h"), with check, mate and promotion marks;
T = 5 tokens, so the exact backend enumerates all 177k sequences. Tolerances come from the
problem, as in ``test_grammar.py``: prior IS has exact ESS fraction Z; SMC without resampling is
SIS from the masked proposal, whose exact ESS and log Ẑ spread are computed by enumeration with
the oracle's allowed sets; with resampling and MH the reference is stated per test.
"""

from __future__ import annotations

import math

import chess
import pyro
import pytest
import torch
from test_grammar import sequences
from toys import tv_distance, tv_tolerance

import ppl_lm
from ppl_lm.conditions import legal_moves
from ppl_lm.conditions.legal_moves import ChessState

FEN = "k7/6P1/1K6/8/8/8/8/7R w - - 0 1"
STRINGS = ["", "1. ", "R", "h", "8#", "Rh", " K", "b8", "2 K", "a1+", "g8=Q#", "a7+"]
T = 5


def language(start: chess.Board, min_moves: int, max_moves: int, drop: str = "") -> set[str]:
    """Every game text from ``start`` (python-chess's ``variation_san``) of ``min_moves`` to
    ``max_moves`` half-moves, or shorter when the game is over; ``drop`` is a prefix of the text
    python-chess writes for the moves before ``start``'s position (removed)."""
    out: set[str] = set()
    board = start.copy()
    root = chess.Board(start.fen()) if not start.move_stack else start.root()
    before = list(start.move_stack)

    def rec(moves):
        over = board.is_game_over()
        if moves and (len(moves) >= min_moves or over):
            out.add(root.variation_san(before + moves)[len(drop):])
        if over or len(moves) == max_moves:
            return
        for m in list(board.legal_moves):
            board.push(m)
            rec(moves + [m])
            board.pop()

    rec([])
    return out


def toy_lm():
    """A Markov LM leaning towards chess-like continuations (so Z ≈ 0.16, spread over 6 texts)."""
    L = language(chess.Board(FEN), 2, 2)
    base = ppl_lm.MarkovLM.random(len(STRINGS), eos_id=0, seed=3, scale=1.0)
    init, trans = base.init_logits.clone(), base.trans_logits.clone()
    init[1] += 3.5
    for a in range(1, len(STRINGS)):
        for b in range(len(STRINGS)):
            if any(STRINGS[a] + STRINGS[b] in s or (b == 0 and s.endswith(STRINGS[a])) for s in L):
                trans[a, b] += 2.5
    return ppl_lm.MarkovLM(init, trans, eos_id=0, token_strings=STRINGS)


def chess_model(lm, mask, T=T):
    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=T))
        ppl_lm.token_constraint("legal", x, mask)
        return x

    return model


class Brute:
    """The exact answer by enumeration and python-chess: admissible sequences, their prior."""

    def __init__(self, lm, L: set[str], T=T):
        self.lm, self.L, self.T = lm, L, T
        self.prefixes = {s[:i] for s in L for i in range(len(s) + 1)}
        x = sequences(lm.vocab_size, T, lm.eos_id)
        keep = torch.tensor([lm.decode(r) in L for r in x.tolist()])
        self.x = x[keep]
        self.logp = lm.score([], self.x).double()
        self.log_z = float(torch.logsumexp(self.logp, 0))
        self.Z = math.exp(self.log_z)
        self.probs = {tuple(r): float(p) for r, p in zip(self.x.tolist(), torch.exp(self.logp - self.log_z))}

    def allowed(self, text: str, last: bool) -> list[bool]:
        """The oracle's allowed tokens after ``text``: EOS iff the text is a game; another token iff
        the text stays a prefix of a game (at the last position: becomes a game)."""
        strings = self.lm.token_texts()
        return [text in self.L if v == self.lm.eos_id else
                (text + s in self.L if last else bool(s) and text + s in self.prefixes)
                for v, s in enumerate(strings)]

    def sis(self):
        """SIS from the masked proposal: exact ESS fraction and relative sd of Ẑ at n = 1."""
        eos, log_w = self.lm.eos_id, []
        for row in self.x.tolist():
            n = row.index(eos) + 1 if eos in row else self.T
            state, lw = self.lm.start(torch.tensor([], dtype=torch.long), 1), 0.0
            for t in range(n):
                ok = torch.tensor(self.allowed(self.lm.decode(row[:t]), t + 1 == self.T))
                lw += float(torch.logsumexp(state.logprobs[0].double()[ok], 0))
                state = self.lm.extend(state, torch.tensor([row[t]]))
            log_w.append(lw)
        log_ew2 = float(torch.logsumexp(self.logp + torch.tensor(log_w, dtype=torch.float64), 0))
        rel_var = math.exp(log_ew2 - 2 * self.log_z) - 1.0
        return 1.0 / (1.0 + rel_var), math.sqrt(rel_var)


@pytest.fixture(scope="module")
def lm():
    return toy_lm()


@pytest.fixture(scope="module")
def brute(lm):
    return Brute(lm, language(chess.Board(FEN), 2, 2))


@pytest.fixture(scope="module")
def mask(lm):
    return ppl_lm.rewards.chess_mask(lm, FEN, min_moves=2, max_moves=2)


@pytest.fixture(scope="module")
def exact(lm, mask):
    return ppl_lm.infer(chess_model(lm, mask), method="exact", progress=False)


def _legal(post, L):
    live = torch.isfinite(post.log_weights).tolist()
    return all(s in L for s, ok in zip(post.texts, live) if ok)


# -- the mask itself ----------------------------------------------------------------------------


def test_problem_is_telling(brute):
    """Several tokenisations of one game, a token across a move boundary, and a check, a mate and a
    promotion among the games the toy LM can write."""
    texts = [brute.lm.decode(r) for r in brute.x.tolist()]
    assert sorted(set(texts)) == ["1. Ra1+ Kb8", "1. Rh2 Kb8", "1. Rh8#", "1. g8=Q#"]
    assert texts.count("1. Rh2 Kb8") == 2 and texts.count("1. Rh8#") == 2
    assert 0.05 < brute.Z < 0.5


def test_check_is_membership_in_the_language_on_every_sequence(lm, mask, brute):
    x = sequences(lm.vocab_size, T, lm.eos_id)
    want = torch.tensor([lm.decode(r) in brute.L for r in x.tolist()])
    assert torch.equal(mask.check(x), want)
    # Prefixes of 3 tokens: some continuation is a game (a prefix ending at EOS is finished).
    p = x[:, :3]
    ended = (p == lm.eos_id).any(-1).tolist()
    want = [lm.decode(r) in (brute.L if e else brute.prefixes) for r, e in zip(p.tolist(), ended)]
    assert mask.check(p, complete=False).tolist() == want and 0 < sum(want) < len(want)


def test_legal_moves_are_generated_once_per_position(lm, monkeypatch):
    """Checking every sequence twice generates the legal moves of each position once: the start
    and the positions after a first move (a position reached by the last move needs none)."""
    calls = []
    sans = legal_moves._legal_sans
    monkeypatch.setattr(legal_moves, "_legal_sans", lambda board: calls.append(board.fen()) or sans(board))
    mask = ppl_lm.rewards.chess_mask(lm, FEN, min_moves=2, max_moves=2)
    x = sequences(lm.vocab_size, T, lm.eos_id)
    first = mask.check(x)
    assert torch.equal(mask.check(x), first)
    # The start, and after "1. Rh2" and "1. Ra1+" (after a mate there is nothing to generate).
    assert len(calls) == len(set(calls)) == mask.num_positions == 3


CHAR_FEN = "r3k2r/pPpp1ppp/8/3Pp3/8/8/P1PP1PPP/R3K2R w KQkq e6 0 5"  # castling, en passant, promotions


def test_allowed_tokens_are_exactly_the_legal_ones_on_a_character_vocabulary():
    """After every prefix of every 2-half-move game from a position with both castlings, an en
    passant capture and capturing promotions with check, over characters plus multi-character
    tokens (across boundaries, castling, promotion): allowed = the oracle's set, EOS iff the
    text is a game, at the last position only tokens that finish a game."""
    L = language(chess.Board(CHAR_FEN), 2, 2)
    chars = sorted({c for s in L for c in s})
    multi = [" 6.", "O-O", "=Q+", "xa8", "+ ", "5. O", "e6 ", "Kf8", "dxe6 K", "6"]
    strings = [""] + chars + multi
    lm = ppl_lm.MarkovLM(torch.zeros(len(strings)), torch.zeros(len(strings), len(strings)), eos_id=0,
                         token_strings=strings)
    brute = Brute.__new__(Brute)
    brute.lm, brute.L, brute.prefixes = lm, L, {s[:i] for s in L for i in range(len(s) + 1)}
    assert {"5. O-O Kf8", "5. O-O-O O-O", "5. dxe6 Kf8", "5. bxa8=Q+ Ke7"} <= L
    mask = ppl_lm.rewards.chess_mask(lm, CHAR_FEN, min_moves=2, max_moves=2)
    index = {s: i for i, s in enumerate(strings)}
    checked: set[str] = set()
    for s in sorted(L):
        state = mask.start(1)
        for i in range(len(s) + 1):
            if s[:i] not in checked:
                checked.add(s[:i])
                assert state.allowed()[0].tolist() == brute.allowed(s[:i], False), s[:i]
                assert state.allowed(last=True)[0].tolist() == brute.allowed(s[:i], True), s[:i]
            if i < len(s):
                state.advance(torch.tensor([index[s[i]]]))
    assert len(checked) > 1000


def test_movetext_start_continues_the_game():
    """Start from the PGN of the model script: the text goes on from "3." (" Bb5 a6 4. Ba4"), the
    language equals python-chess's continuation of the game; without the trailing "3." the text
    starts with it; a bad start is a clear error."""
    lm = ppl_lm.tiny_char_transformer(seed=0)
    opening = "1. e4 e5 2. Nf3 Nc6 3."
    board = chess.Board()
    for san in ("e4", "e5", "Nf3", "Nc6"):
        board.push_san(san)
    L = language(board, 1, 1, drop="1. e4 e5 2. Nf3 Nc6 3.")
    assert " Bb5" in L and " O-O" not in L and len(L) == board.legal_moves.count()
    mask = ppl_lm.rewards.chess_mask(lm, '[Event "x"]\n\n' + opening, min_moves=1, max_moves=1)
    texts = sorted(L) + [" Bb5 a6", "Bb5", " Bb5+", " Bc5", " bb5", " Bb5 "]
    T_ = max(len(s) for s in texts) + 1
    x = torch.tensor([lm.encode(s) + [lm.eos_id] * (T_ - len(s)) for s in texts])
    assert mask.check(x).tolist() == [s in L for s in texts]
    m2 = ppl_lm.rewards.chess_mask(lm, opening[:-3], min_moves=3)
    y = torch.tensor([lm.encode(" 3. Bb5 a6 4. Ba4"), lm.encode(" 3. Bb5 a6 4 .Ba4")])
    assert m2.check(y).tolist() == [True, False]
    with pytest.raises(ValueError, match="not a legal move"):
        ppl_lm.rewards.chess_mask(lm, "1. e4 e5 2. Ke3")
    with pytest.raises(ValueError, match="does not begin"):
        ppl_lm.rewards.chess_mask(lm, "1. e4 e5 3.")
    with pytest.raises(ValueError, match="FEN"):
        ppl_lm.rewards.chess_mask(lm, "k7/8/8 w - - 0 1")
    with pytest.raises(ValueError, match="already over"):
        ppl_lm.rewards.chess_mask(lm, "k7/1Q6/1K6/8/8/8/8/8 b - - 0 1")
    with pytest.raises(ValueError, match="min_moves"):
        ppl_lm.rewards.chess_mask(lm, "", min_moves=0)
    with pytest.raises(ValueError, match="max_moves"):
        ppl_lm.rewards.chess_mask(lm, "", min_moves=3, max_moves=2)


def test_fivefold_repetition_ends_the_game():
    """Knights out and back four times: the initial position's fifth occurrence ends the game
    (python-chess's is_game_over), so EOS is allowed before min_moves and no move may follow."""
    lm = ppl_lm.tiny_char_transformer(seed=0)
    shuffle = " ".join(f"{2 * i + 1}. Nf3 Nf6 {2 * i + 2}. Ng1 Ng8" for i in range(4))
    board = chess.Board()
    for san in shuffle.split():
        if not san.endswith("."):
            board.push_san(san)
    assert board.is_game_over() and not board.is_checkmate()  # python-chess: fivefold repetition
    mask = ppl_lm.rewards.chess_mask(lm, "", min_moves=20)
    texts = [shuffle, shuffle + " 9. e4", shuffle[:-8], shuffle.replace("4. Ng1 Ng8", "4. Ng1 Nc6")]
    T_ = max(len(s) for s in texts) + 1
    x = torch.tensor([lm.encode(s) + [lm.eos_id] * (T_ - len(s)) for s in texts])
    assert mask.check(x).tolist() == [True, False, False, False]
    assert mask.check(x[1:2, :len(shuffle) + 2], complete=False).tolist() == [False]  # not even " 9"
    # A start whose history already holds four occurrences: the fifth ends it.
    with pytest.raises(ValueError, match="already over"):
        ppl_lm.rewards.chess_mask(lm, shuffle, min_moves=1)


def test_free_tail_allows_any_text_after_min_moves():
    lm = ppl_lm.tiny_char_transformer(seed=0)
    mask = ppl_lm.rewards.chess_mask(lm, "1. e4 e5 2. Nf3 Nc6 3.", min_moves=2, free_tail=True)
    texts = [" Bb5 a6", " Bb5 a6 4. Zz9 !?", " Bb5 a6\nnice", " Bb5 Zz9 a6", " Bb5", " Bb5 a64"]
    T_ = max(len(s) for s in texts) + 1
    x = torch.tensor([lm.encode(s) + [lm.eos_id] * (T_ - len(s)) for s in texts])
    assert mask.check(x).tolist() == [True, True, True, False, False, False]


def test_reorder_moves_states_with_their_rows(lm, mask):
    state = mask.start(2)
    one, g8, r = (lm.encode(s)[0] for s in ("1. ", "g8=Q#", "R"))
    state.advance(torch.tensor([one, one]))
    state.advance(torch.tensor([g8, r]))  # "1. g8=Q#" (a game) | "1. R"
    state.reorder(torch.tensor([1, 1, 0]))
    got = state.allowed()
    assert got[:, 0].tolist() == [False, False, True]  # EOS only after the mate
    assert got[0, lm.encode("a1+")[0]] and not got[2, lm.encode("a1+")[0]]


# -- every backend against the exact answer -------------------------------------------------------


def test_exact_backend_equals_brute_force(brute, exact):
    assert exact.log_evidence == pytest.approx(brute.log_z, abs=1e-6)
    p = exact.probabilities()
    assert sum(abs(p.get(k, 0.0) - v) for k, v in brute.probs.items()) < 1e-6


def test_importance_matches_exact(lm, mask, brute, exact):
    n = 20_000
    post = ppl_lm.infer(chess_model(lm, mask), method="importance", num_samples=n, seed=0, progress=False)
    assert _legal(post, brute.L)
    sd = math.sqrt((1 - brute.Z) / (n * brute.Z))
    assert abs(post.log_evidence - brute.log_z) <= 4 * sd
    assert tv_distance(post, exact) <= tv_tolerance(exact, n * brute.Z)


def _smc_sis(lm, mask, seed=0, N=4000):
    return ppl_lm.infer(chess_model(lm, mask), method="smc", num_particles=N, ess_threshold=0.0, seed=seed,
                        progress=False)


def _sis_ok(post, brute, exact, N=4000):
    ess_frac, rel_sd = brute.sis()
    ok_z = abs(post.log_evidence - brute.log_z) <= 4 * rel_sd / math.sqrt(N)
    ok_tv = tv_distance(post, exact) <= tv_tolerance(exact, N * ess_frac)
    return ok_z, ok_tv


def test_smc_without_resampling_matches_exact_sis_errors(lm, mask, brute, exact):
    """ess_threshold=0: SIS from the masked proposal; no particle dies (the lookahead at the last
    position), log Ẑ and the law within the exact SIS errors."""
    post = _smc_sis(lm, mask)
    assert _legal(post, brute.L) and torch.isfinite(post.log_weights).all()
    assert all(_sis_ok(post, brute, exact))


def _smc_resampling(lm, mask, N=1000, R=20):
    return ppl_lm.infer(chess_model(lm, mask), method="smc", num_particles=N, num_replicates=R, ess_threshold=1.0,
                        seed=1, progress=False)


def _resampling_ok(post, brute, exact, N=1000, R=20):
    """Mean Ẑ/Z of R replicates within 4 of its standard errors; TV within the tolerance of
    i.i.d. exact draws at a quarter of the SIS effective size."""
    ess_frac, _ = brute.sis()
    z = torch.exp(torch.tensor(post.info["log_evidence_replicates"], dtype=torch.float64) - brute.log_z)
    ok_z = abs(float(z.mean()) - 1.0) <= 4 * float(z.std()) / math.sqrt(R)
    return ok_z, tv_distance(post, exact) <= tv_tolerance(exact, N * R * ess_frac / 4)


def test_smc_with_resampling_matches_exact(lm, mask, brute, exact):
    post = _smc_resampling(lm, mask)
    assert sum(post.info["num_resampling"]) >= 20 and _legal(post, brute.L)
    assert all(_resampling_ok(post, brute, exact))


def test_mh_matches_exact(lm, mask, brute, exact):
    """MH over edits, the mask as a constraint: 128 chains; each chain's 100 draws carry at least the
    information of one exact draw, so the reference is 128 i.i.d. draws."""
    chains = 128
    post = ppl_lm.infer(chess_model(lm, mask), method="mh", num_samples=100, num_chains=chains, warmup_steps=100,
                        seed=0, progress=False)
    assert _legal(post, brute.L)
    assert tv_distance(post, exact) <= tv_tolerance(exact, chains)


def test_smc_on_a_character_lm_matches_the_exact_evidence():
    """A character-level Markov LM over the 2-half-move games of the castling position (≈ 1 400
    texts, one tokenisation each): exact Z is the LM mass of the games; 10 SMC replicates' mean
    Ẑ/Z lies within 4 of its standard errors, and every live particle is a game."""
    L = language(chess.Board(CHAR_FEN), 2, 2)
    strings = [""] + sorted({c for s in L for c in s}) + ["z"]
    base = ppl_lm.MarkovLM.random(len(strings), eos_id=0, seed=0, scale=0.5)
    lm = ppl_lm.MarkovLM(base.init_logits, base.trans_logits, eos_id=0, token_strings=strings)
    Tc = max(len(s) for s in L) + 1
    x = torch.tensor([lm.encode(s) + [0] * (Tc - len(s)) for s in sorted(L)])
    log_z = float(torch.logsumexp(lm.score([], x).double(), 0))
    mask = ppl_lm.rewards.chess_mask(lm, CHAR_FEN, min_moves=2, max_moves=2)
    R = 10
    post = ppl_lm.infer(chess_model(lm, mask, Tc), method="smc", num_particles=200, num_replicates=R, seed=0,
                        progress=False)
    assert _legal(post, L) and torch.isfinite(post.log_weights).all()
    z = torch.exp(torch.tensor(post.info["log_evidence_replicates"], dtype=torch.float64) - log_z)
    assert abs(float(z.mean()) - 1.0) <= 4 * float(z.std()) / math.sqrt(R)


# -- planted bugs: the same checks fail ---------------------------------------------------------


def _pseudo_legal(board):
    return {board.san(m): m for m in board.pseudo_legal_moves}  # lets the king walk into check


def _no_checks(board):
    return {board.san(m): m for m in board.legal_moves if not board.gives_check(m)}


def test_planted_bug_illegal_move_let_through_fails(lm, brute, exact, monkeypatch):
    """A mask built on pseudo-legal moves ("1. Rh2 Ka7+": the king walks into check) admits texts
    outside the language: exact enumeration leaves brute force and SMC returns illegal games."""
    monkeypatch.setattr(legal_moves, "_legal_sans", _pseudo_legal)
    bad = ppl_lm.rewards.chess_mask(lm, FEN, min_moves=2, max_moves=2)
    post = ppl_lm.infer(chess_model(lm, bad), method="exact", progress=False)
    assert post.log_evidence > brute.log_z + 1e-3  # the exact test allows 1e-6
    smc = _smc_sis(lm, bad)
    assert not (_legal(smc, brute.L) and all(_sis_ok(smc, brute, exact)))


def test_planted_bug_legal_move_blocked_fails(lm, brute, exact, monkeypatch):
    """A mask that forgets checking moves ("1. Ra1+ Kb8", and the mates) misses part of the
    support: the SIS check fails."""
    monkeypatch.setattr(legal_moves, "_legal_sans", _no_checks)
    bad = ppl_lm.rewards.chess_mask(lm, FEN, min_moves=2, max_moves=2)
    assert not all(_sis_ok(_smc_sis(lm, bad), brute, exact))


def test_planted_bug_eos_before_min_moves_fails(lm, brute, exact, monkeypatch):
    """A mask that lets the text end after any complete move (min_moves ignored) admits "1. Ra1+"."""
    monkeypatch.setattr(legal_moves.ChessMask, "_accepting", lambda self, s: s is legal_moves._FREE or (
        not s[1] and s[2] in self._positions[s[0]].moves))
    bad = ppl_lm.rewards.chess_mask(lm, FEN, min_moves=2, max_moves=2)
    smc = _smc_sis(lm, bad)
    assert not (_legal(smc, brute.L) and all(_sis_ok(smc, brute, exact)))


def test_planted_bug_mask_not_reordered_fails(lm, mask, brute, exact, monkeypatch):
    """If resampling left the mask states in place, particles would be proposed from another
    particle's mask: the estimate leaves the exact tolerance (or every particle dies)."""
    monkeypatch.setattr(ChessState, "reorder", lambda self, index: None)
    try:
        post = _smc_resampling(lm, mask)
    except ValueError:  # every particle died
        return
    assert not all(_resampling_ok(post, brute, exact))


# -- the model script ---------------------------------------------------------------------------


def replay(opening: str, text: str, n: int) -> bool:
    """python-chess replays the opening's 4 half-moves and the next ``n`` of ``opening + text``,
    each white move after its move number (what follows them is the free tail)."""
    board, items = chess.Board(), (opening + text).split()
    i = 0
    while len(board.move_stack) < 4 + n:
        if board.turn == chess.WHITE:
            if i >= len(items) or items[i] != f"{board.fullmove_number}.":
                return False
            i += 1
        try:
            board.push_san(items[i] if i < len(items) else "")
        except ValueError:
            return False
        i += 1
    return True


def test_chess_game_legal_mask_mode_on_the_char_lm():
    """models/chess_game.py, mode="legal_mask": the condition is the mask's (texts scored through the
    model), and SMC on a random character LM loses no particle to an illegal move: every returned
    game replays legally in python-chess."""
    from ppl_lm.inference._runtime import run_model
    from ppl_lm.models import chess_game

    lm = ppl_lm.tiny_char_transformer(seed=0)
    model = chess_game.build(lm, min_moves=4, mode="legal_mask", max_new_tokens=40)
    texts = [" Bb5 a6 4. Ba4 Nf6", " Bb5 a6 4. Ba4 Nf6 and so on", " Bb5 a6 Ba4 Nf6", " Bb5 a6 4. Ba4 Nf9"]
    x = torch.tensor([lm.encode(s) + [lm.eos_id] * (40 - len(s)) for s in texts])
    got = run_model(model, (chess_game.context,), {}, len(x), data={"x": x}).constraints["legal_game"]
    assert got.tolist() == [True, True, False, False]
    post = ppl_lm.infer(model, chess_game.context, method="smc", num_particles=16, seed=0, progress=False)
    assert torch.isfinite(post.log_weights).all() and math.isfinite(post.log_evidence)
    opening = chess_game.context[chess_game.context.index("1."):]
    assert all(replay(opening, s, 4) for s in post.texts), post.texts
    assert not replay(opening, " Bb5 a6 Ba4 Nf6", 4) and not replay(opening, " Bb5 a6 4. Ba4 Nf9", 4)
    with pytest.raises(ValueError, match="mode"):
        chess_game.build(lm, mode="legal")


# -- python-chess's verdict on a sampled game (chess_game.check, printed by the CLI) ------------


def test_check_replays_the_game_with_python_chess():
    """chess_game.check against games python-chess writes itself: a random legal continuation is
    "legal" with its exact count; the same game with one move made illegal (or ambiguous) is
    "ILLEGAL" at that move; mate ends the game; a result or prose ends the moves."""
    import random

    from ppl_lm.models import chess_game

    rng, board = random.Random(0), chess.Board()
    for san in ("e4", "e5", "Nf3", "Nc6"):
        board.push_san(san)
    for _ in range(12):
        board.push(rng.choice(list(board.legal_moves)))
    game = chess.Board().variation_san(board.move_stack)
    text = game[len("1. e4 e5 2. Nf3 Nc6 3."):]
    items = text.split()
    number = f"{board.fullmove_number - 1}..." if board.turn == chess.WHITE else f"{board.fullmove_number}."
    assert chess_game.check(text) == f"legal: 12 half-moves (to {number} {items[-1]})"
    k = next(i for i in range(3, len(items)) if not items[i].endswith("."))  # a move, not a number
    bad = " " + " ".join(items[:k] + ["Qxa8"] + items[k + 1:])
    before = chess.Board()
    for san in [*"e4 e5 Nf3 Nc6".split(), *(w for w in items[:k] if not w.endswith("."))]:
        before.push_san(san)
    with pytest.raises(chess.IllegalMoveError):  # the planted move is illegal where it stands
        before.push_san("Qxa8")
    verdict = chess_game.check(bad)
    assert verdict.startswith("legal: ") and "ILLEGAL" in verdict and "Qxa8 (illegal in the position)" in verdict
    n_before = sum(not w.endswith(".") for w in items[:k])
    assert verdict.startswith(f"legal: {n_before} half-moves"), verdict
    assert chess_game.check(" Bxd4") == "ILLEGAL first move 3. Bxd4 (illegal in the position)"
    assert chess_game.check(" Nd2", "1. d4 d5 2. Nf3 Nf6 3.") == "ILLEGAL first move 3. Nd2 (ambiguous)"
    assert chess_game.check(" Bc4 Nf6 4. Qxf7# 1-0", "1. e4 e5 2. Qh5 Nc6 3.") == (
        "legal: 3 half-moves (to 4. Qxf7#), then game over (checkmate), then '1-0'")
    assert chess_game.check(" Bb5 a6 1/2-1/2") == "legal: 2 half-moves (to 3... a6), then the result 1/2-1/2"
    assert chess_game.check(" Bb5 a6\n[Event") == "legal: 2 half-moves (to 3... a6), then text '[Event'"
    assert chess_game.check("1. d4 d5 2.c4", "A game:") == "legal: 3 half-moves (to 2. c4)"  # no "1." in the prompt
    assert chess_game.check(" e4", "1. e4 e5 2. Ke3") == "the prompt's opening is not a legal game at 'Ke3'"


PLANTED = '''
import re

import pyro

import ppl_lm
from ppl_lm.models.chess_game import check, context

def build(lm, text=" Bb5 a6 4. Ba4 Nf6"):
    """Every particle writes exactly ``text`` (a regex mask of the literal)."""
    mask = ppl_lm.rewards.regex_mask(lm, re.escape(text))
    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=len(text) + 1))
        ppl_lm.token_constraint("planted", x, mask)
        return x
    return model
'''


def _run_cli(argv, capsys) -> str:
    from ppl_lm import cli

    assert cli.main(["run", *argv, "--lm", "tiny", "--quiet", "--seed", "0"]) == 0
    return capsys.readouterr().out


def _checks(out: str) -> list[str]:
    return [line.split("check: ", 1)[1] for line in out.splitlines() if line.strip().startswith("check: ")]


def test_cli_prints_python_chess_verdict_of_each_top_sample(tmp_path, capsys):
    """`ppl-lm run` prints the script's check(text, *context) under each top sample: a planted legal
    game is "legal", a planted illegal one "ILLEGAL" at its move, and the verdict replays the
    run's own context (Bb5 is illegal after 1. d4 d5 2.)."""
    path = tmp_path / "planted.py"
    path.write_text(PLANTED)
    smc = [str(path), "--method", "smc", "--num-particles", "4"]
    assert _checks(_run_cli(smc, capsys)) == ["legal: 4 half-moves (to 4... Nf6)"]
    out = _run_cli([*smc, "--set", "text= Bb5 a6 4. Bxd4 Nf6"], capsys)
    assert "' Bb5 a6 4. Bxd4 Nf6'" in out
    assert _checks(out) == ["legal: 2 half-moves (to 3... a6), then ILLEGAL 4. Bxd4 (illegal in the position)"]
    out = _run_cli([*smc, "--set", "text= Bb5 a6", "--context", "1. d4 d5 2."], capsys)
    assert _checks(out) == ["ILLEGAL first move 2. Bb5 (illegal in the position)"]
    # The real script, on the tiny LM: every game the legal mask returns is legal, by python-chess.
    out = _run_cli(["chess_game", "--method", "smc", "--num-particles", "16", "--set", "min_moves=3",
                    "--set", "max_new_tokens=40", "--top", "4"], capsys)
    verdicts = _checks(out)
    assert len(verdicts) >= 2 and all(int(v.split()[1]) >= 3 for v in verdicts if v.startswith("legal:")), out
    assert all(v.startswith("legal:") for v in verdicts), out


def test_cli_check_hook_errors(tmp_path, capsys):
    """A hook that raises shows its error in place of the verdict (the results are still printed);
    a `check` that is not a function is a clear error before anything runs."""
    from ppl_lm import cli

    path = tmp_path / "broken.py"
    path.write_text(PLANTED.replace("from ppl_lm.models.chess_game import check, context",
                                    "from ppl_lm.models.chess_game import context\n"
                                    "def check(text, prompt):\n    return 1 / 0"))
    out = _run_cli([str(path), "--method", "smc", "--num-particles", "4"], capsys)
    assert "log Z" in out and _checks(out) == ["(check raised ZeroDivisionError: division by zero)"]
    path.write_text(PLANTED.replace("from ppl_lm.models.chess_game import check, context",
                                    "from ppl_lm.models.chess_game import context\ncheck = 'yes'"))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(path), "--method", "smc", "--lm", "tiny"])
    assert e.value.code == 2 and "`check` must be a function" in capsys.readouterr().err
