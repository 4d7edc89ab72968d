"""A legal chess game: the LM continues a game given in PGN, and every move must be legal.

The prompt is a PGN header and an opening ("1. e4 e5 2. Nf3 Nc6 3."); the condition reads
the movetext of the prompt followed by the generated text, and asks python-chess that the
game go on for at least ``min_moves`` more legal half-moves:
π(x | c) ∝ π(x | prompt)·1[opening + x has ≥ n_opening + min_moves legal half-moves].
Hard: a small LM soon writes an illegal move (SmolLM2-135M adds a legal move to this
opening about one time in four), so each extra half-move makes the condition rarer.

``mode="prefix"`` states the same condition so that SMC can act on it as the
text grows: (1) a PGN movetext grammar mask (``rewards.regex_mask`` of :func:`movetext`: the
text starts with ``min_moves`` SAN moves, move numbers optional, one space apart; anything may
follow them after whitespace) makes SMC propose only tokens that keep that shape; (2) the
legality of each of those moves, once *finished* (whitespace follows it, or the text ends), is a
prefix-closed constraint, so a particle dies as soon as the token completing an illegal move is
drawn, instead of at the end; (3) that ``min_moves`` legal half-moves were made is checked on
the finished text. It differs from the deferred condition only in asking for single spaces
between the first ``min_moves`` moves.

``mode="legal_mask"`` (the default: no run died in ``benchmarks/RESULTS.md`` §12, where the prefix
mode's runs die from min_moves = 8 on) puts legality inside the proposal: a token mask
(``rewards.chess_mask``) carries each particle's board and allows only tokens that keep the text
on a legal path (python-chess's movetext: move numbers, SAN with its check and promotion marks,
one space apart), so no particle dies of an illegal move; once ``min_moves`` half-moves are made,
whitespace and then anything may follow (``free_tail``), as in the prefix mode. The moves must
be written as python-chess writes them (its SAN, with "x", "+" and the right move numbers), which
the other modes do not ask (their python-chess reading is lenient), so its Z is at most theirs.
Without "1." in the prompt, the generated text must begin the game ("1. e4 ...").

``mode="hard"`` is the deferred version (the count, read by python-chess up to the first
illegal move, checked only on the finished text; SMC cannot prune on it).
``mode="soft"`` rewards the number of new legal half-moves instead (capped at ``min_moves``):
π(x)·exp(n(x)/β), a graded reward that also makes a smoke run on a random LM possible.
A prompt without "1." makes the condition read the generated text alone.

:func:`check` is python-chess's verdict on one sampled text ("legal: 9 half-moves (to 7. Nc3),
then text ..." or "... then ILLEGAL 5. Bxd4 ..."): ``ppl-lm run chess_game`` prints it under each
top sample.
"""

import re
import sys

import pyro
import torch

import ppl_lm
from ppl_lm import rewards

description = "The game in the prompt continues with legal moves (python-chess; hard, mode='soft' counts them)."
context = '[Event "Casual game"]\n[Result "1-0"]\n\n1. e4 e5 2. Nf3 Nc6 3.'
methods = {"smc": {"num_particles": 128}, "importance": {"num_samples": 512}}


# One SAN move (castling, piece moves, pawn moves and promotions, check marks) and a move number.
SAN = r"(O-O(-O)?|[KQRBN][a-h]?[1-8]?x?[a-h][1-8]|[a-h](x[a-h])?[1-8](=[QRBN])?)[+#]?"
NUM = r"[1-9][0-9]*\.(\.\.)?"
RESULTS = ("1-0", "0-1", "1/2-1/2", "*")
MODES = ("prefix", "legal_mask", "hard", "soft")


def movetext(min_moves: int) -> str:
    """Regex of a text starting with ``min_moves`` SAN moves (move numbers optional, one space
    apart, an optional leading space); after the last of them, whitespace and then anything."""
    move = rf"({NUM} )?{SAN}"
    return rf" ?({move} ){{{min_moves - 1}}}{move}(\s[\s\S]*)?"


def legal_prefix(text: str, complete: bool, limit: int | None = None) -> tuple[bool, int]:
    """Whether the finished moves of the movetext ``text`` are legal, and how many half-moves it has.

    A move is finished when whitespace follows it or, if ``complete``, at the end of the text; an
    unfinished last move may still grow ("Nf" -> "Nf3") and is not judged. Move numbers are
    skipped; a result ends the game. With ``limit``, only the first ``limit`` half-moves are
    judged (what follows them is free).
    """
    import chess

    items = text.split()
    if not complete and text and not text[-1].isspace():
        items = items[:-1]
    board = chess.Board()
    n = 0
    for item in items:
        if limit is not None and n >= limit:
            break
        item = re.sub(r"^\d+\.(\.\.)?", "", item)  # "3.Bb5" -> "Bb5"
        if not item:
            continue
        if item in RESULTS:
            break
        try:
            board.push_san(item)
        except ValueError:
            return False, n
        n += 1
    return True, n


