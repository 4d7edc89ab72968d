"""Explicit randomness: every entry point seeds a generator; samplers draw from it.

Pyro calls ``dist.sample()`` with no generator argument, so the active generator is held here
(a :class:`contextvars.ContextVar`, so threads and tasks each see their own), set by
:func:`seeded` around an inference run. Outside ``seeded`` the global torch RNG is used
(``generator`` returns ``None``).
"""

from __future__ import annotations

import contextlib
import contextvars
import random as _pyrandom

import numpy as np
import torch

__all__ = ["seeded", "generator", "current_seed", "check_seed", "MAX_SEED", "Stream"]

#: Seeds are 63-bit non-negative integers (torch generators take 64-bit seeds; we keep a margin
#: for the per-device offsets of :func:`generator`).
MAX_SEED = 2**63 - 1 - 7919 * 64

_active: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ppl_lm_seeding", default=None)


def check_seed(seed) -> int:
    """``seed`` as an int, or a clear error: an integer in ``[0, MAX_SEED]`` (or ``None`` for a fresh one)."""
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer (or None for a fresh random seed), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer between 0 and {MAX_SEED} (2**63 minus a margin), got {seed}")
    return seed


def _devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextlib.contextmanager
def seeded(seed: int | None):
    """Run a block with reproducible randomness: same seed, same samples (on CPU).

    Seeds a private ``torch.Generator`` per device for ppl-lm's samplers and Pyro's global RNGs
    (torch, numpy, random) for everything else, and restores every one of them after, CUDA's
    included (``torch.random.fork_rng``).
    """
    seed = check_seed(seed)
    np_state, py_state = np.random.get_state(), _pyrandom.getstate()
    token = _active.set({"seed": seed, "gens": {}})
    try:
        with torch.random.fork_rng(devices=_devices()):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            _pyrandom.seed(seed)
            yield seed
    finally:
        _active.reset(token)
        np.random.set_state(np_state)
        _pyrandom.setstate(py_state)


def generator(device: torch.device | str = "cpu") -> torch.Generator | None:
    """The active generator for ``device`` (``None`` outside :func:`seeded`)."""
    active = _active.get()
    if active is None:
        return None
    device = torch.device(device)
    key = (device.type, device.index)
    gens = active["gens"]
    if key not in gens:
        g = torch.Generator(device=device)
        g.manual_seed(active["seed"] + 7919 * len(gens))
        gens[key] = g
    return gens[key]


def current_seed() -> int | None:
    active = _active.get()
    return None if active is None else active["seed"]


def state() -> dict:
    """The active generators' states (for checkpoints)."""
    active = _active.get()
    if active is None:
        return {}
    return {k: g.get_state() for k, g in active["gens"].items()}


def set_state(states: dict) -> None:
    for key, st in states.items():
        generator(torch.device(key[0], key[1]) if key[1] is not None else key[0]).set_state(st)


def _global_states() -> tuple:
    """The global RNGs Pyro and model code draw from: torch's CPU generator, numpy's and Python's."""
    return torch.get_rng_state(), np.random.get_state(), _pyrandom.getstate()


def _set_global_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        np.random.set_state(states[1])
        _pyrandom.setstate(states[2])


class Stream:
    """A seeded stream that can be entered, left and entered again, resuming where it stopped.

    :func:`seeded` starts a fresh stream each time; a run that interleaves the draws of several
    independent parts (the contexts of one ``ppl_lm.infer(..., contexts=[...])`` call, batched
    together) holds one ``Stream`` per part and enters the part's stream around each of its draws,
    so every part draws exactly what it would draw alone under ``seeded(seed)``: its ppl-lm
    generators and the global CPU RNGs (torch's, for Pyro's draws; numpy's; Python's ``random``)
    are the part's own. Leaving restores the caller's (inside :func:`seeded`, torch's only: numpy's
    and random's are left for ``seeded`` to restore when it ends).

    >>> s = Stream(3)
    >>> with s: a = torch.rand(2)
    >>> with s: b = torch.rand(2)
    >>> with seeded(3): ref = torch.rand(4)
    >>> bool((torch.cat([a, b]) == ref).all())
    True
    """

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self._active = {"seed": self.seed, "gens": {}}
        self._globals = None  # the global RNGs' states between visits (None: not started)

    def __enter__(self) -> Stream:
        # Inside seeded() (a contexts run), which restores every global RNG on exit, the caller's numpy
        # and random states need no copy here: two ~30 µs numpy state copies fewer per visit.
        self._outer = _global_states() if _active.get() is None else (torch.get_rng_state(), None, None)
        self._token = _active.set(self._active)
        if self._globals is None:
            torch.default_generator.manual_seed(self.seed)  # CPU only: the devices' RNGs are not restored
            np.random.seed(self.seed % 2**32)
            _pyrandom.seed(self.seed)
        else:
            _set_global_states(self._globals)
        return self

    def __exit__(self, *exc) -> None:
        self._globals = _global_states()
        _set_global_states(self._outer)
        _active.reset(self._token)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """This stream's generator for ``device`` (what :func:`generator` returns inside it)."""
        token = _active.set(self._active)
        try:
            return generator(device)
        finally:
            _active.reset(token)
