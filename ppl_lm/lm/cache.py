"""A folder cache that heals itself: each entry records its files' sizes and SHA-256 when written.

:func:`load_lm` keeps GGUF models converted to float weights here. An entry is one folder,
written whole into a temporary sibling and renamed into place (:func:`write`), so no reader ever
sees half of one. Before an entry is used, every file it recorded is checked, size first, then
hash (:func:`problem`). What happens then (:func:`fetch`):

- a whole entry is read;
- a missing, truncated or altered file, a lost record, or an entry that fails to read makes it
  *broken*: it is rebuilt once and replaced atomically, with a one-line notice naming its path;
- a cache that cannot be written (a read-only folder or file system, a full disk) still gives
  the value, built in memory for this run only, with a notice that says so.

The layer knows nothing of language models: ``build``, ``save`` and ``read`` are passed in, so
its behaviour is tested on small files.

>>> import tempfile, pathlib
>>> entry = pathlib.Path(tempfile.mkdtemp()) / "greeting"
>>> save = lambda text, folder: (folder / "text.txt").write_text(text)
>>> read = lambda folder: (folder / "text.txt").read_text()
>>> fetch(entry, build=lambda: "hello", save=save, read=read, what="a greeting")
'hello'
>>> problem(entry) is None and fetch(entry, build=None, save=save, read=read, what="a greeting")
'hello'
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

__all__ = ["CACHE_ENV", "MANIFEST", "cache_dir", "fetch", "problem", "write"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The environment variable that moves :func:`cache_dir`.
CACHE_ENV = "PPL_LM_CACHE"

#: The file of an entry that records its other files' sizes and SHA-256 hashes.
MANIFEST = "ppl-lm-cache.json"
_FORMAT = 1

# Errors that mean "this folder cannot be written", as opposed to a full disk or another failure.
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def cache_dir() -> Path:
    """Where :func:`~ppl_lm.load_lm` keeps GGUF models converted to float weights (safetensors).

    ``$PPL_LM_CACHE`` if set, else ``$XDG_CACHE_HOME/ppl-lm``, else ``~/.cache/ppl-lm``.
    Deleting it is safe: the next load converts again.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppl-lm"


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def problem(entry: str | os.PathLike) -> str | None:
    """Why the cache entry ``entry`` cannot be used, or ``None`` if every file it recorded is there,
    of the recorded size and SHA-256."""
    entry = Path(entry)
    if not entry.is_dir():
        return "it is not a folder" if entry.exists() else "it does not exist"
    try:
        record = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        files = record["files"]
        if record.get("format") != _FORMAT or not isinstance(files, dict) or not files:
            raise ValueError
    except FileNotFoundError:
        return f"it has no {MANIFEST} recording its files (an older ppl-lm wrote it, or its write was cut short)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, meta in files.items():  # sizes first: a truncated file is found without reading anything
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != meta.get("size"):
            return f"{name} has {size:,} bytes where {meta.get('size'):,} were written (truncated or overwritten)"
    for name, meta in files.items():
        if _sha256(entry / name) != meta.get("sha256"):
            return f"{name} is not the file that was written (its SHA-256 differs)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def write(entry: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = False) -> None:
    """Write the cache entry ``entry`` atomically, replacing a broken one.

    ``fill(folder)`` writes the files into a new temporary folder next to ``entry``; their sizes
    and SHA-256 go into :data:`MANIFEST`; the folder is then renamed to ``entry``. A broken
    entry in the way is moved aside first and deleted after (between the two renames a reader
    finds no entry and builds its own; it never reads a partial one). An entry that another
    process finished meanwhile, and that is whole, is kept, unless ``replace`` (the entry in the
    way is whole but known not to read).

    Raises:
        OSError: the cache folder cannot be written (nothing is left behind).
    """
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    try:
        fill(tmp)
        record = {"format": _FORMAT, "files": {
            name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in _files(tmp)}}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        _put(tmp, entry, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _put(tmp: Path, entry: Path, replace: bool) -> None:
    try:
        os.rename(tmp, entry)
        return
    except OSError:
        if not (entry.exists() or entry.is_symlink()):
            raise
    if not replace and problem(entry) is None:  # another process wrote a whole entry first: keep it
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".stale", dir=entry.parent))
    try:
        os.replace(entry, stale / "old")
        try:
            os.rename(tmp, entry)
        except OSError:
            if problem(entry) is not None:  # not a whole entry of another process either
                raise
    finally:
        _remove(stale)


def _write_failure(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in _NOT_WRITABLE:
        return f"is not writable ({err.strerror or err})"
    return f"could not be written ({err.strerror if isinstance(err, OSError) and err.strerror else err})"


def fetch(entry: str | os.PathLike, *, build: Callable[[], T], save: Callable[[T, Path], None],
          read: Callable[[Path], T], what: str) -> T:
    """The value cached in ``entry``; built, and cached, when the entry is absent or broken.

    Args:
        entry: the entry's folder.
        build: makes the value (the expensive step the cache saves).
        save: ``save(value, folder)`` writes the value's files into ``folder``.
        read: ``read(folder)`` reads the value back from a whole entry.
        what: the value, as the notices name it (e.g. ``"SmolLM2-135M-Instruct.Q4_1.gguf"``).

    A broken entry (see :func:`problem`), or one whose files are whole but fail to ``read``, is
    rebuilt and replaced with a one-line warning on the ``ppl_lm.lm.cache`` logger naming its
    path; a cache that cannot be written gives the built value for this run only, with a warning
    saying so. ``build``'s own errors propagate.
    """
    entry = Path(entry)
    unreadable = False
    if entry.exists() or entry.is_symlink():
        why = problem(entry)
        if why is None:
            try:
                return read(entry)
            except Exception as err:  # whole files that no longer load (e.g. a reader that changed)
                why = f"it cannot be read: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                unreadable = True
        log.warning("the cached %s in %s is broken (%s); rebuilding it once", what, entry, why)
    value = build()
    try:
        write(entry, lambda folder: save(value, folder), replace=unreadable)
    except Exception as err:
        log.warning("the cache folder %s %s, so %s was converted in memory for this run only and the next "
                    "run converts it again; set %s to a writable folder to keep it", entry.parent,
                    _write_failure(err), what, CACHE_ENV)
    return value
