"""Where an SMC run's time goes: the no-e task on SmolLM2 (T = 24), split by component.

One warm-up run, then one run under ``cProfile`` with a CPU-time clock (``time.process_time``:
other processes' load does not count), seed 0. Components are the cumulative times of the
functions the sweep calls: the LM forward (prompt and decode steps), the token draw with the mask
and the allowed mass (``Sweep._propose``), the prefix re-scoring (``_rescore``), resampling (and
the KV-cache reorder inside it), the mask advance, and the rest of the sweep.

    python benchmarks/smc_profile.py --particles 16 64 --threads 1
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
from smc_vs_genlm import PROMPTS, our_mask, run_ours  # noqa: E402

PROMPT = PROMPTS["no_e"]


def components(stats: pstats.Stats) -> tuple[float, dict[str, float]]:
    """(the sweep's total, seconds per component) from a profile of one SMC run."""
    def cum(file: str, fn: str) -> float:
        return sum(v[3] for (f, _, n), v in stats.stats.items() if f.endswith(file) and n == fn)

    def own(fn: str) -> float:
        return sum(v[2] for (_, _, n), v in stats.stats.items() if n == fn)

    total = cum(os.path.join("smc", "sweep.py"), "run")
    parts = {
        "LM forward (prompt + decode steps)": cum(os.path.join("hf", "model.py"), "start")
        + cum(os.path.join("hf", "model.py"), "extend"),
        "  of which log_softmax": own("<built-in method torch.log_softmax>"),
        "token draw + mask + allowed mass (_propose)": cum("sweep.py", "_propose"),
        "prefix re-scoring (_rescore)": cum("sweep.py", "_rescore"),
        "resampling (_resample, KV reorder incl.)": cum("sweep.py", "_resample"),
        "  of which KV reorder": cum(os.path.join("hf", "model.py"), "reorder"),
        "mask advance": cum("masks.py", "advance"),
    }
    parts["other (weights, bookkeeping, Python)"] = total - sum(v for k, v in parts.items() if not k.startswith(" "))
    return total, parts


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, nargs="+", default=None, help="N (default 16 64)")
    p.add_argument("--tokens", type=int, default=None, help="T (default 24)")
    args = p.parse_args(argv)
    _bench.setup(args)
    args.particles = args.particles or ([4] if args.smoke else [16, 64])
    T = args.tokens or (4 if args.smoke else 24)

    lm = _bench.smollm2(args)
    mask = our_mask(lm, "no_e")
    rows = []
    for N in args.particles:
        def run(N=N):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return run_ours(lm, mask, PROMPT, T, N, args.seed)[1]

        run()
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        post = run()
        prof.disable()
        total, parts = components(pstats.Stats(prof))
        print(f"N={N} T={T}: sweep {total:.2f} CPU s, log Z {float(post.log_evidence):.6f}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        for k, v in parts.items():
            print(f"  {k:45s} {v:7.3f} s  {100 * v / total:5.1f} %")
        rows.append({"N": N, "T": T, "sweep_s": total, "parts_s": parts, "log_z": float(post.log_evidence)})
    _bench.emit("smc_profile", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
