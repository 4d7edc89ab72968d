"""The ``ppl-lm`` command: run a model script with any backend, compare backends, write reports.

::

    ppl-lm list
    ppl-lm run sentiment --method smc --num-particles 64 --report out/sentiment
    ppl-lm run my_model.py --method importance --lm tiny --quiet
    ppl-lm compare no_e --methods importance,smc,mh,svi --report out/no_e --lm tiny

MODEL is a name from ``ppl_lm.models`` or the path of a Python script. A script defines
``build(lm, **kw) -> model`` (a vectorised Pyro model), ``context`` (the model's default
argument: a tuple of arguments or one value, e.g. a prompt), and optionally ``methods``
(method -> default options), ``description`` and ``toy_context`` (the context used with
``--lm tiny``), and ``check(text, *context) -> str``: a one-line verdict on a sampled text, given
the model's arguments (e.g. ``models/chess_game.py`` replays the game with python-chess: "legal: 9
half-moves ..." or "... ILLEGAL 5. Bxd4 ..."), printed under each of the top samples by ``run`` and
``compare``.

An exception raised by the script's own code is reported as ``error in script.py:LINE: ...``
(exit status 2) rather than as a deep traceback; ``--traceback`` shows the full one.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import traceback
import types
import typing
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from .cli_flags import int_at_least, option_flags

__all__ = ["main", "load_script", "build_parser", "prepare", "check_contexts"]

log = logging.getLogger("ppl_lm.cli")

#: What a model script must define (models/README.md says so too).
REQUIRED_SCRIPT_ATTRS = ("build", "context")

def default_compare() -> tuple[str, ...]:
    """The backends ``compare`` runs when neither ``--methods`` nor the script's ``methods`` says:
    every registered one that samples (an enumeration runs only when asked, as the reference)."""
    from .backends import Kind, get, names

    return tuple(m for m in names() if get(m).kind is not Kind.EXACT)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class ScriptError(Exception):
    """An exception raised inside the user's model script, located at ``path:line``."""

    def __init__(self, path: str, line: int | None, exc: BaseException, source: str | None = None):
        self.path, self.line, self.exc, self.source = path, line, exc, source
        where = os.path.basename(path) + (f":{line}" if line else "")
        msg = str(exc) if not isinstance(exc, SyntaxError) else (exc.msg or str(exc))
        super().__init__(f"error in {where}: {type(exc).__name__}: {msg}{_notes(exc)}")


def _notes(exc: BaseException) -> str:
    """The notes added to ``exc`` (``add_note``: e.g. which context the model refused), one per line."""
    return "".join(f"\n    {n}" for n in getattr(exc, "__notes__", ()))


# -- loading a model script ---------------------------------------------------------------------

