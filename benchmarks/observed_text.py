"""Observed text on SmolLM2: p(w | 8 texts) with K = 3 worlds by every backend, against K × 8 scoring passes.

``models/which_world.py``: a world w (3 preambles) and 8 observed continuations of one context,
so the likelihood of each world is Π_i π(text_i | preamble_w + context). Only w is latent, so
exact enumeration is feasible on the real model and is the ground truth.

The baseline is the cost of the likelihood itself: K × 8 single scoring passes, one
``lm.sequence(prompt_w, T_i).log_prob(text_i)`` call per (world, text), one after another. Each
backend scores one row per distinct (prompt, text) pair and reads it back from the run's cache
afterwards, so its wall time over that baseline is what the backend adds (its own bookkeeping,
and for MH and SVI the model runs of every step, all cache hits). Backends and the baseline are
interleaved over ``--repeats`` rounds (ABBA); the error of p(w) and log Z against exact is
printed per backend.

    python benchmarks/observed_text.py --threads 1
    python benchmarks/observed_text.py --smoke      # the tiny random LM: checks that it runs
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402



def main(argv=None):
    import ppl_lm
    from ppl_lm.models import which_world

    options = which_world.methods  # the script's own recommended settings
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(options))
    args = p.parse_args(argv)
    _bench.setup(args)
    if args.smoke:
        lm = ppl_lm.tiny_char_transformer(seed=0)
        context = which_world.toy_context
    else:
        lm = _bench.smollm2(args)
        context = which_world.context
    model = which_world.build(lm)
    prompts = [lm.encode(which_world.PREAMBLES[w] + context) for w in which_world.WORLDS]
    texts = list(which_world.TEXTS)
    lengths = [len(lm.encode(t)) for t in texts]

    def single_passes():
        with torch.no_grad():
            return [[float(lm.sequence(pr, max_new_tokens=n).log_prob(t)) for t, n in zip(texts, lengths)]
                    for pr in prompts]

    posts: dict = {}

    def runner(method):
        def fn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                posts[method] = ppl_lm.infer(model, context, method=method, seed=args.seed, progress=False,
                                             **options[method])
        return fn

    fns = {"K x texts passes": single_passes, **{m: runner(m) for m in args.methods}}
    repeats = args.repeats or (1 if args.smoke else 3)
    times = _bench.interleaved(fns, repeats, args.device, warmup=1)
    base = _bench.median(times["K x texts passes"])
    exact = posts.get("exact") or ppl_lm.infer(model, context, method="exact", progress=False)
    p_exact = exact.marginal("w")
    print(f"K = {len(prompts)} worlds, {len(texts)} texts ({sum(lengths)} tokens); "
          f"{len(prompts) * len(texts)} single scoring passes: {base:.2f} s (median of {repeats})")
    print("exact p(w | texts): " + ", ".join(f"{w} {p_exact[k][0]:.4f}" for k, w in enumerate(which_world.WORLDS))
          + f"; log Z {exact.log_evidence:.4f}")
    rows = []
    print(f"{'method':<12}{'wall s':>8}{'/ passes':>10}{'max |Δp(w)|':>13}{'max Δ/se':>10}{'log Z err':>11}{'± se':>8}")
    for m in args.methods:
        post, t = posts[m], _bench.median(times[m])
        got = post.marginal("w")
        dp = [got.get(k, (0.0, 0.0))[0] - p_exact[k][0] for k in p_exact]
        z = [abs(d) / got[k][1] if got.get(k, (0, 0))[1] else 0.0 for d, k in zip(dp, p_exact)]
        lz = None if post.log_evidence is None else post.log_evidence - exact.log_evidence
        print(f"{m:<12}{t:>8.2f}{t / base:>10.2f}{max(map(abs, dp)):>13.4f}{max(z):>10.2f}"
              + (f"{lz:>+11.4f}{post.log_evidence_se or 0.0:>8.4f}" if lz is not None else f"{'—':>11}{'':>8}"))
        rows.append({"method": m, "wall_s": t, "ratio_to_passes": t / base,
                     "p_w": {k: v for k, v in got.items()}, "log_z_err": lz, "log_z_se": post.log_evidence_se,
                     "options": options[m]})
    _bench.emit("observed_text", {"passes_s": base, "p_w_exact": p_exact, "log_z_exact": exact.log_evidence,
                                  "rows": rows, "repeats": repeats, "smoke": args.smoke})
    return 0


if __name__ == "__main__":
    sys.exit(main())
