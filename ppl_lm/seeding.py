"""Explicit randomness: every entry point seeds a generator; samplers draw from it.

Pyro calls ``dist.sample()`` with no generator argument, so the active generator is held
here, set by :func:`seeded` around an inference run. Outside ``seeded`` the global torch RNG
is used (``generator`` returns ``None``).
"""

from __future__ import annotations

import contextlib
import random as _pyrandom

import numpy as np
import torch

__all__ = ["seeded", "generator", "current_seed"]

_stack: list[dict] = []


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run a block with reproducible randomness: same seed, same samples (on CPU).

    Seeds a private ``torch.Generator`` per device for ppl-lm's samplers and Pyro's global
    RNG (torch, numpy, random) for everything else; restores the previous generators after.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    saved = (torch.get_rng_state(), np.random.get_state(), _pyrandom.getstate())
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    _pyrandom.seed(seed)
    _stack.append({"seed": seed, "gens": {}})
    try:
        yield seed
    finally:
        _stack.pop()
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        _pyrandom.setstate(saved[2])


def generator(device: torch.device | str = "cpu") -> torch.Generator | None:
    """The active generator for ``device`` (``None`` outside :func:`seeded`)."""
    if not _stack:
        return None
    device = torch.device(device)
    key = (device.type, device.index)
    gens = _stack[-1]["gens"]
    if key not in gens:
        g = torch.Generator(device=device)
        g.manual_seed(_stack[-1]["seed"] + 7919 * len(gens))
        gens[key] = g
    return gens[key]


def current_seed() -> int | None:
    return _stack[-1]["seed"] if _stack else None


def state() -> dict:
    """The active generators' states (for checkpoints)."""
    if not _stack:
        return {}
    return {k: g.get_state() for k, g in _stack[-1]["gens"].items()}


def set_state(states: dict) -> None:
    for key, st in states.items():
        generator(torch.device(key[0], key[1]) if key[1] is not None else key[0]).set_state(st)
