"""SMC with a locally constrained proposal: ppl-lm vs LLaMPPL, on "avoid the letter e".

Task: continue "Once upon a time, in a small village," for 24 tokens with SmolLM2-135M,
never producing a token that contains "e" or "E" (EOS allowed; a sequence ends at EOS or at
24 tokens). Target: π(x | no e); evidence Z = P_π(no e).

- ppl-lm: ``ppl_lm.infer(model, method="smc", num_particles=N)`` on a model whose condition is
  ``ppl_lm.token_constraint("no_e", x, forbid_chars(lm, "eE"))``: SMC proposes from the LM's
  next-token distribution restricted to allowed tokens and weights by the allowed mass.
- LLaMPPL (``llamppl``, its Hugging Face backend ``AsyncTransformer`` wrapped in
  ``CachedCausalLM``, loaded the way its docs do: ``CachedCausalLM.from_pretrained(folder,
  backend="hf")`` on the float-weight folder ``ppl_lm.load_lm`` writes for the embedded GGUF (no
  hub here), so the same float32 weights): a ``Model``
  whose ``step`` does ``observe(context.mask_dist(forbidden), False)`` (weight += log P(allowed),
  next-token distribution restricted to allowed tokens) then ``sample(context.next_token())``,
  run by ``smc_standard(model, N, ess_threshold=0.5)``; the prompt's KV is cached first
  (``lm.cache_kv``) and the auto-batcher's batch size is set to N, both in LLaMPPL's favour.
  The forbidden set is exactly the complement of our mask (so both estimate the same Z;
  LLaMPPL's own string vocabulary would forbid EOS, whose text "<|im_end|>" has an "e").

Each side runs in its own fresh process per N and seed (``_procs.run_worker``; issue 24: a peer
sharing our process ran slower), the order alternating from seed to seed, after an untimed
small warm-up in the same process; one torch thread each (``--threads 1``). The script prints the
median CPU and wall times, the ratio LLaMPPL/ours (> 1: ours faster), both log Z estimates (mean ±
sd over seeds) with a z-score of their difference, and the time of plain batched sampling of
N×24 tokens (in ours' process, after its SMC run). The workers are ``smc_vs_genlm.py``'s (ours)
and :func:`w_llamppl`.

    python benchmarks/smc_vs_llamppl.py --threads 1    # N in {16, 64, 256}, 3 seeds
    python benchmarks/smc_vs_llamppl.py --smoke        # tiny: checks the script runs
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
import _procs  # noqa: E402
import smc_vs_genlm as genlm_bench  # noqa: E402

PROMPT = genlm_bench.PROMPTS["no_e"]


def w_llamppl(args):
    """LLaMPPL's ``smc_standard`` in this process, on SmolLM2 loaded by LLaMPPL itself."""
    import json

    from llamppl import CachedCausalLM

    N, T = args.particles[0], args.tokens
    with open(args.spec) as f:
        spec = json.load(f)
    if args.model_dir is None:  # --config-only: random weights that only ours' loader builds
        from genlm.backend.llm import AsyncTransformer

        lm = _bench.smollm2(args)
        llm = CachedCausalLM(AsyncTransformer(lm.model, lm.tokenizer, batch_size=N))
    else:
        llm = CachedCausalLM.from_pretrained(args.model_dir, backend="hf", batch_size=N)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    if prompt_ids != spec["prompt_ids"]:
        raise AssertionError(f"prompt tokenisations differ: {prompt_ids} vs {spec['prompt_ids']}")
    forbidden = set(spec["forbidden"])
    run_llamppl(llm, forbidden, min(T, 4), min(N, 4), 10_000, spec["eos_id"])  # warm-up (not timed)
    llm.clear_cache()
    llm.cache_kv(prompt_ids)  # LLaMPPL's prompt cache, off the clock (in its favour)
    with _procs.Clock() as c:
        z, _ = run_llamppl(llm, forbidden, T, N, args.seed, spec["eos_id"])
    p = next(llm.model.model.parameters())
    return {"log_z": z, "wall_s": c.wall, "cpu_s": c.cpu, "dtype": str(p.dtype), "threads": torch.get_num_threads()}


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


WORKERS = {"ours": genlm_bench.w_ours, "llamppl": w_llamppl}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    genlm_bench.add_args(p, ["no_e"])
    p.add_argument("--no-llamppl", action="store_true", help="ours and plain sampling only")
    _procs.add_worker_args(p, WORKERS)
    args = p.parse_args(argv)
    _bench.setup(args)
    args.particles = args.particles or ([4] if args.smoke else [16, 64, 256])
    args.tokens = args.tokens or (4 if args.smoke else 24)
    args.seeds = args.seeds or (2 if args.smoke else 3)
    args.tasks = ["no_e"]
    if args.worker:
        return _procs.write_result(args, WORKERS[args.worker](args))
    if not args.no_llamppl:
        try:
            import llamppl  # noqa: F401
        except ImportError:
            print("llamppl is not installed (pip install llamppl): running ours only")
            args.no_llamppl = True
    argv = list(sys.argv[1:] if argv is None else argv)
    setup = genlm_bench.write_spec(args, ["no_e"])
    t0, load0 = time.perf_counter(), os.getloadavg()
    try:
        rows = genlm_bench.drive(__file__, args, [] if args.no_llamppl else ["llamppl"], argv, setup)
    finally:
        os.unlink(setup["specs"]["no_e"])
    print(f"total {time.perf_counter() - t0:.0f} s; load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    _bench.emit("smc_vs_llamppl", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
