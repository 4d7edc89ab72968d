"""Each side of a benchmark in its own fresh process (issue 24: a peer sharing our process ran slower).

A benchmark script is both the driver and the worker. The driver calls :func:`run_worker` for
each (side, configuration, repeat): it starts ``python <script> <argv> --worker NAME --out FILE``,
waits, and returns the JSON the worker wrote, plus the child's wall and CPU seconds (the whole
process: loading included) and the load average. The worker (``args.worker`` set) does one
thing and hands its result to :func:`write_result`. :func:`order` alternates which side runs
first from one repeat to the next, so a drift of the machine's load favours neither side.

    p = _bench.parser(...); _procs.add_worker_args(p, WORKERS)
    if args.worker:
        return _procs.write_result(args, WORKERS[args.worker](args))
    for rep in range(R):
        for side in _procs.order(["ours", "peer"], rep):
            res[side] = _procs.run_worker(__file__, argv, side, ["--seed", str(seed)])
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def add_worker_args(p: argparse.ArgumentParser, workers) -> None:
    """The hidden ``--worker NAME`` and ``--out FILE`` a driver passes to its own script."""
    p.add_argument("--worker", choices=sorted(workers), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)


def order(sides, rep: int) -> list:
    """The sides in their given order on even repeats, reversed on odd ones."""
    sides = list(sides)
    return sides if rep % 2 == 0 else sides[::-1]


def without(argv, *options) -> list[str]:
    """``argv`` without the given options and every value that follows each (``--seed 3``,
    ``--batch 16 64``, ``--seed=3``): the driver sets them per worker. Benchmarks take no positionals."""
    out, skip = [], False
    for a in argv:
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            skip = name in options and "=" not in a
            if name in options:
                continue
        if not skip:
            out.append(a)
    return out


def run_worker(script: str, argv, name: str, extra=(), python: str | None = None, env=None,
               label: str | None = None) -> dict:
    """Run ``script`` as worker ``name`` in a fresh process and return its JSON result.

    ``argv``: the driver's arguments to pass through; ``extra``: more (``["--seed", "3"]``);
    ``python``: another interpreter (a peer needing its own venv); ``env``: extra environment.
    Adds ``process_s`` (wall), ``process_cpu_s`` (the child's user + system CPU seconds, loading
    included), ``load_avg`` (at its end) and ``worker``. Exits with the worker's stderr tail
    when it fails.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [python or sys.executable, os.path.abspath(script), *argv, "--worker", name, "--out", out,
           *[str(a) for a in extra]]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        os.unlink(out)
        sys.exit(f"worker {label or name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    res.update(worker=label or name, process_s=wall, load_avg=[round(x, 2) for x in os.getloadavg()],
               process_cpu_s=(ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime))
    return res


def write_result(args, res: dict) -> None:
    """The worker's last act: its result as JSON into ``--out``."""
    with open(args.out, "w") as f:
        json.dump(res, f, default=_jsonable)


class Clock:
    """Wall and CPU seconds (``time.process_time``: every thread of this process) of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def _jsonable(x):
    """torch tensors and numpy arrays / scalars as lists and numbers; anything else as its string."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
