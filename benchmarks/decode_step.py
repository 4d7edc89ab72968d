"""One decode step (``lm.extend``) with each KV cache of ``TransformersLM``, against the compute bound.

The three ``kv_cache`` settings on the same weights (``lm.with_kv_cache``):

- ``dynamic``: transformers' ``DynamicCache`` (grows a position a step; the default);
- ``static``: a preallocated ``StaticCache``, fixed-shape step, eager;
- ``compiled``: ``static`` with the step under ``torch.compile`` (``mode="reduce-overhead"``,
  i.e. CUDA graphs, on CUDA; Inductor without graphs on CPU).

For each batch size B, every setting starts from the same prompt (10 tokens), is warmed up by
``--warmup`` steps (the compiled one compiles there), then runs ``--rounds`` rounds of ``--steps``
consecutive steps, settings interleaved (ABC, CBA, ...); the host syncs only at the ends of a
round, so a step's time is the round's time / steps (launches overlap as they do in ``sample``).
The cache holds prompt + ``--tokens`` positions (rounded up to 64), like ``lm.sample(..., T)``,
so ``sample`` reuses the compiled step; the context grows from ~10 + warmup to the cache's end.

Compute bound: 2·params·B FLOPs / ``--peak-tflops`` (params include the LM head; attention over
<= 64 positions is negligible here), printed as the ratio step / bound; with ``--peak-tbps``
also the memory bound (weights + the KV cache read once a step) and step / max of the two. Also timed: a whole
``lm.sample(prompt, B, --tokens)`` per setting (prefill + steps + the CDF-inversion sampler),
and the largest |log-prob difference| of each setting from ``dynamic`` after the warm-up.

With ``--bound`` (CPU): the machine's bound in each of ``--dtypes`` (default float32 and
bfloat16), every dtype on copies of the same weights, interleaved. This core's peak matmul rate
per dtype is measured (a large ``torch.mm``, :func:`peak_gflops`), and printed as fractions of
it: each decode step (``lm.extend``, B = ``--batch``); a whole sample per token for ours
(``lm.sample``), plain batched sampling (:func:`plain_sample`: the network with transformers'
cache and ``torch.multinomial``, no log-probs) and HF ``generate`` (``sampling.generate_sample``);
and a training step (:func:`train_step`: forward+backward of the LoRA guide's token log-probs,
B = ``--train-batch``, L = ``--train-tokens``, what an SVI step differentiates). The bound of a
decode step is 2·params·B FLOPs at peak; of a training step 4·params·B·L (forward, and backward
through activations only: the base weights are frozen; LoRA's own products are <1 %).

    python benchmarks/decode_step.py --bound --threads 1                       # CPU, float32 + bfloat16
    python benchmarks/decode_step.py --config-only --batch 16 64             # CPU, float32
    python benchmarks/decode_step.py --smoke                                   # seconds
    python benchmarks/decode_step.py --device cuda --config-only --batch 64 256 1024 \
        --peak-tflops 790 --peak-tbps 3.0
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
from sampling import count_params  # noqa: E402

KV_CACHES = ("dynamic", "static", "compiled")


def time_rounds(lms: dict, states: dict, tok: torch.Tensor, args) -> dict[str, list[float]]:
    """Per-step seconds of each setting, one entry per round (settings interleaved)."""
    names = list(lms)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                _bench.sync(args.device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    states[n] = lms[n].extend(states[n], tok)
                _bench.sync(args.device)
                per_step[n].append((time.perf_counter() - t0) / args.steps)
    return per_step


def kv_bytes_per_row_position(model) -> int:
    """Bytes of keys and values one row keeps per position (all layers)."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = torch.finfo(next(model.parameters()).dtype).bits // 8
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * elt


