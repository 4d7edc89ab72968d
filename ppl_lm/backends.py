"""Backends describe themselves; shared code reads the description, never a backend's name.

A backend is a module with a ``run(model, *args, seed=0, model_kwargs=None, <options>) -> Posterior``
decorated by :func:`describe`, which declares

* its **kind** (:class:`Kind`): exact support, weighted draws, or Markov chains. ``Posterior``,
  the diagnostics, the warnings, ``compare``, the report and the CLI branch on the kind (or on the
  fields of the run's ``Info``), so a new backend of a known kind needs no edit there;
* its **Info** type, the frozen dataclass of its run facts;
* optionally, how it runs **many contexts in one call** (``contexts=``: a function that stacks
  the contexts' particles into shared LM batches, :mod:`ppl_lm.inference.contexts`); a backend
  without one runs ``infer(..., contexts=[...])`` as a loop of single calls;
* its **options**: the keyword-only parameters of ``run``, each with an annotation, a default
  and a line in the docstring's ``Args:``. They are the one place an option is written:
  :attr:`Backend.options` is the dataclass made from them (name, type, default, help), the CLI's
  flags are generated from it, and the checks in the annotations (``PositiveInt``,
  ``Literal[...]``, :mod:`ppl_lm.validation`) run before any work, in :func:`ppl_lm.infer`, in a
  direct ``run(...)`` call, and in the CLI before the LM loads.

Registration is one line: :data:`BUILTIN` (name -> module) for the project's backends,
:func:`register` for anyone else's. ``ppl_lm.infer(model, method=name)`` then runs it.

>>> b = get("importance")
>>> b.kind, b.info.__name__
(<Kind.WEIGHTED: 'weighted draws'>, 'ImportanceInfo')
>>> b.options.__name__, [o.name for o in b.option_specs()][:2]
('ImportanceOptions', ['num_samples', 'chunk_size'])
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib
import inspect
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from .validation import check_value

__all__ = ["Kind", "Backend", "Option", "describe", "register", "unregister", "get", "names", "METHODS",
           "BUILTIN", "kind_of"]


class Kind(enum.Enum):
    """What a backend's draws are; shared code branches on this, never on a name."""

    #: every point of the support, exact weights and log Z (no Monte Carlo error)
    EXACT = "exact support"
    #: weighted draws (independent, or SMC particles sharing ancestors), an unbiased Ẑ where defined
    WEIGHTED = "weighted draws"
    #: Markov chains of equal-weight draws (R-hat, bulk ESS), no log Z
    MCMC = "Markov chains"


#: The project's backends: name -> module. A new one is one line here (or :func:`register`).
BUILTIN: dict[str, str] = {
    "exact": "ppl_lm.inference.exact",
    "importance": "ppl_lm.inference.importance",
    "smc": "ppl_lm.inference.smc",
    "mh": "ppl_lm.inference.mh",
    "svi": "ppl_lm.inference.svi",
}

_registry: dict[str, str | ModuleType] = dict(BUILTIN)

# Parameters of ``run`` that are not options.
NOT_OPTIONS = ("model", "args", "seed", "model_kwargs")


@dataclass(frozen=True)
class Option:
    """One option of a backend: the keyword parameter of its ``run``."""

    name: str
    annotation: Any
    default: Any
    help: str


