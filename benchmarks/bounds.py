"""log Z from both sides: the lower bound (log Ẑ) and the upper bound from exact draws, against N.

Toy part (``--lm markov``): the six conformance problems (``tests/toys.py``, Markov LM). For each
N, prior importance sampling (``runs`` runs of N samples, each bounded above by conditional
importance sampling with 64 exact draws from enumeration) and SMC (``runs`` replicates of N
particles below, ``runs`` conditional SMC sweeps, one per exact draw, above). Printed: exact
log Z, the mean of each side over the runs with its standard error, and the gap.

SmolLM2 part (``--lm smollm2``): a hard pin of the first k tokens of a plausible continuation
at moderate prior probability p ≥ 0.1 (exact, from ``lm.score``), exact draws by rejection (prior
draws kept when they meet the pin), then SMC and conditional SMC at a few N.

    python benchmarks/bounds.py                  # toy problems
    python benchmarks/bounds.py --lm smollm2     # SmolLM2, one pin
    python benchmarks/bounds.py --smoke
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import _bench  # noqa: E402


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


def importance_sides(model, args, draws, n: int, runs: int):
    import ppl_lm
    from ppl_lm.inference.bounds import reference_log_weights

    lo, up = [], []
    for s in range(runs):
        try:
            post = ppl_lm.infer(model, *args, method="importance", num_samples=n, seed=s, progress=False)
        except ValueError:  # no sample met the condition: Ẑ = 0, and the upper side is log(w(x*) / (N + 1))
            lo.append(-math.inf)
            up.append(float((reference_log_weights(model, args, {}, draws.values, None) - math.log(n + 1)).mean()))
            continue
        b = ppl_lm.log_evidence_bounds(post, model, *args, exact=draws)
        lo.append(b.lower)
        up.append(b.upper)
    return torch.tensor(lo), torch.tensor(up)


def smc_sides(model, args, draws, n: int, seed: int = 0):
    import ppl_lm

    post = ppl_lm.infer(model, *args, method="smc", num_particles=n, num_replicates=len(draws), seed=seed,
                        progress=False)
    b = ppl_lm.log_evidence_bounds(post, model, *args, exact=draws, seed=seed + 1)
    return torch.tensor(post.info.log_evidence_replicates), torch.tensor(b.upper_replicates)


def row(label: str, n: int, log_z: float, lo: torch.Tensor, up: torch.Tensor, wall: float) -> dict:
    """One line of the table. A run with Ẑ = 0 (no sample met the condition, or every SMC particle
    died) has log Ẑ = −inf, so the lower side's mean is −inf: its count is printed instead."""
    dead = int((~torch.isfinite(lo)).sum())
    (ml, sl), (mu, su) = mean_se(lo), mean_se(up)
    if dead:
        low = f"lower -inf ({dead} of {len(lo)} runs Ẑ = 0)"
        verdict = "yes" if log_z <= mu + 2 * su else "NO"
    else:
        low = f"lower {ml:+.4f} ± {sl:.4f}"
        verdict = "yes" if ml - 2 * sl <= log_z <= mu + 2 * su else "NO"
    print(f"  {label:>10s} N={n:5d}  {low}  upper {mu:+.4f} ± {su:.4f}  gap {mu - ml:.4f}  bracket {verdict}  "
          f"{wall:.1f}s", flush=True)
    return {"method": label, "N": n, "log_z": log_z, "lower": ml, "lower_se": sl, "upper": mu, "upper_se": su,
            "gap": mu - ml, "dead_runs": dead, "wall_s": wall}


