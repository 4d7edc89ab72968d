"""Declarative model-and-condition scripts (``ppl-lm run NAME``).

Each module ``ppl_lm.models.NAME`` defines ``description``, ``context`` (the model's default
argument(s) for the real LM), optionally ``toy_context`` (for the tiny char-level LM),
``methods`` (recommended backends and their default options), ``chat = True`` (the context is a
user message for the LM's chat template) and ``build(lm, **kw) -> model``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["NAMES", "ALIASES", "names", "load", "model_args"]

#: The model scripts shipped with ppl-lm (``names()`` also finds scripts added later).
NAMES = ("prefix", "suffix", "sentiment", "no_violence", "chess_game", "factorisation", "pin", "contains_keyword",
         "no_e", "worlds", "which_world", "preferences", "json_person", "regex_sentence")
#: Short CLI names for scripts whose module name must not shadow another package (python-chess,
#: the standard ``keyword`` module): ``ppl-lm run chess`` runs ``chess_game``.
ALIASES = {"chess": "chess_game", "keyword": "contains_keyword", "regex": "regex_sentence"}


def names() -> list[str]:
    """Every model module in this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> ModuleType:
    """Import ``ppl_lm.models.<name>``, with a clear error for unknown names."""
    known = names()
    name = ALIASES.get(name, name)
    if name not in known:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(known)} or give a path to a script")
    return importlib.import_module(f"{__name__}.{name}")


def model_args(module: ModuleType, toy: bool = False, lm=None) -> tuple:
    """The model's default positional arguments: ``context`` (or ``toy_context``) as a tuple.

    A script with ``chat = True`` (an instruct-style script) takes its context as a user message:
    given ``lm`` (and not ``toy``), the text becomes ``ppl_lm.chat(lm, context)``, the token ids
    of the LM's chat template, as ``ppl-lm run`` does.
    """
    ctx = getattr(module, "toy_context", module.context) if toy else module.context
    ctx = ctx if isinstance(ctx, tuple) else (ctx,)
    if getattr(module, "chat", False) and not toy and lm is not None:
        from ppl_lm import chat

        ctx = (chat(lm, ctx[0]), *ctx[1:])
    return ctx
