"""Peak memory of importance sampling and SMC with many particles (100k by default).

Each (method, N) runs in its own child process, so the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that run alone; the child also
reports its peak RSS after loading the model and a 16-particle warm-up of the same method
(lazy imports, first-call buffers), so the increment due to N particles is visible.
Children run under an address-space limit (``--limit-gb``, default 12 GiB): a run that would
need more fails with an allocation error instead of pushing the machine into swap or the
OOM killer, and the failure is reported.

glibc's malloc raises its mmap threshold dynamically after large blocks are freed; later large
tensors then come from the heap, which fragments, and the peak RSS of the very same run varies
from run to run by hundreds of MiB (seen here: +52 / +479 / +55 MiB for importance at N=100k).
Children therefore run with a fixed ``MALLOC_MMAP_THRESHOLD_`` (``--mmap-threshold``, default
128 KiB; 0 leaves glibc's default), which makes the peaks reproducible.

Model: the prompt "Once upon a time," continued for ``--tokens`` tokens (default 6) under
"no letter e" (``ppl_lm.token_constraint`` with ``forbid_chars(lm, "eE")``): importance proposes
from the prior in chunks of ``--chunk-size``; SMC proposes allowed tokens only.

    python benchmarks/memory.py                       # tiny char transformer, N = 10k and 100k
    python benchmarks/memory.py --model smollm2 --num 10000 100000
    python benchmarks/memory.py --smoke
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

PROMPT = "Once upon a time,"


def child(args) -> dict:
    """Runs in the child process: load, infer once, report peaks."""
    import pyro
    import torch

    import ppl_lm
    from ppl_lm import rewards

    if args.limit_gb:
        lim = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        lm = _bench.smollm2(args)
    else:
        lm = ppl_lm.tiny_char_transformer(seed=args.seed, hidden_size=64, num_layers=2)
    mask = rewards.forbid_chars(lm, "eE")
    T = args.tokens

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.token_constraint("no_e", x, mask)
        return x

    # warm-up with 16 particles: lazy imports (arviz for k-hat...) and first-call buffers are not
    # what N particles cost
    import warnings

    warnings.simplefilter("ignore")
    try:
        if args.method == "importance":
            ppl_lm.infer(model, PROMPT, method="importance", num_samples=16, progress=False)
        elif args.method == "smc":
            ppl_lm.infer(model, PROMPT, method="smc", num_particles=16, progress=False)
        else:
            lm.sample(lm.encode(PROMPT), 16, T)
    except ValueError:  # 16 samples may all miss the condition: the warm-up has done its job anyway
        pass
    rss_loaded = _bench.peak_rss_mb()
    out = {"method": args.method, "N": args.n, "model": args.model, "tokens": T, "rss_loaded_mb": rss_loaded}
    t0 = time.perf_counter()
    try:
        if args.method == "importance":
            post = ppl_lm.infer(model, PROMPT, method="importance", num_samples=args.n,
                                chunk_size=args.chunk_size, seed=args.seed, progress=False)
        elif args.method == "sample":
            # the LM alone, in one batch: what a non-chunked sampler needs
            lm.sample(lm.encode(PROMPT), args.n, T)
            post = None
        else:
            opts = {}
            if args.smc_chunk_size:
                opts["chunk_size"] = args.smc_chunk_size
            post = ppl_lm.infer(model, PROMPT, method="smc", num_particles=args.n, seed=args.seed,
                                progress=False, **opts)
        out["ok"] = True
        if post is not None:
            out["log_evidence"] = post.log_evidence
            out["ess"] = post.ess
    except (MemoryError, RuntimeError) as err:  # torch raises RuntimeError on failed allocations
        out["ok"] = False
        out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _bench.peak_rss_mb()
    out["inference_rss_mb"] = out["peak_rss_mb"] - rss_loaded
    return out


def kv_cache_gb(lm_cfg, n: int, ctx: int, bytes_per: int = 4) -> float:
    """Size of a KV cache for ``n`` rows of ``ctx`` tokens (what an unchunked SMC holds)."""
    L = lm_cfg.num_hidden_layers
    kv = getattr(lm_cfg, "num_key_value_heads", lm_cfg.num_attention_heads)
    hd = lm_cfg.hidden_size // lm_cfg.num_attention_heads
    return 2 * L * kv * hd * ctx * n * bytes_per / 1e9


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--num", type=int, nargs="+", default=None, help="particle counts (default 10000 100000)")
    p.add_argument("--methods", nargs="+", default=["importance", "smc"], choices=["importance", "smc", "sample"])
    p.add_argument("--tokens", type=int, default=6)
    p.add_argument("--chunk-size", type=int, default=1024, help="importance chunk size")
    p.add_argument("--smc-chunk-size", type=int, default=None, help="passed to SMC as chunk_size if given")
    p.add_argument("--limit-gb", type=float, default=12.0, help="address-space limit of each child (0: none)")
    p.add_argument("--mmap-threshold", type=int, default=131072,
                   help="MALLOC_MMAP_THRESHOLD_ for the children (bytes; 0: glibc's dynamic default)")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--method", default=None, help=argparse_hidden())
    p.add_argument("--n", type=int, default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        res = child(args)
        print("CHILD " + json.dumps(res), flush=True)
        return
    _bench.setup(args)
    args.num = args.num or ([2000] if args.smoke else [10_000, 100_000])
    rows = []
    for n in args.num:
        for method in args.methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", method, "--n", str(n),
                   "--model", args.model, "--tokens", str(args.tokens), "--chunk-size", str(args.chunk_size),
                   "--limit-gb", str(args.limit_gb), "--seed", str(args.seed), "--device", args.device]
            if args.smc_chunk_size:
                cmd += ["--smc-chunk-size", str(args.smc_chunk_size)]
            if args.config_only:
                cmd.append("--config-only")
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ)
            if args.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
            if line:
                res = json.loads(line[-1][6:])
            else:
                res = {"method": method, "N": n, "ok": False,
                       "error": f"child exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
            rows.append(res)
            status = "ok" if res.get("ok") else f"FAILED ({res.get('error')})"
            extra = ""
            if res.get("ok") and res.get("log_evidence") is not None:
                extra = f"  log Z {res['log_evidence']:.3f}  ESS {res['ess']:.0f}"
            print(f"{method:>10s} N={n:<7d} peak RSS {res.get('peak_rss_mb', float('nan')):8.0f} MiB "
                  f"(+{res.get('inference_rss_mb', float('nan')):.0f} over the loaded model)  "
                  f"{res.get('wall_s', float('nan')):7.1f}s  {status}{extra}", flush=True)
    _bench.emit("memory", {"args": vars(args), "rows": rows})


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