@dataclass(frozen=True)
class Backend:
    """A registered backend, as it describes itself."""

    name: str
    kind: Kind
    info: type
    run: Callable
    #: a frozen dataclass of the options (fields: name, type, default; ``metadata["help"]``)
    options: type
    #: ``contexts(model, contexts, args, kwargs, sites, seed, options) -> list[Posterior]``, the
    #: backend's shared-batch run of many contexts (:mod:`ppl_lm.inference.contexts`), or None
    contexts: Callable | None = None

    def option_specs(self) -> list[Option]:
        return [Option(f.name, f.type, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(self.options)]

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def check_options(self, options: dict[str, Any]) -> None:
        """A clear error for an option this backend does not have (with the nearest one), or a
        value its annotation refuses; nothing runs before this passes."""
        check_options(self.run, options, self.name)


class _Description:
    """What :func:`describe` attaches to ``run``."""

    def __init__(self, run: Callable, kind: Kind, info: type, contexts: str | None = None):
        self.kind, self.info, self.run, self.contexts = kind, info, run, contexts
        self._options = None

    @property
    def options(self) -> type:
        if self._options is None:
            self._options = _options_dataclass(self.run, self.info)
        return self._options


def describe(*, kind: Kind, info: type, contexts: str | None = None) -> Callable[[Callable], Callable]:
    """Decorate a backend's ``run``: declares its kind and Info type (and, optionally, the name of the
    backend module's function that runs many contexts in shared batches, read when the backend is
    looked up), and checks its options' values (from their annotations) on every call, before the
    body runs."""
    if not isinstance(kind, Kind):
        raise TypeError(f"kind must be a ppl_lm.backends.Kind, got {kind!r}")
    if contexts is not None and not (isinstance(contexts, str) and contexts.isidentifier()):
        raise TypeError(f"contexts= names the backend module's function that runs many contexts (a string such "
                        f"as 'run_contexts'), got {contexts!r}")

    def wrap(run: Callable) -> Callable:
        sig = inspect.signature(run)

        @functools.wraps(run)
        def checked(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs)
            _check_values(run, {k: v for k, v in bound.arguments.items() if k not in NOT_OPTIONS})
            return run(*args, **kwargs)

        checked.__ppl_lm_backend__ = _Description(run, kind, info, contexts)
        return checked

    return wrap


def _description(run: Callable, where: str) -> _Description:
    d = getattr(run, "__ppl_lm_backend__", None)
    if d is None:
        raise TypeError(f"{where}.run is not described: decorate it with @ppl_lm.backends.describe(kind=..., info=...) "
                        "(see inference/TEMPLATE.py)")
    return d


def register(name: str, module: str | ModuleType) -> None:
    """Register a backend module (or its import path) under ``name``; ``infer(method=name)`` then
    runs it. Its ``run`` must be decorated by :func:`describe` (checked now)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a backend name must be an identifier, got {name!r}")
    mod = importlib.import_module(module) if isinstance(module, str) else module
    if not callable(getattr(mod, "run", None)):
        raise TypeError(f"{getattr(mod, '__name__', mod)} has no run(model, *args, seed=..., **options)")
    _contexts_run(mod, _description(mod.run, getattr(mod, "__name__", name)), name)
    _registry[name] = module
    get.cache_clear()


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register` (the built-in ones stay)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in backend")
    _registry.pop(name, None)
    get.cache_clear()


def names() -> tuple[str, ...]:
    """The registered backends' names, built-in ones first."""
    return tuple(_registry)


class _Names(Sequence):
    """``METHODS``: the registered names, read live (a backend registered later appears)."""

    def __getitem__(self, i):
        return names()[i]

    def __len__(self) -> int:
        return len(_registry)

    def __contains__(self, name) -> bool:
        return name in _registry

    def __repr__(self) -> str:
        return repr(names())

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented

    __hash__ = None


METHODS = _Names()


@functools.lru_cache(maxsize=None)
def get(name: str) -> Backend:
    """The registered backend ``name``; a clear error (with the nearest name) otherwise."""
    if name not in _registry:
        near = difflib.get_close_matches(str(name), names(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown inference method {name!r}{hint} Choose one of {', '.join(names())}")
    entry = _registry[name]
    mod = importlib.import_module(entry) if isinstance(entry, str) else entry
    d = _description(mod.run, mod.__name__)
    return Backend(name=name, kind=d.kind, info=d.info, run=mod.run, options=d.options,
                   contexts=_contexts_run(mod, d, name))


def _contexts_run(mod: ModuleType, d: _Description, name: str) -> Callable | None:
    """The function ``@describe(contexts=...)`` names in the backend's module, or a clear error."""
    if d.contexts is None:
        return None
    fn = getattr(mod, d.contexts, None)
    if not callable(fn):
        raise TypeError(f"backend {name!r}: its run declares @describe(contexts={d.contexts!r}), and {mod.__name__} "
                        f"has no function {d.contexts!r}; define it there (run_contexts(model, contexts, args, kwargs, "
                        "sites, seed, options) -> list[Posterior]) or leave contexts= out (a plain loop)")
    return fn


def kind_of(method: str | None) -> Kind:
    """The kind of a registered backend; :attr:`Kind.WEIGHTED` for a name no backend has (a
    ``Posterior`` built by hand)."""
    return get(method).kind if method in _registry else Kind.WEIGHTED


# -- options from run's signature ----------------------------------------------------------------

def keyword_options(run: Callable) -> dict[str, inspect.Parameter]:
    params = inspect.signature(run).parameters
    return {k: p for k, p in params.items() if k not in NOT_OPTIONS and p.kind is p.KEYWORD_ONLY}


def _hints(run: Callable) -> dict[str, Any]:
    fn = inspect.unwrap(run)
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception as err:  # an annotation that does not evaluate in the module
        raise TypeError(f"the annotations of {fn.__module__}.run do not evaluate ({err}); import the names "
                        "they use at module level") from err


def _check_values(run: Callable, options: dict[str, Any]) -> None:
    hints = _hints(run)
    for key, value in options.items():
        if key in hints:
            check_value(key, value, hints[key])


def check_options(run: Callable, options: dict[str, Any], method: str) -> None:
    valid = keyword_options(run)
    for key in options:
        if key not in valid:
            near = difflib.get_close_matches(key, list(valid), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TypeError(
                f"unknown option {key!r} for method={method!r}{hint} Valid options: {', '.join(valid)}. "
                "Arguments of the model itself go in model_kwargs={...}")
    _check_values(run, options)


def docstring_args(fn: Callable) -> dict[str, str]:
    """``{name: help}`` from the ``Args:`` section of a Google-style docstring (``a, b: text`` gives
    both names the text; continuation lines are joined)."""
    doc = inspect.getdoc(inspect.unwrap(fn)) or ""
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
    if not m:
        return {}
    out: dict[str, str] = {}
    current: list[str] = []
    for line in m.group(1).splitlines():
        head = re.match(r"^ {4}(\*{0,2}[\w, ]+?):\s*(.*)$", line)
        if head and not line.startswith("     "):
            current = [n.strip().lstrip("*") for n in head.group(1).split(",")]
            for n in current:
                out[n] = head.group(2).strip()
        elif line.strip() and current:
            for n in current:
                out[n] += " " + line.strip()
    return out


def _options_dataclass(run: Callable, info: type) -> type:
    """The frozen dataclass of ``run``'s options, named after its Info type (``SMCInfo`` -> ``SMCOptions``)."""
    hints, helps = _hints(run), docstring_args(run)
    fields = []
    for name, p in keyword_options(run).items():
        default = None if p.default is p.empty else p.default
        fields.append((name, hints.get(name, Any), dataclasses.field(default=default, metadata={"help": helps.get(name, "")})))
    title = info.__name__.removesuffix("Info") or "Backend"
    return dataclasses.make_dataclass(f"{title}Options", fields, frozen=True)
