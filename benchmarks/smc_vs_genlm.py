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
the text is complete, as ours does, so both estimate the same Z.

Each side runs in its own fresh process per (task, N, seed) (``_procs.run_worker``; issue 24: genlm
sharing our process and our module ran 1.3–1.5× slower), the order alternating from seed to seed,
one torch thread each, after an untimed small warm-up (N ≤ 4, T ≤ 4) in the same process. genlm
loads SmolLM2 the way its docs do, ``PromptedLLM.from_name(folder, backend="hf")`` (an
``AsyncTransformer`` with batch size N), on the float32 folder that ``ppl_lm.load_lm`` writes for
the embedded GGUF (there is no hub here); it never sees ppl-lm's module. The driver hands each
process the prompt's token ids, EOS and (no_e) the forbidden token ids in a small JSON file.

Samplers: ours = ``ppl_lm.infer(..., method="smc")``; genlm = SMC with AWRS (adaptive weighted
rejection sampling, genlm's fastest; the default) or the direct token sampler
(``direct_token_sampler(llm * condition)``: the exact local product, which evaluates the condition
on the whole vocabulary each step); plus plain batched sampling of N×T tokens (``lm.sample``, in
ours' process after its SMC run). Reported: median CPU seconds (``time.process_time``; the machine
is shared) and wall seconds of the timed call, ratios, log Z mean ± sd over seeds and the z of the
difference, and the grammar-mask cost per token. ``--diagnose``: genlm alone in a process with its
own module or ppl-lm's, with or without ppl-lm's SMC run first (what slowed it in one process).

    python benchmarks/smc_vs_genlm.py --threads 1                 # N in {16, 64, 256}, 2 seeds
    python benchmarks/smc_vs_genlm.py --threads 1 --tasks no_e --particles 16 --diagnose
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
import _bench  # noqa: E402
import _procs  # noqa: E402

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


def genlm_llm(args, N, spec):
    """genlm's ``PromptedLLM`` on SmolLM2, loaded the way genlm's docs load a model.

    ``--genlm-module own`` (the default): ``PromptedLLM.from_name(folder, backend="hf")`` on the
    float-weight folder that ``ppl_lm.load_lm`` writes for the embedded GGUF (there is no hub
    here; genlm's ``AsyncTransformer.from_name`` reads it with ``AutoModelForCausalLM.from_pretrained``,
    its own ``device_map="auto"`` and ``torch_dtype="auto"``: float32, as the folder holds; with
    ``--dtype`` its ``hf_opts`` set the same dtype as ours).
    ``ppl``: genlm's ``AsyncTransformer`` around the module ``ppl_lm.load_lm`` returns (the old
    shared-process set-up; for the diagnosis only).
    """
    from genlm.backend.llm import AsyncTransformer
    from genlm.control import PromptedLLM

    if args.genlm_module == "ppl" or args.model_dir is None:  # None: --config-only, random weights
        lm = _bench.smollm2(args)
        model, tok = lm.model, lm.tokenizer
        eos = [tok.decode([spec["eos_id"]]).encode()]
        llm = PromptedLLM(AsyncTransformer(model, tok, batch_size=N), eos_byte_strings=eos)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir)
        eos = [tok.decode([spec["eos_id"]]).encode()]
        # --dtype: the same parameter dtype as ours (genlm's own default, torch_dtype="auto", reads float32)
        hf_opts = {"torch_dtype": getattr(torch, args.dtype)} if args.dtype else None
        llm = PromptedLLM.from_name(args.model_dir, backend="hf", eos_byte_strings=eos, batch_size=N, hf_opts=hf_opts)
    llm.prompt_ids = list(spec["prompt_ids"])
    return llm


def genlm_condition(llm, task, spec):
    """The condition as a genlm potential (and a terminal-only critic for regex / json)."""
    from genlm.control import BoolFSA

    if task == "no_e":
        allowed = torch.ones(spec["vocab_size"], dtype=torch.bool)
        allowed[spec["forbidden"]] = False
        return _allowed_tokens_potential(llm, allowed), None
    cond = BoolFSA.from_regex(REGEX if task == "regex" else JSON_REGEX).coerce(llm, f=b"".join)
    return cond, _terminal(cond)


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


# -- the workers: one side, one task, one N, one seed, in a fresh process -------------------------------


