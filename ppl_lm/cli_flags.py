"""Command-line flags made from the backends' own descriptions (:mod:`ppl_lm.backends`).

One flag per backend option name (``--num-particles``), shared by the backends that have it: its
parser and choices come from the option's annotation, its help from the first sentence of the
option's line in ``run``'s docstring, and the methods that take it are listed in the help. A new
backend option is a new flag with no edit here.
"""

from __future__ import annotations

import argparse
import functools
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["OptionFlag", "option_flags", "int_at_least", "RUNTIME_OPTIONS"]

#: Backend options the CLI sets itself (``progress`` from ``--quiet``), never as a flag of their own.
RUNTIME_OPTIONS = ("progress",)


def int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``, with ``what`` in the error message."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    parse.low = low
    parse.__name__ = "int"  # argparse's "invalid int value" message
    return parse


@dataclass(frozen=True)
class OptionFlag:
    """A command-line flag made from backend options of one name (``--num-particles``)."""

    parse: Callable[[str], Any]
    choices: tuple | None
    metavar: str | None
    help: str
    methods: tuple[str, ...]


def _names_or_choice(choices: tuple[str, ...]):
    """An argparse type: one of ``choices`` (e.g. ``all-linear``), or comma-separated names
    (``q_proj,v_proj``)."""
    def parse(text: str) -> list[str] | str:
        if text.strip() in choices:
            return text.strip()
        names = [t.strip() for t in text.split(",")]
        if not all(n.isidentifier() for n in names):
            raise argparse.ArgumentTypeError(f"expected comma-separated names (e.g. q_proj,v_proj) or {' or '.join(choices)}, "
                                             f"got {text!r}")
        return names
    return parse


def _flag_type(annotation) -> tuple[Callable, tuple | None, str | None] | None:
    """How a flag parses an option of this annotation (type, choices, metavar), or ``None`` when the
    option is not one a command line can give (a guide object, a callback, a tensor)."""
    from .validation import AtLeast, int_phrase, strip_optional

    ann, _ = strip_optional(annotation)
    alts = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    literal = next((a for a in alts if typing.get_origin(a) is typing.Literal), None)
    if literal is not None:
        choices = typing.get_args(literal)
        if any(typing.get_origin(a) is list for a in alts):
            return _names_or_choice(choices), None, "NAMES"
        return str, choices, None
    if str in alts and all(isinstance(a, type) for a in alts):
        return str, None, None  # an object or its text form (``prompted:<text>``): the command line gives the text
    if len(alts) != 1:
        return None
    base, rules = ann, ()
    if typing.get_origin(ann) is typing.Annotated:
        base, *rules = typing.get_args(ann)
    if base is int:
        low = min((r.low for r in rules if isinstance(r, AtLeast)), default=None)
        return (int if low is None else int_at_least(low, int_phrase(low))), None, "N"
    if base in (float, str):
        return base, None, None
    return None


@functools.lru_cache(maxsize=None)
def _flags(registered: tuple[str, ...]) -> dict[str, OptionFlag]:
    from .backends import get

    specs: dict[str, tuple] = {}
    for m in registered:
        for opt in get(m).option_specs():
            if opt.name in RUNTIME_OPTIONS:
                continue
            how = _flag_type(opt.annotation)
            if how is None:
                continue
            if opt.name in specs:
                parse, choices, metavar, helps, methods = specs[opt.name]
                if choices and how[1]:
                    choices = tuple(dict.fromkeys(choices + how[1]))  # each backend checks its own
                elif parse is not how[0]:
                    parse = _loosest(parse, how[0], opt.name)
                helps.setdefault(_flag_help(opt.help), []).append(m)
                specs[opt.name] = (parse, choices, metavar, helps, methods + (m,))
            else:
                specs[opt.name] = (*how, {_flag_help(opt.help): [m]}, (m,))
    return {name: OptionFlag(parse, choices, metavar, _joined_help(helps), methods)
            for name, (parse, choices, metavar, helps, methods) in specs.items()}


def _joined_help(helps: dict[str, list[str]]) -> str:
    """One flag's help: the backends' common line, or each backend's own where the option means
    different things in different backends (``--proposal``: a token proposal, or where SVI's forward
    draws come from)."""
    if len(helps) == 1:
        return next(iter(helps))
    return "; ".join(f"{', '.join(methods)}: {help}" for help, methods in helps.items())


def _flag_help(doc: str) -> str:
    """A docstring's option line as flag help: its first sentence, without reST markup."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")
    first = re.split(r"(?<!e\.g)(?<!i\.e)\.\s", text + " ", maxsplit=1)[0].strip().rstrip(".")
    return first.replace("%", "%%")


def _loosest(a, b, name: str):
    """Two backends' parsers of one flag: the integer one with the lower bound (each backend then
    checks its own bound before the LM loads); a clear error if they parse different types."""
    lows = [getattr(p, "low", 0 if p is int else None) for p in (a, b)]
    if None in lows:
        raise TypeError(f"backend option {name!r} has different types in different backends; a CLI flag needs one")
    return a if lows[0] <= lows[1] else b


def option_flags() -> dict[str, OptionFlag]:
    """Every backend option a command line can give, one flag per option name (shared by the
    backends that have it), generated from the backends' own descriptions."""
    from .backends import names

    return _flags(names())
