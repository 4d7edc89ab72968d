"""Chess as a prefix potential vs the deferred condition, SMC on SmolLM2.

``models/chess_game.py``: continue "1. e4 e5 2. Nf3 Nc6 3." with at least ``min_moves`` new legal
half-moves. ``mode="hard"`` checks the count on the finished text only (SMC cannot prune on it:
particles die at the end); ``mode="prefix"`` adds a PGN movetext grammar mask (proposal) and the
legality of every finished move as a prefix-closed constraint (particles die as soon as an
illegal move completes, and are replaced by resampling). Both target π(x | c) for their own
condition (the prefix version also asks the whole text to be legal movetext, not only up to the
first illegal move), so log Z differs by design; the point is ESS, survival and time.

``mode="legal_mask"`` (``--modes``) puts legality inside the token mask (``rewards.chess_mask``:
only tokens on a legal path are proposed, so no particle dies of an illegal move).

For each min_moves in {2, 4, 8} (``max_new_tokens = 12 + 4·min_moves``, or ``--tokens-per-move``)
and each seed, the modes run interleaved, with plain batched sampling of the same N × T tokens
(``lm.sample``); the script prints per mode: median time, log Z ± se (mean over seeds where
finite, and how many runs had every particle die), Kish ESS of the final weights, SMC's n_eff,
the fraction of final particles alive, the token masks' cost per particle-token (their
``allowed`` / ``advance`` / ``check``), and the most probable game, replayed by python-chess.

    python benchmarks/chess_prefix.py --threads 1                     # section 10: hard vs prefix
    python benchmarks/chess_prefix.py --threads 1 --modes prefix legal_mask --particles 64 --min-moves 4 8
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

MASK_TIME = {"s": 0.0}  # seconds spent in token-mask methods (allowed, advance, check)


def _time_masks():
    """Wrap the token masks' per-step methods with a timer (once per process)."""
    from ppl_lm.conditions.grammar import GrammarMask, GrammarState
    from ppl_lm.conditions.legal_moves import ChessMask, ChessState

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                MASK_TIME["s"] += time.perf_counter() - t0
        return wrapper

    for cls, names in ((GrammarState, ("allowed", "advance")), (ChessState, ("allowed", "advance")),
                       (GrammarMask, ("check",)), (ChessMask, ("check",))):
        for name in names:
            setattr(cls, name, timed(getattr(cls, name)))


def _replayed(chess_game, text: str, k: int) -> bool:
    """python-chess replays ``k`` legal half-moves of ``text``, or fewer that end the game (mate,
    fivefold repetition...)."""
    import chess

    n = chess_game.legal_prefix(text, True, k)[1]  # legal half-moves before the first illegal item
    if n >= k:
        return True
    board = chess.Board()
    for item in text.split():
        item = chess_game.re.sub(r"^\d+\.(\.\.)?", "", item)
        if not item or len(board.move_stack) == n:
            continue
        board.push_san(item)
    return board.is_game_over()