def toys(args) -> list[dict]:
    import ppl_lm
    from toys import PROBLEMS, markov_lm

    ns = [4, 16] if args.smoke else [4, 16, 64, 256]
    runs = 8 if args.smoke else 40
    rows = []
    for name, make in PROBLEMS.items():
        model, margs = make(markov_lm())
        exact = ppl_lm.infer(model, *margs, method="exact", progress=False)
        print(f"{name}: exact log Z = {exact.log_evidence:+.4f}", flush=True)
        for n in ns:
            for label in ("importance", "smc"):
                t0 = time.perf_counter()
                if label == "importance":
                    draws = ppl_lm.exact_draws(model, *margs, num_samples=64, seed=n)
                    lo, up = importance_sides(model, margs, draws, n, runs)
                else:
                    draws = ppl_lm.exact_draws(model, *margs, num_samples=runs * 5, seed=n)
                    lo, up = smc_sides(model, margs, draws, n)
                r = row(label, n, exact.log_evidence, lo, up, time.perf_counter() - t0)
                rows.append({"problem": name, **r})
    return rows


def smollm2(args) -> list[dict]:
    import pyro

    import ppl_lm

    lm = _bench.smollm2(args)
    prompt, T = "Once upon a time, in a small village,", 6
    path = lm.encode(" there lived an old man")
    ptoks = torch.as_tensor(lm.encode(prompt))
    # moderate p: the most pinned tokens (at most 4) whose prior probability stays >= 0.1
    log_ps = [float(lm.score(ptoks, torch.tensor([path[:k]]))[0]) for k in range(1, 5)]
    k = max([k for k, lp in zip(range(1, 5), log_ps) if lp >= math.log(0.1)], default=1)
    log_p = log_ps[k - 1]
    pins = {i: path[i] for i in range(k)}

    def model(p):
        x = pyro.sample("x", lm.sequence(p, max_new_tokens=T))
        ppl_lm.pin("pinned", x, pins)
        return x

    print(f"SmolLM2: pin the first {k} token(s) {lm.decode(path[:k])!r}: p = {math.exp(log_p):.4f} "
          f"(log p = {log_p:+.4f})", flush=True)
    M = 8 if args.smoke else 16
    t0 = time.perf_counter()
    draws = ppl_lm.exact_draws(model, prompt, num_samples=M, method="rejection", seed=0, chunk_size=128)
    t_rej = time.perf_counter() - t0
    print(f"  rejection: {M} exact draws from {draws.num_proposals} prior draws in {t_rej:.1f}s "
          f"(its own log Z estimate {draws.log_evidence:+.3f})", flush=True)
    rows = [{"method": "rejection", "N": draws.num_proposals, "log_z": log_p, "wall_s": t_rej}]
    for n in ([4] if args.smoke else [4, 16]):
        t0 = time.perf_counter()
        post = ppl_lm.infer(model, prompt, method="smc", num_particles=n, num_replicates=M, seed=1, progress=False)
        b = ppl_lm.log_evidence_bounds(post, model, prompt, exact=draws, seed=2)
        lo, up = torch.tensor(post.info.log_evidence_replicates), torch.tensor(b.upper_replicates)
        rows.append({"problem": "smollm2_pin", **row("smc", n, log_p, lo, up, time.perf_counter() - t0)})
    t0 = time.perf_counter()
    n = 64 if args.smoke else 128
    post = ppl_lm.infer(model, prompt, method="importance", num_samples=n, seed=3, progress=False)
    b = ppl_lm.log_evidence_bounds(post, model, prompt, exact=draws)
    wall = time.perf_counter() - t0
    print(f"  importance N={n:5d}  lower {b.lower:+.4f} ± {b.lower_se:.4f}  upper {b.upper:+.4f} ± {b.upper_se:.4f}  "
          f"gap {b.gap:.4f}  EUBO {b.eubo:+.4f}  {wall:.1f}s", flush=True)
    rows.append({"problem": "smollm2_pin", "method": "importance", "N": n, "log_z": log_p, "lower": b.lower,
                 "lower_se": b.lower_se, "upper": b.upper, "upper_se": b.upper_se, "gap": b.gap, "wall_s": wall})
    return rows


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--lm", choices=["markov", "smollm2"], default="markov")
    args = p.parse_args(argv)
    _bench.setup(args)
    warnings.simplefilter("ignore")  # small runs: the diagnostics' warnings are expected
    rows = toys(args) if args.lm == "markov" else smollm2(args)
    _bench.emit("bounds", {"lm": args.lm, "rows": rows})


if __name__ == "__main__":
    main()
