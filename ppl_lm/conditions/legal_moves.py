"""Legal chess moves as a token mask: the generated text continues a game with legal SAN moves.

The language of a :class:`ChessMask` is the movetext python-chess writes
(``Board.variation_san``): ``"1. e4 e5 2. Nf3"`` — a move number before every white move
(``"N. "``), one space between items, each move in python-chess's SAN for its position (minimal
disambiguation, ``x`` for captures, ``=Q`` for promotions, ``+`` / ``#`` after checks and mates,
``O-O``). The text continues ``start`` (a FEN, or movetext from the initial position), so its first
characters are whatever that text lacks before the next move (``" Bb5"`` after ``"... 3."``). The
text is complete after at least ``min_moves`` legal half-moves, or when the game is over
(checkmate, stalemate, insufficient material, the 75-move rule, fivefold repetition: python-chess's
``Board.is_game_over()``), after which no move may follow.

Per particle the state is a small immutable tuple (a position id, the separator text still due
before the next move, the partial move, the number of moves made, the positions since the last
capture or pawn move, for repetitions), so resampling copies nothing.
Legal moves are generated once per position (cached by FEN); the allowed tokens of a state are
found by walking the vocabulary, sorted as strings, along the characters the state allows (a
token may span a move boundary: ``"5 2."``), and cached per state.
"""

from __future__ import annotations

import bisect
import re
import weakref
from typing import Any

import torch

from .masks import MaskState, TokenMask

__all__ = ["ChessMask", "ChessState", "chess_mask"]

# Memo tables are cleared when they grow past this many entries (memory stays below ~100 MiB).
CACHE_ENTRIES = 200_000
WHITESPACE = " \t\n\r\f\v"  # what may start the free tail (``free_tail=True``)
_TOP = chr(0x10FFFF)  # sorts after every character: the end of a prefix's range of tokens
_FREE = (-1, "", "", 0, ())  # the state after the free tail began: anything goes
_VOCABS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _chess():
    try:
        import chess
    except ImportError as err:  # pragma: no cover - a runtime dependency
        raise ImportError("chess masks need python-chess (pip install chess)") from err
    return chess


class _Vocab:
    """The LM's token texts sorted as strings: the tokens starting with a prefix are a range."""

    def __init__(self, lm):
        texts = list(lm.token_texts())
        tok = getattr(lm, "tokenizer", None)
        special = set(getattr(tok, "all_special_ids", None) or []) | {lm.eos_id}
        # EOS, special tokens and tokens without text never continue the text: "" matches no prefix.
        self.texts_by_id = ["" if i in special else s for i, s in enumerate(texts)]
        order = sorted(range(len(texts)), key=lambda i: self.texts_by_id[i])
        self.texts = [self.texts_by_id[i] for i in order]
        self.ids = torch.tensor(order, dtype=torch.long)
        self.nonempty = self.ids[bisect.bisect_right(self.texts, ""):]


def _vocab(lm) -> _Vocab:
    v = _VOCABS.get(lm)
    if v is None:
        v = _VOCABS[lm] = _Vocab(lm)
    return v


def _legal_sans(board) -> dict:
    """``{SAN: move}`` for every legal move of ``board``."""
    return {board.san(m): m for m in board.legal_moves}


class _Position:
    """A position: its legal moves in SAN and the characters that may follow each partial move
    (generated on first use: a position reached only as the last move of a game needs neither)."""

    __slots__ = ("_moves", "_next_chars", "children", "fen", "key", "over", "sep", "zeroed")

    def __init__(self, board):
        chess = _chess()
        self.fen = board.fen()
        self.key = " ".join(self.fen.split()[:4])  # what a repetition compares (no clocks)
        self.zeroed = board.halfmove_clock == 0  # a capture or pawn move led here: no earlier repetition
        self.over = (board.is_checkmate() or board.is_stalemate() or board.is_insufficient_material()
                     or board.is_seventyfive_moves())
        # The text between a move into this position and the next move.
        self.sep = f" {board.fullmove_number}. " if board.turn == chess.WHITE else " "
        self.children: dict[str, int] = {}
        self._moves: dict | None = None
        self._next_chars: dict[str, str] = {}

    @property
    def moves(self) -> dict:
        if self._moves is None:
            self._moves = {} if self.over else _legal_sans(_chess().Board(self.fen))
            for san in self._moves:
                for k in range(len(san)):
                    if san[k] not in self._next_chars.get(san[:k], ""):
                        self._next_chars[san[:k]] = self._next_chars.get(san[:k], "") + san[k]
        return self._moves

    @property
    def next_chars(self) -> dict[str, str]:
        self.moves  # noqa: B018 - generates them
        return self._next_chars


