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
t0 = time.perf_counter()
ppl_lm.load_lm(cache=sys.argv[1] == "cached", progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def load_seconds(kind: str, cache: str) -> float:
    env = {**os.environ, "PPL_LM_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, kind], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = load_seconds("cached", cache)  # converts and fills the cache
        times: dict[str, list[float]] = {"uncached": [], "cached": []}
        for r in range(args.repeats):
            for kind in (("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")):
                times[kind].append(load_seconds(kind, cache))
                print(f"repeat {r} {kind:8s} {times[kind][-1]:6.2f} s", flush=True)
    u, c = statistics.median(times["uncached"]), statistics.median(times["cached"])
    print(f"first load (convert + write cache) {first:.2f} s; median uncached {u:.2f} s, cached {c:.2f} s; "
          f"ratio {u / c:.1f}x; load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"benchmark": "load_time", "first": first, "uncached": times["uncached"],
                      "cached": times["cached"], "ratio": u / c}))


if __name__ == "__main__":
    main()
