"""Batched ancestral sampling with log-probs: ``lm.sample`` vs Hugging Face ``model.generate``.

Ours: ``TransformersLM.sample`` (ppl_lm/lm/base.py), a hand-written KV-cached loop that returns the
tokens and the log-probability of every token (exact ancestral sampling from the softmax).

Baseline: ``model.generate(do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
max_new_tokens=T, output_scores=True, return_dict_in_generate=True)`` with an attention mask
and ``pad_token_id = eos``, followed by ``log_softmax(scores).gather(tokens)`` so that it
computes the same thing as ours (tokens + per-token log-probs). ``top_k=0`` matters:
transformers' default generation config samples from the top 50 only. ``generate`` stops
early once every row has emitted EOS; ours always runs T steps (rows that finished read EOS).

Both run in one process, interleaved over ``--repeats`` rounds; the script prints the median
times, the throughput ratio ours/generate (> 1: ours is faster) and one JSON line.

``--procs K`` runs each side in its own fresh process instead (``_procs``, the harness of the peer
benchmarks): per batch size, K processes per side (plain, ``generate``, and SMC with ``--smc``),
the order of the sides alternating from one round of processes to the next; each process loads
the model, runs ``--warmup`` untimed calls and then ``--repeats`` timed ones; medians over every
timed call of a side, in CPU seconds of its process (``time.process_time``) and wall seconds.

``--smc`` adds a third, interleaved with them: SMC on the no-e task (``ppl_lm.infer(...,
method="smc", num_particles=B)`` on ``lm.sequence(prompt, T)`` under ``token_constraint(
forbid_chars(lm, "eE"))``, as in ``smc_vs_llamppl.py``), and prints SMC / plain sampling of the
same B × T tokens. With it every time is measured twice, wall and this process's CPU time
(``time.process_time``: on a shared machine the other processes' load inflates the wall time),
and the load average is recorded with each round.

    python benchmarks/sampling.py                   # tiny transformer + real SmolLM2, B in {16, 64}
    python benchmarks/sampling.py --smoke           # seconds: checks the script runs
    python benchmarks/sampling.py --device cuda --config-only --batch 64 256 1024 --decode-steps
    python benchmarks/sampling.py --models smollm2 --smc --batch 16 64 256 --repeats 3 --threads 1
    python benchmarks/sampling.py --models smollm2 --smc --batch 16 64 --repeats 3 --procs 2 --threads 1
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
import _procs  # noqa: E402

PROMPT = "Once upon a time, in a small village,"


def generate_sample(lm, prompt_ids: torch.Tensor, batch: int, T: int):
    """The baseline: ``generate`` + per-token log-probs from its scores."""
    from transformers import GenerationConfig

    model = lm.model
    ids = prompt_ids.to(lm.device)[None].expand(batch, -1)
    gc = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=T, min_new_tokens=0,
        eos_token_id=lm.eos_id, pad_token_id=lm.eos_id, bos_token_id=lm.bos_id,
        output_scores=True, return_dict_in_generate=True, use_cache=True,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    new = out.sequences[:, ids.shape[-1]:]
    scores = torch.stack(out.scores, 1).float()  # [B, T', V]: the logits (no warper is active)
    lp = torch.log_softmax(scores, -1).gather(-1, new[..., None])[..., 0]
    done_before = torch.cumsum((new == lm.eos_id).long(), -1) - (new == lm.eos_id).long()
    lp = lp.masked_fill(done_before > 0, 0.0)
    if new.shape[-1] < T:  # every row finished early: pad like ours
        pad = torch.full((batch, T - new.shape[-1]), lm.eos_id, dtype=new.dtype, device=new.device)
        new = torch.cat([new, pad], -1)
        lp = torch.cat([lp, torch.zeros(batch, T - lp.shape[-1], device=lp.device)], -1)
    return new, lp


def smc_no_e(lm, prompt_ids: torch.Tensor, T: int):
    """SMC on the no-e task, continuing ``prompt_ids``, at ``N`` particles: ``run(N, seed)`` -> log Ẑ (every sample checked)."""
    import pyro

    import ppl_lm
    from ppl_lm.diagnostics.warnings import PplLmWarning

    mask = ppl_lm.rewards.forbid_chars(lm, "eE")

    def model():
        x = pyro.sample("x", lm.sequence(prompt_ids, max_new_tokens=T))
        ppl_lm.token_constraint("no_e", x, mask)

    def run(N: int, seed: int) -> float:
        with warnings.catch_warnings():  # few particles: diagnostics warn, and that is not what is timed
            warnings.simplefilter("ignore", PplLmWarning)
            post = ppl_lm.infer(model, method="smc", num_particles=N, seed=seed, progress=False)
        if not bool(mask.check(post.samples).all()):
            raise AssertionError("SMC returned a sample that violates the mask")
        return float(post.log_evidence)

    return run


def interleaved_cpu(fns: dict, repeats: int, device, warmup: int = 1) -> dict:
    """Like ``_bench.interleaved`` (``warmup`` untimed rounds, then ABBA rounds), timing each call
    by wall clock and by this process's CPU time, with the load average after each round."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}, "load": []}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            _bench.sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            _bench.sync(device)
            out["wall"][n].append(time.perf_counter() - t0)
            out["cpu"][n].append(time.process_time() - c0)
        out["load"].append(round(os.getloadavg()[0], 2))
    return out