class ChessMask(TokenMask):
    """Token mask: the text continues the game of ``start`` with legal moves (see
    :func:`chess_mask`, which builds one, and the module notes for the exact language)."""

    def __init__(self, lm, start: str = "", min_moves: int = 1, max_moves: int | None = None,
                 free_tail: bool = False):
        super().__init__(lm)
        if not isinstance(min_moves, int) or isinstance(min_moves, bool) or min_moves < 1:
            raise ValueError(f"min_moves must be a positive integer, got {min_moves!r}")
        if max_moves is not None and (not isinstance(max_moves, int) or max_moves < min_moves):
            raise ValueError(f"max_moves must be None or an integer >= min_moves ({min_moves}), got {max_moves!r}")
        if max_moves is not None and free_tail:
            raise ValueError("max_moves and free_tail exclude each other (the free tail may hold more moves)")
        if not isinstance(start, str):
            raise TypeError(f"start must be a FEN or PGN movetext string, got {type(start).__name__}")
        self.min_moves, self.max_moves, self.free_tail = min_moves, max_moves, free_tail
        self._cap = max_moves if max_moves is not None else min_moves  # moves counted up to here
        self._vocab = _vocab(lm)
        self._positions: list[_Position] = []
        self._ids: dict[str, int] = {}
        self._edges_memo: dict = {}
        self._tokens_memo: dict = {}
        self._consume_memo: dict = {}
        board, literal = _parse_start(start)
        self.start_state = (self._position(board), literal, "", 0, _history(board))
        self.start_text = start
        if self._positions[0].over or self.start_state[4].count(self._positions[0].key) >= 5:
            raise ValueError(f"the game in start={start!r} is already over: no move can follow")

    def __repr__(self) -> str:
        return (f"ChessMask(start={self.start_text!r}, min_moves={self.min_moves}, max_moves={self.max_moves}, "
                f"free_tail={self.free_tail})")

    @property
    def num_positions(self) -> int:
        """Positions whose legal moves were generated so far (once each: the cache by FEN)."""
        return sum(p._moves is not None for p in self._positions)

    # -- the automaton over characters -------------------------------------------------------
    def _position(self, board) -> int:
        fen = board.fen()
        pid = self._ids.get(fen)
        if pid is None:
            pid = self._ids[fen] = len(self._positions)
            self._positions.append(_Position(board))
        return pid

    def _child(self, pid: int, san: str) -> int:
        pos = self._positions[pid]
        cid = pos.children.get(san)
        if cid is None:
            board = _chess().Board(pos.fen)
            board.push(pos.moves[san])
            cid = pos.children[san] = self._position(board)
        return cid

    def _accepting(self, state) -> bool:
        """The text that led to ``state`` is complete (EOS may follow)."""
        if state is _FREE:
            return True
        pid, literal, partial, n, hist = state
        if literal or partial not in self._positions[pid].moves:
            return False
        return n + 1 >= self.min_moves or self._after(pid, partial, hist)[2]

    def _after(self, pid: int, san: str, hist: tuple) -> tuple[int, tuple, bool]:
        """The position after move ``san``, its repetition history, and whether the game is over."""
        cid = self._child(pid, san)
        child = self._positions[cid]
        hist = (child.key,) if child.zeroed else hist + (child.key,)
        return cid, hist, child.over or hist.count(child.key) >= 5

    def _edges(self, state) -> dict:
        """``{character: next state}`` for every character that keeps the text on a legal path."""
        out = self._edges_memo.get(state)
        if out is not None:
            return out
        if len(self._edges_memo) > CACHE_ENTRIES:
            self._edges_memo.clear()
        pid, literal, partial, n, hist = state
        pos = self._positions[pid]
        out = {}
        if literal:
            out[literal[0]] = (pid, literal[1:], "", n, hist)
        else:
            for ch in pos.next_chars.get(partial, ""):
                out[ch] = (pid, "", partial + ch, n, hist)
            if partial in pos.moves:
                if self.free_tail and self._accepting(state):
                    out.update(dict.fromkeys(WHITESPACE, _FREE))
                else:
                    cid, hist2, over = self._after(pid, partial, hist)
                    sep = self._positions[cid].sep
                    if not over and (self.max_moves is None or n + 1 < self.max_moves):
                        out[sep[0]] = (cid, sep[1:], "", min(n + 1, self._cap), hist2)
        self._edges_memo[state] = out
        return out

    def _consume(self, state, tok: int):
        """The state after token ``tok`` (``None``: the text left the language)."""
        key = (state, tok)
        out = self._consume_memo.get(key, 0)
        if out != 0:
            return out
        if len(self._consume_memo) > CACHE_ENTRIES:
            self._consume_memo.clear()
        text = self._vocab.texts_by_id[tok]
        out = None
        if text:
            out = state
            if state is not _FREE:
                for ch in text:
                    out = self._edges(out).get(ch)
                    if out is None or out is _FREE:
                        break
        self._consume_memo[key] = out
        return out

    def _tokens(self, state) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(allowed non-EOS token ids, those after which the text is complete, EOS allowed)."""
        out = self._tokens_memo.get(state)
        if out is not None:
            return out
        if len(self._tokens_memo) > CACHE_ENTRIES // 16:
            self._tokens_memo.clear()
        v = self._vocab
        if state is _FREE:
            out = (v.nonempty, v.nonempty, True)
        else:
            allowed, complete = [], []  # ranges of positions in the sorted vocabulary
            stack = [("", 0, len(v.texts), state)]
            while stack:
                prefix, lo, hi, s = stack.pop()
                for ch, s2 in self._edges(s).items():
                    q = prefix + ch
                    a = bisect.bisect_left(v.texts, q, lo, hi)
                    b = bisect.bisect_left(v.texts, q + _TOP, a, hi)
                    if a == b:
                        continue
                    if s2 is _FREE:  # every token starting with q
                        allowed.append((a, b))
                        complete.append((a, b))
                        continue
                    e = a
                    while e < b and v.texts[e] == q:
                        e += 1
                    if e > a:
                        allowed.append((a, e))
                        if self._accepting(s2):
                            complete.append((a, e))
                    if e < b:
                        stack.append((q, e, b, s2))
            out = (_ranges(v.ids, allowed), _ranges(v.ids, complete), self._accepting(state))
        self._tokens_memo[state] = out
        return out

    # -- the TokenMask protocol ----------------------------------------------------------------
    def start(self, batch_size: int) -> ChessState:
        return ChessState(self, [self.start_state] * batch_size)

    def allowed(self, prefix: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, V]``: the allowed next tokens after each prefix ``[B, t]`` (no EOS inside)."""
        state = self.start(prefix.shape[0])
        for t in range(prefix.shape[-1]):
            state.advance(prefix[:, t])
        return state.allowed().to(prefix.device)

    def check(self, x: torch.Tensor, complete: bool = True) -> torch.Tensor:
        """``ok`` ``[...]`` for sequences ``[..., T]``.

        ``complete=True``: the text up to the first EOS (or all ``T`` tokens) is complete.
        ``complete=False`` (a prefix): it is on a legal path (some continuation is complete).
        """
        eos = self.lm.eos_id
        out = []
        for row in x.reshape(-1, x.shape[-1]).tolist():
            state, ended = self.start_state, False
            for tok in row:
                if tok == eos:
                    ended = True
                    break
                state = self._consume(state, tok)
                if state is None:
                    break
            out.append(state is not None and (self._accepting(state) if complete or ended else True))
        return torch.tensor(out, dtype=torch.bool, device=x.device).reshape(x.shape[:-1])


