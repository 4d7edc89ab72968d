"""The two-mode toy posterior: forward, reverse and mixture-taught SVI against exact answers.

Problem (issue 21, item 3): ``tests/toys.py``'s ``two_modes`` on the conformance Markov LM
(vocabulary 5, at most 4 tokens, 341 sequences): the reward pays λ = 4 for x_0 = x_2 ∈ {a, c}.
The ``full`` guide (one transition matrix per position) sees x_2 only through x_1, so none of
its guides is the posterior; its best for the forward KL is found by Adam on the enumerated
KL(π′‖q) (exact gradients).

Each run: ``method="svi"``, guide ``full``, the same steps, draws per step, lr 0.1 decaying
10x, then ``num_samples`` guide draws importance-weighted against the exact target (the run's
corrected posterior). Columns: training time and wall time; the exact KL(π′‖q) of the trained
guide and its exact ESS/N (1/Σ π′²/q); the ESS/N the run reports from its own draws; log Ẑ −
log Z (and the run's standard error); TV of the corrected posterior to the exact one, against
the expected TV of the same number of iid exact draws (E TV) and three times it (the tests'
bound, ``toys.tv_tolerance``).

    python benchmarks/svi_two_modes.py              # 1500 steps x 64 draws, seeds 0 1, about 10 minutes
    python benchmarks/svi_two_modes.py --smoke      # seconds
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import _bench

RUNS = (("reverse", "reverse", "guide"), ("forward", "forward", "guide"), ("mixture-taught", "forward", "mixture"))


def main():
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--particles", type=int, default=64)
    p.add_argument("--draws", type=int, default=2000, help="importance-weighted draws of the corrected posterior")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    _bench.setup(args)
    if args.smoke:
        args.steps, args.particles, args.draws, args.seeds = 10, 8, 100, [0]

    import ppl_lm
    from toys import (
        LMS, coverage, enumerated_log_posterior, enumerated_log_q, expected_tv, family_optimum, tv_distance,
        two_modes,
    )

    model, margs = two_modes(LMS["markov"]())
    exact = ppl_lm.infer(model, *margs, method="exact")
    log_post = enumerated_log_posterior(model, margs)
    kl_star, ess_star = family_optimum(model, margs, log_post, steps=20 if args.smoke else 600)
    e_tv = expected_tv(exact, args.draws)
    print(f"exact log Z {exact.log_evidence:.4f}; the family's best guide: KL(π′‖q) {kl_star:.4f}, ESS/N "
          f"{ess_star:.3f}; {args.draws} iid exact draws: E TV {e_tv:.4f}, bound (3x) {3 * e_tv:.4f}", flush=True)
    print("| run | seed | steps × draws | train s | wall s | KL(π′‖q) exact | ESS/N exact | ESS/N reported "
          "| log Ẑ − log Z (se) | TV | TV / E TV |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, objective, proposal in RUNS:
        for seed in args.seeds:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                post = ppl_lm.infer(model, *margs, method="svi", objective=objective, proposal=proposal,
                                    num_steps=args.steps, num_particles=args.particles, lr=0.1,
                                    num_samples=args.draws, progress=False, seed=seed, crosscheck_samples=0)
            wall = time.perf_counter() - t0
            with torch.no_grad():
                kl_fwd, ess = coverage(log_post, enumerated_log_q(model, margs, post.guide))
            tv = tv_distance(post, exact)
            row = dict(run=name, seed=seed, steps=args.steps, particles=args.particles,
                       train_seconds=post.info.train_time, wall_seconds=wall, kl_forward=kl_fwd, ess_exact=ess,
                       ess_reported=post.ess / len(post), log_z_error=post.log_evidence - exact.log_evidence,
                       log_z_se=post.log_evidence_se, tv=tv, expected_tv=e_tv,
                       warnings=[w.code for w in post.warnings])
            rows.append(row)
            print(f"| {name} | {seed} | {args.steps} × {args.particles} | {row['train_seconds']:.0f} | {wall:.0f} | "
                  f"{kl_fwd:.3f} | {ess:.3f} | {row['ess_reported']:.3f} | {row['log_z_error']:+.3f} "
                  f"({row['log_z_se']:.3f}) | {tv:.3f} | {tv / e_tv:.2f} |", flush=True)
    _bench.emit("svi_two_modes", {"args": vars(args), "log_z": exact.log_evidence, "kl_star": kl_star,
                                  "ess_star": ess_star, "rows": rows})


if __name__ == "__main__":
    main()
