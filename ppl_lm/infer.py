"""One entry point for every backend: ``ppl_lm.infer(model, *args, method=..., seed=..., **options)``."""

from __future__ import annotations

import inspect
import time
from typing import Callable, Sequence

from .backends import METHODS, get
from .posterior import Posterior

__all__ = ["infer", "METHODS", "backend", "backend_options"]


def backend(method: str):
    """The run function's module of the registered backend ``method``; a clear error for unknown names."""
    import importlib

    return importlib.import_module(get(method).run.__module__)


def backend_options(method: str) -> dict[str, inspect.Parameter]:
    """The named options of a backend (the keyword parameters of its ``run``, with defaults)."""
    from .backends import keyword_options

    return keyword_options(get(method).run)


def check_options(method: str, options: dict) -> None:
    """Raise a clear error naming any option ``method`` does not have (with the nearest valid one),
    or a value its annotation refuses."""
    get(method).check_options(options)


def infer(model: Callable, *args, method: str = "importance", seed: int = 0, model_kwargs: dict | None = None,
          contexts: Sequence | None = None, **options) -> Posterior | list[Posterior]:
    """Condition ``model`` by the chosen backend and return a :class:`Posterior`.

    Args:
        model: a vectorised Pyro model (``lm.sequence`` sites plus factors; see DESIGN).
        *args: the model's positional arguments (its context, e.g. the prompt).
        method: a registered backend (:data:`METHODS`: ``"exact"``, ``"importance"``, ``"smc"``,
            ``"mh"``, ``"svi"``, and any added by :func:`ppl_lm.backends.register`).
        seed: same seed, same samples (on CPU).
        model_kwargs: the model's keyword arguments (e.g. ``{"beta": 0.5}``).
        contexts: many contexts in one call: a list of the model's first argument, one per context;
            returns a list with one Posterior per context (context i under the seed
            :func:`ppl_lm.inference.contexts.context_seed` ``(seed, i)``, context 0 under ``seed``;
            ``*args`` follow the context). Importance (prior proposal) and SMC (LM proposal) share
            LM batches between the contexts' particles; other methods and options run a plain loop
            (:mod:`ppl_lm.inference.contexts`). A backend with its own ``contexts`` option keeps
            it: ``method="svi"`` trains one amortised guide over ``contexts`` and returns one Posterior.
        **options: the backend's named options (``num_samples``, ``num_particles``, ``num_chains``...);
            an unknown option is a clear error naming the nearest valid one.

    >>> import torch, pyro, ppl_lm
    >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
    >>> def model():
    ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=2))
    ...     ppl_lm.constraint("starts_b", x[..., 0] == 1)
    >>> round(ppl_lm.infer(model, method="exact").log_evidence, 4)  # log(1/3)
    -1.0986
    >>> ppl_lm.infer(model, method="importance", num_sampels=10)
    Traceback (most recent call last):
    ...
    TypeError: unknown option 'num_sampels' for method='importance'; did you mean 'num_samples'? ...
    """
    from .seeding import check_seed

    b = get(method)
    if contexts is not None:
        if "contexts" in backend_options(method):  # the backend's own option (SVI's amortised training)
            options["contexts"] = contexts
        else:
            from ppl_lm.inference import contexts as _contexts

            _contexts.check_contexts(contexts)
            b.check_options(options)
            return _contexts.run(model, contexts, *args, method=method, seed=check_seed(seed),
                                 model_kwargs=model_kwargs, **options)
    b.check_options(options)
    check_seed(seed)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict of the model's keyword arguments, got {type(model_kwargs).__name__}")
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if "model_kwargs" in inspect.signature(b.run).parameters:
        options["model_kwargs"] = model_kwargs
    elif model_kwargs:
        raise TypeError(f"method={method!r} does not take model_kwargs yet; bind them with functools.partial(model, ...)")
    t0 = time.perf_counter()
    post = b.run(model, *args, seed=seed, **options)
    if post is None:  # a distributed run: another process pools the parts (ppl_lm.inference.distributed)
        return None
    post.method, post.kind, post.seed = method, b.kind, seed
    post.wall_time = time.perf_counter() - t0
    return post