def _ranges(ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    if not spans:
        return ids[:0]
    return torch.cat([ids[a:b] for a, b in spans])


class ChessState(MaskState):
    """One automaton state per row (``None``: the row's text left the language)."""

    def __init__(self, mask: ChessMask, states: list):
        self.mask = mask
        self.states = states
        self.done = [False] * len(states)

    def allowed(self, last: bool = False) -> torch.Tensor:
        V, eos = self.mask.lm.vocab_size, self.mask.lm.eos_id
        out = torch.zeros(len(self.states), V, dtype=torch.bool)
        rows: dict = {}  # rows sharing a state (resampled particles) share one lookup
        for i, (s, d) in enumerate(zip(self.states, self.done)):
            if d:
                out[i, eos] = True
            elif s is not None:
                rows.setdefault(s, []).append(i)
        for s, idx in rows.items():
            allowed, complete, eos_ok = self.mask._tokens(s)
            cols = complete if last else allowed
            r = torch.tensor(idx)
            out[r[:, None], cols[None, :]] = True
            if eos_ok:
                out[r, eos] = True
        return out

    def advance(self, tokens: torch.Tensor) -> None:
        eos = self.mask.lm.eos_id
        for i, tok in enumerate(tokens.tolist()):
            s = self.states[i]
            if self.done[i] or s is None:
                continue
            if tok == eos:
                self.done[i] = True
            else:
                self.states[i] = self.mask._consume(s, tok)

    def reorder(self, index: torch.Tensor) -> None:
        # States are immutable tuples: rows may share them.
        self.states = [self.states[j] for j in index.tolist()]
        self.done = [self.done[j] for j in index.tolist()]


_NUMBER = re.compile(r"^\d+\.(\.\.)?")
_RESULTS = ("1-0", "0-1", "1/2-1/2", "*")


def _history(board) -> tuple:
    """The repetition keys of ``board``'s positions since its last capture or pawn move."""
    board = board.copy()
    keys = []
    while True:
        keys.append(" ".join(board.fen().split()[:4]))
        if board.halfmove_clock == 0 or not board.move_stack:
            break
        board.pop()
    return tuple(reversed(keys))


def _parse_start(start: str):
    """The board of ``start`` and the text still due before its next move."""
    chess = _chess()
    if "/" in start and not start.lstrip().startswith("["):
        try:
            board = chess.Board(start.strip())
        except ValueError as err:
            raise ValueError(f"start={start!r} looks like a FEN but is not one python-chess reads: {err}") from None
        return board, f"{board.fullmove_number}." + (" " if board.turn == chess.WHITE else "..")
    text = "\n".join(line for line in start.split("\n") if not line.lstrip().startswith("["))
    text = text.lstrip()
    board = chess.Board()
    last_end = None
    for m in re.finditer(r"\S+", text):
        item = _NUMBER.sub("", m.group())
        if not item:
            continue
        if item in _RESULTS:
            raise ValueError(f"start={start!r} ends the game with a result ({item}): no move can follow")
        try:
            board.push_san(item)
        except ValueError:
            raise ValueError(f"start={start!r}: {item!r} is not a legal move in the position "
                             f"{board.fen()!r}") from None
        last_end = m.end()
    if last_end is None:
        due, trailing = f"{board.fullmove_number}. ", text
    else:
        due, trailing = (f" {board.fullmove_number}. " if board.turn == chess.WHITE else " "), text[last_end:]
    if not due.startswith(trailing):
        raise ValueError(f"start={start!r} ends with {trailing!r}, which does not begin {due!r} (the text "
                         "python-chess writes before the next move)")
    return board, due[len(trailing):]


def chess_mask(lm, start: str = "", min_moves: int = 1, max_moves: int | None = None,
               free_tail: bool = False) -> ChessMask:
    """Token mask: the decoded text continues the game of ``start`` with legal chess moves.

    The text is movetext as python-chess writes it (``"1. e4 e5 2. Nf3"``; SAN with its check,
    mate and promotion marks) and is complete after at least ``min_moves`` legal half-moves, or
    when the game is over. SMC then proposes only tokens that keep the text on a legal path.

    Args:
        start: ``""`` (the initial position), a FEN, or PGN movetext from the initial position
            (header lines allowed), e.g. ``"1. e4 e5 2. Nf3 Nc6 3."``: the text goes on from it
            (here ``" Bb5 a6 4. Ba4"``).
        min_moves: half-moves before the text may end (EOS).
        max_moves: no move after this many half-moves (``None``: no limit).
        free_tail: once ``min_moves`` half-moves are made, whitespace and then any text may
            follow the last move (the game only has to *begin* the text).

    Raises:
        ValueError: bad bounds, an illegal move in ``start``, or a finished game.

    >>> import torch, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(5), torch.zeros(5, 5), eos_id=0,
    ...                      token_strings=["", " Rh8#", " Rh2", " Kb8", "1."])
    >>> mask = ppl_lm.rewards.chess_mask(lm, "k7/8/1K6/8/8/8/8/7R w - - 0 1", min_moves=2)
    >>> mask.check(torch.tensor([[4, 1, 0], [4, 2, 0], [4, 2, 3]])).tolist()  # mate ends the game
    [True, False, True]
    """
    return ChessMask(lm, start, min_moves, max_moves, free_tail)
