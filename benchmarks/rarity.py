"""Cost versus rarity: importance sampling, SMC and an SVI-trained guide on ever rarer conditions.

Condition k pins the first k generated tokens (``ppl_lm.pin`` with ``lam=None``, a hard,
prefix-closed condition), so its prior probability p_k = π(x_1..k = y_1..k) falls
geometrically with k and is known exactly: on the toy ``MarkovLM`` (vocab 8, 6 new tokens)
from the exact backend, on SmolLM2 (``--lm smollm2``) as ``exp(lm.score(prompt, y_1..k))``
(the product of next-token probabilities, exact without enumeration).

For each k and each method the script records wall time, ESS, ESS/N and the error of log Z
against the exact log p_k:

- importance, prior proposal: the weights are 0/1, so ESS = number of hits and
  ESS/N ≈ p_k (the script prints both): the cost of a fixed ESS grows like 1/p_k.
- SMC (``method="smc"``): pruning on prefixes and resampling keep the particles alive; its
  effective sample size is reported as ``info["n_eff"]`` where the backend gives it.
- SVI (``method="svi"``, ``guide="full"`` on the toy, ``"lora"`` on SmolLM2): the trained guide
  is the proposal of the final importance step; time includes training.

    python benchmarks/rarity.py                 # toy MarkovLM, k = 0..5
    python benchmarks/rarity.py --lm smollm2    # SmolLM2, k = 1..4
    python benchmarks/rarity.py --smoke
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

PROMPT = "Once upon a time, in a small village,"


def pinned_model(lm, prompt, T, pins):
    import ppl_lm

    def model(p):
        x = pyro.sample("x", lm.sequence(p, max_new_tokens=T))
        if pins:
            ppl_lm.pin("pinned", x, pins)
        return x

    return model


def run_method(method, model, prompt, opts, seed):
    import ppl_lm

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            post = ppl_lm.infer(model, prompt, method=method, seed=seed, progress=False, **opts)
        except ValueError as err:  # every weight zero: no sample met the condition
            return {"ok": False, "error": str(err).split(".")[0], "wall_s": time.perf_counter() - t0}
    res = {"ok": True, "wall_s": time.perf_counter() - t0, "log_z": post.log_evidence, "ess": post.ess,
           "n_eff": getattr(post.info, "n_eff_genealogy", None), "num_eves": getattr(post.info, "num_eves", None),
           "distinct": len({tuple(r) for r, w in zip(post.samples.tolist(), post.log_weights.tolist())
                             if w > -math.inf}), "log_z_se": post.log_evidence_se}
    if method == "svi":
        res["train_s"] = getattr(post.info, "train_time", None)
    return res


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--lm", choices=["markov", "smollm2"], default="markov")
    p.add_argument("--num", type=int, default=None, help="samples / particles per method (default 4000; 256 on SmolLM2)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of pinned tokens")
    p.add_argument("--methods", nargs="+", default=["importance", "smc", "svi"])
    p.add_argument("--svi-steps", type=int, default=None)
    args = p.parse_args(argv)
    _bench.setup(args)
    import ppl_lm

    if args.lm == "markov":
        V, T = 8, 6
        lm = ppl_lm.MarkovLM.random(V, eos_id=0, seed=11, scale=1.0)
        prompt = [1]
        # the pinned path: at each step the second most likely non-EOS token after the previous
        # one (next-token probabilities .17 .27 .13 .13 .17 .27): p_k from 1 down to 4e-5
        path = [7, 5, 6, 1, 7, 5][:T]
        ks = args.ks or ([0, 2] if args.smoke else [0, 1, 2, 3, 4, 5])
        N = args.num or (500 if args.smoke else 4000)
        svi_opts = {"guide": "full", "num_steps": args.svi_steps or (20 if args.smoke else 300),
                    "num_particles": 32, "num_samples": N}
    else:
        lm = _bench.smollm2(args)
        T = 8
        prompt = PROMPT
        ref = lm.encode(" there lived an old man who loved to")  # a plausible continuation
        path = ref[:T]
        ks = args.ks or ([1] if args.smoke else [1, 2, 3, 4])
        N = args.num or (32 if args.smoke else 256)
        svi_opts = {"guide": "lora", "num_steps": args.svi_steps or (5 if args.smoke else 60),
                    "num_particles": 8, "num_samples": N}
    opts = {"importance": {"num_samples": N}, "smc": {"num_particles": N}, "svi": svi_opts}

    # warm-up: imports (arviz for k-hat, peft...) and first-call costs stay out of the timings
    for method in args.methods:
        wopts = dict(opts[method])
        for key in ("num_samples", "num_particles"):
            if key in wopts:
                wopts[key] = min(wopts[key], 16)
        if "num_steps" in wopts:
            wopts["num_steps"] = 2
        run_method(method, pinned_model(lm, prompt, T, {}), prompt, wopts, args.seed)

    rows = []
    for k in ks:
        pins = {i: path[i] for i in range(k)}
        model = pinned_model(lm, prompt, T, pins)
        if args.lm == "markov":
            exact = ppl_lm.infer(model, prompt, method="exact")
            log_p = exact.log_evidence
        else:
            ptoks = torch.as_tensor(lm.encode(prompt))
            log_p = float(lm.score(ptoks, torch.tensor([path[:k]]))[0]) if k else 0.0
        print(f"k={k}: exact p = {math.exp(log_p):.3g} (log p = {log_p:.3f})", flush=True)
        for method in args.methods:
            res = run_method(method, model, prompt, opts[method], args.seed)
            res.update({"k": k, "method": method, "N": N, "log_p": log_p, "p": math.exp(log_p)})
            if res["ok"]:
                res["ess_over_n"] = res["ess"] / N
                res["log_z_err"] = res["log_z"] - log_p
                neff = f", n_eff {res['n_eff']:.0f}" if res.get("n_eff") is not None else ""
                if res.get("num_eves") is not None:
                    neff += f", {res['num_eves']} ancestors"
                neff += f", {res['distinct']} distinct"
                print(f"   {method:>10s}: {res['wall_s']:7.2f}s  ESS {res['ess']:8.1f}  ESS/N {res['ess_over_n']:.4f}"
                      f"{neff}  log Z err {res['log_z_err']:+.3f}"
                      + (f" (se {res['log_z_se']:.3f})" if res.get("log_z_se") else ""), flush=True)
            else:
                print(f"   {method:>10s}: {res['wall_s']:7.2f}s  FAILED: {res['error']}", flush=True)
            rows.append(res)
    _bench.emit("rarity", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
