"""One entry point for every backend: ``ppl_lm.infer(model, *args, method=..., seed=...)``."""

from __future__ import annotations

import importlib
import time
from typing import Callable

from .posterior import Posterior

__all__ = ["infer", "METHODS"]

METHODS = ("exact", "importance", "smc", "mh", "svi")


def backend(method: str):
    """The module ``ppl_lm.inference.<method>``; a clear error for unknown names."""
    if method not in METHODS:
        raise ValueError(f"unknown inference method {method!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"ppl_lm.inference.{method}")


def infer(model: Callable, *args, method: str = "importance", seed: int = 0, **options) -> Posterior:
    """Condition ``model`` by the chosen backend and return a :class:`Posterior`.

    Args:
        model: a vectorised Pyro model (see DESIGN: one ``lm.sequence`` site plus factors).
        *args: the model's arguments (its context, e.g. the prompt).
        method: ``"exact"``, ``"importance"``, ``"smc"``, ``"mh"`` or ``"svi"``.
        seed: same seed, same samples (on CPU).
        **options: backend options (``num_samples``, ``num_particles``, ``num_chains``...).

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1)
    >>> round(ppl_lm.infer(model, method="exact").log_evidence, 4)  # log(1/3)
    -1.0986
    """
    mod = backend(method)
    t0 = time.perf_counter()
    post = mod.run(model, *args, seed=seed, **options)
    post.info.setdefault("wall_time", time.perf_counter() - t0)
    post.info.setdefault("seed", seed)
    return post
