"""Many contexts in one call against a Python loop over ``infer`` (issue 23 item 2).

``ppl_lm.infer(model, contexts=[16 prompts], ...)`` (the contexts' particles in shared LM batches,
:mod:`ppl_lm.inference.contexts`) against ``[ppl_lm.infer(model, c, seed=context_seed(seed, i), ...)
for i, c in enumerate(contexts)]``, on SmolLM2 with one torch thread: SMC (64 particles per context)
on the lipogram task (``models/no_e.py``, a token mask shared by every context) and importance
sampling (64 samples per context; the lipogram avoids the rare letter q instead of e, which prior
draws do not manage). The two are run interleaved (ABBA...) over ``--repeats`` rounds after
``--warmup`` untimed calls each; wall time and CPU time (``time.process_time``) are recorded per run with the load
average, and the medians' ratios (loop / batched) printed. Both compute the same posteriors under
the same seeds: the largest difference in log Z between them is printed (float summation order:
a batch reads its prompts left-padded).

    python benchmarks/many_contexts.py --threads 1 --repeats 3     # SmolLM2
    python benchmarks/many_contexts.py --smoke                     # tiny LM: checks the script
    python benchmarks/many_contexts.py --profile smc                # where the batched call's time goes
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

CONTEXTS = [
    "Once upon a time, in a small village,",
    "The old lighthouse keeper looked at the sea and",
    "My grandmother always told me that",
    "In the year 2150, the first colony on Mars",
    "The detective opened the door slowly.",
    "It was a cold winter morning when",
    "The little robot wanted nothing more than",
    "After the storm, the forest was",
    "She picked up the letter and read:",
    "Deep under the ocean, a strange light",
    "The king called his three sons and said",
    "Every night at midnight, the clock in the hall",
    "The train stopped in the middle of nowhere.",
    "He had never seen a dragon before, but",
    "On the first day of school,",
    "The recipe was simple:",
]


def main() -> None:
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--particles", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--methods", default="smc,importance")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each before the timed rounds (0: none)")
    p.add_argument("--profile", choices=["smc", "importance"], help="cProfile one batched call and print the top")
    p.add_argument("--step-cost", action="store_true",
                   help="only time one decode step (lm.extend) per row at 64 rows and at contexts x 64 rows")
    p.add_argument("--logprob-diff", action="store_true",
                   help="only compare next-token log-probs of the contexts' prompts read as one left-padded batch "
                        "and read alone")
    args = p.parse_args()
    _bench.setup(args)
    if args.step_cost:
        return step_cost(args)
    if args.logprob_diff:
        return logprob_diff(args)
    import ppl_lm
    from ppl_lm.inference.contexts import context_seed
    from ppl_lm.models import no_e

    lm = ppl_lm.tiny_char_transformer(seed=0) if args.smoke else _bench.smollm2(args)
    C, N, T = (3, 8, 4) if args.smoke else (args.contexts, args.particles, args.tokens)
    contexts = CONTEXTS[:C]
    repeats = 1 if args.smoke else (args.repeats or 3)
    runs = {
        "smc": (no_e.build(lm, max_new_tokens=T), dict(method="smc", num_particles=N)),
        "importance": (no_e.build(lm, chars="q", max_new_tokens=T), dict(method="importance", num_samples=N)),
    }
    if args.profile:
        import cProfile
        import pstats

        model, opts = runs[args.profile]
        prof = cProfile.Profile()
        prof.enable()
        ppl_lm.infer(model, contexts=contexts, seed=args.seed, progress=False, **opts)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        return
    for name in args.methods.split(","):
        model, opts = runs[name]

        def batched():
            return ppl_lm.infer(model, contexts=contexts, seed=args.seed, progress=False, **opts)

        def loop():
            return [ppl_lm.infer(model, c, seed=context_seed(args.seed, i), progress=False, **opts)
                    for i, c in enumerate(contexts)]

        fns = {"batched": batched, "loop": loop}
        for k in fns if args.warmup else ():
            fns[k]()
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        loads, first = [], {}
        for r in range(repeats):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                w0, c0 = time.perf_counter(), time.process_time()
                result = fns[k]()
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
                first.setdefault(k, result)  # round 0's: the two must agree
                loads.append(os.getloadavg()[0])
                print(f"{name} {k}: wall {wall[k][-1]:.2f} s, cpu {cpu[k][-1]:.2f} s, load {loads[-1]:.2f}",
                      flush=True)
        dz = max(abs(a.log_evidence - b.log_evidence) for a, b in zip(first["batched"], first["loop"]))
        same = sum(bool(torch.equal(a.samples, b.samples)) for a, b in zip(first["batched"], first["loop"]))
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}
        ratio_wall, ratio_cpu = med["loop"][0] / med["batched"][0], med["loop"][1] / med["batched"][1]
        print(f"{name}: {C} contexts x {N} particles, T={T}: batched {med['batched'][0]:.2f} s wall / "
              f"{med['batched'][1]:.2f} s cpu, loop {med['loop'][0]:.2f} s / {med['loop'][1]:.2f} s: "
              f"loop/batched = {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x cpu (target >= 2x: "
              f"{'hit' if ratio_wall >= 2 else 'miss'}); max |dlog Z| {dz:.2e}, equal samples in {same}/{C} contexts",
              flush=True)
        _bench.emit("many_contexts", {"method": name, "contexts": C, "particles": N, "tokens": T, "wall": wall,
                                      "cpu": cpu, "load": loads, "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu,
                                      "max_dlogz": dz, "equal_samples": same})


def logprob_diff(args) -> None:
    """How far a batch of several prompts (left-padded, one row each) moves the next-token log-probs
    from those of each prompt read alone, over a few decode steps: where a draw's uniform lands
    within that distance of a CDF boundary, the batched and the single call draw different tokens."""
    from ppl_lm.inference.contexts import stack_prompts, start_unique
    from ppl_lm.tokens import as_prompt_tensor

    lm = _bench.smollm2(args)
    dists = [lm.sequence(c, max_new_tokens=args.tokens) for c in CONTEXTS[:args.contexts]]
    prompt, lengths = stack_prompts(dists, [1] * len(dists))
    batched = start_unique(lm, prompt, lengths, len(dists))
    singles = [lm.start(as_prompt_tensor(c, lm), 1) for c in CONTEXTS[:args.contexts]]
    worst = []
    for t in range(4):
        diff = torch.stack([(batched.logprobs[i] - s.logprobs[0]).abs().max() for i, s in enumerate(singles)])
        worst.append(float(diff.max()))
        tok = batched.logprobs.argmax(-1)
        batched = lm.extend(batched, tok)
        singles = [lm.extend(s, tok[i:i + 1]) for i, s in enumerate(singles)]
    print(f"max |log p batched - log p alone| over {len(dists)} prompts, steps 0-3: "
          + ", ".join(f"{w:.1e}" for w in worst))


def step_cost(args) -> None:
    """Seconds per row of one decode step at one context's batch and at the stacked batch: when
    they are equal the step is compute-bound and stacking contexts cannot save time."""
    lm = _bench.smollm2(args)
    rows = [args.particles, args.particles * args.contexts]
    out = {}
    for B in rows * 2:  # twice, interleaved: the second round is reported
        prompt = torch.randint(3, 1000, (12,))
        state = lm.start(prompt, B)
        tok = torch.randint(3, 1000, (B,))
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3):
            state = lm.extend(state, tok)
        out[B] = ((time.perf_counter() - w0) / 3 / B, (time.process_time() - c0) / 3 / B)
    for B, (w, c) in out.items():
        print(f"decode step at {B} rows: {1e3 * w:.2f} ms wall / {1e3 * c:.2f} ms cpu per row, "
              f"load {os.getloadavg()[0]:.2f}")
    ratio = out[rows[0]][1] / out[rows[1]][1]
    print(f"cpu per row, {rows[0]} rows / {rows[1]} rows: {ratio:.2f}x (the most stacking can save on the LM step)")
    _bench.emit("many_contexts_step", {"rows": rows, "per_row": {str(k): v for k, v in out.items()},
                                       "ratio_cpu": ratio})


if __name__ == "__main__":
    main()
