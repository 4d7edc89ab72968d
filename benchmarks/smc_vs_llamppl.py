"""SMC with a locally constrained proposal: ppl-lm vs LLaMPPL, on "avoid the letter e".

Task: continue "Once upon a time, in a small village," for 24 tokens with SmolLM2-135M,
never producing a token that contains "e" or "E" (EOS allowed; a sequence ends at EOS or at
24 tokens). Target: π(x | no e); evidence Z = P_π(no e).

- ppl-lm: ``ppl_lm.infer(model, method="smc", num_particles=N)`` on a model whose condition is
  ``ppl_lm.token_constraint("no_e", x, forbid_chars(lm, "eE"))``: SMC proposes from the LM's
  next-token distribution restricted to allowed tokens and weights by the allowed mass.
- LLaMPPL (``llamppl``, its Hugging Face backend ``AsyncTransformer`` wrapped in
  ``CachedCausalLM``, on the SAME torch module and tokenizer, so the same weights): a ``Model``
  whose ``step`` does ``observe(context.mask_dist(forbidden), False)`` (weight += log P(allowed),
  next-token distribution restricted to allowed tokens) then ``sample(context.next_token())``,
  run by ``smc_standard(model, N, ess_threshold=0.5)``; the prompt's KV is cached first
  (``lm.cache_kv``) and the auto-batcher's batch size is set to N, both in LLaMPPL's favour.
  The forbidden set is exactly the complement of our mask (so both estimate the same Z;
  LLaMPPL's own string vocabulary would forbid EOS, whose text "<|im_end|>" has an "e").

Both run interleaved in one process, over ``--seeds`` seeds; the script prints the median wall
times, the ratio LLaMPPL/ours (> 1: ours faster), both log Z estimates (mean ± sd over seeds)
with a z-score of their difference, and the time of plain batched sampling of N×24 tokens.

    python benchmarks/smc_vs_llamppl.py                # N in {16, 64}, 3 seeds
    python benchmarks/smc_vs_llamppl.py --smoke        # tiny: checks the script runs
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import time

import numpy as np
import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

PROMPT = "Once upon a time, in a small village,"


def ours_model(lm, mask, T):
    import ppl_lm

    def model(prompt):
        x = pyro.sample("x", lm.sequence(prompt, max_new_tokens=T))
        ppl_lm.token_constraint("no_e", x, mask)
        return x

    return model


def run_ours(lm, mask, T, N, seed):
    import ppl_lm

    post = ppl_lm.infer(ours_model(lm, mask, T), PROMPT, method="smc", num_particles=N, seed=seed,
                        progress=False)
    ok = mask.check(post.samples)
    if not bool(ok.all()):
        raise AssertionError("ppl-lm SMC returned a sample that violates the mask")
    return float(post.log_evidence), post


def make_llamppl(lm, batch_size):
    """LLaMPPL's HF backend around our torch module and tokenizer (same weights)."""
    from genlm.backend.llm import AsyncTransformer
    from llamppl import CachedCausalLM

    backend = AsyncTransformer(lm.model, lm.tokenizer, batch_size=batch_size)
    return CachedCausalLM(backend)


def llamppl_model_class():
    from llamppl import LMContext, Model

    class AvoidLetter(Model):
        """Each step: condition the next token on the allowed set, then sample it."""

        def __init__(self, llm, prompt, forbidden, max_tokens, eos_id):
            super().__init__()
            self.context = LMContext(llm, prompt)
            self.forbidden = forbidden
            self.max_tokens = max_tokens
            self.eos_id = eos_id

        def immutable_properties(self):
            return {"forbidden", "max_tokens", "eos_id"}

        async def step(self):
            await self.observe(self.context.mask_dist(self.forbidden), False)
            token = await self.sample(self.context.next_token())
            if token.token_id == self.eos_id or self.context.token_count >= self.max_tokens:
                self.finish()

    return AvoidLetter


