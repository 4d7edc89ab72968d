"""Structured SMC: ppl-lm vs genlm-control 0.4.1 on token constraints (no letter e, a regex, JSON).

Tasks (SmolLM2-135M, T new tokens, a sequence ends at EOS or at T tokens, EOS never forced):

- ``no_e``: no token containing "e"/"E" (static mask ``forbid_chars``; EOS allowed);
- ``regex``: the text fully matches ``[A-Z][a-z]+ is [0-9]+ years old\\.`` (``regex_mask``);
- ``json``: a JSON object ``{"name": <[A-Z][a-z]+>, "age": <integer>}`` in the fixed layout of
  ``json_mask`` (``", "``, ``": "``), after a chat-style prompt.

Target π(x | condition), Z = P_π(condition). The SAME language on both sides: genlm gets the
allowed-token set of ``no_e`` as a token potential, and for ``regex`` / ``json`` a ``BoolFSA`` of
the regular expression equal to the language (the JSON one is the regex of ``json_mask``'s
layout: properties in schema order, integers ``-?(0|[1-9][0-9]*)``), coerced to tokens. genlm's
``max_tokens`` counts the EOS and forces it with its probability multiplied in; here it is told to
stop at T tokens without correction (``terminate_when``), and a terminal-only critic checks that
the text is complete, as ours does, so both estimate the same Z. Both run on the SAME torch module
(genlm's ``AsyncTransformer`` with batch size N, so one forward pass per step, as ours).

Samplers: ours = ``ppl_lm.infer(..., method="smc")``; genlm = SMC with AWRS (adaptive weighted
rejection sampling) and with the direct token sampler (``direct_token_sampler(llm * condition)``:
the exact local product, which evaluates the condition on the whole vocabulary each step);
plus plain batched sampling of N×T tokens (``lm.sample``). Interleaved in one process, over
``--seeds`` seeds: median times, ratios, log Z mean ± sd, and the grammar-mask cost per token.

    python benchmarks/smc_vs_genlm.py --threads 1                 # N in {16, 64}, 2 seeds
    python benchmarks/smc_vs_genlm.py --smoke                      # tiny: checks the script runs
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
import _bench

REGEX = r"[A-Z][a-z]+ is [0-9]+ years old\."
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
JSON_REGEX = r'\{"name": "[A-Z][a-z]+", "age": -?(0|[1-9][0-9]*)\}'
PROMPTS = {
    "no_e": "Once upon a time, in a small village,",
    "regex": "Write one short sentence giving a person's name and age.\n",
    "json": ("<|im_start|>user\nGive a JSON object with a person's name and age.<|im_end|>\n"
             "<|im_start|>assistant\n"),
}


def our_mask(lm, task):
    from ppl_lm import rewards

    if task == "no_e":
        return rewards.forbid_chars(lm, "eE")
    if task == "regex":
        return rewards.regex_mask(lm, REGEX)
    return rewards.json_mask(lm, SCHEMA)


def run_ours(lm, mask, prompt, T, N, seed):
    import ppl_lm

    def model(p):
        x = pyro.sample("x", lm.sequence(p, max_new_tokens=T))
        ppl_lm.token_constraint("c", x, mask)
        return x

    try:
        post = ppl_lm.infer(model, prompt, method="smc", num_particles=N, seed=seed, progress=False)
    except ValueError as err:  # every particle died: Z estimated as 0, counted as not finite
        if "every particle died" not in str(err):
            raise
        return -math.inf, None
    live = torch.isfinite(post.log_weights)
    if not bool(mask.check(post.samples[live]).all()):
        raise AssertionError("ppl-lm SMC returned a sample that violates the condition")
    return float(post.log_evidence), post


def mask_cost(mask, samples, eos, repeats=3):
    """Seconds per row and token of the mask state (allowed + advance) replaying ``samples``."""
    B, T = samples.shape
    best = math.inf
    for _ in range(repeats):
        state = mask.start(B)
        t0 = time.perf_counter()
        for t in range(T):
            state.allowed(last=t + 1 == T)
            state.advance(samples[:, t])
        best = min(best, time.perf_counter() - t0)
    n_tok = int((~torch.cat([torch.zeros(B, 1, dtype=torch.bool),
                             (samples == eos).cumsum(-1)[:, :-1] > 0], -1)).sum())
    return best / max(n_tok, 1)


# -- genlm-control ------------------------------------------------------------------------------


def genlm_setup(lm, task, prompt, N):
    """genlm's LLM potential on our torch module, and the condition as a token-level potential."""
    from genlm.backend.llm import AsyncTransformer
    from genlm.control import BoolFSA, PromptedLLM

    backend = AsyncTransformer(lm.model, lm.tokenizer, batch_size=N)
    llm = PromptedLLM(backend, eos_byte_strings=[lm.tokenizer.decode([lm.eos_id]).encode()])
    llm.prompt_ids = lm.encode(prompt)
    if task == "no_e":
        allowed = our_mask(lm, task).allowed(torch.zeros(1, 0, dtype=torch.long))[0]
        cond = _allowed_tokens_potential(llm, allowed)
        return llm, cond, None
    fsa = BoolFSA.from_regex(REGEX if task == "regex" else JSON_REGEX)
    cond = fsa.coerce(llm, f=b"".join)
    return llm, cond, _terminal(cond)