def parity(lm, prompt_ids, tokens, lps) -> float:
    """Max |sum of sampler log-probs - one-pass scoring| over the batch."""
    with torch.no_grad():
        ref = lm.score(prompt_ids, tokens.to(lm.device))
    return float((lps.sum(-1).to(ref.device) - ref).abs().max())


def count_params(model) -> tuple[int, int]:
    """(all parameters, embedding parameters)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return total, emb


def decode_step_bounds(lm, prompt_ids, batch: int, ctx: int, args) -> dict:
    """Time one cached decode step at ``batch`` rows and compare to the compute and memory bounds."""
    cfg = lm.model.config
    total, emb = count_params(lm.model)
    tied = getattr(cfg, "tie_word_embeddings", False)
    head = emb  # the LM head multiplies by a [V, H] matrix, tied or not
    body = total - emb - (0 if tied else head)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = H // cfg.num_attention_heads
    flops = 2 * batch * (body + head) + 4 * batch * L * cfg.num_attention_heads * head_dim * ctx
    elt = torch.finfo(next(lm.model.parameters()).dtype).bits // 8
    bytes_ = elt * (body + head) + elt * 2 * L * kv_heads * head_dim * ctx * batch
    state = lm.start(prompt_ids, batch)
    tok = torch.full((batch,), 5, dtype=torch.long, device=lm.device)
    for _ in range(ctx - prompt_ids.shape[-1]):
        state = lm.extend(state, tok)
    times = []
    for _ in range(args.step_repeats):
        _bench.sync(args.device)
        t0 = time.perf_counter()
        state = lm.extend(state, tok)  # the context grows by step_repeats tokens: a small drift
        _bench.sync(args.device)
        times.append(time.perf_counter() - t0)
    step = _bench.median(times)
    res = {"batch": batch, "context": ctx, "step_s": step, "gflop": flops / 1e9, "gbyte": bytes_ / 1e9,
           "achieved_tflops": flops / step / 1e12}
    if args.peak_tflops:
        res["compute_bound_s"] = flops / (args.peak_tflops * 1e12)
    if args.peak_tbps:
        res["memory_bound_s"] = bytes_ / (args.peak_tbps * 1e12)
    if args.peak_tflops and args.peak_tbps:
        res["bound_s"] = max(res["compute_bound_s"], res["memory_bound_s"])
        res["step_over_bound"] = step / res["bound_s"]
    return res


def bench_model(name: str, lm, prompt_ids: torch.Tensor, args) -> list[dict]:
    rows = []
    T = args.tokens
    g = torch.Generator(device=lm.device).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    smc = smc_no_e(lm, prompt_ids, T) if args.smc else None
    for B in args.batch:
        ours = lambda B=B: lm.sample(prompt_ids, B, T, generator=g)  # noqa: E731
        base = lambda B=B: generate_sample(lm, prompt_ids, B, T)  # noqa: E731
        fns = {"ours": ours} if args.no_generate else {"ours": ours, "generate": base}
        if smc is not None:
            seeds = iter(range(args.seed, args.seed + 10_000))
            log_z = []
            fns["smc"] = lambda B=B, seeds=seeds, log_z=log_z: log_z.append(smc(B, next(seeds)))  # noqa: E731
        measured = interleaved_cpu(fns, args.repeats, args.device, args.warmup)
        times, cpu = measured["wall"], measured["cpu"]
        t_ours = _bench.median(times["ours"])
        tok_o, lp_o = ours()
        row = {
            "model": name, "batch": B, "tokens": T, "prompt_tokens": int(prompt_ids.shape[-1]),
            "ours_s": t_ours, "ours_tok_per_s": B * T / t_ours, "ours_times": times["ours"],
            "cpu_times": cpu, "load": measured["load"],
            "parity_ours": parity(lm, prompt_ids, tok_o, lp_o), "mean_logprob_ours": float(lp_o.sum(-1).mean()),
        }
        rows.append(row)
        line = f"{name:>10s} B={B:<5d} T={T}: ours {t_ours:.3f}s ({row['ours_tok_per_s']:.0f} tok/s)  "
        if "generate" in fns:
            t_gen = _bench.median(times["generate"])
            tok_g, lp_g = base()
            row.update(generate_s=t_gen, generate_tok_per_s=B * T / t_gen, throughput_ratio=t_gen / t_ours,
                       generate_times=times["generate"],
                       cpu_throughput_ratio=_bench.median(cpu["generate"]) / _bench.median(cpu["ours"]),
                       parity_generate=parity(lm, prompt_ids, tok_g, lp_g),
                       mean_logprob_generate=float(lp_g.sum(-1).mean()))
            line += (f"generate {t_gen:.3f}s ({row['generate_tok_per_s']:.0f} tok/s)  "
                     f"ratio ours/generate = {row['throughput_ratio']:.2f}x (CPU time {row['cpu_throughput_ratio']:.2f}x)  "
                     f"[|logp - score| ours {row['parity_ours']:.1e}, generate {row['parity_generate']:.1e}]  ")
        print(line + f"CPU {_bench.median(cpu['ours']):.3f}s  load {measured['load']}", flush=True)
        if smc is not None:
            row.update(smc_s=_bench.median(times["smc"]), smc_times=times["smc"], smc_log_z=log_z,
                       smc_over_plain=_bench.median(times["smc"]) / t_ours,
                       smc_over_plain_cpu=_bench.median(cpu["smc"]) / _bench.median(cpu["ours"]))
            print(f"{'':>10s} SMC no-e N={B}: {row['smc_s']:.3f}s wall, {_bench.median(cpu['smc']):.3f}s CPU; "
                  f"SMC / plain sampling = {row['smc_over_plain']:.2f}x wall, {row['smc_over_plain_cpu']:.2f}x CPU  "
                  f"(plain {_bench.median(cpu['ours']):.3f}s CPU)",
                  flush=True)
    return rows


def load_model(name: str, args):
    """(label, lm, prompt ids) for ``--models`` entry ``name``."""
    import ppl_lm

    if name == "tiny":
        lm = ppl_lm.tiny_transformer(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                     max_context=256, scale=0.05, seed=args.seed,
                                     token_strings=[""] + [f"<{i}>" for i in range(1, 256)])
        lm.model.to(device=args.device, dtype=_bench.dtype_of(args))
        return "tiny", lm, torch.arange(1, 11)
    lm = _bench.smollm2(args)
    if args.config_only:
        return "smollm2-rand", lm, torch.randint(3, 49152, (10,), generator=torch.Generator().manual_seed(1))
    return "smollm2", lm, torch.tensor(lm.encode(PROMPT))


def side_worker(side: str):
    """A worker of ``--procs``: one side at one batch size, ``--warmup`` untimed calls, ``--repeats`` timed."""

    def work(args) -> dict:
        label, lm, prompt_ids = load_model(args.models[0], args)
        B, T = args.batch[0], args.tokens
        g = torch.Generator(device=lm.device).manual_seed(args.seed)
        torch.manual_seed(args.seed)
        log_z: list[float] = []
        if side == "plain":
            fn = lambda: lm.sample(prompt_ids, B, T, generator=g)  # noqa: E731
        elif side == "generate":
            fn = lambda: generate_sample(lm, prompt_ids, B, T)  # noqa: E731
        else:
            smc, seeds = smc_no_e(lm, prompt_ids, T), iter(range(args.seed, args.seed + 10_000))
            fn = lambda: log_z.append(smc(B, next(seeds)))  # noqa: E731
        for _ in range(args.warmup):
            fn()
        cpu, wall = [], []
        for _ in range(args.repeats):
            with _procs.Clock() as c:
                fn()
                _bench.sync(args.device)
            cpu.append(c.cpu)
            wall.append(c.wall)
        return {"model": label, "side": side, "batch": B, "tokens": T, "cpu": cpu, "wall": wall,
                "log_z": log_z, "dtype": str(next(lm.model.parameters()).dtype),
                "threads": torch.get_num_threads()}

    return work


WORKERS = {"plain": side_worker("plain"), "generate": side_worker("generate"), "smc": side_worker("smc")}


def run_procs(args, argv) -> list[dict]:
    """``--procs K``: every (model, batch, side) in K fresh processes, alternating the sides' order."""
    argv = _procs.without(argv, "--procs", "--batch", "--models")
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    rows = []
    for name in args.models:
        for B in args.batch:
            sides = ["plain"] + ([] if args.no_generate else ["generate"]) + (["smc"] if args.smc else [])
            res: dict = {s: [] for s in sides}
            for rep in range(args.procs):
                for side in _procs.order(sides, rep):
                    res[side].append(_procs.run_worker(__file__, argv, side, ["--batch", B, "--models", name],
                                                       env=env))
            cpu = {s: [t for r in res[s] for t in r["cpu"]] for s in sides}
            wall = {s: [t for r in res[s] for t in r["wall"]] for s in sides}
            med = {s: _bench.median(cpu[s]) for s in sides}
            row = {"model": res["plain"][0]["model"], "batch": B, "tokens": args.tokens, "procs": args.procs,
                   "cpu_times": cpu, "wall_times": wall, "load": [r["load_avg"] for s in sides for r in res[s]],
                   "dtype": res["plain"][0]["dtype"]}
            line = f"{row['model']:>10s} B={B:<5d} own processes, CPU s (median): plain {med['plain']:.3f}"
            if "generate" in med:
                row["cpu_throughput_ratio"] = med["generate"] / med["plain"]
                row["wall_throughput_ratio"] = _bench.median(wall["generate"]) / _bench.median(wall["plain"])
                line += (f"  generate {med['generate']:.3f}  plain/generate throughput {row['cpu_throughput_ratio']:.2f}x"
                         f" CPU ({row['wall_throughput_ratio']:.2f}x wall)")
            if "smc" in med:
                row["smc_over_plain_cpu"] = med["smc"] / med["plain"]
                row["smc_log_z"] = [z for r in res["smc"] for z in r["log_z"]]
                line += f"  SMC {med['smc']:.3f}  SMC/plain {row['smc_over_plain_cpu']:.2f}x CPU"
            print(line + f"  [{row['dtype']}, load {row['load']}]", flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 16 64)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens T (default 24)")
    p.add_argument("--models", nargs="+", default=None, choices=["tiny", "smollm2"],
                   help="which models (default both; --config-only makes smollm2 random)")
    p.add_argument("--smc", action="store_true",
                   help="also time SMC on the no-e task at N = each batch size")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    p.add_argument("--no-generate", action="store_true", help="leave generate out (ours, and SMC with --smc)")
    p.add_argument("--decode-steps", action="store_true",
                   help="also time single decode steps and compare to compute / memory bounds")
    p.add_argument("--context", type=int, default=128, help="context length for --decode-steps")
    p.add_argument("--step-repeats", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak matmul TFLOP/s of the device in --dtype (H100 bf16 dense: ~790 measured)")
    p.add_argument("--peak-tbps", type=float, default=None, help="peak memory bandwidth TB/s (H100: ~3.0)")
    p.add_argument("--procs", type=int, default=0,
                   help="each side in its own fresh process, K processes per side and batch size")
    _procs.add_worker_args(p, WORKERS)
    args = p.parse_args(argv)
    _bench.setup(args)
    args.batch = args.batch or ([2, 4] if args.smoke else [16, 64])
    args.tokens = args.tokens or (4 if args.smoke else 24)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.models = args.models or (["tiny"] if args.smoke else ["tiny", "smollm2"])

    if args.worker:
        return _procs.write_result(args, WORKERS[args.worker](args))
    if args.procs:
        rows = run_procs(args, argv)
        _bench.emit("sampling", {"args": vars(args), "rows": rows})
        return

    results = []
    for name in args.models:
        label, lm, prompt_ids = load_model(name, args)
        rows = bench_model(label, lm, prompt_ids, args)
        if args.decode_steps:
            for B in args.batch:
                r = decode_step_bounds(lm, prompt_ids, B, args.context, args)
                r["model"] = label
                rows.append({"decode_step": r})
                bound = (f" bound {r['bound_s'] * 1e3:.3f} ms (step/bound {r['step_over_bound']:.1f}x)"
                         if "bound_s" in r else "")
                print(f"{label:>10s} decode step B={B} ctx={args.context}: {r['step_s'] * 1e3:.2f} ms, "
                      f"{r['achieved_tflops']:.3f} TFLOP/s{bound}", flush=True)
        results.extend(rows)
        del lm
    ratios = [r["throughput_ratio"] for r in results if "throughput_ratio" in r]
    summary = {"geomean_throughput_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}
    if ratios:
        print(f"geometric-mean throughput ratio ours/generate: {summary['geomean_throughput_ratio']:.2f}x")
    _bench.emit("sampling", {"args": vars(args), "rows": results, **summary})


if __name__ == "__main__":
    main()
