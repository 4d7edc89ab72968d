"""Cost of the legal-move mask (``rewards.chess_mask``) per particle-token on SmolLM2's vocabulary.

64 random legal games of 20 half-moves after "1. e4 e5 2. Nf3 Nc6 3." (python-chess, seeded), each
encoded by SmolLM2's tokenizer, are stepped through one ``ChessState`` of 64 rows: the time of
``allowed`` (the ``[64, 49152]`` mask), ``advance`` and ``check`` (the whole prefix, as
``token_constraint`` calls it on a prefix), per row-token. ``cold``: a new mask, so every position
is new (legal moves and their SAN generated: the worst case, 64 distinct games); ``warm``: the
same mask again (positions and allowed sets cached, as for resampled particles).

    python benchmarks/chess_mask_cost.py --threads 1
"""

from __future__ import annotations

import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

OPENING = "1. e4 e5 2. Nf3 Nc6 3."


def random_games(n: int, plies: int, seed: int) -> list[str]:
    """``n`` random legal continuations of OPENING, as python-chess writes them."""
    import chess

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        board = chess.Board()
        for san in ("e4", "e5", "Nf3", "Nc6"):
            board.push_san(san)
        for _ in range(plies):
            moves = list(board.legal_moves)
            if not moves:
                break
            board.push(rng.choice(moves))
        out.append(chess.Board().variation_san(board.move_stack)[len(OPENING):])
    return out


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    _bench.setup(args)
    import ppl_lm

    lm = _bench.smollm2(args)
    n, plies = (4, 4) if args.smoke else (64, 20)
    games = random_games(n, plies, args.seed)
    ids = [lm.encode(s) for s in games]
    T = min(len(i) for i in ids)
    x = torch.tensor([i[:T] for i in ids])
    rows, mask = [], None
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        mask = ppl_lm.rewards.chess_mask(lm, OPENING, min_moves=plies) if mask is None else mask
        build = time.perf_counter() - t0
        state = mask.start(n)
        t_allowed = t_advance = 0.0
        for t in range(T):
            t0 = time.perf_counter()
            allowed = state.allowed(last=t == T - 1)
            t_allowed += time.perf_counter() - t0
            if t < T - 1 and not bool(allowed[torch.arange(n), x[:, t]].all()):
                raise AssertionError(f"a legal game's token was masked at position {t}")
            t0 = time.perf_counter()
            state.advance(x[:, t])
            t_advance += time.perf_counter() - t0
        t0 = time.perf_counter()
        ok = mask.check(x, complete=False)
        t_check = time.perf_counter() - t0
        per = 1e6 / (n * T)
        row = {"cache": label, "build_ms": 1e3 * build, "tokens": T, "rows": n, "allowed_us": t_allowed * per,
               "advance_us": t_advance * per, "check_us": t_check * per, "positions": mask.num_positions,
               "legal": bool(ok.all())}
        print(f"{label}: mask built in {row['build_ms']:.0f} ms; {T} tokens x {n} rows; per row-token: allowed "
              f"{row['allowed_us']:.0f} us, advance {row['advance_us']:.1f} us, check {row['check_us']:.1f} us; "
              f"positions generated {row['positions']}; every prefix legal: {row['legal']}", flush=True)
        rows.append(row)
    print(f"e.g. {games[0][:100]!r}")
    _bench.emit("chess_mask_cost", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
