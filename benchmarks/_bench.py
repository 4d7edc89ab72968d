"""Shared plumbing for the benchmarks: arguments, models, interleaved timing, the JSON line.

Benchmarks of our own code paths run them in ONE process, interleaved (ours, baseline, baseline,
ours, ...) over several repeats, and report medians and their ratio: on a shared machine the
absolute numbers drift, the ratio much less. Benchmarks against a peer library (genlm-control,
LLaMPPL, TRL) run each side in its own fresh process instead (``_procs``; issue 24: a peer sharing
our process ran 1.3–1.5× slower).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# SmolLM2-135M(-Instruct)'s architecture, for random-weight runs on machines without the GGUF.
SMOLLM2_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that the script runs")
    p.add_argument("--config-only", action="store_true",
                   help="SmolLM2-135M's architecture with random weights (no GGUF needed)")
    p.add_argument("--tokenizer", default=None,
                   help="with --config-only: a saved tokenizer folder (SmolLM2's) for text conditions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but torch sees no CUDA device")
    import transformers

    transformers.logging.set_verbosity_error()


def dtype_of(args) -> torch.dtype:
    if args.dtype is not None:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32


def smollm2_random(device="cpu", dtype=torch.float32, seed: int = 0, tokenizer: str | None = None):
    """SmolLM2-135M's exact config with random weights, wrapped as a TransformersLM.

    ``tokenizer``: a folder holding SmolLM2's tokenizer (``save_pretrained``), for benchmarks
    whose conditions read text; without it the LM has no tokenizer.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppl_lm import TransformersLM

    cfg = LlamaConfig(**SMOLLM2_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    return TransformersLM(model, tok, eos_id=2, bos_id=1)


def smollm2(args):
    """The real SmolLM2 (embedded GGUF) or, with ``--config-only``, its architecture with random weights."""
    import ppl_lm

    if args.config_only:
        return smollm2_random(args.device, dtype_of(args), args.seed, args.tokenizer)
    return ppl_lm.load_lm(device=args.device, dtype=dtype_of(args))


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device="cpu",
                warmup: int = 1) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, alternating the order each round (ABBA...)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
            sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def emit(name: str, result: dict) -> None:
    """Print the result as one JSON line (``BENCH {...}``) and append it to out/<name>.jsonl."""
    result = {"benchmark": name, "machine": machine(), **result}
    line = json.dumps(result, default=_jsonable)
    print("BENCH " + line, flush=True)
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, f"{name}.jsonl"), "a") as f:
        f.write(line + "\n")


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    return str(x)