def run_llamppl(llm, forbidden, T, N, seed, eos_id):
    from llamppl import smc_standard

    np.random.seed(seed)
    Model = llamppl_model_class()
    model = Model(llm, PROMPT, forbidden, T, eos_id)
    particles = asyncio.run(smc_standard(model, N, ess_threshold=0.5))
    w = np.array([p.weight for p in particles], dtype=np.float64)
    log_z = float(np.logaddexp.reduce(w) - math.log(N))
    return log_z, particles


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, nargs="+", default=None, help="N (default 16 64)")
    p.add_argument("--tokens", type=int, default=None, help="T (default 24)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per N (default 3)")
    p.add_argument("--no-llamppl", action="store_true", help="ours and plain sampling only")
    args = p.parse_args(argv)
    _bench.setup(args)
    args.particles = args.particles or ([4] if args.smoke else [16, 64])
    args.tokens = args.tokens or (4 if args.smoke else 24)
    args.seeds = args.seeds or (2 if args.smoke else 3)
    T = args.tokens

    from ppl_lm import rewards

    lm = _bench.smollm2(args)
    if lm.tokenizer is None:
        sys.exit("this benchmark needs the tokenizer (the letter-e mask): run without --config-only, "
                 "or give a model folder with a tokenizer")
    mask = rewards.forbid_chars(lm, "eE")
    allowed = mask.allowed(torch.zeros(1, 0, dtype=torch.long))[0]
    forbidden = set(torch.nonzero(~allowed).flatten().tolist())
    print(f"vocab {lm.vocab_size}: {len(forbidden)} tokens forbidden ({len(forbidden) / lm.vocab_size:.0%})")

    llm = None
    if not args.no_llamppl:
        try:
            import llamppl  # noqa: F401
        except ImportError:
            print("llamppl is not installed (pip install llamppl): running ours only")
            args.no_llamppl = True
    rows = []
    for N in args.particles:
        if not args.no_llamppl:
            llm = make_llamppl(lm, batch_size=N)
            prompt_ids = llm.tokenizer.encode(PROMPT)
            if prompt_ids != lm.encode(PROMPT):
                raise AssertionError(f"prompt tokenisations differ: {prompt_ids} vs {lm.encode(PROMPT)}")
            llm.cache_kv(prompt_ids)
        t = {"ours": [], "llamppl": [], "sample": []}
        lz = {"ours": [], "llamppl": []}
        g = torch.Generator(device=lm.device).manual_seed(args.seed)
        # warm-up (not timed)
        run_ours(lm, mask, T, N, seed=10_000)
        for i in range(args.seeds):
            seed = args.seed + i
            order = ["ours", "llamppl", "sample"] if i % 2 == 0 else ["sample", "llamppl", "ours"]
            for name in order:
                if name == "llamppl" and args.no_llamppl:
                    continue
                t0 = time.perf_counter()
                if name == "ours":
                    lz["ours"].append(run_ours(lm, mask, T, N, seed)[0])
                elif name == "llamppl":
                    lz["llamppl"].append(run_llamppl(llm, forbidden, T, N, seed, lm.eos_id)[0])
                else:
                    lm.sample(lm.encode(PROMPT), N, T, generator=g)
                t[name].append(time.perf_counter() - t0)
        row = {"N": N, "T": T, "times": t, "log_z": lz}
        med = {k: _bench.median(v) for k, v in t.items() if v}
        row["median_s"] = med
        for k, v in lz.items():
            if v:
                row[f"log_z_{k}_mean"] = statistics.fmean(v)
                row[f"log_z_{k}_sd"] = statistics.stdev(v) if len(v) > 1 else float("nan")
        line = (f"N={N:<3d} T={T}: ours {med['ours']:.2f}s  plain sampling {med['sample']:.2f}s"
                f"  log Z ours {row['log_z_ours_mean']:.3f} ± {row['log_z_ours_sd']:.3f}")
        if not args.no_llamppl:
            row["speedup_vs_llamppl"] = med["llamppl"] / med["ours"]
            se = math.sqrt((row["log_z_ours_sd"] ** 2 + row["log_z_llamppl_sd"] ** 2) / args.seeds)
            row["log_z_diff"] = row["log_z_ours_mean"] - row["log_z_llamppl_mean"]
            row["log_z_diff_z"] = row["log_z_diff"] / se if se > 0 else float("nan")
            line += (f"\n        LLaMPPL {med['llamppl']:.2f}s  log Z {row['log_z_llamppl_mean']:.3f} ± "
                     f"{row['log_z_llamppl_sd']:.3f}   speed-up ours vs LLaMPPL = {row['speedup_vs_llamppl']:.1f}x"
                     f"   log Z difference {row['log_z_diff']:+.3f} (z = {row['log_z_diff_z']:+.2f})")
        print(line, flush=True)
        rows.append(row)
    _bench.emit("smc_vs_llamppl", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
