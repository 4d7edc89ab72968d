"""Importance sampling, SMC and SVI across processes (``torch.distributed``), launched by ``torchrun``.

::

    torchrun --nproc_per_node=K -m ppl_lm.inference.distributed run no_e --method smc --num-particles 100000
    torchrun --nproc_per_node=K -m ppl_lm.inference.distributed run no_e --method importance --num-samples 100000
    torchrun --nproc_per_node=K -m ppl_lm.inference.distributed run sentiment --method svi --num-steps 200 \\
        --num-particles 64 --device cuda --out guide.pt

``run MODEL`` takes the flags of ``ppl-lm run`` (``--lm``, ``--context``, ``--set``, the backend's
options...) but ``--contexts FILE`` (refused: run it with ``ppl-lm run`` in one process), plus ``--backend`` (``gloo`` or ``nccl``; default ``nccl`` with ``--device cuda``,
else ``gloo``) and, for SVI, ``--out``. ``--device cuda`` gives each process ``cuda:LOCAL_RANK``.
Rank 0 prints (and writes ``--report``); without ``torchrun`` it runs in one process.

**Importance and SMC.** A run is made of independent parts (:mod:`ppl_lm.inference.shards`):
importance sampling's chunks of ``chunk_size`` draws, SMC's islands of at most ``chunk_size``
particles (or batches of whole replicates). Of K processes, rank r computes the parts i with
``i % K == r``; part i draws from its own seed, so it draws the same on any rank. At the end the
parts are gathered to rank 0 (``torch.distributed.gather_object``: tokens and per-sample scalars,
see ``benchmarks/RESULTS.md`` for the bytes), which pools them with the single-process code:
log Ẑ = log Σ_u (n_u/N)·Ẑ_u over SMC's islands (the mean of the weights for importance), the
standard error from the islands (Lee–Whiteley per island; the spread of replicates with
``num_replicates >= 2``), every particle weighted (n_u/N)·Ẑ_u·W_uj. Same seed and same
``chunk_size``: the result equals the single-process run's, sample for sample, log Z included
(bit for bit on CPU, where the same rows are computed the same way). Nothing crosses the wire
while the parts run: resampling stays within an island.

With ``chunk_size=None`` a distributed run splits its particles into parts of at most
``ceil(total / K)`` (and the backend's memory bound); ``post.info.chunk_size`` records the size, and a
single-process run with that ``chunk_size`` reproduces the result.

**SVI.** ``--method svi`` trains the guide data-parallel (:mod:`ppl_lm.inference.svi.distributed`:
each process draws its blocks of each step, the gradients are summed), rank 0 saves it with ``--out``.

From Python, on every process of an initialised group (:func:`init` reads torchrun's environment)::

    post = ppl_lm.inference.distributed.run(model, prompt, method="smc", num_particles=100_000, seed=0)
    # rank 0: the pooled Posterior; other ranks: None (dst=None: every rank gets it)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

from ppl_lm.inference import shards

__all__ = ["METHODS", "TorchShard", "init", "main", "run", "world"]

log = logging.getLogger(__name__)

#: The methods a distributed run takes.
METHODS = ("importance", "smc", "svi")
#: The methods whose parts are sharded by :func:`run` (SVI trains with its own data-parallel loss).
SHARDED = ("importance", "smc")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (idempotent).

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. Returns
    ``(rank, world_size)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("no process group and no torchrun environment (RANK, WORLD_SIZE): launch with "
                               "`torchrun --nproc_per_node=K -m ppl_lm.inference.distributed run MODEL ...`")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return world()


class TorchShard(shards.Shard):
    """Rank ``rank`` of ``size`` computes the parts ``i % size == rank``; the parts are gathered to
    ``dst`` (every rank when ``dst`` is ``None``), in part order.

    ``chunk_size``: parts of at most ``ceil(total / size)`` particles (within the backend's
    default), so that every rank has work.
    """

    def __init__(self, rank: int | None = None, size: int | None = None, dst: int | None = 0):
        r, s = world()
        self.rank, self.size = (r if rank is None else rank), (s if size is None else size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.size} processes")
        if dst is not None and not 0 <= dst < self.size:
            raise ValueError(f"dst={dst} is not a rank of the {self.size} processes (0..{self.size - 1}), or None")
        self.dst = dst

    def owns(self, part: int) -> bool:
        return part % self.size == self.rank

    def chunk_size(self, default: int, total: int) -> int:
        return max(2, min(default, math.ceil(total / self.size)))

    def gather(self, parts: dict[int, Any]) -> list | None:
        mine = sorted(parts.items())
        if self.size == 1:
            return [p for _, p in mine]
        if self.dst is None:
            every: list | None = [None] * self.size
            dist.all_gather_object(every, mine)
        else:
            every = [None] * self.size if self.rank == self.dst else None
            dist.gather_object(mine, every, dst=self.dst)
        if every is None:
            return None
        merged = dict(kv for rank_parts in every for kv in rank_parts)
        if len(merged) != sum(len(x) for x in every):
            raise RuntimeError("two ranks computed the same part: every rank must run with the same world size")
        if sorted(merged) != list(range(len(merged))):
            raise RuntimeError(f"parts {sorted(set(range(max(merged) + 1)) - set(merged))} are missing: every rank "
                               "must run the same model, options and seed")
        return [merged[i] for i in range(len(merged))]


def run(model: Callable, *args, method: str = "smc", seed: int = 0, dst: int | None = 0, **options):
    """``ppl_lm.infer`` for importance sampling or SMC, its parts shared by the processes of the group.

    Call it on every process of an initialised group (:func:`init`), with the same arguments; without
    a group it is ``ppl_lm.infer``.

    Args:
        model, *args: the vectorised model and its arguments.
        method: ``"importance"`` or ``"smc"``.
        seed: the run's seed (same seed, same ``chunk_size``: the single-process result).
        dst: the rank that pools the parts and gets the Posterior; ``None``: every rank does.
        **options: the backend's options (``num_particles``, ``chunk_size``, ``num_replicates``...).

    Returns:
        The pooled :class:`~ppl_lm.Posterior` on ``dst`` (every rank if ``dst`` is ``None``), ``None``
        on the other ranks.
    """
    import ppl_lm

    if method not in SHARDED:
        raise ValueError(f"method={method!r}: a distributed run shares the parts of {' or '.join(SHARDED)}; "
                         "for SVI use ppl_lm.inference.svi.distributed.train")
    with shards.sharded(TorchShard(dst=dst)):
        return ppl_lm.infer(model, *args, method=method, seed=seed, **options)


# -- the command line ----------------------------------------------------------------------------

USAGE = ("python -m ppl_lm.inference.distributed run MODEL --method importance|smc|svi [ppl-lm run options] "
         "[--backend gloo|nccl] [--out FILE]  (launched by torchrun --nproc_per_node=K)")


def _local_device(device: str | None) -> str | None:
    """``cuda`` -> ``cuda:LOCAL_RANK`` (one GPU per process)."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def main(argv=None) -> int:
    """``torchrun --nproc_per_node=K -m ppl_lm.inference.distributed run MODEL --method ...``."""
    from ppl_lm import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(prog="python -m ppl_lm.inference.distributed", usage=USAGE, add_help=False)
    pre.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    pre.add_argument("--out", default=None)
    extra, rest = pre.parse_known_args(argv)
    if not rest or rest[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__.split('**Importance')[0].strip()}")
        return 0 if rest else 2
    if rest[0] != "run":
        print(f"error: the command is `run` (got {rest[0]!r})\nusage: {USAGE}", file=sys.stderr)
        return 2
    args = cli.build_parser().parse_args(rest)
    if args.method not in METHODS:
        print(f"error: --method {args.method}: a distributed run takes {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if extra.out is not None and args.method != "svi":
        print("error: --out saves an SVI guide; for importance and smc use --report DIR", file=sys.stderr)
        return 2
    if args.contexts is not None:  # before the LM loads, as `ppl-lm run --contexts` checks
        try:
            cli.check_contexts(args, args.method)  # svi: refused with the single-process CLI's words
        except cli.CLIError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("error: --contexts FILE is not shared over processes (every rank would run every context): run "
              "`ppl-lm run MODEL --contexts FILE` in one process (importance and smc batch the contexts' LM calls), "
              "or one distributed run per context with --context TEXT", file=sys.stderr)
        return 2
    backend = extra.backend or ("nccl" if (args.device or "").startswith("cuda") else "gloo")
    rank, size = init(backend) if "RANK" in os.environ else world()
    argv = _rank_argv(rest, rank, args.device, _local_device(args.device))
    try:
        if args.method == "svi":
            _run_svi(cli.build_parser().parse_args(argv), extra.out, rank)
            return 0
        with shards.sharded(TorchShard(rank, size, dst=0)):
            return cli.main(argv)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _rank_argv(rest: list[str], rank: int, device: str | None, local: str | None) -> list[str]:
    """The ``ppl-lm run`` arguments of this rank: ``cuda`` made ``cuda:LOCAL_RANK``; ranks other than
    0 quiet, without ``--report`` and top samples (rank 0 prints the pooled result)."""
    out, skip = [], False
    for tok in rest:
        if skip:
            skip = False
        elif rank and tok == "--report":
            skip = True
        elif not (rank and tok.startswith("--report=")):
            out.append(tok)
    if local != device:
        out += ["--device", local]
    return out + (["--quiet", "--top", "0"] if rank else [])


def _run_svi(args: argparse.Namespace, out: str | None, rank: int) -> None:
    """Data-parallel SVI training (:func:`ppl_lm.inference.svi.distributed.train`); rank 0 logs the
    last step and saves the guide with ``out``."""
    import inspect
    import json

    from ppl_lm import cli
    from ppl_lm.inference.svi import distributed as svi_dist

    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    _, _, model, ctx, options = cli.prepare(args, ["svi"], strict=True)
    takes = inspect.signature(svi_dist.train).parameters
    opts = {k: v for k, v in options["svi"].items() if k in takes}
    ignored = sorted(set(options["svi"]) - set(opts))
    if ignored:
        log.info("distributed svi trains the guide only; not used: %s", ", ".join(ignored))
    res = svi_dist.train(model, *ctx, seed=args.seed, **opts)
    if rank == 0:
        summary = {k: float(v[-1]) for k, v in res.trace.items() if len(v)}
        log.info("done: %s; %s", json.dumps(res.info), json.dumps(summary))
        if out:
            torch.save({"guide": res.guide.state_dict(), "trace": res.trace, "info": res.info}, out)
            log.info("guide saved to %s", out)


if __name__ == "__main__":
    raise SystemExit(main())
