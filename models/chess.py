"""A valid chess game: the continuation of a PGN header contains legal movetext.

π(x | c) ∝ π(x)·1[x contains a game of ≥ ``min_moves`` legal half-moves from the starting
position, written "1. e4 e5 2. Nf3 ..."] (python-chess checks each move). The prompt is a
PGN header, so the LM is invited to write movetext; the condition judges the generated text
only. Hard: small LMs soon play an illegal move, and the condition is not prefix-closed as
written (a prefix with no "1." yet may still start a game), so SMC defers it to the end.

``mode="soft"`` uses the number of legal half-moves instead: π(x)·exp(min(n(x), K)/β) with
K = ``min_moves``, a graded reward that also makes a smoke run on a random LM possible.
"""

import os
import sys

if __name__ == "__main__":  # run as a script: models/ must not shadow python-chess (`import chess`)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import pyro  # noqa: E402
import torch  # noqa: E402

import ppl_lm  # noqa: E402
from ppl_lm import rewards  # noqa: E402

description = "The text contains a legal chess game (python-chess), after a PGN header (hard; mode='soft' counts legal moves)."
context = '[Event "Casual game"]\n[White "Alice"]\n[Black "Bob"]\n[Result "1-0"]\n\n'
methods = {"smc": {"num_particles": 128}, "importance": {"num_samples": 512}}


def build(lm, min_moves: int = 4, mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 24):
    """The prompted LM conditioned on writing a legal game of at least ``min_moves`` half-moves.

    Args:
        mode: ``"hard"`` (constraint) or ``"soft"`` (reward = legal half-moves, capped at ``min_moves``).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    if not isinstance(min_moves, int) or min_moves < 1:
        raise ValueError(f"min_moves must be a positive integer, got {min_moves!r}")

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        if mode == "hard":
            ppl_lm.constraint("legal_game", rewards.chess_game(lm, x, min_moves))
        else:
            n = torch.clamp(rewards.chess_moves(lm, x), max=float(min_moves))
            ppl_lm.reward("legal_moves", n, beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
