"""The fair harness's argument plumbing (benchmarks/_procs.py): what a driver hands its workers.

A worker that inherits the driver's ``--batch 16 64`` next to its own ``--batch 16`` fails to parse
(``sampling.py --procs`` did, once); one that inherits ``--seed 0`` next to its own ``--seed 3`` runs
the wrong seed silently. Both are checked here, with the order of sides over repeats.
"""

from __future__ import annotations

from toys import load_benchmark


def _procs():
    return load_benchmark("_procs")


def test_without_drops_every_value_of_each_option():
    without = _procs().without
    argv = ["--models", "smollm2", "--smc", "--batch", "16", "64", "--repeats", "3", "--seed=3", "--threads", "1"]
    assert without(argv, "--batch", "--models", "--seed") == ["--smc", "--repeats", "3", "--threads", "1"]
    assert without(["--seed", "0", "--steps", "30"], "--seed") == ["--steps", "30"]
    assert without(argv) == argv  # nothing asked: nothing dropped


def test_order_alternates_the_sides_over_repeats():
    order = _procs().order
    assert [order(["ours", "peer"], r) for r in range(3)] == [["ours", "peer"], ["peer", "ours"], ["ours", "peer"]]
