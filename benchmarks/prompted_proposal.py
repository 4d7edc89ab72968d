"""A prompt as a proposal: prior vs prompted proposals on a SmolLM2 keyword condition (ESS/N, log Z, wall time).

The target is ``models/contains_keyword.py``: SmolLM2-135M-Instruct continuing "Once upon a time,
in a land far away," conditioned (hard) on the text mentioning "dragon". The proposals are the
prior, the same LM under a prompt that points at the condition (``ppl_lm.prompted(lm, "Write a
story about a dragon. ")``) and one that points away from it ("Write about the weather. "). Every
proposal is corrected by π/q, so all rows estimate the same log Z; what changes is the ESS.
Wall times are against plain sampling of the same number of sequences (``lm.sample``).

    python benchmarks/prompted_proposal.py            # N = 256, 16 new tokens (CPU: minutes)
    python benchmarks/prompted_proposal.py --smoke    # tiny sizes
"""

from __future__ import annotations

import math
import time

import _bench

PROMPTS = {"prior": None, "helps": "Write a story about a dragon. ", "hurts": "Write about the weather. "}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=None, help="samples / particles per run (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=["importance", "smc"])
    p.add_argument("--prompts", nargs="+", default=None,
                   help="proposal prompts to try after the prior (default: the 'helps' and 'hurts' prompts)")
    args = p.parse_args(argv)
    prompts = PROMPTS if args.prompts is None else {"prior": None, **{t: t for t in args.prompts}}
    _bench.setup(args)
    import ppl_lm
    from ppl_lm.models import contains_keyword

    lm = _bench.smollm2(args)
    N = args.num or (16 if args.smoke else 256)
    T = 4 if args.smoke else args.max_new_tokens
    model = contains_keyword.build(lm, ("dragon",), mode="hard", max_new_tokens=T)
    context = contains_keyword.context

    def plain():
        lm.sample(context, N, T)

    plain()  # warm-up
    t0 = time.perf_counter()
    plain()
    plain_s = time.perf_counter() - t0
    print(f"plain sampling of {N} x {T} tokens: {plain_s:.2f}s", flush=True)

    rows = []
    for method in args.methods:
        size = {"importance": "num_samples", "smc": "num_particles"}[method]
        for name, text in prompts.items():
            proposal = None if text is None else ppl_lm.prompted(lm, text)
            t0 = time.perf_counter()
            try:
                post = ppl_lm.infer(model, context, method=method, proposal=proposal, seed=args.seed, progress=False,
                                    **{size: N})
            except ValueError as err:  # no draw met the condition
                rows.append({"method": method, "proposal": name, "ok": False, "error": str(err).split(".")[0]})
                print(f"{method:>10s} {name!r:>8s}: FAILED {rows[-1]['error']}", flush=True)
                continue
            wall = time.perf_counter() - t0
            met = sum(1 for w in post.log_weights.tolist() if w > -math.inf)
            row = {"method": method, "proposal": name, "ok": True, "N": N, "wall_s": wall, "vs_plain": wall / plain_s,
                   "log_z": post.log_evidence, "log_z_se": post.log_evidence_se, "ess_over_n": post.ess / N,
                   "met": met, "n_eff": getattr(post.info, "n_eff_genealogy", None),
                   "num_eves": getattr(post.info, "num_eves", None)}
            rows.append(row)
            extra = f", {row['num_eves']} ancestors" if row["num_eves"] is not None else ""
            print(f"{method:>10s} {name!r:>8s}: {wall:7.2f}s ({row['vs_plain']:.1f}x plain)  ESS/N {row['ess_over_n']:.3f}"
                  f"  log Z {row['log_z']:.3f} ± {row['log_z_se'] or 0:.3f}  {met}/{N} meet the condition{extra}",
                  flush=True)
    _bench.emit("prompted_proposal", {"args": vars(args), "plain_s": plain_s, "rows": rows})


if __name__ == "__main__":
    main()
