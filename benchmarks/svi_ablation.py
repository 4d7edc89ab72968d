"""Which variance reduction and step control pays: each SVI idea measured against the exact posterior.

Toy problems with an enumerable support (tests/toys.py: a Markov LM and a tiny transformer,
vocabulary 5, at most 4 tokens: 341 sequences), so KL(q‖π′) and KL(π′‖q) of the trained guide
are computed exactly, not estimated. Every variant trains the same guide family ("full") with
the same budget of draws, under ``--repeats`` seeds; the table gives the median and the worst
seed of each KL, and the training time. Variants (one change each from the base setting):

- base: the ``method="svi"`` defaults of that objective (RLOO / forward with the −1/N
  baseline, global-norm clipping at 1, lr decaying 10x over the run);
- no baseline: reverse ``c_i = f_i/N``; forward ``c_i = softmax(f)_i``;
- no clipping; elementwise clipping at 10 (Pyro's ClippedAdam, the old default);
- constant lr;
- 4x the draws per step, 1/4 the steps (equal draws: more draws per prompt share its cache on
  a transformer);
- forward from the prior's draws; forward for the first half then reverse.

    python benchmarks/svi_ablation.py --threads 1
    python benchmarks/svi_ablation.py --smoke
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import _bench


def exact_kls(model, args, guide):
    """KL(q‖π′) and KL(π′‖q) by enumeration (q renormalised to the admissible set for hard conditions)."""
    from ppl_lm.inference.exact import enumerate_sequences
    from ppl_lm.inference.svi.elbo import particle_terms
    from toys import T, V

    import ppl_lm

    support = enumerate_sequences(V, 0, T)
    exact = ppl_lm.infer(model, *args, method="exact")
    with torch.no_grad():
        t = particle_terms(model, guide, args, {}, len(support), values={"x": support})
    lq = t.log_q.double()
    lpost = (t.log_prior + t.log_likelihood).double() - exact.log_evidence
    q, p = lq.exp(), lpost.exp()
    rev = float((q * (lq - lpost)).sum())
    keep = p > 0
    fwd = float((p[keep] * (lpost[keep] - lq[keep])).sum())
    return rev, fwd


def variants(base_steps, base_n):
    from ppl_lm.inference.svi.elbo import RLOO_ELBO, ForwardKL

    class NoBaselineReverse(RLOO_ELBO):
        def coefficients(self, a):
            return a / a.shape[-1]

    class NoBaselineForward(ForwardKL):
        def coefficients(self, a):
            return torch.softmax(a, -1)

    rev, fwd = RLOO_ELBO, ForwardKL  # each called with the draws per step
    out = {}
    for name, mk in (("reverse", rev), ("forward", fwd)):
        out[f"{name}: base"] = dict(loss=mk)
        out[f"{name}: no baseline"] = dict(loss=(lambda n: NoBaselineReverse(n)) if name == "reverse"
                                           else (lambda n: NoBaselineForward(n)))
        out[f"{name}: no clipping"] = dict(loss=mk, clip_norm=None)
        out[f"{name}: elementwise clip 10"] = dict(loss=mk, clip_norm=None, elementwise=10.0)
        out[f"{name}: constant lr"] = dict(loss=mk, lr_decay=1.0)
        out[f"{name}: 4x draws, 1/4 steps"] = dict(loss=mk, n=4 * base_n, steps=base_steps // 4)
    out["forward: prior draws"] = dict(loss=lambda n: ForwardKL(n, proposal="prior"))
    out["forward then reverse"] = dict(loss=fwd, then=rev)
    return out


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--only", default=None, help="run variants whose name contains this")
    args = p.parse_args(argv)
    _bench.setup(args)
    args.repeats = args.repeats or (1 if args.smoke else 3)

    from ppl_lm.inference.svi.guides import make_guide
    from ppl_lm.inference.svi.training import train
    from toys import LMS, PROBLEMS

    import ppl_lm

    problems = [("markov", "soft_reward", 300, 16, 0.1), ("transformer", "pin_soft", 200, 16, 0.02)]
    if args.smoke:
        problems = [("markov", "soft_reward", 8, 4, 0.1)]
    rows = []
    for lm_name, problem, steps0, n0, lr in problems:
        lm = LMS[lm_name]()
        model, margs = PROBLEMS[problem](lm)
        prior_guide = make_guide(model, *margs)
        start = exact_kls(model, margs, prior_guide)
        print(f"\n{lm_name}/{problem}: {steps0} steps x {n0} draws, lr {lr}; at the prior KL(q‖π′) {start[0]:.4f}, "
              f"KL(π′‖q) {start[1]:.4f}", flush=True)
        for name, v in variants(steps0, n0).items():
            if args.only and args.only not in name:
                continue
            n, steps = v.get("n", n0), v.get("steps", steps0)
            res = []
            for rep in range(args.repeats):
                g = make_guide(model, *margs)
                first, then = v["loss"](n), (v["then"](n) if "then" in v else None)
                def loss(s, first=first, then=then, steps=steps):
                    return first if then is None or s < steps // 2 else then

                opt = dict(lr=lr, lr_decay=v.get("lr_decay", 0.1), clip_norm=v.get("clip_norm", 1.0))
                if "elementwise" in v:
                    opt["elementwise_clip"] = v["elementwise"]
                t0 = time.perf_counter()
                with ppl_lm.seeding.seeded(args.seed + rep):
                    train(model, margs, {}, g, loss, num_steps=steps, progress=False, **opt)
                res.append((*exact_kls(model, margs, g), time.perf_counter() - t0))
            med = [statistics.median(r[i] for r in res) for i in range(3)]
            worst = [max(r[i] for r in res) for i in range(2)]
            rows.append({"problem": f"{lm_name}/{problem}", "variant": name, "kl_reverse": med[0],
                         "kl_reverse_worst": worst[0], "kl_forward": med[1], "kl_forward_worst": worst[1],
                         "seconds": med[2], "steps": steps, "draws_per_step": n})
            print(f"  {name:32s} KL(q‖π′) {med[0]:.4f} (worst {worst[0]:.4f})  KL(π′‖q) {med[1]:.4f} "
                  f"(worst {worst[1]:.4f})  {med[2]:.1f} s", flush=True)
    _bench.emit("svi_ablation", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