def _literal(text: str) -> Any:
    """``15`` -> 15, ``'(1, 2)'`` -> (1, 2), ``hello`` -> "hello"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _is_path(model: str) -> bool:
    return model.endswith(".py") or os.sep in model or "/" in model or os.path.isfile(model)


def load_script(model: str) -> ModuleType:
    """The module of a model name (``ppl_lm.models.NAME``) or of a script path.

    Raises:
        CLIError: unknown model name, or missing file.
        ScriptError: the script raised (or has a syntax error) while being imported.
    """
    from . import models

    if _is_path(model):
        path = os.path.abspath(model)
        if not os.path.isfile(path):
            raise CLIError(f"no such model script: {model}")
        name = "ppl_lm_script_" + "".join(c if c.isalnum() else "_" for c in Path(path).stem)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise CLIError(f"cannot import {model}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # so classes and pickling inside the script find their module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise _locate(exc, [path]) from exc
    else:
        known = models.names()
        model = models.ALIASES.get(model, model)
        if model not in known:
            near = difflib.get_close_matches(model, known + list(models.ALIASES), n=1)
            raise CLIError(
                f"unknown model {model!r}" + (f"; did you mean {near[0]!r}?" if near else ".")
                + f" Available models: {', '.join(known)} (`ppl-lm list` describes them), or give the path "
                "to a .py script")
        file = os.path.join(os.path.dirname(models.__file__), f"{model}.py")
        try:
            module = models.load(model)
        except Exception as exc:
            raise _locate(exc, [file]) from exc
    for attr in REQUIRED_SCRIPT_ATTRS:
        if not hasattr(module, attr):
            raise CLIError(
                f"{_where(module)} does not define `{attr}`: a model script defines build(lm, **kw) -> model "
                "and context (the model's default argument)")
    if not callable(module.build):
        raise CLIError(f"{_where(module)}: `build` must be a function build(lm, **kw) -> model")
    if not callable(getattr(module, "check", print)):
        raise CLIError(f"{_where(module)}: `check` must be a function check(text, *context) -> str (or absent)")
    return module


def _where(module: ModuleType) -> str:
    return os.path.basename(getattr(module, "__file__", None) or module.__name__)


def _locate(exc: BaseException, files: Sequence[str]) -> BaseException:
    """A :class:`ScriptError` at the last traceback frame inside ``files``; else ``exc`` itself."""
    files = {os.path.realpath(f) for f in files if f}
    if isinstance(exc, SyntaxError) and exc.filename and os.path.realpath(exc.filename) in files:
        return ScriptError(exc.filename, exc.lineno, exc, (exc.text or "").rstrip("\n"))
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if os.path.realpath(fr.filename) in files:
            return ScriptError(fr.filename, fr.lineno, exc, fr.line)
    return exc


def _context(module: ModuleType, toy: bool, override: str | None) -> tuple:
    ctx = getattr(module, "toy_context", module.context) if toy else module.context
    if override is not None:
        ctx = _literal(override)
    return ctx if isinstance(ctx, tuple) else (ctx,)


def _build_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise CLIError(f"--set expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        if not k.isidentifier():
            raise CLIError(f"--set: {k!r} is not a valid keyword name")
        out[k] = _literal(v)
    return out


# -- the language model -------------------------------------------------------------------------

#: The ``--lm`` names the CLI knows, besides paths and Hugging Face ids in the local cache.
LM_NAMES = ("smollm2", "tiny", "default")


def _check_lm(spec: str) -> None:
    """A clear error for an ``--lm`` that names no known model or existing path, before it loads."""
    from .lm.hf import check_model

    if spec == "tiny":
        return
    try:
        check_model(None if spec in ("smollm2", "default") else spec)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as err:
        if not isinstance(err, ValueError) or spec in LM_NAMES or os.path.exists(os.path.expanduser(spec)):
            raise CLIError(f"--lm {spec}: {err}") from None
        near = difflib.get_close_matches(spec, LM_NAMES, n=1, cutoff=0.5)
        raise CLIError(
            f"--lm {spec}: not a known model name or path" + (f"; did you mean {near[0]!r}?" if near else ".")
            + " Give smollm2 (the embedded model), tiny (a random toy for smoke runs), a local model folder, "
            "a .gguf file, or the id of a model in the local Hugging Face cache (ppl-lm never downloads)") from None


def load_language_model(spec: str, device: str | None, dtype: str | None = None):
    """``tiny`` (the char-level random transformer, seed 0), ``smollm2`` (embedded) or a path/id.

    ``dtype``: ``"auto"``, ``"float32"`` or ``"bfloat16"`` (``None``: ``load_lm``'s default; the
    tiny toy stays float32 unless a dtype is given).
    """
    import ppl_lm

    if spec == "tiny":
        lm = ppl_lm.tiny_char_transformer(seed=0)
        if device not in (None, "cpu"):
            lm.model.to(ppl_lm.lm.hf.check_device(device))
        if dtype is not None:
            from .lm.hf.precision import choose_dtype

            lm.model.to(choose_dtype(dtype, lm.device)[0])
        return lm
    kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if spec in ("smollm2", "default"):
        return ppl_lm.load_lm(**kw)
    return ppl_lm.load_lm(spec, **kw)


# -- running ------------------------------------------------------------------------------------

def _backend_params(method: str) -> tuple[set[str], bool]:
    """The option names ``method``'s ``run`` names explicitly (and whether it takes ``**kwargs``)."""
    from .infer import backend

    try:
        mod = backend(method)
    except ModuleNotFoundError as err:
        raise CLIError(f"the {method!r} backend is not available in this installation ({err})") from None
    params = inspect.signature(mod.run).parameters
    named = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_method(method: str) -> str:
    from .infer import METHODS

    if method not in METHODS:
        raise CLIError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _options(method: str, module: ModuleType, args, strict: bool) -> dict[str, Any]:
    """Backend options: the script's defaults for ``method``, then the command-line flags.

    A flag the backend does not take is an error for ``run`` (``strict``) and skipped by
    ``compare`` (where one set of flags serves several backends).
    """
    named, _ = _backend_params(method)
    defaults = getattr(module, "methods", None) or {}
    opts = dict(defaults.get(method, {})) if isinstance(defaults, dict) else {}
    flags = option_flags()
    for flag, spec in flags.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if method not in spec.methods:
            if strict:
                takes = sorted(f for f, s in flags.items() if method in s.methods)
                raise CLIError(
                    f"method {method!r} does not take --{flag.replace('_', '-')}; it takes "
                    + (", ".join("--" + t.replace("_", "-") for t in takes) or "no option flags")
                    + f" (--{flag.replace('_', '-')} is an option of {', '.join(spec.methods)})")
            continue
        opts[flag] = value
    if "progress" in named:
        opts["progress"] = not args.quiet
    if "checkpoint_dir" in named:
        _check_resume(method, opts.get("checkpoint_dir"), getattr(args, "resume", False))
    elif strict and getattr(args, "resume", False):
        takes = [m for m, f in _methods_with("checkpoint_dir")]
        raise CLIError(f"--resume applies to --method {' or '.join(takes)} only (it continues a checkpointed run)")
    return opts


