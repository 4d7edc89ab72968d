"""A legal chess game: the LM continues a game given in PGN, and every move must be legal.

The prompt is a PGN header and an opening ("1. e4 e5 2. Nf3 Nc6 3."); the condition reads
the movetext of the prompt followed by the generated text, and asks python-chess that the
game go on for at least ``min_moves`` more legal half-moves:
π(x | c) ∝ π(x | prompt)·1[opening + x has ≥ n_opening + min_moves legal half-moves].
Hard: a small LM soon writes an illegal move (SmolLM2-135M adds a legal move to this
opening about one time in four), so each extra half-move makes the condition rarer. Not
prefix-closed as written (a prefix may still be completed legally), so SMC defers it to the
end. A prompt without "1." makes the condition read the generated text alone.

``mode="soft"`` rewards the number of new legal half-moves instead (capped at ``min_moves``):
π(x)·exp(n(x)/β), a graded reward that also makes a smoke run on a random LM possible.
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


def build(lm, min_moves: int = 2, mode: str = "hard", beta: float = 0.5, max_new_tokens: int = 24):
    """The prompted LM conditioned on continuing the game with ``min_moves`` legal half-moves.

    Args:
        mode: ``"hard"`` (constraint) or ``"soft"`` (reward = new legal half-moves, capped at
            ``min_moves``).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
    if not isinstance(min_moves, int) or min_moves < 1:
        raise ValueError(f"min_moves must be a positive integer, got {min_moves!r}")

    def model(prompt: str):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=max_new_tokens))
        # The movetext is the prompt's (from its "1.", if any) followed by the generated text.
        m = re.search(r"(?<![\w.])1\.", prompt)
        opening = torch.tensor(lm.encode(prompt[m.start():]) if m else [], dtype=torch.long, device=x.device)
        n0 = int(rewards.chess_moves(lm, opening[None])[0]) if m else 0
        game = torch.cat([opening.expand(*x.shape[:-1], -1), x], -1)
        if mode == "hard":
            ppl_lm.constraint("legal_game", rewards.chess_game(lm, game, n0 + min_moves))
        else:
            n = torch.clamp(rewards.chess_moves(lm, game) - n0, 0, min_moves)
            ppl_lm.reward("legal_moves", n, beta=beta)
        return x

    return model


if __name__ == "__main__":
    from ppl_lm.cli import main

    main(["run", __file__, *sys.argv[1:]])
