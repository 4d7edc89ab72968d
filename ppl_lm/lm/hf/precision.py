"""The parameter dtype of a loaded LM: ``"auto"``, ``"float32"`` or ``"bfloat16"``.

``"auto"`` picks bfloat16 on CUDA, and on a CPU whose flags include AMX-BF16 or AVX512-BF16
when a short timed probe (a decode-shaped matmul, about 20 ms, once per process) finds bfloat16
at least :data:`BF16_MIN_SPEEDUP` times faster than float32 on the threads torch uses; float32
everywhere else (other CPUs, MPS). ``benchmarks/decode_step.py`` measured the model-level gain
behind the rule (``benchmarks/RESULTS.md``, section 20).

bfloat16 changes the model, not the inference: the target of every backend is the bfloat16 LM
(its log-softmax is taken in float32, so rows still sum to one), samples differ from float32's,
and log Z agrees with float32's within the tolerance measured in the README.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["DTYPES", "BF16_MIN_SPEEDUP", "check_dtype", "choose_dtype", "cpu_bf16_flags", "bf16_matmul_speedup"]

#: The names ``load_lm(dtype=...)`` and the CLI's ``--dtype`` take.
DTYPES = ("auto", "float32", "bfloat16")
#: The probe's bfloat16 / float32 matmul speed-up above which ``"auto"`` takes bfloat16 on CPU.
BF16_MIN_SPEEDUP = 1.3
_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}


def check_dtype(dtype) -> str | torch.dtype | None:
    """``dtype`` as one of :data:`DTYPES` (or a ``torch.dtype`` / ``None`` as given), or a clear error.

    Cheap, so callers run it before loading anything.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if name in DTYPES:
            return name
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(map(repr, DTYPES))} (or a torch.dtype)")


def cpu_bf16_flags() -> tuple[str, ...]:
    """The bfloat16 matmul flags of this CPU (``amx_bf16``, ``avx512_bf16``) from /proc/cpuinfo; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(f for f in _CPU_FLAGS if f in have)
    except OSError:
        pass
    return ()


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup(threads: int | None = None) -> float:
    """float32 time / bfloat16 time of a decode-shaped CPU matmul ([64, 1024] x [1024, 1024]), best of 5.

    ``threads`` only keys the cache (the probe runs on torch's current thread count).
    """
    del threads
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(64, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = a32.to(dt), b32.to(dt)
        torch.mm(a, b)  # first call: kernel selection, allocation
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best[dt] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def choose_dtype(dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """``(torch dtype, why)`` for ``load_lm(dtype=...)`` on ``device``; ``why`` is shown in the load status line."""
    dtype = check_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype, "as asked"
    if dtype in ("float32", "bfloat16"):
        return getattr(torch, dtype), "as asked"
    if device.type == "cuda":
        return torch.bfloat16, "auto: CUDA"
    if device.type != "cpu":
        return torch.float32, f"auto: {device.type}"
    flags = cpu_bf16_flags()
    if not flags:
        return torch.float32, "auto: this CPU has no AMX-BF16 or AVX512-BF16"
    speedup = bf16_matmul_speedup(torch.get_num_threads())
    if speedup >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"auto: {flags[0]}, bfloat16 matmul {speedup:.1f}x float32"
    return torch.float32, f"auto: {flags[0]} but bfloat16 matmul only {speedup:.1f}x float32"