def _methods_with(option: str) -> list[tuple[str, Any]]:
    from .backends import get, names

    return [(m, get(m)) for m in names() if option in get(m).option_names]


def _check_resume(method: str, checkpoint_dir: str | None, resume: bool) -> None:
    """A checkpoint is continued only when asked (``--resume``), never found and resumed silently.
    The backend's module names its checkpoint file (``CHECKPOINT_FILE``)."""
    from .infer import backend

    CHECKPOINT_FILE = backend(method).CHECKPOINT_FILE

    if checkpoint_dir is None:
        if resume:
            raise CLIError("--resume needs --checkpoint-dir DIR (the folder of the run to continue)")
        return
    exists = os.path.exists(os.path.join(checkpoint_dir, CHECKPOINT_FILE))
    if exists and not resume:
        raise CLIError(f"{checkpoint_dir} already holds a {method} checkpoint; pass --resume to continue that run "
                       "(same model, context, --set values and options), or choose another --checkpoint-dir")
    if resume and not exists:
        raise CLIError(f"--resume: {checkpoint_dir} holds no {method} checkpoint ({CHECKPOINT_FILE}) to continue")


def _infer(model, ctx: tuple, method: str, seed: int, opts: dict, files: list[str]):
    import ppl_lm

    from .diagnostics.warnings import PplLmWarning

    try:
        with warnings.catch_warnings():
            # The CLI prints each typed warning itself, once, before the results (_print_warnings).
            warnings.simplefilter("ignore", PplLmWarning)
            return ppl_lm.infer(model, *ctx, method=method, seed=seed, **opts)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise _locate(exc, files) from exc


def _check_build_kwargs(module: ModuleType, kwargs: dict[str, Any], texts: dict[str, str] | None = None) -> None:
    """Every ``--set`` key is a parameter of the script's ``build`` (unless it takes ``**kw``), and its
    value is of the type the parameter's annotation (or default) says; ``kwargs`` is updated in place
    (text options get the text as written, ``texts``)."""
    texts = texts or {}
    try:
        params = list(inspect.signature(module.build).parameters.values())[1:]  # after `lm`
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            raise CLIError(
                f"--set {key}: {_where(module)}'s build() has no option {key!r}"
                + (f"; did you mean {near[0]!r}?" if near else ".")
                + (f" Valid keys: {', '.join(valid)}" if valid else " It takes no options"))
    by_name = {p.name: p for p in params}
    try:
        hints = typing.get_type_hints(module.build)
    except Exception:  # an annotation that does not evaluate: fall back on the defaults
        hints = {}
    for key, value in list(kwargs.items()):
        kwargs[key] = _typed_value(key, value, texts.get(key, repr(value)),
                                   _expected_types(by_name[key], hints.get(key)), module)


#: The option types ``--set`` checks (anything else is passed as given).
_SIMPLE_TYPES = (bool, int, float, str)


def _expected_types(param: inspect.Parameter, hint) -> tuple[set[type], bool] | None:
    """The simple types a build() option takes, and whether it takes None; ``None`` if unknown."""
    if hint is not None:
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = {a for a in args if a in _SIMPLE_TYPES}
        if kinds and all(a in _SIMPLE_TYPES or a is type(None) for a in args):
            return kinds, type(None) in args
        return None
    default = param.default
    if default is not inspect.Parameter.empty and type(default) in _SIMPLE_TYPES:
        return {type(default)}, False
    return None


