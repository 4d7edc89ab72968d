"""The independent parts of a run: which ones this process computes, and how they come together.

Importance sampling draws its samples in chunks and SMC runs its particles as islands (or batches of
replicates): parts that need nothing from each other until the end, where they are pooled. A run
goes through its parts in order, each under its own seed :func:`part_seed` ``(seed, i)``
(:func:`part_stream`; part 0's is the run's seed). So what a part draws does not depend on which
process computes it, on whether the parts before it were computed here at all, nor on what the
run's set-up drew before the parts began.

The active :class:`Shard` (a context variable, like the active generator of
:mod:`ppl_lm.seeding`) says which parts this process computes and how the computed parts come
together. The default computes every part in this process. :mod:`ppl_lm.inference.distributed`
installs one that computes every K-th part on each of K processes and gathers the parts to one of
them, which pools them exactly as a single process would; the run then returns ``None`` on the
other processes.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

from ppl_lm import seeding as _random

__all__ = ["Shard", "sharded", "current", "part_seed", "part_stream"]


class Shard:
    """Every part, computed and pooled in this process (the default).

    A subclass decides :meth:`owns` (which parts this process computes), :meth:`chunk_size`
    (the default part size when the user gives none) and :meth:`gather` (where the parts meet).
    """

    def owns(self, part: int) -> bool:
        """Whether this process computes part ``part``."""
        return True

    def chunk_size(self, default: int, total: int) -> int:
        """The part size a run uses when the user gives none: ``default`` (the backend's memory
        bound) here; ``total`` is the run's number of particles (all replicates)."""
        return default

    def gather(self, parts: dict[int, Any]) -> list | None:
        """The parts of the whole run in part order, on the process that pools them; ``None`` on
        the others. ``parts``: the parts this process computed, by index."""
        return [parts[i] for i in sorted(parts)]


_active: contextvars.ContextVar[Shard] = contextvars.ContextVar("ppl_lm_shard", default=Shard())


@contextlib.contextmanager
def sharded(shard: Shard):
    """Run a block with ``shard`` as the active :class:`Shard`."""
    if not isinstance(shard, Shard):
        raise TypeError(f"sharded() takes a ppl_lm.inference.shards.Shard, got {type(shard).__name__}")
    token = _active.set(shard)
    try:
        yield shard
    finally:
        _active.reset(token)


def current() -> Shard:
    """The active :class:`Shard` (the single-process one outside :func:`sharded`)."""
    return _active.get()


def part_seed(seed: int, part: int) -> int:
    """The seed of part ``part`` of a run seeded by ``seed``: ``seed`` itself for part 0 (a run of
    one part draws what it drew before parts existed), distinct seeds for distinct parts.

    >>> part_seed(7, 0), part_seed(0, 1) != part_seed(0, 2) != part_seed(1, 1)
    (7, True)
    """
    if part == 0:
        return int(seed)
    return (int(seed) * 1_000_003 + int(part) * 7_919 + 17) % _random.MAX_SEED


@contextlib.contextmanager
def part_stream(part: int):
    """Draw part ``part`` of the running (seeded) run from a fresh stream seeded by
    :func:`part_seed` ``(seed, part)``."""
    seed = _random.current_seed()
    if seed is None:  # not in a seeded run: nothing to make reproducible
        yield
        return
    with _random.seeded(part_seed(seed, part)):
        yield
