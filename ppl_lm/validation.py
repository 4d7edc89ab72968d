"""Checks of argument values, defined once: positive integers (never ``True``), numbers in a range,
one of a few choices.

Backend options carry their checks in their annotations (``num_samples: PositiveInt = 1000``), read
by :mod:`ppl_lm.backends` before a run starts and by the CLI before the LM loads. Code that is not a
backend calls :func:`check_int` directly.

>>> check_int("num_samples", 10)
10
>>> check_int("num_samples", True)
Traceback (most recent call last):
...
ValueError: num_samples must be a positive integer, got True
>>> check_value("guide", "adaptor", Literal["lora", "full"] | dict | None)
Traceback (most recent call last):
...
TypeError: guide must be one of 'lora', 'full', or a dict; got 'adaptor'
>>> check_value("resampling", "sytematic", Literal["multinomial", "systematic"])
Traceback (most recent call last):
...
ValueError: resampling must be one of 'multinomial', 'systematic'; got 'sytematic' (did you mean 'systematic'?)
"""

from __future__ import annotations

import difflib
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

__all__ = ["AtLeast", "Between", "PositiveInt", "NonNegativeInt", "AtLeastTwo", "Fraction", "check_int",
           "check_value", "strip_optional", "int_phrase"]


@dataclass(frozen=True)
class AtLeast:
    """An integer ``>= low`` (``Annotated[int, AtLeast(1)]``); bools are refused."""

    low: int

    def check(self, name: str, value: Any, optional: bool = False) -> None:
        check_int(name, value, self.low, optional=optional)


@dataclass(frozen=True)
class Between:
    """A real number in ``[low, high]`` (``Annotated[float, Between(0, 1)]``); bools and NaN are refused."""

    low: float
    high: float

    def check(self, name: str, value: Any, optional: bool = False) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) \
                or not self.low <= value <= self.high:
            raise ValueError(f"{name} must be a number in [{self.low:g}, {self.high:g}]{' or None' if optional else ''}, "
                             f"got {value!r}")


PositiveInt = Annotated[int, AtLeast(1)]
NonNegativeInt = Annotated[int, AtLeast(0)]
AtLeastTwo = Annotated[int, AtLeast(2)]
Fraction = Annotated[float, Between(0.0, 1.0)]


def check_int(name: str, value: Any, low: int = 1, *, optional: bool = False) -> Any:
    """``value`` if it is an integer ``>= low`` (numpy integers too, never ``True``/``False``);
    else a ValueError naming ``name``. ``optional``: ``None`` passes too."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be {int_phrase(low)}{' or None' if optional else ''}, got {value!r}")
    return value


def int_phrase(low: int) -> str:
    """How errors name an integer ``>= low``: "a positive integer", "an integer >= 2"."""
    return {1: "a positive integer", 0: "an integer >= 0"}.get(low, f"an integer >= {low}")


def strip_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` (``Optional[X]``), else ``(annotation, False)``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return annotation, False


def _alternatives(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def check_value(name: str, value: Any, annotation: Any) -> None:
    """Check ``value`` against the checks an annotation carries: ``Annotated[..., AtLeast/Between]``
    and ``Literal[...]`` choices, through ``X | None`` and unions (the value passes when one
    alternative takes it). Alternatives without checks (a class, ``list[str]``) take a value of
    their type; anything else about such values is the callee's to check."""
    annotation, optional = strip_optional(annotation)
    if value is None and optional:
        return
    errors, kinds = [], []
    for alt in _alternatives(annotation):
        if isinstance(alt, type):
            kinds.append(alt.__name__)
        origin = typing.get_origin(alt)
        try:
            if origin is Literal:
                _check_choice(name, value, typing.get_args(alt))
            elif origin is Annotated:
                for rule in typing.get_args(alt)[1:]:
                    if hasattr(rule, "check"):
                        rule.check(name, value, optional)
            elif not isinstance(value, origin or alt) if isinstance(origin or alt, type) else False:
                continue
            return
        except ValueError as err:
            errors.append(err)
    if errors and kinds:  # e.g. ``Literal["lora", "full"] | SequenceGuide``: say both
        msg = str(errors[0])
        cut = max(msg.rfind("; got"), msg.rfind(", got"))
        raise TypeError(f"{msg[:cut]}, or a {' or a '.join(kinds)}{msg[cut:]}")
    if errors:
        raise errors[0]


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
                     + (f" (did you mean {near[0]!r}?)" if near else ""))