def _typed_value(key: str, value: Any, text: str, expected: tuple[set[type], bool] | None,
                 module: ModuleType) -> Any:
    """``value`` (``text`` as written) checked against ``expected`` (from the annotation or the default).

    A text option gets the text as written: ``--set chars=5`` passes ``"5"``, not the number 5.
    """
    if expected is None:
        return value
    kinds, none_ok = expected
    if value is None and none_ok:
        return None
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int) and kinds & {int, float}:
        return value
    elif isinstance(value, float) and float in kinds:
        return value
    if str in kinds:
        return value if isinstance(value, str) else text
    wanted = [{bool: "True or False", int: "an integer", float: "a number", str: "text"}[k]
              for k in _SIMPLE_TYPES if k in kinds] + (["None"] if none_ok else [])
    example = {bool: "True", int: "3", float: "0.5"}[next(k for k in (float, int, bool) if k in kinds)]
    raise CLIError(f"--set {key}={text}: {_where(module)}'s build() takes {' or '.join(wanted)} for {key!r}; "
                   f"write e.g. --set {key}={example}")


def _check_device(device: str | None) -> None:
    from .lm.hf import check_device

    if device is not None:
        try:
            check_device(device)
        except ValueError as err:
            raise CLIError(f"--device {device}: {err}") from None


def _check_report_dir(path: str | None) -> None:
    from .reporting import check_out_dir

    if path is None:
        return
    try:
        out = check_out_dir(path)
    except ValueError as err:
        raise CLIError(f"--report {path}: {err}") from None
    # The report is written into a temporary folder beside the report's, then moved in place. Try
    # that now: permission bits do not stop root, and a read-only file system stops everyone.
    where = out.parent
    while not where.exists():
        where = where.parent
    for folder in (where, out) if out.is_dir() else (where,):
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".ppl-lm-check.", dir=folder))
        except OSError as err:
            raise CLIError(f"--report {path}: cannot write in {folder} ({err.strerror or err}); "
                           "give a folder you can write to") from None


def prepare(args, methods: Sequence[str], strict: bool, module: ModuleType | None = None):
    """Check every argument, then load the LM and build the model (``ppl-lm run`` / ``compare`` and the
    distributed entry point, ``inference/distributed.py``, all start here).

    Returns ``(module, files, model, ctx, options)``, ``options`` the backend options per method.
    """
    module = module or load_script(args.model)
    files = [getattr(module, "__file__", "")]
    toy = args.lm == "tiny"
    # Cheap checks first: a typo costs nothing, not an LM load and a run.
    kwargs = _build_kwargs(args.set)
    _check_build_kwargs(module, kwargs, _set_texts(args.set))
    _check_device(args.device)
    _check_report_dir(args.report)
    _check_lm(args.lm)
    ctx = _context(module, toy, args.context)
    chat = _check_chat(args, module, toy, ctx)
    options = {m: _options(m, module, args, strict) for m in methods}
    for m in methods:
        _check_options(m, ctx, args.seed, options[m])
    lm = load_language_model(args.lm, args.device, args.dtype)
    if chat:
        lm, ctx = _chat(lm, ctx)
        if getattr(args, "context_list", None) is not None:  # --contexts: each text a user message too
            args.context_list = [_chat(lm, (c,))[1][0] for c in args.context_list]
    try:
        model = module.build(lm, **kwargs)
    except Exception as exc:
        raise _locate(exc, files) from exc
    if not callable(model):
        raise CLIError(f"{_where(module)}: build(lm) returned {type(model).__name__}, not a model function")
    return module, files, model, ctx, options


def _check_chat(args, module: ModuleType, toy: bool, ctx: tuple) -> bool:
    """Whether the context is a user message in the LM's chat template: ``--chat``, or a script's
    ``chat = True`` (not with ``--lm tiny``, whose ``toy_context`` is plain text)."""
    if getattr(args, "chat", False) and toy:
        raise CLIError("--chat: the tiny LM (--lm tiny) has no chat template; leave --chat out, or use an "
                       "instruct model (the default --lm smollm2)")
    chat = getattr(args, "chat", False) or (bool(getattr(module, "chat", False)) and not toy)
    if chat and not (ctx and isinstance(ctx[0], str)):
        raise CLIError(f"--chat wraps the context (a text) as a user message, but {_where(module)}'s context is "
                       f"{ctx[0] if len(ctx) == 1 else ctx!r}; give a text with --context, or leave --chat out")
    return chat