def bench_batch(lms: dict, prompt: torch.Tensor, B: int, flops_per_row: float, args) -> dict:
    device = args.device
    g = torch.Generator().manual_seed(args.seed + B)
    tok = torch.randint(3, lms["dynamic" if "dynamic" in lms else next(iter(lms))].vocab_size, (B,),
                        generator=g).to(device)
    states, warm_s = {}, {}
    with torch.no_grad():
        for n, lm in lms.items():
            lm.check_context(prompt.shape[-1], args.tokens)  # sizes the static caches
            _bench.sync(device)
            t0 = time.perf_counter()
            s = lm.start(prompt, B)
            for _ in range(args.warmup):
                s = lm.extend(s, tok)
            _bench.sync(device)
            warm_s[n] = time.perf_counter() - t0
            states[n] = s
    ref = next(iter(states))
    diffs = {n: float((states[n].logprobs - states[ref].logprobs).abs().max()) for n in states}
    per_step = time_rounds(lms, states, tok, args)
    steps = {n: _bench.median(v) for n, v in per_step.items()}
    row = {"batch": B, "steps": steps, "step_times": per_step, "warmup_s": warm_s,
           "max_abs_logprob_diff_vs_" + ref: diffs, "gflop_per_step": B * flops_per_row / 1e9,
           "context": [int(prompt.shape[-1]) + args.warmup, int(prompt.shape[-1]) + args.warmup
                       + args.rounds * args.steps]}
    if args.peak_tflops:
        bound = B * flops_per_row / (args.peak_tflops * 1e12)
        row["compute_bound_s"] = bound
        row["step_over_bound"] = {n: t / bound for n, t in steps.items()}
    if args.peak_tbps:
        # every weight read once, plus the keys and values of the mean context of a timed step
        base = next(iter(lms.values()))
        weights = sum(p.numel() * p.element_size() for p in base.model.parameters())
        ctx = sum(row["context"]) / 2
        row["memory_bound_s"] = (weights + B * ctx * kv_bytes_per_row_position(base.model)) / (args.peak_tbps * 1e12)
        if args.peak_tflops:
            bound = max(row["compute_bound_s"], row["memory_bound_s"])
            row["step_over_roofline"] = {n: t / bound for n, t in steps.items()}
    del states  # frees their caches: sample() reuses the compiled setting's pooled one
    if not args.no_sample:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        fns = {n: (lambda lm=lm: lm.sample(prompt, B, args.tokens, generator=gen)) for n, lm in lms.items()}
        times = _bench.interleaved(fns, args.sample_repeats, device)
        row["sample_s"] = {n: _bench.median(v) for n, v in times.items()}
        row["sample_s_per_token"] = {n: t / args.tokens for n, t in row["sample_s"].items()}
    return row


def report(label: str, row: dict, args) -> None:
    B = row["batch"]
    parts = []
    for n, t in row["steps"].items():
        s = f"{n} {t * 1e3:.2f} ms"
        if "step_over_bound" in row:
            s += f" ({row['step_over_bound'][n]:.1f}x bound)"
        parts.append(s)
    bound = f"; compute bound {row['compute_bound_s'] * 1e3:.3f} ms" if "compute_bound_s" in row else ""
    if "memory_bound_s" in row:
        bound += f", memory bound {row['memory_bound_s'] * 1e3:.3f} ms"
    print(f"{label} decode step B={B}: " + ", ".join(parts) + bound, flush=True)
    base = row["steps"].get("dynamic")
    if base:
        print("    speed-up vs dynamic: " + ", ".join(f"{n} {base / t:.2f}x" for n, t in row["steps"].items()
                                                      if n != "dynamic"), flush=True)
    print("    warm-up (start + %d steps, compile included): " % args.warmup
          + ", ".join(f"{n} {t:.1f}s" for n, t in row["warmup_s"].items())
          + "; max |dlogp| vs first: " + ", ".join(
              f"{n} {d:.1e}" for n, d in next(v for k, v in row.items() if k.startswith("max_abs")).items()),
          flush=True)
    if "step_over_roofline" in row:
        print("    step / max(compute, memory bound): " + ", ".join(
            f"{n} {r:.1f}x" for n, r in row["step_over_roofline"].items()), flush=True)
    if "sample_s" in row:
        print(f"    lm.sample(B={B}, T={args.tokens}) per token: " + ", ".join(
            f"{n} {t * 1e3:.2f} ms" for n, t in row["sample_s_per_token"].items()), flush=True)


def peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This core's matmul rate in ``dtype`` (GFLOP/s): a [n, n] x [n, n] ``torch.mm``, best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_sample(lm, prompt: torch.Tensor, B: int, T: int, generator: torch.Generator) -> torch.Tensor:
    """Plain batched ancestral sampling: the network with transformers' KV cache and
    ``torch.multinomial`` on the softmax, T steps, no log-probs, no EOS bookkeeping."""
    from transformers import DynamicCache

    from ppl_lm.lm.hf.kv_cache import cache_keyword

    ids = prompt.to(lm.device)[None].expand(B, -1)
    toks, kw = [], cache_keyword(lm.model)
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad():
        for _ in range(T):
            out = lm.model(input_ids=ids, **{kw: cache}, use_cache=True)
            probs = torch.softmax(out.logits[:, -1].float(), -1)
            ids = torch.multinomial(probs, 1, generator=generator)
            toks.append(ids)
    return torch.cat(toks, -1)


def train_step(guide, prompt: torch.Tensor, tokens: torch.Tensor) -> None:
    """One forward+backward of the guide's per-token log-probs (what an SVI step differentiates)."""
    guide.token_logprobs(prompt, tokens).sum().backward()


def bound_tables(base, prompt: torch.Tensor, flops_per_row: float, params: int, args) -> dict:
    """The bound tables of ``--bound``: decode steps, whole samples and training steps per dtype."""
    from ppl_lm.lm.lora import LoraLM
    from sampling import generate_sample

    nets = {d: (base.model if getattr(torch, d) == base.dtype else copy.deepcopy(base.model).to(getattr(torch, d)))
            for d in args.dtypes}
    lms = {d: ppl_lm_of(base, net) for d, net in nets.items()}
    peak = {d: peak_gflops(getattr(torch, d)) for d in args.dtypes}
    print("peak matmul (2048^3 torch.mm, 1 thread): " + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peak.items()),
          flush=True)
    out = {"peak_gflops": peak, "decode": [], "sample": [], "train": []}
    args.no_sample = True  # bench_batch's own lm.sample timing: the table below times it beside the others
    for B in args.batch if {"decode", "sample"} & set(args.parts) else ():
        if "decode" in args.parts:
            row = bench_batch(lms, prompt, B, flops_per_row, args)
            row["fraction_of_peak"] = {d: B * flops_per_row / 1e9 / peak[d] / t for d, t in row["steps"].items()}
            out["decode"].append(row)
            print(f"decode step B={B}: " + ", ".join(
                f"{d} {t * 1e3:.1f} ms ({row['fraction_of_peak'][d]:.1%} of peak, bound {B * flops_per_row / 1e6 / peak[d]:.1f} ms)"
                for d, t in row["steps"].items()), flush=True)
        if "sample" not in args.parts:
            continue
        gen = torch.Generator().manual_seed(args.seed)
        fns = {}
        for d, lm in lms.items():
            fns[f"{d} ours"] = lambda lm=lm: lm.sample(prompt, B, args.tokens, generator=gen)
            fns[f"{d} plain"] = lambda lm=lm: plain_sample(lm, prompt, B, args.tokens, gen)
            fns[f"{d} generate"] = lambda lm=lm: generate_sample(lm, prompt, B, args.tokens)
        times = _bench.interleaved(fns, args.sample_repeats)
        per_tok = {n: _bench.median(v) / args.tokens for n, v in times.items()}
        frac = {n: B * flops_per_row / 1e9 / peak[n.split()[0]] / t for n, t in per_tok.items()}
        out["sample"].append({"batch": B, "tokens": args.tokens, "s_per_token": per_tok, "fraction_of_peak": frac,
                              "times": times})
        print(f"sample B={B}, T={args.tokens}, per token: " + ", ".join(
            f"{n} {t * 1e3:.1f} ms ({frac[n]:.1%})" for n, t in per_tok.items()), flush=True)
    if "train" not in args.parts:
        return out
    # training: a LoRA guide on a copy of each dtype's network (peft injects in place)
    Bt, Lt = args.train_batch, args.train_tokens
    toks = torch.randint(3, base.vocab_size, (Bt, Lt), generator=torch.Generator().manual_seed(args.seed))
    guides = {d: LoraLM(ppl_lm_of(base, copy.deepcopy(net))) for d, net in nets.items()}
    fns = {d: (lambda g=g: train_step(g, prompt, toks)) for d, g in guides.items()}
    times = _bench.interleaved(fns, args.train_repeats)
    flops = 4 * params * Bt * Lt
    for d, v in times.items():
        t = _bench.median(v)
        out["train"].append({"dtype": d, "batch": Bt, "tokens": Lt, "step_s": t, "times": v,
                             "bound_s": flops / 1e9 / peak[d], "fraction_of_peak": flops / 1e9 / peak[d] / t})
    print(f"train step (forward+backward, LoRA guide) B={Bt}, L={Lt}: " + ", ".join(
        f"{r['dtype']} {r['step_s']:.2f} s ({r['fraction_of_peak']:.1%} of peak, bound {r['bound_s']:.2f} s)"
        for r in out["train"]), flush=True)
    return out


