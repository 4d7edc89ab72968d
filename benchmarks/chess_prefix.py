"""Chess as a prefix potential vs the deferred condition, SMC on SmolLM2.

``models/chess_game.py``: continue "1. e4 e5 2. Nf3 Nc6 3." with at least ``min_moves`` new legal
half-moves. ``mode="hard"`` checks the count on the finished text only (SMC cannot prune on it:
particles die at the end); ``mode="prefix"`` adds a PGN movetext grammar mask (proposal) and the
legality of every finished move as a prefix-closed constraint (particles die as soon as an
illegal move completes, and are replaced by resampling). Both target π(x | c) for their own
condition (the prefix version also asks the whole text to be legal movetext, not only up to the
first illegal move), so log Z differs by design; the point is ESS, survival and time.

For each min_moves in {2, 4, 8} (``max_new_tokens = 12 + 4·min_moves``) and each seed, both modes
run interleaved; the script prints per mode: median time, log Z (mean over seeds where finite,
and how many runs had every particle die), Kish ESS of the final weights, SMC's n_eff, and the
fraction of final particles alive.

    python benchmarks/chess_prefix.py --threads 1
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


def run(lm, mode, min_moves, N, seed):
    from ppl_lm.models import chess_game

    import ppl_lm

    T = 12 + 4 * min_moves
    model = chess_game.build(lm, min_moves=min_moves, mode=mode, max_new_tokens=T)
    t0 = time.perf_counter()
    try:
        post = ppl_lm.infer(model, chess_game.context, method="smc", num_particles=N, seed=seed, progress=False)
    except ValueError as err:
        if "every particle died" not in str(err):
            raise
        return {"time": time.perf_counter() - t0, "log_z": -math.inf, "ess": 0.0, "n_eff": 0.0, "alive": 0.0,
                "example": None}
    alive = torch.isfinite(post.log_weights)
    return {"time": time.perf_counter() - t0, "log_z": float(post.log_evidence), "ess": float(post.ess),
            "n_eff": float(post.info["n_eff"]), "alive": float(alive.float().mean()),
            "example": post.texts[int(torch.argmax(post.log_weights))]}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=None, help="N (default 32)")
    p.add_argument("--min-moves", type=int, nargs="+", default=None, help="default 2 4 8")
    p.add_argument("--seeds", type=int, default=None, help="default 2")
    args = p.parse_args(argv)
    _bench.setup(args)
    N = args.particles or (4 if args.smoke else 32)
    moves = args.min_moves or ([1] if args.smoke else [2, 4, 8])
    seeds = args.seeds or (1 if args.smoke else 2)
    lm = _bench.smollm2(args)
    rows = []
    for k in moves:
        res = {"hard": [], "prefix": []}
        for i in range(seeds):
            for mode in (("hard", "prefix") if i % 2 == 0 else ("prefix", "hard")):
                res[mode].append(run(lm, mode, k, N, args.seed + i))
        for mode, rs in res.items():
            fin = [r["log_z"] for r in rs if math.isfinite(r["log_z"])]
            row = {"min_moves": k, "mode": mode, "N": N, "T": 12 + 4 * k, "runs": rs,
                   "median_s": _bench.median([r["time"] for r in rs]),
                   "log_z_mean": statistics.fmean(fin) if fin else -math.inf,
                   "dead_runs": len(rs) - len(fin),
                   "ess_mean": statistics.fmean(r["ess"] for r in rs),
                   "n_eff_mean": statistics.fmean(r["n_eff"] for r in rs),
                   "alive_mean": statistics.fmean(r["alive"] for r in rs)}
            print(f"min_moves={k} {mode:6s} N={N} T={row['T']}: {row['median_s']:.1f}s  log Z {row['log_z_mean']:.2f} "
                  f"({row['dead_runs']}/{len(rs)} runs all dead)  ESS {row['ess_mean']:.1f}  n_eff "
                  f"{row['n_eff_mean']:.1f}  alive {row['alive_mean']:.0%}  e.g. {rs[0]['example']!r}", flush=True)
            rows.append(row)
    _bench.emit("chess_prefix", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