def _chat(lm, ctx: tuple):
    """``lm`` whose sequences end at its end-of-turn token, and the context's text as a chat prompt."""
    import ppl_lm

    try:
        lm = lm.for_chat()
        return lm, (ppl_lm.chat(lm, ctx[0]), *ctx[1:])
    except (AttributeError, ValueError) as err:
        raise CLIError(f"--chat: {err}") from None


class _OptionsChecked(Exception):
    """Raised by the stand-in model of :func:`_check_options`: the backend accepted its options."""


def _stand_in_model(*args, **kwargs):
    raise _OptionsChecked


def _check_options(method: str, ctx: tuple, seed: int, opts: dict[str, Any]) -> None:
    """The backend's own checks of ``opts`` (and the seed), before the LM loads.

    Every backend checks its options before it first calls the model, so it is handed a stand-in
    model that stops it there: an option error is raised first, with the backend's own message.
    """
    import ppl_lm

    from .diagnostics.warnings import PplLmWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PplLmWarning)
            quiet = {**opts, "progress": False} if "progress" in opts else opts
            ppl_lm.infer(_stand_in_model, *ctx, method=method, seed=seed, **quiet)
    except _OptionsChecked:
        return
    except (ValueError, TypeError) as err:
        raise CLIError(f"--method {method}: {err}") from None


def _set_texts(pairs: Sequence[str]) -> dict[str, str]:
    """``--set`` values as written (text options take them as they are)."""
    return dict(p.split("=", 1) for p in pairs or () if "=" in p)


def _short(text: str, n: int = 100) -> str:
    text = text.replace("\n", "⏎")
    return repr(text if len(text) <= n else text[:n] + "…")


def _error_text(err: BaseException) -> str:
    """``Type: message``, without the trace-shape table Pyro appends to errors raised in a model."""
    return f"{type(err).__name__}: {str(err).split(chr(10) + 'Trace Shapes:')[0]}"


def _print_warnings(items, out=None) -> None:
    """Typed warnings, ``(backend, InferenceWarning)`` pairs, as a block that comes first."""
    out = out or sys.stdout
    for backend, w in items:
        print(f"WARNING [{w.code}] {backend}: {w.message}\n    what to do: {w.fix}", file=out)
    if items:
        print(file=out)


def _print_run(name: str, post, top_k: int, out=None, labels: dict | None = None, check=None) -> None:
    """One run's summary line, means, discrete latents' posteriors (``labels``: site -> value names)
    and top samples, each with ``check(text)``'s one-line verdict under it (see :func:`_checker`)."""
    from . import diagnostics as D

    out = out or sys.stdout
    s = D.summary(post)
    lz = "—" if s["log_evidence"] is None else f"{s['log_evidence']:.4f}"
    if s["log_evidence"] is not None and s["log_evidence_se"] is not None:
        lz += f" ± {s['log_evidence_se']:.4f}"
    elif s["log_evidence_se_reason"]:  # no fake error bar: say why there is none
        lz += f" ± — ({s['log_evidence_se_reason']})"
    ess = f"ESS {s['ess']:.1f}" + (f" ({s['ess_note']})" if s["ess_note"] else "")
    parts = [f"method {post.method}", f"samples {s['num_samples']}"
             + (f" ({s['num_chains']} chains)" if s["num_chains"] > 1 else ""),
             f"log Z {lz}", ess]
    if s["n_eff_genealogy"] is not None and math.isfinite(s["n_eff_genealogy"]):
        parts.append(f"SMC genealogy n_eff {s['n_eff_genealogy']:.1f}")
    if s["khat"] is not None:
        parts.append(f"k-hat {s['khat']:.2f}")
    elif s["khat_reason"]:
        parts.append(f"k-hat — ({s['khat_reason']})")
    if s["rhat"] is not None:
        parts.append(f"R-hat {s['rhat']:.3f}")
    if s["acceptance"] is not None:
        parts.append(f"acceptance {s['acceptance']:.2f}")
    if s["wall_time"] is not None:
        parts.append(f"wall time {s['wall_time']:.2f} s")
    print(f"{name}: " + ", ".join(parts), file=out)
    print(f"  can be trusted: {s['verdict']}", file=out)
    if s["means"]:
        print("  " + ", ".join(f"E[{k}] = {v:.4g}" for k, v in s["means"].items()), file=out)
    for site, m in s["marginals"].items():
        names = (labels or {}).get(site)
        shown = [f"{names[int(v)] if names and 0 <= int(v) < len(names) else v} {p:.4f} ± {se:.4f}"
                 for v, (p, se) in m.items()]
        print(f"  p({site} | data): " + ", ".join(shown), file=out)
    if top_k > 0 and post.samples is not None:
        from .reporting.render import admissible_top, rejected_note

        top, rejected = admissible_top(post, top_k)
        print("  top samples (weight, count, text):", file=out)
        for t in top:
            print(f"    {t['weight']:.4f}  ×{t['count']:<4d} {_short(t['text'])}", file=out)
            if check is not None:
                print(f"{'':18}check: {_verdict(check, t['text'])}", file=out)
        if rejected:
            print(f"    ({rejected_note(rejected, len(post))})", file=out)


