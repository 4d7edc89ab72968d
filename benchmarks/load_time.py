"""Time to load the embedded SmolLM2: converting its GGUF every time (before) vs the float cache (after).

Each load runs in a fresh Python process (what a user's second ``ppl-lm run`` pays), after
``import ppl_lm``, with one torch thread; the two kinds are interleaved (uncached, cached,
cached, uncached, ...) so machine load affects both alike. The cache folder is a temporary one,
filled once before timing.

    python benchmarks/load_time.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
import ppl_lm
t0, c0 = time.perf_counter(), time.process_time()
ppl_lm.load_lm(cache=sys.argv[1] == "cached", progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}))
"""


def load_seconds(kind: str, cache: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one load in a fresh process. On a busy machine the CPU time
    (one thread) is close to what the load takes on an idle one."""
    env = {**os.environ, "PPL_LM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, kind], env=env, capture_output=True, text=True, check=True)
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return t["seconds"], t["cpu"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first, _ = load_seconds("cached", cache)  # converts and fills the cache
        times: dict[str, list[tuple[float, float]]] = {"uncached": [], "cached": []}
        for r in range(args.repeats):
            for kind in (("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")):
                times[kind].append(load_seconds(kind, cache))
                wall, cpu = times[kind][-1]
                print(f"repeat {r} {kind:8s} wall {wall:6.2f} s, cpu {cpu:6.2f} s", flush=True)
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    (uw, uc), (cw, cc) = med["uncached"], med["cached"]
    print(f"first load (convert + write cache) {first:.2f} s; median uncached {uw:.2f} s wall / {uc:.2f} s cpu, "
          f"cached {cw:.2f} s wall / {cc:.2f} s cpu; ratio {uw / cw:.1f}x wall; load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"benchmark": "load_time", "first": first, "times": times, "ratio_wall": uw / cw}))


if __name__ == "__main__":
    main()