def w_ours(args):
    """ppl-lm's SMC (then plain batched sampling of N×T tokens, timed apart) in this process."""
    task, N, T = args.tasks[0], args.particles[0], args.tokens
    lm = _bench.smollm2(args)
    prompt = PROMPTS[task]
    with _procs.Clock() as build:
        mask = our_mask(lm, task)
    run_ours(lm, mask, prompt, min(T, 4), min(N, 4), seed=10_000)  # warm-up (not timed), both sides alike
    with _procs.Clock() as c:
        z, post = run_ours(lm, mask, prompt, T, N, args.seed)
    res = {"log_z": z, "wall_s": c.wall, "cpu_s": c.cpu, "mask_build_s": build.wall, "dtype": str(lm.dtype),
           "threads": torch.get_num_threads()}
    if post is not None:
        res["mask_us_per_token"] = 1e6 * mask_cost(mask, post.samples, lm.eos_id)
        res["example"] = post.texts[int(torch.argmax(post.log_weights))]
    if args.plain:
        g = torch.Generator(device=lm.device).manual_seed(args.seed)
        with _procs.Clock() as c:
            lm.sample(lm.encode(prompt), N, T, generator=g)
        res.update(plain_wall_s=c.wall, plain_cpu_s=c.cpu)
    return res


def w_genlm(args):
    """genlm-control's SMC (AWRS or the direct sampler) in this process, on a model it loads itself.

    ``--after-ours``: first load ppl-lm's module and run ppl-lm's SMC in this process (warm-up and the
    same seed), as the old one-process harness did; for the diagnosis of the shared-process slow-down."""
    import json

    task, N, T = args.tasks[0], args.particles[0], args.tokens
    with open(args.spec) as f:
        spec = json.load(f)
    if args.after_ours:
        w_ours(argparse_copy(args, plain=False))
    llm = genlm_llm(args, N, spec)
    cond, critic = genlm_condition(llm, task, spec)
    run_genlm(llm, cond, critic, args.worker, min(T, 4), min(N, 4), seed=10_000)  # warm-up (not timed)
    llm.model.clear_cache()  # the timed run starts without the warm-up's cached prompt / KV
    if args.after_genlm:  # the old harness reused one PromptedLLM over seeds: its KV/log-prob trie kept growing
        run_genlm(llm, cond, critic, args.worker, T, N, args.seed + 1)
    with _procs.Clock() as c:
        z, _ = run_genlm(llm, cond, critic, args.worker, T, N, args.seed)
    p = next(llm.model.model.parameters())
    return {"log_z": z, "wall_s": c.wall, "cpu_s": c.cpu, "dtype": str(p.dtype), "threads": torch.get_num_threads(),
            "module": args.genlm_module, "after_ours": args.after_ours, "after_genlm": args.after_genlm,
            "max_rss_mb": _bench.peak_rss_mb()}


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


WORKERS = {"ours": w_ours, "awrs": w_genlm, "direct": w_genlm}


# -- the driver ----------------------------------------------------------------------------------------


def add_args(p, default_tasks):
    p.add_argument("--particles", type=int, nargs="+", default=None, help="N (default 16 64 256)")
    p.add_argument("--tokens", type=int, default=None, help="T (default 24)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per N (default 2)")
    p.add_argument("--tasks", nargs="+", default=default_tasks, choices=list(PROMPTS))
    p.add_argument("--no-plain", dest="plain", action="store_false",
                   help="skip plain batched sampling in ours' process")
    p.add_argument("--spec", default=None, help=argparse_hidden())
    p.add_argument("--model-dir", default=None, help=argparse_hidden())


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def write_spec(args, tasks) -> dict:
    """Per task, a JSON file for the peers' processes: the prompt's token ids, EOS, and for no_e the
    forbidden token ids (the complement of our mask: the same language on both sides). Also returns
    the folder of float weights the peers load (``ppl_lm.load_lm`` writes it on a first load)."""
    import json
    import tempfile

    import ppl_lm
    from ppl_lm.lm.hf import EMBEDDED_GGUF, cache_entry, embedded_model_dir

    lm = _bench.smollm2(args)
    if lm.tokenizer is None:
        sys.exit("this benchmark needs SmolLM2's tokenizer: run without --config-only")
    folder = None if args.config_only else str(cache_entry(str(embedded_model_dir()), EMBEDDED_GGUF))
    if folder is not None and not os.path.isdir(folder):
        sys.exit(f"the float weights {folder} are missing (PPL_LM_CACHE off?): the peers load them")
    specs = {}
    for task in tasks:
        spec = {"prompt_ids": lm.encode(PROMPTS[task]), "eos_id": lm.eos_id, "vocab_size": lm.vocab_size}
        if task == "no_e":
            allowed = ppl_lm.rewards.forbid_chars(lm, "eE").allowed(torch.zeros(1, 0, dtype=torch.long))[0]
            spec["forbidden"] = torch.nonzero(~allowed).flatten().tolist()
        with tempfile.NamedTemporaryFile("w", suffix=f"-{task}.json", delete=False) as f:
            json.dump(spec, f)
            specs[task] = f.name
    return {"specs": specs, "model_dir": folder}