def _checker(module: ModuleType, ctx: tuple):
    """The script's optional hook ``check(text, *context) -> str`` bound to the run's context
    (``text -> verdict``), or None when the script defines none."""
    hook = getattr(module, "check", None)  # load_script made sure it is callable
    return None if hook is None else (lambda text: hook(text, *ctx))


def _verdict(check, text: str) -> str:
    """``check(text)`` on one line; the hook's own exception is shown in its place (the run's
    results are still printed)."""
    try:
        verdict = str(check(text))
    except Exception as err:  # noqa: BLE001 - a bug in the script's hook must not hide the results
        return f"(check raised {_error_text(err)})"
    verdict = " ".join(verdict.split())
    return verdict if len(verdict) <= 160 else verdict[:160] + "…"


def _describe(module: ModuleType, ctx: tuple, lm_spec: str, contexts_file: str | None = None) -> str:
    desc = getattr(module, "description", None) or (module.__doc__ or "").strip().split("\n")[0]
    shown = ctx[0] if len(ctx) == 1 else ctx
    where = f"Contexts: one per row below, from {contexts_file}" if contexts_file else f"Context: {shown!r}"
    return (f"{desc}\n" if desc else "") + f"{where}. LM: {lm_spec}."


def cmd_run(args) -> int:
    method = _check_method(args.method)
    if getattr(args, "contexts", None) is not None:
        return _run_contexts(args, method)
    module, files, model, ctx, options = prepare(args, [method], strict=True)
    opts = options[method]
    log.info("running %s on %s with %s", method, args.model, opts)
    post = _infer(model, ctx, method, args.seed, opts, files)
    if post is None:  # a distributed run (ppl_lm.inference.distributed): another rank pools and prints
        return 0
    _print_warnings([(method, w) for w in post.warnings])
    _print_run(args.model, post, args.top, labels=getattr(module, "labels", None), check=_checker(module, ctx))
    if args.report:
        from .reporting import report

        path = report({method: post}, args.report, title=f"{args.model}: {method}", top_k=max(args.top, 10),
                      description=_describe(module, ctx, args.lm))
        print(f"report: {path}")
    return 0


