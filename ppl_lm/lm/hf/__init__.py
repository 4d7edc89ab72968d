"""Hugging Face causal LMs behind the protocol, in three modules by job:

- :mod:`.model`: :class:`TransformersLM`, the wrapper (text, chat stop tokens, the KV-cached loop);
- :mod:`.kv_cache`: how keys and values are kept between decode steps, one strategy per
  ``kv_cache`` setting (``"dynamic"``, ``"static"``, ``"compiled"``);
- :mod:`.loading`: :func:`load_lm` and what reads files: the embedded SmolLM2, local folders and
  GGUF files, the converted-weight cache, and the cheap :func:`check_model` / :func:`check_device`;
- :mod:`.precision`: the parameter dtype ``load_lm(dtype="auto")`` picks (bfloat16 where it pays).

Every name is re-exported here, where callers import it from (``ppl_lm.lm.hf.check_device``).
"""

from ..cache import CACHE_ENV, cache_dir
from .kv_cache import KV_CACHES, STATIC_BLOCK, STATIC_DEFAULT_NEW_TOKENS, STATIC_RECOMPILE_LIMIT
from .loading import EMBEDDED_GGUF, cache_entry, check_device, check_model, embedded_model_dir, load_lm
from .model import TransformersLM
from .precision import DTYPES

__all__ = ["TransformersLM", "load_lm", "DTYPES", "check_device", "check_model", "cache_dir", "cache_entry",
           "embedded_model_dir", "EMBEDDED_GGUF", "KV_CACHES", "STATIC_BLOCK", "STATIC_DEFAULT_NEW_TOKENS",
           "STATIC_RECOMPILE_LIMIT", "CACHE_ENV"]