def run(lm, mode, min_moves, N, seed, T):
    from ppl_lm.models import chess_game

    import ppl_lm

    model = chess_game.build(lm, min_moves=min_moves, mode=mode, max_new_tokens=T)
    MASK_TIME["s"] = 0.0
    t0 = time.perf_counter()
    try:
        post = ppl_lm.infer(model, chess_game.context, method="smc", num_particles=N, seed=seed, progress=False)
    except ValueError as err:
        if "every particle died" not in str(err):
            raise
        return {"time": time.perf_counter() - t0, "log_z": -math.inf, "se": math.nan, "ess": 0.0, "n_eff": 0.0,
                "alive": 0.0, "example": None, "legal": None, "mask_us_per_token": math.nan}
    elapsed = time.perf_counter() - t0
    alive = torch.isfinite(post.log_weights)
    opening = chess_game.context[chess_game.context.index("1."):]
    n0 = 4  # the opening's half-moves
    legal = [_replayed(chess_game, opening + s, n0 + min_moves) for s, a in zip(post.texts, alive) if a]
    return {"time": elapsed, "log_z": float(post.log_evidence), "se": float(post.log_evidence_se or math.nan),
            "ess": float(post.ess), "n_eff": float(post.info.n_eff_genealogy), "alive": float(alive.float().mean()),
            "example": post.texts[int(torch.argmax(post.log_weights))],
            "legal": sum(legal) / max(len(legal), 1),
            "mask_us_per_token": 1e6 * MASK_TIME["s"] / (N * post.info.num_steps)}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=None, help="N (default 32)")
    p.add_argument("--min-moves", type=int, nargs="+", default=None, help="default 2 4 8")
    p.add_argument("--seeds", type=int, default=None, help="default 2")
    p.add_argument("--modes", nargs="+", default=["hard", "prefix"], help="chess_game modes (default hard prefix)")
    p.add_argument("--tokens-per-move", type=int, default=4, help="max_new_tokens = 12 + this * min_moves")
    args = p.parse_args(argv)
    _bench.setup(args)
    _time_masks()
    N = args.particles or (4 if args.smoke else 32)
    moves = args.min_moves or ([1] if args.smoke else [2, 4, 8])
    seeds = args.seeds or (1 if args.smoke else 2)
    lm = _bench.smollm2(args)
    from ppl_lm.models import chess_game

    prompt = lm.encode(chess_game.context)
    rows = []
    for k in moves:
        T = 12 + args.tokens_per_move * k
        res = {mode: [] for mode in args.modes}
        plain = []
        for i in range(seeds):
            order = [*args.modes, "plain"]
            for mode in (order if i % 2 == 0 else order[::-1]):
                if mode == "plain":
                    g = torch.Generator().manual_seed(args.seed + i)
                    t0 = time.perf_counter()
                    lm.sample(prompt, N, T, generator=g)
                    plain.append(time.perf_counter() - t0)
                else:
                    res[mode].append(run(lm, mode, k, N, args.seed + i, T))
        plain_s = _bench.median(plain)
        print(f"min_moves={k} plain sampling of N={N} x T={T} tokens: {plain_s:.1f}s", flush=True)
        for mode, rs in res.items():
            fin = [r for r in rs if math.isfinite(r["log_z"])]
            row = {"min_moves": k, "mode": mode, "N": N, "T": T, "runs": rs, "plain_s": plain_s,
                   "median_s": _bench.median([r["time"] for r in rs]),
                   "log_z_mean": statistics.fmean(r["log_z"] for r in fin) if fin else -math.inf,
                   "se_mean": statistics.fmean(r["se"] for r in fin) if fin else math.nan,
                   "dead_runs": len(rs) - len(fin),
                   "ess_mean": statistics.fmean(r["ess"] for r in rs),
                   "n_eff_mean": statistics.fmean(r["n_eff"] for r in rs),
                   "alive_mean": statistics.fmean(r["alive"] for r in rs),
                   "mask_us_per_token": statistics.fmean(r["mask_us_per_token"] for r in fin) if fin else math.nan}
            print(f"min_moves={k} {mode:10s} N={N} T={T}: {row['median_s']:.1f}s ({row['median_s'] / plain_s:.1f}x "
                  f"plain)  log Z {row['log_z_mean']:.2f} ± {row['se_mean']:.2f} (runs: "
                  f"{[round(r['log_z'], 2) for r in rs]}; {row['dead_runs']}/{len(rs)} all dead)  ESS "
                  f"{row['ess_mean']:.1f}  n_eff {row['n_eff_mean']:.1f}  alive {row['alive_mean']:.0%}  mask "
                  f"{row['mask_us_per_token']:.0f} us/token  legal (python-chess) {[r['legal'] for r in rs]}", flush=True)
            for r in rs:
                print(f"    seed game: {r['example']!r}", flush=True)
            rows.append(row)
    _bench.emit("chess_prefix", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