def read_contexts(path: str) -> list:
    """The contexts of ``--contexts FILE``: one per line, as plain text, or JSONL with one object
    ``{"context": ...}`` per line (any JSON value: a text, a list of token ids). Blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, line.rstrip("\r\n")) for i, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise CLIError(f"--contexts: cannot read {path} ({err.strerror or err})") from None
    if not lines:
        raise CLIError(f"--contexts: {path} holds no context; write one per line (or JSONL with {{\"context\": ...}})")
    if not lines[0][1].lstrip().startswith("{"):
        return [text for _, text in lines]
    out = []
    for i, text in lines:
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"--contexts: {path}:{i} is not a JSON object ({err.msg}); a JSONL file has one "
                           "{\"context\": ...} object per line") from None
        if not isinstance(row, dict) or "context" not in row:
            raise CLIError(f"--contexts: {path}:{i} has no \"context\" key; a JSONL file has one "
                           "{\"context\": ...} object per line")
        out.append(row["context"])
    return out


def check_contexts(args, method: str) -> None:
    """The checks of ``--contexts FILE`` that need no LM (also run by the distributed entry point).

    Raises:
        CLIError: ``--context`` given too, or ``method`` takes ``contexts=`` as its own option.
    """
    from .infer import backend_options

    if args.context is not None:
        raise CLIError("give the contexts once: --context TEXT (one) or --contexts FILE (many), not both")
    if "contexts" in backend_options(method):  # the backend's own option: one result, not one per context
        raise CLIError(f"--contexts FILE runs one result per context, and method {method!r} takes contexts= as its own "
                       f"option (one result over all the contexts, e.g. one guide amortised over them): call "
                       f"ppl_lm.infer(model, ..., method={method!r}, contexts=[...]) from Python, or run one "
                       "--context TEXT at a time")


def _run_contexts(args, method: str) -> int:
    """``ppl-lm run MODEL --contexts FILE``: one ``infer(..., contexts=[...])`` call, one summary row
    per context, and (``--report``) one report whose table has a row per context."""
    from . import diagnostics as D
    from .diagnostics.warnings import PplLmWarning

    check_contexts(args, method)
    args.context_list = read_contexts(args.contexts)
    module, files, model, ctx, options = prepare(args, [method], strict=True)
    contexts = args.context_list
    import ppl_lm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PplLmWarning)
            posts = ppl_lm.infer(model, *ctx[1:], contexts=contexts, method=method, seed=args.seed, **options[method])
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise _locate(exc, files) from exc
    _print_warnings([(f"{method}, context {i}", w) for i, p in enumerate(posts) for w in p.warnings])
    print(f"{args.model}: method {method}, {len(posts)} contexts")
    print(f"{'#':>3}  {'log Z':>10} {'± se':>8} {'ESS':>8}  {'context':<40}  top sample")
    for i, (c, post) in enumerate(zip(args.context_list, posts)):
        s = D.summary(post)
        lz = "—" if s["log_evidence"] is None else f"{s['log_evidence']:.4f}"
        se = "—" if s["log_evidence_se"] is None else f"{s['log_evidence_se']:.4f}"
        top = D.top_samples(post, 1) if post.samples is not None else []
        print(f"{i:>3}  {lz:>10} {se:>8} {s['ess']:>8.1f}  {_short(str(c), 40):<40}  "
              f"{_short(top[0]['text'], 60) if top else ''}")
    if args.report:
        from .reporting import report

        named = {f"{i}: {_short(str(c), 40)}": post for i, (c, post) in enumerate(zip(args.context_list, posts))}
        path = report(named, args.report, title=f"{args.model}: {method} over {len(posts)} contexts",
                      top_k=max(args.top, 10), description=_describe(module, ctx, args.lm, args.contexts))
        print(f"report: {path}")
    return 0


def cmd_compare(args) -> int:
    module = load_script(args.model)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        defaults = getattr(module, "methods", None)
        methods = list(defaults) if isinstance(defaults, dict) and defaults else list(default_compare())
    if not methods:
        raise CLIError("--methods is empty; give a comma-separated list, e.g. importance,smc,mh,svi")
    for m in methods:
        _check_method(m)
    module, files, model, ctx, options = prepare(args, methods, strict=False, module=module)
    posts, exact, failed = {}, None, {}
    for m in methods:
        opts = options[m]
        if not args.quiet:
            print(f"running {m} ...", file=sys.stderr, flush=True)
        try:
            post = _infer(model, ctx, m, args.seed, opts, files)
        except ScriptError:
            raise  # the script is broken for every method
        except (ValueError, TypeError, RuntimeError) as err:
            if args.traceback:
                raise
            # One backend that cannot run this model (exact on a real LM, say) spoils no other. Its
            # error is printed once, among the warnings before the results.
            if not args.quiet:
                print(f"{m} failed (its error is listed with the warnings below)", file=sys.stderr, flush=True)
            failed[m] = _error_text(err)
            continue
        from .backends import Kind

        if post.kind is Kind.EXACT:
            exact = post
        else:
            posts[m] = post
    from .reporting.render import report_warnings

    shown = posts or ({"exact": exact} if exact is not None else {})
    reference = exact if posts else None
    # What went wrong comes first: the backends' disagreement, the failures, each run's warnings.
    _print_warnings(report_warnings(shown, reference, failed))
    for m in methods:
        if m not in failed:
            _print_run(m, posts.get(m, exact), args.top, labels=getattr(module, "labels", None),
                       check=_checker(module, ctx))
    if args.report and shown:
        from .reporting import report

        # The title names every method asked for: a failed one is listed among the warnings.
        path = report(shown, args.report, title=f"{args.model}: " + ", ".join(methods),
                      exact=reference, top_k=max(args.top, 10), failed=failed,
                      description=_describe(module, ctx, args.lm))
        print(f"report: {path}")
    if failed:
        raise CLIError(f"{', '.join(failed)} failed (see above); the others ran")
    return 0


def cmd_list(args) -> int:
    from . import models

    names = models.names()
    short = {full: alias for alias, full in models.ALIASES.items()}
    width = max(map(len, names), default=0)
    for n in names:
        try:
            desc = getattr(models.load(n), "description", "") or ""
        except Exception as exc:  # a broken script should not hide the others
            desc = f"(cannot import: {type(exc).__name__}: {exc})"
        print(f"{n:<{width}}  {desc}" + (f" (short name: {short[n]})" if n in short else ""))
    return 0


# -- argument parsing ---------------------------------------------------------------------------

_positive_int = int_at_least(1, "a positive integer")
_nonneg_int = int_at_least(0, "an integer >= 0")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model name (see `ppl-lm list`) or the path to a model script (.py)")
    for flag, spec in option_flags().items():
        p.add_argument("--" + flag.replace("_", "-"), type=spec.parse, choices=spec.choices, metavar=spec.metavar,
                       help=f"{spec.help} [{', '.join(spec.methods)}]")
    p.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in --checkpoint-dir (refused if the model, context, --set "
                        "values, LM or options differ) [" + ", ".join(m for m, _ in _methods_with("checkpoint_dir")) + "]")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", help="torch device for the LM, e.g. cpu or cuda")
    # ppl_lm.lm.hf.precision.DTYPES, spelled out: importing ppl_lm.lm.hf loads transformers (seconds)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None,
                   help="the LM's parameter dtype (default float32; auto: bfloat16 on CUDA and on CPUs with "
                        "AMX-BF16 or AVX512-BF16 where it measures faster, else float32); the target is the model "
                        "in that dtype, see the README")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads torch uses (torch.set_num_threads; default: torch's, one per core). "
                        "On a shared or small machine 1 is often fastest; see the README on reproducibility")
    p.add_argument("--lm", default="smollm2",
                   help="smollm2 (embedded, default), tiny (random char-level transformer for smoke runs), "
                        "or a local model folder / .gguf file")
    p.add_argument("--chat", action="store_true",
                   help="wrap the context as a user message in the LM's chat template (ppl_lm.chat); the reply "
                        "ends at the model's end-of-turn token")
    p.add_argument("--context", help="the model's argument instead of the script's context (a Python "
                                     "literal, or plain text)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="keyword argument for the script's build(lm, **kw) (repeatable), e.g. --set beta=0.5")
    p.add_argument("--report", metavar="DIR", help="write an HTML report to DIR")
    p.add_argument("--top", type=_nonneg_int, default=5, help="top samples to print (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the backends do")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .infer import METHODS

    parser = argparse.ArgumentParser(
        prog="ppl-lm", description="Condition language models by probabilistic inference (Pyro).")
    parser.add_argument("--version", action="version", version=f"ppl-lm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("run", help="run one inference method on a model", description="Run one method on a model.")
    _common(p)
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--contexts", metavar="FILE",
                   help="many contexts in one call: a file with one context per line (or JSONL, "
                        "{\"context\": ...} per line); prints one summary row per context, and --report writes one "
                        "report with a table over the contexts (importance and smc share LM batches)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="run several methods and compare them",
                       description="Run several methods on one model; with --report, one HTML report. "
                                   "Including exact (toy LMs) adds it as the reference.")
    _common(p)
    p.add_argument("--methods", help="comma-separated methods (default: the script's methods, else "
                                     + ",".join(default_compare()) + ")")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("list", help="list the available models", description="List the available models.")
    p.set_defaults(func=cmd_list)
    return parser


def _print_script_error(err: ScriptError) -> None:
    print(str(err), file=sys.stderr)
    if err.source:
        print(f"    {err.source.strip()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppl-lm`` command. Returns 0; errors exit with status 2.

    Errors (bad arguments, unknown model or method, an exception in the model script) print a
    one-line message and raise ``SystemExit(2)``, like argparse's own usage errors.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as stop:
        # svi's TrainingInterrupted says where it checkpointed the step it finished
        path = getattr(stop, "checkpoint_path", None)
        if path:
            print(f"interrupted after svi step {stop.step}, checkpointed in {os.path.dirname(path) or '.'}: run "
                  "the same command with --resume to continue", file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except ScriptError as err:
        if getattr(args, "traceback", False):
            raise err.exc
        _print_script_error(err)
    except CLIError as err:
        print(f"ppl-lm: error: {err}", file=sys.stderr)
    except Exception as exc:
        if getattr(args, "traceback", False):
            raise
        print(f"ppl-lm: error: {type(exc).__name__}: {exc}{_notes(exc)}", file=sys.stderr)
        if not quiet:
            print("(run with --traceback for the full traceback)", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