def _allowed_tokens_potential(llm, allowed: torch.Tensor):
    """A genlm potential over the LLM's tokens: 0 if every token is in the allowed set (EOS allowed)."""
    from genlm.control import Potential

    class AllowedTokens(Potential):
        def __init__(self):
            super().__init__(list(llm.vocab))
            ok = [bool(allowed[t.token_id]) for t in llm.vocab]
            self.ok = {t for t, a in zip(llm.vocab, ok) if a}
            self.w = np.array([0.0 if a else -np.inf for a in ok] + [0.0])  # last entry: EOS

        async def prefix(self, context):
            return 0.0 if all(t in self.ok for t in context) else -np.inf

        async def complete(self, context):
            return await self.prefix(context)

        async def logw_next(self, context):
            return self.make_lazy_weights(self.w)

    return AllowedTokens()


def _terminal(cond):
    """The condition at termination only (prefix weight 0): the text must be complete."""
    from genlm.control import Potential

    class Complete(Potential):
        def __init__(self):
            super().__init__(list(cond.vocab))

        async def prefix(self, context):
            return 0.0

        async def complete(self, context):
            return await cond.complete(context)

        def is_terminal_only(self):
            return True

    return Complete()


def run_genlm(llm, cond, critic, kind, T, N, seed):
    from genlm.control import AWRS, SMC, direct_token_sampler

    np.random.seed(seed)
    torch.manual_seed(seed)
    sampler = AWRS(llm, cond, seed=seed) if kind == "awrs" else direct_token_sampler(llm * cond)
    smc = SMC(sampler, critic=critic)

    async def go():
        try:
            # max_tokens counts the EOS and would force it: T + 1 never binds, terminate_when stops at T.
            return await smc(n_particles=N, ess_threshold=0.5, max_tokens=T + 1,
                             terminate_when=lambda ctx: len(ctx) >= T)
        finally:
            await smc.cleanup()

    seqs = asyncio.run(go())
    return float(seqs.log_ml), seqs


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, nargs="+", default=None, help="N (default 16 64)")
    p.add_argument("--tokens", type=int, default=None, help="T (default 24)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per N (default 2)")
    p.add_argument("--tasks", nargs="+", default=["no_e", "regex", "json"], choices=list(PROMPTS))
    p.add_argument("--samplers", nargs="+", default=["awrs", "direct"], choices=["awrs", "direct"],
                   help="genlm-control samplers to run (none: --samplers with --no-genlm)")
    p.add_argument("--direct-tasks", nargs="+", default=["no_e"], choices=list(PROMPTS),
                   help="tasks for genlm's direct sampler (on regex/json it evaluates the FSA on every token "
                        "of the vocabulary per particle and step: minutes per run)")
    p.add_argument("--no-genlm", action="store_true", help="ours and plain sampling only")
    args = p.parse_args(argv)
    _bench.setup(args)
    args.particles = args.particles or ([4] if args.smoke else [16, 64])
    args.tokens = args.tokens or (16 if args.smoke else 24)
    args.seeds = args.seeds or 2
    T = args.tokens
    lm = _bench.smollm2(args)
    if lm.tokenizer is None:
        sys.exit("this benchmark needs SmolLM2's tokenizer: run without --config-only, or give --tokenizer")
    if not args.no_genlm:
        try:
            import genlm.control  # noqa: F401
        except ImportError:
            print("genlm-control is not installed (pip install genlm-control==0.4.1): running ours only")
            args.no_genlm = True
    rows = []
    for task in args.tasks:
        prompt = PROMPTS[task]
        t0 = time.perf_counter()
        mask = our_mask(lm, task)
        build_s = time.perf_counter() - t0
        for N in args.particles:
            kinds = [] if args.no_genlm else [k for k in args.samplers if k != "direct" or task in args.direct_tasks]
            llm = cond = critic = None
            if kinds:
                llm, cond, critic = genlm_setup(lm, task, prompt, N)
            t = {k: [] for k in ["ours", "sample", *kinds]}
            lz = {k: [] for k in ["ours", *kinds]}
            g = torch.Generator(device=lm.device).manual_seed(args.seed)
            post = run_ours(lm, mask, prompt, T, N, seed=10_000)[1]  # warm-up (not timed)
            for i in range(args.seeds):
                seed = args.seed + i
                order = ["ours", *kinds, "sample"]
                for name in (order if i % 2 == 0 else order[::-1]):
                    t1 = time.perf_counter()
                    if name == "ours":
                        z, p_ = run_ours(lm, mask, prompt, T, N, seed)
                        lz["ours"].append(z)
                        post = p_ or post
                    elif name == "sample":
                        lm.sample(lm.encode(prompt), N, T, generator=g)
                    else:
                        lz[name].append(run_genlm(llm, cond, critic, name, T, N, seed)[0])
                    t[name].append(time.perf_counter() - t1)
            med = {k: _bench.median(v) for k, v in t.items()}
            row = {"task": task, "N": N, "T": T, "times": t, "log_z": lz, "median_s": med,
                   "mask_build_s": build_s,
                   "mask_us_per_token": 1e6 * mask_cost(mask, post.samples, lm.eos_id) if post else math.nan,
                   "example": post.texts[int(torch.argmax(post.log_weights))] if post else None}
            for k, v in lz.items():
                fin = [z for z in v if math.isfinite(z)]
                row[f"log_z_{k}"] = (statistics.fmean(fin) if fin else -math.inf,
                                     statistics.stdev(fin) if len(fin) > 1 else float("nan"), len(fin))
            row["ours_vs_sample"] = med["ours"] / med["sample"]
            line = (f"{task:5s} N={N:<3d} T={T}: ours {med['ours']:.2f}s  plain sampling {med['sample']:.2f}s "
                    f"(ours/plain {row['ours_vs_sample']:.2f})  log Z ours {row['log_z_ours'][0]:.3f} ± "
                    f"{row['log_z_ours'][1]:.3f}  mask {row['mask_us_per_token']:.1f} µs/token")
            for k in kinds:
                row[f"speedup_vs_{k}"] = med[k] / med["ours"]
                line += (f"\n      genlm {k}: {med[k]:.2f}s ({row[f'speedup_vs_{k}']:.1f}x ours)  log Z "
                         f"{row[f'log_z_{k}'][0]:.3f} ± {row[f'log_z_{k}'][1]:.3f} ({row[f'log_z_{k}'][2]} finite)")
            print(line, f"\n      e.g. {row['example']!r}", flush=True)
            rows.append(row)
    _bench.emit("smc_vs_genlm", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
