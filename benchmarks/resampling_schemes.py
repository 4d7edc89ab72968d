"""Which resampling scheme gives SMC the lowest-variance log Ẑ? Every scheme on the conformance problems.

SMC (``method="smc"``) with each scheme of ``ppl_lm.resampling.SCHEMES`` on every toy problem of
``tests/toys.py`` (both toy LMs), whose exact log Z comes from enumeration (``method="exact"``).
Each (problem, LM, scheme) cell is ``--seeds`` runs of ``--replicates`` independent replicates
(``num_replicates``: independent SMC runs batched together) of ``--particles`` particles, so
it holds seeds × replicates independent log Ẑ. The script prints, per cell, the bias
E[log Ẑ] − log Z and the variance Var(log Ẑ) over the live replicates, each with its standard
error (the variance's from the fourth moment); the variance as a ratio to multinomial (today's
default) and the z-score of the difference paired by replicate (same seed and index: the same
draws up to the first resampling); E[Ẑ/Z] over every replicate (dead ones, Ẑ = 0, included: it
must be 1, SMC's Ẑ being unbiased whatever the scheme); the genealogy standard error of the
pooled log Ẑ (Lee–Whiteley: exact for multinomial, an approximation otherwise) as a ratio to the
one from the replicates' spread ("se gen.", mean over seeds; 1 is calibrated); the number of
resampling events per replicate and of dead replicates.

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


def log_z_errors(model, args, exact_log_z: float, scheme: str, opts: dict) -> tuple[torch.Tensor, float, float, float]:
    """log Ẑ − log Z of every replicate of the cell (−inf where a replicate died), the mean number of
    resampling events per replicate, the mean ratio of the genealogy standard error of the pooled
    log Ẑ (Lee–Whiteley, per replicate) to the one from the replicates' spread, and the wall time."""
    import ppl_lm

    logs, resamplings, se_ratio, t0 = [], [], [], time.perf_counter()
    for seed in range(opts["seeds"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post = ppl_lm.infer(model, *args, method="smc", seed=seed, progress=False, resampling=scheme,
                                num_particles=opts["particles"], num_replicates=opts["replicates"],
                                ess_threshold=opts["ess_threshold"])
        logs.append(torch.tensor(post.info.log_evidence_replicates, dtype=torch.float64))
        resamplings.append(torch.tensor(post.info.num_resampling, dtype=torch.float64))
        se_ratio.append(post.info.log_evidence_se_genealogy / post.log_evidence_se)
    return (torch.cat(logs) - exact_log_z, float(torch.cat(resamplings).mean()), sum(se_ratio) / len(se_ratio),
            time.perf_counter() - t0)


def stats(x: torch.Tensor, base: torch.Tensor) -> dict:
    """Bias and variance of log Ẑ (live replicates) with standard errors (the variance's from the
    fourth moment); mean and variance of Ẑ/Z over every replicate (dead ones give 0); and the
    variance difference to ``base`` (multinomial) paired by replicate: the same seed and replicate
    index share every draw up to the first resampling, so the pairing removes most of the noise."""
    live = torch.isfinite(x)
    y = x[live]
    n = len(y)
    d = y - y.mean()
    var = float((d**2).sum()) / (n - 1)
    var_se = math.sqrt(max(float((d**4).mean()) - var**2 * (n - 3) / (n - 1), 0.0) / n)
    z = torch.exp(x)  # Ẑ / Z, 0 for a dead replicate
    both = live & torch.isfinite(base)
    a, b = x[both], base[both]
    diff = (a - a.mean()) ** 2 - (b - b.mean()) ** 2
    return {"bias": float(y.mean()), "bias_se": math.sqrt(var / n), "var": var, "var_se": var_se, "n": n,
            "dead": int((~live).sum()), "z_mean": float(z.mean()), "z_mean_se": float(z.std()) / math.sqrt(len(z)),
            "z_var": float(z.var()), "dvar": float(diff.mean()),
            "dvar_se": float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")}


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
    print(f"{'problem':16s} {'lm':11s} {'scheme':11s} {'bias of log Ẑ':>17s} {'Var(log Ẑ)':>17s} {'/multi':>6s} "
          f"{'paired z':>8s} {'E[Ẑ/Z]':>15s} {'se gen.':>7s} {'resampl.':>8s} {'dead':>4s} {'s':>5s}")
    rows, ratios = [], {s: [] for s in SCHEMES}
    for lm_name in a.lms or list(LMS):
        for name in a.problems or list(PROBLEMS):
            model, args = PROBLEMS[name](LMS[lm_name]())
            exact = ppl_lm.infer(model, *args, method="exact")
            base = None
            for scheme in SCHEMES:
                x, resamplings, se_ratio, seconds = log_z_errors(model, args, exact.log_evidence, scheme, opts)
                base = x if base is None else base
                r = stats(x, base)
                ratio = r["var"] / float(base[torch.isfinite(base)].var())
                zscore = r["dvar"] / r["dvar_se"] if r["dvar_se"] > 0 else 0.0
                if resamplings > 0:  # without resampling every scheme gives the same draws
                    ratios[scheme].append(ratio)
                rows.append({"problem": name, "lm": lm_name, "scheme": scheme, "ratio_to_multinomial": ratio,
                             "paired_z": zscore, "resamplings": resamplings, "se_genealogy_ratio": se_ratio,
                             "seconds": seconds, **r})
                print(f"{name:16s} {lm_name:11s} {scheme:11s} {r['bias']:+8.4f} ± {r['bias_se']:.4f} "
                      f"{r['var']:8.5f} ± {r['var_se']:.5f} {ratio:6.3f} {zscore:+8.1f} "
                      f"{r['z_mean']:6.3f} ± {r['z_mean_se']:.3f} {se_ratio:7.3f} {resamplings:8.2f} {r['dead']:4d} "
                      f"{seconds:5.1f}",
                      flush=True)
    print("\ngeometric mean of Var(log Ẑ) / Var_multinomial over the cells that resample:")
    summary = {}
    for scheme, rs in ratios.items():
        summary[scheme] = math.exp(sum(math.log(x) for x in rs) / len(rs)) if rs else float("nan")
        print(f"  {scheme:11s} {summary[scheme]:.3f}" + (f"  (range {min(rs):.3f}-{max(rs):.3f}, {len(rs)} cells)"
                                                         if rs else ""))
    _bench.emit("resampling_schemes", {"options": opts, "rows": rows, "geometric_mean_ratio": summary})


if __name__ == "__main__":
    main()