def check(text: str, prompt: str = context) -> str:
    """python-chess's one-line verdict on the game that ``text`` continues from ``prompt``.

    The prompt's movetext (from its "1.", if any) is replayed, then the items of ``text`` one by
    one (move numbers skipped, "3.Bb5" read as "Bb5"): how many new legal half-moves it makes and
    what ends them: an ILLEGAL move (a SAN-shaped item python-chess cannot play in the position),
    the game being over (checkmate, stalemate, fivefold repetition...), a result, other text, or
    the end of the text. (Whether the legal ones are enough is the condition's business: after
    ``min_moves`` of them, the legal-mask mode lets any text follow a space, even an illegal move.)
    ``ppl-lm run chess_game`` prints the verdict beside each top sample.

    >>> check(" Bb5 a6 4. Ba4 Nf6 and so on")
    "legal: 4 half-moves (to 4... Nf6), then text 'and so on'"
    >>> check(" Bb5 a6 4. Bxd4 Nf6")
    'legal: 2 half-moves (to 3... a6), then ILLEGAL 4. Bxd4 (illegal in the position)'
    """
    import chess

    m = re.search(r"(?<![\w.])1\.", prompt)
    board = chess.Board()
    for item in prompt[m.start():].split() if m else ():
        move = _move(item)
        try:
            if move:
                board.push_san(move)
        except ValueError:
            return f"the prompt's opening is not a legal game at {item!r}"
    items, n, last = text.split(), 0, ""
    for i, item in enumerate(items):
        if board.is_game_over():
            break
        move = _move(item)
        if move is None:
            continue
        if move in RESULTS or not re.fullmatch(SAN, move):
            return _verdict(n, last, f"the result {move}" if move in RESULTS else f"text {_quote(items[i:])}")
        number = f"{board.fullmove_number}{'.' if board.turn == chess.WHITE else '...'} {move}"
        try:
            board.push_san(move)
        except ValueError as err:
            why = "ambiguous" if isinstance(err, chess.AmbiguousMoveError) else "illegal in the position"
            return _verdict(n, last, f"ILLEGAL {number} ({why})") if n else f"ILLEGAL first move {number} ({why})"
        n, last = n + 1, number
    else:
        i = len(items)
    if board.is_game_over():
        end = board.outcome().termination.name.lower().replace("_", " ")
        return _verdict(n, last, f"game over ({end})" + (f", then {_quote(items[i:])}" if items[i:] else ""))
    return _verdict(n, last, "")


def _move(item: str) -> str | None:
    """The move of a movetext item ("3.Bb5" -> "Bb5"), or None for a bare move number."""
    return None if re.fullmatch(NUM, item) else re.sub(rf"^{NUM}", "", item)


def _quote(items: list[str], n: int = 40) -> str:
    text = " ".join(items)
    return repr(text if len(text) <= n else text[:n] + "…")


def _verdict(n: int, last: str, then: str) -> str:
    return f"legal: {n} half-moves" + (f" (to {last})" if n else "") + (f", then {then}" if then else "")


@rewards.text_reward
def _legal_so_far(text: str, partial: bool, limit: int) -> bool:
    return legal_prefix(text, complete=not partial, limit=limit)[0]


@rewards.text_reward
def _half_moves(text: str, limit: int) -> float:
    return float(legal_prefix(text, complete=True, limit=limit)[1])


def build(lm, min_moves: int = 2, mode: str = "legal_mask", beta: float = 0.5, max_new_tokens: int = 24):
    """The prompted LM conditioned on continuing the game with ``min_moves`` legal half-moves.

    Args:
        mode: ``"legal_mask"`` (legality inside the token mask), ``"prefix"`` (movetext mask +
            legality as a prefix-closed constraint), ``"hard"``
            (the deferred constraint) or ``"soft"`` (reward = new legal half-moves, capped at
            ``min_moves``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(min_moves, int) or min_moves < 1:
        raise ValueError(f"min_moves must be a positive integer, got {min_moves!r}")

    mask = rewards.regex_mask(lm, movetext(min_moves)) if mode == "prefix" else None  # built once
    legal_masks: dict[str, ppl_lm.TokenMask] = {}  # per opening: a mask keeps its caches across runs

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        # The movetext is the prompt's (from its "1.", if any) followed by the generated text.
        m = re.search(r"(?<![\w.])1\.", prompt)
        if mode == "legal_mask":
            start = prompt[m.start():] if m else ""
            if start not in legal_masks:
                legal_masks[start] = rewards.chess_mask(lm, start, min_moves, free_tail=True)
            ppl_lm.token_constraint("legal_game", x, legal_masks[start])
            return x
        opening = torch.tensor(lm.encode(prompt[m.start():]) if m else [], dtype=torch.long, device=x.device)
        n0 = int(rewards.chess_moves(lm, opening[None])[0]) if m else 0
        game = torch.cat([opening.expand(*x.shape[:-1], -1), x], -1)
        if mode == "prefix":
            ppl_lm.token_constraint("movetext", x, mask)
            # The prompt's movetext ends with a move number ("3."): the opening is read with it.
            k = n0 + min_moves
            ppl_lm.constraint("legal_so_far", _legal_so_far(lm, game, ppl_lm.is_partial(), k), prefix_closed=True)
            ppl_lm.constraint("legal_game", _half_moves(lm, game, k) >= k)
        elif mode == "hard":
            ppl_lm.constraint("legal_game", rewards.chess_game(lm, game, n0 + min_moves))
        else:
            n = torch.clamp(rewards.chess_moves(lm, game) - n0, 0, min_moves)
            ppl_lm.reward("legal_moves", n, beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
