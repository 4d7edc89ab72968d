"""float32 against bfloat16 on the no-e task (``models/no_e.py``): log Z agreement and SMC wall time.

The same SmolLM2 weights in float32 and in bfloat16 (a copy), SMC with ``--particles`` N and
T = ``--tokens``, the same seeds, the dtypes interleaved (ABBA) in one process. Printed: each
dtype's log Ẑ per seed, their mean and sd over seeds, the paired difference bf16 − fp32 (mean ±
its standard error over seeds: the number the README's tolerance quotes), the median wall time
per dtype and their ratio, and how far the two models' log-probabilities of the same sequences
(every run's samples) are apart: mean and max |Δ log p(x)| per sequence, and the paired
estimates of log Z_bf16 − log Z_fp32 = log E_fp32[p_bf16(x) / p_fp32(x)] over each float32 run's
weighted posterior samples and −log E_bf16[p_fp32 / p_bf16] over each bfloat16 run's (the
condition is the same indicator under both models); each is biased low in its own direction,
so together they bracket the difference.

    python benchmarks/dtype_no_e.py --threads 1                 # N = 64, T = 24, 4 seeds
    python benchmarks/dtype_no_e.py --smoke                     # the tiny char transformer
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=64)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args(argv)
    args.dtype = "float32"
    _bench.setup(args)

    import ppl_lm
    from ppl_lm import TransformersLM
    from ppl_lm.models import load

    if args.smoke:
        base = ppl_lm.tiny_char_transformer(seed=args.seed)
        args.particles, args.tokens, args.seeds = 8, 4, 2
        context = "Hi"
    else:
        base = _bench.smollm2(args)
        context = load("no_e").context
    lms = {"float32": base,
           "bfloat16": TransformersLM(copy.deepcopy(base.model).to(torch.bfloat16), base.tokenizer,
                                      eos_id=base.eos_id, bos_id=base.bos_id, vocab=base.vocab)}
    models = {d: load("no_e").build(lm, max_new_tokens=args.tokens) for d, lm in lms.items()}
    runs: dict[str, list] = {d: [] for d in lms}
    import warnings

    warnings.filterwarnings("ignore", message=".*too_few_draws.*")
    for s in range(args.seeds):
        for d in (list(lms) if s % 2 == 0 else list(lms)[::-1]):
            t0 = time.perf_counter()
            post = ppl_lm.infer(models[d], context, method="smc", num_particles=args.particles, seed=args.seed + s,
                                progress=False)
            runs[d].append({"seed": args.seed + s, "log_z": post.log_evidence, "se": post.log_evidence_se,
                            "wall_s": time.perf_counter() - t0, "lm_dtype": post.info.lm_dtype,
                            "samples": post.samples, "log_weights": post.log_weights})
            print(f"seed {args.seed + s} {d}: log Z {post.log_evidence:.4f} ± {post.log_evidence_se:.4f}, "
                  f"{runs[d][-1]['wall_s']:.1f} s", flush=True)
    logz = {d: [r["log_z"] for r in v] for d, v in runs.items()}
    diffs = [b - a for a, b in zip(logz["float32"], logz["bfloat16"])]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    wall = {d: _bench.median([r["wall_s"] for r in v]) for d, v in runs.items()}
    # log Z_bf16 - log Z_fp32 = log E_{fp32 posterior}[p_bf16(x) / p_fp32(x)] (the condition is the same
    # indicator under both), and minus the same from the bf16 side: each run's weighted samples give
    # a paired estimate. Both are biased low for their own direction (log of a mean, finite
    # samples), so the fp32-side estimate and the negated bf16-side one bracket the difference.
    side, dlp = {}, []
    for d, other in (("float32", "bfloat16"), ("bfloat16", "float32")):
        side[d] = []
        for r in runs[d]:
            with torch.no_grad():
                x = r["samples"]
                delta = (lms[other].score(context, x.to(lms[other].device)).double().cpu()
                         - lms[d].score(context, x.to(lms[d].device)).double().cpu())
            dlp.append(delta.abs())
            est = float(torch.logsumexp(r["log_weights"].double().cpu() + delta, 0))
            side[d].append(est if d == "float32" else -est)
    dlp = torch.cat(dlp)
    summary = {
        "mean_log_z": {d: statistics.mean(v) for d, v in logz.items()},
        "sd_log_z": {d: statistics.stdev(v) if len(v) > 1 else float("nan") for d, v in logz.items()},
        "diff_mean": statistics.mean(diffs), "diff_se": sd / len(diffs) ** 0.5, "diff_max_abs": max(map(abs, diffs)),
        "wall_s": wall, "speedup_bf16": wall["float32"] / wall["bfloat16"],
        "seq_logp_absdiff_mean": float(dlp.mean()), "seq_logp_absdiff_max": float(dlp.max()),
        "reweighted_diff": side, "reweighted_diff_mean": {d: statistics.mean(v) for d, v in side.items()},
        "reweighted_diff_se": {d: (statistics.stdev(v) / len(v) ** 0.5) if len(v) > 1 else float("nan")
                               for d, v in side.items()},
    }
    print(f"log Z mean (sd over {args.seeds} seeds): " + ", ".join(
        f"{d} {summary['mean_log_z'][d]:.4f} ({summary['sd_log_z'][d]:.4f})" for d in lms), flush=True)
    print(f"bf16 - fp32, paired: {summary['diff_mean']:+.4f} ± {summary['diff_se']:.4f} (max |.| "
          f"{summary['diff_max_abs']:.4f}); wall median fp32 {wall['float32']:.1f} s, bf16 {wall['bfloat16']:.1f} s "
          f"({summary['speedup_bf16']:.2f}x); |log p_bf16(x) - log p_fp32(x)| over {len(dlp)} sequences: mean "
          f"{summary['seq_logp_absdiff_mean']:.3f}, max {summary['seq_logp_absdiff_max']:.3f}", flush=True)
    for d, v in side.items():
        print(f"log Z_bf16 - log Z_fp32 by reweighting the {d} posterior samples: "
              f"{summary['reweighted_diff_mean'][d]:+.4f} ± {summary['reweighted_diff_se'][d]:.4f} (per seed: "
              + ", ".join(f"{e:+.4f}" for e in v) + ")", flush=True)
    for v in runs.values():
        for r in v:
            del r["samples"], r["log_weights"]
    _bench.emit("dtype_no_e", {"args": vars(args), "runs": runs, **summary})


if __name__ == "__main__":
    main()
