"""Tests on several processes: a worker run on K ``gloo`` processes spawned from pytest."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, worker: Callable[[int, int], Any], size: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'init')}", rank=rank,
                            world_size=size)
    try:
        torch.save(worker(rank, size), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable[[int, int], Any], folder, size: int = 2) -> list:
    """``worker(rank, size)`` on ``size`` processes of one gloo group; what each returns, by rank.

    ``worker`` must be a module-level function (the processes import it); ``folder`` an empty
    folder for the group's rendezvous file and the results.
    """
    mp.spawn(_entry, args=(worker, size, str(folder)), nprocs=size, join=True)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(size)]
