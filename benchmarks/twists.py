"""Learned twists for SMC: the variance of log Ẑ against training steps, on rare toy pins.

The toy of ``rarity.py`` (``MarkovLM``, vocab 8, 6 new tokens after the prompt ``[1]``) with a hard
pin on its last four tokens (positions 2-5): prior probabilities p ≈ 1e-4, 1e-5 and 1e-6, exact
log Z by enumeration. For each p, SMC (``--particles`` particles, ``--replicates`` independent
replicates batched into one run: as many independent log Ẑ) with

- no twist (the pin prunes prefixes once position 2 is reached);
- the optimal twist ψ* = E_π[e^r | x_{≤t}] (``ppl_lm.exact_twist``, by enumeration): zero variance;
- a :class:`TableTwist` learned by ``ppl_lm.learn_twist`` for 0, 25, ... ``--steps`` steps of
  ``--train-particles`` particles, by contrastive twist learning (``objective="ctl"``) and by
  least squares on the optimal twist's one-step identity (``"regression"``).

Columns: Var(log Ẑ) over the live replicates, E[Ẑ/Z] over all of them (dead ones count Ẑ = 0; it
must be 1: SMC is unbiased with any twist), dead replicates, the mean error of log Ẑ, the
training wall time (cumulative) and the wall time of one evaluation run (all replicates).

With ``--lm smollm2`` (SmolLM2-135M-Instruct): the prompt of ``rarity.py`` and a hard pin on the
first ``--k`` tokens of its reference continuation (exact p from ``lm.score``), a
:class:`PositionTwist` (log ψ = table[t, v]) learned by CTL, against SMC without a twist.

    python benchmarks/twists.py
    python benchmarks/twists.py --lm smollm2 --k 6 --particles 32 --replicates 4 --steps 0 10 30
    python benchmarks/twists.py --smoke
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

V, T = 8, 6
# pins on positions 2..5 with prior probability ~1e-4, 1e-5, 1e-6 (searched by matrix products)
PINS = {"1e-4": (2, 3, 2, 4), "1e-5": (3, 2, 7, 1), "1e-6": (3, 1, 6, 2)}


def evaluate(model, log_z, twist, args, prompt=(1,)) -> dict:
    import ppl_lm

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            post = ppl_lm.infer(model, list(prompt) if isinstance(prompt, tuple) else prompt, method="smc",
                                twist=twist, num_particles=args.particles, num_replicates=args.replicates,
                                seed=args.seed + 10_000, progress=False)
        except ValueError as err:  # every replicate died: Ẑ = 0 for all
            if "every particle died" not in str(err):
                raise
            return {"var": math.nan, "ratio": 0.0, "ratio_se": 0.0, "dead": args.replicates, "err": math.nan,
                    "eval_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    z = torch.tensor(post.info.log_evidence_replicates, dtype=torch.float64)
    live = torch.isfinite(z)
    return {"var": float(z[live].var()) if int(live.sum()) > 1 else math.nan,
            "ratio": float(torch.exp(z - log_z).mean()), "ratio_se": float(torch.exp(z - log_z).std()) / math.sqrt(len(z)),
            "dead": int((~live).sum()), "err": float(z[live].mean() - log_z) if bool(live.any()) else math.nan,
            "eval_s": wall}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=None, help="SMC particles per replicate (default 64)")
    p.add_argument("--replicates", type=int, default=None, help="independent replicates per cell (default 200)")
    p.add_argument("--train-particles", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=None, help="training-step checkpoints")
    p.add_argument("--levels", nargs="+", default=list(PINS), choices=list(PINS))
    p.add_argument("--objectives", nargs="+", default=["ctl", "regression"])
    p.add_argument("--lm", choices=["markov", "smollm2"], default="markov")
    p.add_argument("--k", type=int, default=6, help="SmolLM2: pinned first tokens")
    args = p.parse_args(argv)
    _bench.setup(args)
    import ppl_lm
    from ppl_lm.inference.smc.twists import PositionTwist, TableTwist, TwistTraining

    if args.lm == "smollm2":
        return smollm2(args, ppl_lm, PositionTwist, TwistTraining)

    args.particles = args.particles or (16 if args.smoke else 64)
    args.replicates = args.replicates or (10 if args.smoke else 200)
    steps = args.steps or ([0, 5] if args.smoke else [0, 25, 50, 100, 200])
    lm = ppl_lm.MarkovLM.random(V, eos_id=0, seed=11, scale=1.0)
    rows = []
    for level in args.levels if not args.smoke else args.levels[:1]:
        pins = dict(zip(range(T - 4, T), PINS[level]))

        def model(prompt, pins=pins):
            x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
            ppl_lm.pin("pinned", x, pins)

        log_z = ppl_lm.infer(model, [1], method="exact", progress=False).log_evidence
        print(f"\np = {math.exp(log_z):.3g} (pins {pins}); SMC {args.particles} particles x {args.replicates} "
              "replicates per cell", flush=True)
        print(f"{'twist':>22s} {'steps':>5s} {'Var(log Z)':>11s} {'E[Z/Z]':>14s} {'dead':>4s} {'err':>7s} "
              f"{'train s':>7s} {'eval s':>6s}", flush=True)

        def show(name, k, res, train_s):
            res.update({"p": math.exp(log_z), "level": level, "twist": name, "steps": k, "train_s": train_s})
            rows.append(res)
            print(f"{name:>22s} {k:5d} {res['var']:11.5f} {res['ratio']:7.3f} ± {res['ratio_se']:.3f} {res['dead']:4d} "
                  f"{res['err']:+7.3f} {train_s:7.1f} {res['eval_s']:6.2f}", flush=True)

        show("none", 0, evaluate(model, log_z, None, args), 0.0)
        t0 = time.perf_counter()
        exact = ppl_lm.exact_twist(model, [1])
        show("exact (enumeration)", 0, evaluate(model, log_z, exact, args), time.perf_counter() - t0)
        for objective in args.objectives:
            tw, done, train_s = TableTwist(T, V), 0, 0.0
            for k in steps:
                rec = TwistTraining()
                if k > done:
                    try:
                        ppl_lm.learn_twist(model, [1], twist=tw, steps=k - done, num_particles=args.train_particles,
                                           objective=objective, seed=args.seed + done, record=rec)
                    except ValueError as err:  # every training run died: the twist has collapsed
                        print(f"{'learned (' + objective + ')':>22s} {k:5d}  training stopped: {err}", flush=True)
                        break
                train_s += rec.wall_time
                done = k
                show(f"learned ({objective})", k, evaluate(model, log_z, tw, args), train_s)
    _bench.emit("twists", {"args": vars(args), "rows": rows})


def smollm2(args, ppl_lm, PositionTwist, TwistTraining):
    from rarity import PROMPT

    lm = _bench.smollm2(args)
    T = 8
    path = lm.encode(" there lived an old man who loved to")[:T]
    pins = {i: path[i] for i in range(args.k)}

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.pin("pinned", x, pins)

    log_z = float(lm.score(torch.as_tensor(lm.encode(PROMPT)), torch.tensor([path[: args.k]]))[0])
    args.particles = args.particles or 32
    args.replicates = args.replicates or 4
    steps = args.steps or [0, 10, 30]
    print(f"\nSmolLM2, p = {math.exp(log_z):.3g} (first {args.k} tokens pinned); SMC {args.particles} particles x "
          f"{args.replicates} replicates per cell", flush=True)
    rows = []
    tw, done, train_s = PositionTwist(T, lm.vocab_size), 0, 0.0
    for k in steps:
        rec = TwistTraining()
        if k > done:
            ppl_lm.learn_twist(model, PROMPT, twist=tw, steps=k - done, num_particles=args.train_particles,
                               seed=args.seed + done, record=rec)
        train_s += rec.wall_time
        done = k
        res = evaluate(model, log_z, tw if k else None, args, PROMPT)
        res.update({"p": math.exp(log_z), "twist": "position (ctl)" if k else "none", "steps": k, "train_s": train_s})
        rows.append(res)
        print(f"steps {k:4d}: Var(log Z) {res['var']:.4f}  E[Z/Z] {res['ratio']:.3f} ± {res['ratio_se']:.3f}  "
              f"dead {res['dead']}  err {res['err']:+.3f}  train {train_s:.0f} s  eval {res['eval_s']:.0f} s", flush=True)
    _bench.emit("twists", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
