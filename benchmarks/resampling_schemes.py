"""Which resampling scheme gives SMC the lowest-variance log Ẑ? Every scheme on the conformance problems.

SMC (``method="smc"``) with each scheme of ``ppl_lm.resampling.SCHEMES`` on every toy problem of
``tests/toys.py`` (both toy LMs), whose exact log Z comes from enumeration (``method="exact"``).
Each (problem, LM, scheme) cell is ``--seeds`` runs of ``--replicates`` independent replicates
(``num_replicates``: independent SMC runs batched together) of ``--particles`` particles, so
it holds seeds × replicates independent log Ẑ. The script prints, per cell, the bias
E[log Ẑ] − log Z and the variance Var(log Ẑ), each with its standard error (the variance's from
the fourth moment), the variance as a ratio to multinomial (today's default), and the number of
resampling events per replicate. Rows with a dead replicate (Ẑ = 0) report how many.

    python benchmarks/resampling_schemes.py                       # N = 32, 8 seeds x 500 replicates
    python benchmarks/resampling_schemes.py --ess-threshold 1.0   # resample at every step
    python benchmarks/resampling_schemes.py --smoke
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import _bench  # noqa: E402


def moments(x: torch.Tensor) -> dict:
    """Mean and variance of independent draws ``x`` with their standard errors."""
    n = len(x)
    m = float(x.mean())
    d = x - m
    var = float((d**2).sum()) / (n - 1)
    m4 = float((d**4).mean())
    var_se = math.sqrt(max(m4 - var**2 * (n - 3) / (n - 1), 0.0) / n)
    return {"bias": m, "bias_se": math.sqrt(var / n), "var": var, "var_se": var_se, "n": n}


def cell(model, args, exact_log_z: float, scheme: str, opts: dict) -> dict:
    import ppl_lm

    logs, resamplings, t0 = [], [], time.perf_counter()
    for seed in range(opts["seeds"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = ppl_lm.infer(model, *args, method="smc", seed=seed, progress=False, resampling=scheme,
                                num_particles=opts["particles"], num_replicates=opts["replicates"],
                                ess_threshold=opts["ess_threshold"])
        logs.append(torch.tensor(post.info.log_evidence_replicates, dtype=torch.float64))
        resamplings.append(torch.tensor(post.info.num_resampling, dtype=torch.float64))
    x = torch.cat(logs)
    dead = int((~torch.isfinite(x)).sum())
    out = moments(x[torch.isfinite(x)] - exact_log_z)
    out.update(dead=dead, resamplings=float(torch.cat(resamplings).mean()), seconds=time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--replicates", type=int, default=500, help="independent replicates per run")
    p.add_argument("--seeds", type=int, default=8, help="runs per cell (seeds 0, 1, ...)")
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--problems", nargs="+", default=None, help="names from tests/toys.py PROBLEMS (default: all)")
    p.add_argument("--lms", nargs="+", default=None, help="markov, transformer (default: both)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that the script runs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.smoke:
        a.particles, a.replicates, a.seeds = 8, 20, 2
        a.problems, a.lms = a.problems or ["soft_reward"], a.lms or ["markov"]

    import ppl_lm
    from ppl_lm.resampling import SCHEMES
    from toys import LMS, PROBLEMS

    opts = {"particles": a.particles, "replicates": a.replicates, "seeds": a.seeds, "ess_threshold": a.ess_threshold}
    print(f"SMC log Ẑ by resampling scheme: N = {a.particles} particles, {a.seeds} seeds x {a.replicates} "
          f"replicates per cell, ess_threshold = {a.ess_threshold}")
    head = (f"{'problem':17s} {'lm':11s} {'scheme':11s} {'bias':>16s} {'Var(log Ẑ)':>18s} {'/multi':>6s} "
            f"{'resampl.':>8s} {'dead':>4s} {'s':>5s}")
    print(head)
    rows, ratios = [], {s: [] for s in SCHEMES}
    for lm_name in a.lms or list(LMS):
        for name in a.problems or list(PROBLEMS):
            model, args = PROBLEMS[name](LMS[lm_name]())
            exact = ppl_lm.infer(model, *args, method="exact")
            base = None
            for scheme in SCHEMES:
                r = cell(model, args, exact.log_evidence, scheme, opts)
                base = base or r
                ratio = r["var"] / base["var"] if base["var"] > 0 else float("nan")
                ratios[scheme].append(ratio)
                rows.append({"problem": name, "lm": lm_name, "scheme": scheme, "ratio_to_multinomial": ratio, **r})
                print(f"{name:17s} {lm_name:11s} {scheme:11s} {r['bias']:+8.4f} ± {r['bias_se']:.4f} "
                      f"{r['var']:9.5f} ± {r['var_se']:.5f} {ratio:6.2f} {r['resamplings']:8.2f} {r['dead']:4d} "
                      f"{r['seconds']:5.1f}", flush=True)
    print("\ngeometric mean of Var(log Ẑ) / Var_multinomial over the cells:")
    summary = {}
    for scheme, rs in ratios.items():
        good = [x for x in rs if x > 0 and math.isfinite(x)]
        summary[scheme] = math.exp(sum(math.log(x) for x in good) / len(good)) if good else float("nan")
        print(f"  {scheme:11s} {summary[scheme]:.3f}  (range {min(good):.2f}-{max(good):.2f})" if good else
              f"  {scheme:11s} -")
    _bench.emit("resampling_schemes", {"options": opts, "rows": rows, "geometric_mean_ratio": summary})


if __name__ == "__main__":
    main()
