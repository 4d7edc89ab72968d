"""1 -> 2 processes: importance sampling and SMC with their parts shared by gloo ranks (issue 23).

Runs this script under ``torchrun`` with K = 1 and K = 2 processes (one torch thread each), in
alternating order over ``--repeats`` rounds, on the lipogram task (``models/no_e.py``) with the same
seed and ``chunk_size = N / 2`` (two islands, two chunks; importance avoids the letter q instead of
e, which prior draws do not manage), so both run the same parts and must give
the same log Z (checked). Reported per run, from rank 0: the wall time of the inference call (from
a barrier before it to the gathered result; process start and the LM load excluded), the bytes
the parts take when gathered (pickled, all ranks, per particle) and the machine's load average.

    python benchmarks/distributed_speedup.py --repeats 3            # SmolLM2
    python benchmarks/distributed_speedup.py --smoke                # tiny LM: checks the script
    python benchmarks/distributed_speedup.py --pool-cost 100000     # rank 0's serial share, toy LM
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TAG = "DIST_WORKER "


def worker(args) -> None:
    import torch.distributed as dist

    import ppl_lm
    from ppl_lm.inference import distributed, shards
    from ppl_lm.models import no_e

    torch.set_num_threads(1)
    rank, size = distributed.init("gloo")

    class Measured(distributed.TorchShard):
        def gather(self, parts):
            self.bytes = len(pickle.dumps(sorted(parts.items()), protocol=pickle.HIGHEST_PROTOCOL))
            return super().gather(parts)

    lm = ppl_lm.tiny_char_transformer(seed=0) if args.smoke else _bench.smollm2(args)
    # prior importance sampling finds no lipogram at this N: it avoids the rare letter q instead
    models = {"smc": no_e.build(lm, max_new_tokens=args.tokens),
              "importance": no_e.build(lm, chars="Qq", max_new_tokens=args.tokens)}
    n = args.num_particles
    for method, model in models.items():
        size_opt = "num_particles" if method == "smc" else "num_samples"
        opts = {size_opt: n, "chunk_size": n // 2, "progress": False}
        shard = Measured(rank, size)
        dist.barrier()
        t0 = time.perf_counter()
        with shards.sharded(shard):
            post = ppl_lm.infer(model, no_e.context, method=method, seed=args.seed, **opts)
        seconds = time.perf_counter() - t0
        total = torch.tensor([shard.bytes], dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0:
            print(TAG + json.dumps({"method": method, "processes": size, "seconds": seconds, "N": n,
                                    "log_z": post.log_evidence, "ess": post.ess,
                                    "bytes_per_particle": float(total) / n,
                                    "load_avg": os.getloadavg()[0]}), flush=True)
    dist.destroy_process_group()


def pool_cost(n: int, seed: int) -> dict:
    """What rank 0 does alone, at ``n`` particles of a toy (MarkovLM, 4 tokens, 4 islands): pickling
    and unpickling the gathered parts (what ``gather_object`` adds to the transfer) and pooling
    them (``combine``), against the SMC run itself (in one process)."""
    import pyro

    import ppl_lm
    from ppl_lm.inference import shards
    from ppl_lm.inference.smc import driver

    lm = ppl_lm.MarkovLM.random(5, eos_id=0, seed=3)

    def model():
        x = pyro.sample("x", lm.sequence([], max_new_tokens=4))
        ppl_lm.reward("r", (x == 2).float().sum(-1) - 0.3 * ppl_lm.rewards.length(lm, x), beta=0.5)

    class Kept(shards.Shard):
        def gather(self, parts):
            self.parts = super().gather(parts)
            return self.parts

    timed, combine = {}, driver.combine

    def timed_combine(*a, **k):
        t0 = time.perf_counter()
        out = combine(*a, **k)
        timed["combine"] = time.perf_counter() - t0
        return out

    driver.combine, kept = timed_combine, Kept()
    try:
        t0 = time.perf_counter()
        with shards.sharded(kept):
            ppl_lm.infer(model, method="smc", num_particles=n, chunk_size=n // 4, seed=seed, progress=False)
        total = time.perf_counter() - t0
    finally:
        driver.combine = combine
    t0 = time.perf_counter()
    blob = pickle.dumps(list(enumerate(kept.parts)), protocol=pickle.HIGHEST_PROTOCOL)
    pickle.loads(blob)
    return {"N": n, "run_seconds": total, "combine_seconds": timed["combine"],
            "pickle_roundtrip_seconds": time.perf_counter() - t0, "bytes_per_particle": len(blob) / n}


def launch(k: int, argv: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "--master_port",
           str(29500 + k), os.path.abspath(__file__), "--worker", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.exit(f"torchrun K={k} failed:\n{out.stderr[-3000:]}")
    return [json.loads(line[len(TAG):]) for line in out.stdout.splitlines() if line.startswith(TAG)]


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--num-particles", type=int, default=64, help="N (two parts of N/2)")
    p.add_argument("--tokens", type=int, default=16, help="max_new_tokens")
    p.add_argument("--pool-cost", type=int, default=None, metavar="N",
                   help="instead: time rank 0's serial share (pickling, pooling) at N toy particles")
    args = p.parse_args()
    if args.pool_cost:
        torch.set_num_threads(1)
        _bench.emit("distributed_pool_cost", pool_cost(args.pool_cost, args.seed))
        return
    if args.smoke:
        args.num_particles, args.tokens = 16, 4
    if args.worker:
        worker(args)
        return
    passthrough = [a for a in sys.argv[1:] if a != "--worker"]
    repeats = args.repeats or (1 if args.smoke else 3)
    rows = []
    for r in range(repeats):
        for k in ((1, 2) if r % 2 == 0 else (2, 1)):
            for row in launch(k, passthrough):
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"rows": rows}
    for method in ("smc", "importance"):
        one = [x["seconds"] for x in rows if x["method"] == method and x["processes"] == 1]
        two = [x["seconds"] for x in rows if x["method"] == method and x["processes"] == 2]
        zs = {round(x["log_z"], 9) for x in rows if x["method"] == method}
        result[method] = {"seconds_1": _bench.median(one), "seconds_2": _bench.median(two),
                          "speedup": _bench.median(one) / _bench.median(two), "same_log_z": len(zs) == 1,
                          "bytes_per_particle": next(x["bytes_per_particle"] for x in rows if x["method"] == method)}
        print(f"{method}: 1 process {result[method]['seconds_1']:.2f} s, 2 processes "
              f"{result[method]['seconds_2']:.2f} s, speed-up {result[method]['speedup']:.2f}; "
              f"same log Z in every run: {len(zs) == 1}", flush=True)
    _bench.emit("distributed_speedup", result)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