def log_z_stats(v):
    """(mean, sd, number finite) of the finite estimates."""
    fin = [z for z in v if math.isfinite(z)]
    return (statistics.fmean(fin) if fin else -math.inf, statistics.stdev(fin) if len(fin) > 1 else math.nan, len(fin))


def agreement(a, b):
    """Difference of two sides' mean log Z and its z (each mean's se from its own seeds' sd)."""
    (ma, sa, na), (mb, sb, nb) = log_z_stats(a), log_z_stats(b)
    diff = ma - mb
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb) if na > 1 and nb > 1 else math.nan
    return diff, (diff / se if se and math.isfinite(se) and se > 0 else math.nan)


def drive(script, args, peers, argv, setup, extra_for=lambda side: []):
    """Every (task, N, seed): ours and each peer in their own fresh process, the order alternating
    from seed to seed (and N to N). Returns one row per (task, N)."""
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    rows = []
    k = 0
    for task in args.tasks:
        for N in args.particles:
            res = {s: [] for s in ["ours", *peers]}
            for i in range(args.seeds):
                seed = args.seed + i
                for side in _procs.order(["ours", *peers], k):
                    extra = ["--tasks", task, "--particles", N, "--seed", seed, "--spec", setup["specs"][task],
                             *(["--model-dir", setup["model_dir"]] if setup["model_dir"] else []), *extra_for(side)]
                    r = _procs.run_worker(script, argv, side, extra, env=env)
                    res[side].append(r)
                    print(f"  {task} N={N} seed {seed} {side:>7s}: {r['wall_s']:7.2f} s wall, {r['cpu_s']:7.2f} s CPU, "
                          f"log Z {r['log_z']:.3f}  (process {r['process_s']:.0f} s, load {r['load_avg'][0]})",
                          flush=True)
                k += 1
            rows.append(summarise(task, N, args.tokens, res, peers))
    return rows


def summarise(task, N, T, res, peers):
    med = {s: {"wall_s": _bench.median([r["wall_s"] for r in rs]), "cpu_s": _bench.median([r["cpu_s"] for r in rs])}
           for s, rs in res.items()}
    lz = {s: [r["log_z"] for r in rs] for s, rs in res.items()}
    row = {"task": task, "N": N, "T": T, "median": med, "log_z": lz, "runs": res,
           "log_z_stats": {s: log_z_stats(v) for s, v in lz.items()},
           "load_avg": [r["load_avg"][0] for rs in res.values() for r in rs]}
    ours = res["ours"]
    if ours and "plain_wall_s" in ours[0]:
        med["plain"] = {"wall_s": _bench.median([r["plain_wall_s"] for r in ours]),
                        "cpu_s": _bench.median([r["plain_cpu_s"] for r in ours])}
        row["ours_vs_plain_cpu"] = med["ours"]["cpu_s"] / med["plain"]["cpu_s"]
    m, s, n = row["log_z_stats"]["ours"]
    line = (f"{task:5s} N={N:<3d} T={T}: ours {med['ours']['wall_s']:.2f} s wall / {med['ours']['cpu_s']:.2f} s CPU, "
            f"log Z {m:.3f} ± {s:.3f} ({n} finite)")
    if "plain" in med:
        line += f"; plain sampling {med['plain']['cpu_s']:.2f} s CPU (ours/plain {row['ours_vs_plain_cpu']:.2f})"
    for p in peers:
        row[f"speedup_vs_{p}_wall"] = med[p]["wall_s"] / med["ours"]["wall_s"]
        row[f"speedup_vs_{p}_cpu"] = med[p]["cpu_s"] / med["ours"]["cpu_s"]
        row[f"log_z_diff_{p}"], row[f"log_z_z_{p}"] = agreement(lz["ours"], lz[p])
        m, s, n = row["log_z_stats"][p]
        line += (f"\n      {p}: {med[p]['wall_s']:.2f} s wall / {med[p]['cpu_s']:.2f} s CPU -> ours "
                 f"{row[f'speedup_vs_{p}_wall']:.2f}x (wall), {row[f'speedup_vs_{p}_cpu']:.2f}x (CPU); log Z "
                 f"{m:.3f} ± {s:.3f} ({n} finite); difference {row[f'log_z_diff_{p}']:+.3f} "
                 f"(z = {row[f'log_z_z_{p}']:+.2f})")
    print(line, flush=True)
    return row