def ppl_lm_of(base, net):
    """A TransformersLM over ``net`` with ``base``'s tokenizer and ids."""
    from ppl_lm import TransformersLM

    return TransformersLM(net, base.tokenizer, eos_id=base.eos_id, bos_id=base.bos_id, vocab=base.vocab)


def main(argv=None):
    p = _bench.parser(__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 16 64)")
    p.add_argument("--kv-caches", nargs="+", default=list(KV_CACHES), choices=KV_CACHES)
    p.add_argument("--tokens", type=int, default=24, help="new tokens the cache holds (and sample's T)")
    p.add_argument("--warmup", type=int, default=6, help="steps before timing (compiles)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--no-sample", action="store_true", help="skip the whole-sample() timing")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for 'compiled' (default inductor; 'eager' checks tracing fast)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak matmul TFLOP/s in --dtype (H100/H200 bf16 dense: ~790 measured)")
    p.add_argument("--peak-tbps", type=float, default=None,
                   help="memory bandwidth TB/s, read + write (H100 ~3.0, H200 ~4.3 measured)")
    p.add_argument("--bound", action="store_true",
                   help="CPU: peak matmul per dtype and every step as a fraction of it (see the docstring)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="with --bound: the dtypes compared")
    p.add_argument("--parts", nargs="+", default=["decode", "sample", "train"], choices=["decode", "sample", "train"],
                   help="with --bound: which tables")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-tokens", type=int, default=24)
    p.add_argument("--train-repeats", type=int, default=3)
    args = p.parse_args(argv)
    _bench.setup(args)
    if args.smoke:
        args.batch = args.batch or [2]
        args.warmup, args.steps, args.rounds, args.sample_repeats = 2, 2, 2, 1
        args.train_batch, args.train_tokens, args.train_repeats = 2, 4, 1
    args.batch = args.batch or [16, 64]
    if 10 + args.warmup + args.rounds * args.steps > 10 + args.tokens + (-(10 + args.tokens)) % 64:
        p.error("warmup + rounds * steps must fit in the cache: prompt 10 + --tokens, rounded up to 64")

    import ppl_lm

    if args.smoke and not args.config_only:
        base = ppl_lm.tiny_char_transformer(seed=args.seed)
        base.model.to(device=args.device, dtype=_bench.dtype_of(args))
        label = "tiny"
    else:
        base = _bench.smollm2(args)
        label = "smollm2-rand" if args.config_only else "smollm2"
    prompt = torch.randint(3, base.vocab_size, (10,), generator=torch.Generator().manual_seed(1))
    total, _ = count_params(base.model)
    flops_per_row = 2 * total  # tied or not, the head is a [V, H] product: counted once in params
    if args.bound:
        print(f"{label}: {total / 1e6:.1f}M parameters, {args.device}, {torch.get_num_threads()} thread(s); "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        _bench.emit("decode_step_bound", {"args": vars(args), "params": total, "model": label,
                                          **bound_tables(base, prompt, flops_per_row, total, args)})
        return
    options = {"backend": args.compile_backend} if args.compile_backend else None
    lms = {n: base.with_kv_cache(n, options) for n in args.kv_caches}
    print(f"{label}: {total / 1e6:.1f}M parameters, {_bench.dtype_of(args)}, {args.device}; "
          f"settings {', '.join(lms)}", flush=True)
    rows = []
    for B in args.batch:
        row = bench_batch(lms, prompt, B, flops_per_row, args)
        row["model"] = label
        report(label, row, args)
        rows.append(row)
    _bench.emit("decode_step", {"args": vars(args), "params": total, "rows": rows})


if __name__ == "__main__":
    main()