def diagnose(args, argv, setup):
    """Why genlm ran slower sharing our process: genlm alone, with its own module or ours, with or
    without ppl-lm's SMC run first in the same process, or after another genlm run on the same
    ``PromptedLLM`` (its caches kept, as the old harness reused it over seeds); the order rotating
    over the repeats."""
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    variants = {"own": ["--genlm-module", "own"], "ppl-module": ["--genlm-module", "ppl"],
                "own+ours-first": ["--genlm-module", "own", "--after-ours"],
                "ppl-module+ours-first": ["--genlm-module", "ppl", "--after-ours"],
                "own+genlm-first": ["--genlm-module", "own", "--after-genlm"]}
    names = list(variants)
    out = {n: [] for n in names}
    task, N = args.tasks[0], args.particles[0]
    for rep in range(args.seeds):
        rot = names[rep % len(names):] + names[:rep % len(names)]
        for n in _procs.order(rot, rep):
            extra = ["--tasks", task, "--particles", N, "--seed", args.seed, "--spec", setup["specs"][task],
                     "--model-dir", setup["model_dir"], *variants[n]]
            r = _procs.run_worker(__file__, argv, "awrs", extra, env=env, label=n)
            out[n].append(r)
            print(f"  diagnose {task} N={N} rep {rep} {n:>22s}: {r['wall_s']:7.2f} s wall, {r['cpu_s']:7.2f} s CPU, "
                  f"log Z {r['log_z']:.4f} (load {r['load_avg'][0]})", flush=True)
    summary = {n: {"wall_s": _bench.median([r["wall_s"] for r in rs]), "cpu_s": _bench.median([r["cpu_s"] for r in rs])}
               for n, rs in out.items()}
    for n, s in summary.items():
        print(f"{n:>22s}: median {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU "
              f"({s['cpu_s'] / summary['own']['cpu_s']:.2f}x own's CPU)")
    return {"task": task, "N": N, "runs": out, "median": summary}


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    add_args(p, ["no_e", "regex", "json"])
    p.add_argument("--samplers", nargs="+", default=["awrs"], choices=["awrs", "direct"],
                   help="genlm-control samplers to run (default: AWRS, genlm's fastest)")
    p.add_argument("--direct-tasks", nargs="+", default=["no_e"], choices=list(PROMPTS),
                   help="tasks for genlm's direct sampler (on regex/json it evaluates the FSA on every token "
                        "of the vocabulary per particle and step: minutes per run)")
    p.add_argument("--no-genlm", action="store_true", help="ours and plain sampling only")
    p.add_argument("--genlm-module", default="own", choices=["own", "ppl"], help=argparse_hidden())
    p.add_argument("--after-ours", action="store_true", help=argparse_hidden())
    p.add_argument("--after-genlm", action="store_true", help=argparse_hidden())
    p.add_argument("--diagnose", action="store_true",
                   help="genlm AWRS alone in a process: its own module vs ppl-lm's, with and without ppl-lm's "
                        "SMC run first (first task, first N, --seeds repeats, one seed)")
    _procs.add_worker_args(p, WORKERS)
    args = p.parse_args(argv)
    _bench.setup(args)
    args.particles = args.particles or ([4] if args.smoke else [16, 64, 256])
    args.tokens = args.tokens or (16 if args.smoke else 24)
    args.seeds = args.seeds or 2
    if args.worker:
        return _procs.write_result(args, WORKERS[args.worker](args))
    if not args.no_genlm:
        try:
            import genlm.control  # noqa: F401
        except ImportError:
            print("genlm-control is not installed (pip install genlm-control==0.4.1): running ours only")
            args.no_genlm = True
    argv = list(sys.argv[1:] if argv is None else argv)
    setup = write_spec(args, args.tasks)
    t0, load0 = time.perf_counter(), os.getloadavg()
    try:
        if args.diagnose:
            return _bench.emit("smc_vs_genlm_diagnose", {"args": vars(args), **diagnose(args, argv, setup)})
        rows = []
        for task in args.tasks:
            peers = [] if args.no_genlm else [k for k in args.samplers if k != "direct" or task in args.direct_tasks]
            rows += drive(__file__, argparse_copy(args, tasks=[task]), peers, argv, setup)
    finally:
        for f in setup["specs"].values():
            os.unlink(f)
    print(f"total {time.perf_counter() - t0:.0f} s; load average at start {load0[0]:.1f}, at end {os.getloadavg()[0]:.1f}")
    _bench.emit("smc_vs_genlm", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
