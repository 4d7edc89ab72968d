"""Reward and condition functions: a batch of token tensors in, one value per sequence out.

Every function takes ``(lm, x, ...)`` with ``x`` a LongTensor ``[..., T]`` and returns a tensor
of shape ``[...]``. Functions that decode text (and so leave torch) re-attach the sample's Pyro
provenance to their output, so ``TraceGraph_ELBO``-style estimators still see that the reward
depends on the sample: this is done once, here, in :func:`text_reward`.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable

import torch
from pyro.ops.provenance import get_provenance, track_provenance

from .conditions.grammar import grammar_mask, json_mask, regex_mask
from .conditions.legal_moves import chess_mask
from .conditions.masks import TokenMask
from .tokens import lengths

__all__ = [
    "text_reward", "texts", "contains", "regex", "keywords", "sentiment", "chess_game",
    "factorisation", "length", "ends_with", "forbid_chars", "only_chars", "starts_with",
    "chess_moves", "regex_mask", "grammar_mask", "json_mask", "chess_mask",
]


def texts(lm, x: torch.Tensor) -> list[str]:
    """Decode a batch ``[..., T]`` to a flat list of strings."""
    flat = x.reshape(-1, x.shape[-1])
    return [lm.decode(row) for row in flat.tolist()]


def text_reward(fn: Callable[..., float]) -> Callable[..., torch.Tensor]:
    """Turn ``fn(text, *args) -> number | bool`` into a batched reward ``(lm, x, *args) -> Tensor``.

    Results are cached per distinct text within a call (duplicates are common in posteriors).
    """

    @functools.wraps(fn)
    def batched(lm, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point:
            raise TypeError(f"{fn.__name__}: x must be a LongTensor of token ids [..., T]")
        cache: dict[str, object] = {}
        out = []
        for text in texts(lm, x):
            if text not in cache:
                cache[text] = fn(text, *args, **kwargs)
            out.append(cache[text])
        dtype = torch.bool if all(isinstance(v, bool) for v in out) else torch.float32
        res = torch.tensor(out, dtype=dtype).reshape(x.shape[:-1])
        prov = get_provenance(x)
        return track_provenance(res, prov) if prov else res

    return batched


@text_reward
def contains(text: str, s: str) -> bool:
    """The text contains the substring ``s``."""
    return s in text


@text_reward
def starts_with(text: str, s: str) -> bool:
    return text.startswith(s)


@text_reward
def ends_with(text: str, s: str) -> bool:
    """The text ends with ``s`` (ignoring trailing whitespace)."""
    return text.rstrip().endswith(s.rstrip())


@text_reward
def regex(text: str, pattern: str) -> bool:
    """``re.search(pattern, text)`` matches."""
    return re.search(pattern, text) is not None


@text_reward
def keywords(text: str, words: Iterable[str]) -> float:
    """Number of the given words that occur in the text (case-insensitive, whole words)."""
    low = text.lower()
    return float(sum(1 for w in words if re.search(rf"\b{re.escape(w.lower())}\b", low)))


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@text_reward
def sentiment(text: str) -> float:
    """VADER compound sentiment in [-1, 1] (positive is > 0)."""
    return float(_vader().polarity_scores(text)["compound"])


def _legal_half_moves(text: str) -> int:
    """Legal half-moves of the PGN movetext starting at the first "1." (0 if none)."""
    import chess

    m = re.search(r"1\.\s*\S", text)
    if m is None:
        return 0
    board = chess.Board()
    count = 0
    for tok in text[m.start():].split():
        tok = re.sub(r"^\d+\.(\.\.)?", "", tok)
        if not tok:
            continue
        if tok in ("1-0", "0-1", "1/2-1/2", "*"):
            break
        try:
            board.push_san(tok)
        except ValueError:
            break
        count += 1
    return count


@text_reward
def chess_game(text: str, min_moves: int = 2) -> bool:
    """The text contains a legal chess game in PGN movetext ("1. e4 e5 2. Nf3 ...").

    At least ``min_moves`` half-moves, every one legal from the starting position.
    """
    return _legal_half_moves(text) >= min_moves


@text_reward
def chess_moves(text: str) -> float:
    """Number of legal half-moves in the PGN movetext starting at the first "1." (0 if none).

    A graded version of :func:`chess_game` (which is ``chess_moves >= min_moves``), for soft
    rewards.
    """
    return float(_legal_half_moves(text))


@text_reward
def factorisation(text: str, n: int) -> bool:
    """The text begins with a correct prime factorisation of ``n`` ("3 * 5 * 7", "3×5×7").

    The factors must be primes (sympy) whose product is ``n``.
    """
    import sympy

    m = re.match(r"\s*(\d+(?:\s*[*×x·]\s*\d+)*)", text)
    if m is None:
        return False
    factors = [int(f) for f in re.split(r"\s*[*×x·]\s*", m.group(1).strip())]
    prod = 1
    for f in factors:
        prod *= f
    return prod == int(n) and all(sympy.isprime(f) for f in factors)


def length(lm, x: torch.Tensor) -> torch.Tensor:
    """Number of tokens up to and including EOS."""
    out = lengths(x, lm.eos_id).float()
    prov = get_provenance(x)
    return track_provenance(out, prov) if prov else out


def _char_mask(lm, keep: Callable[[str], bool]) -> torch.Tensor:
    allowed = torch.tensor([keep(s) for s in lm.token_texts()], dtype=torch.bool)
    allowed[lm.eos_id] = True
    return allowed


def _check_chars(fn: str, chars) -> str:
    if not isinstance(chars, str):
        raise TypeError(f"{fn}: chars must be a string of the characters, e.g. {fn}(lm, \"eE\"), "
                        f"got {type(chars).__name__} {chars!r}")
    if not chars:
        raise ValueError(f"{fn}: chars is empty, so the mask would "
                         + ("forbid nothing" if fn == "forbid_chars" else "allow only EOS")
                         + "; give the characters, e.g. \"eE\"")
    return chars


def forbid_chars(lm, chars: str) -> TokenMask:
    """Token mask: no token whose text contains any of ``chars`` (e.g. "eE": no letter e).

    Raises:
        TypeError: ``chars`` is not a string. ValueError: it is empty.
    """
    chars = _check_chars("forbid_chars", chars)
    return TokenMask(lm, _char_mask(lm, lambda s: not any(c in s for c in chars)))


def only_chars(lm, chars: str) -> TokenMask:
    """Token mask: only tokens made entirely of ``chars`` (e.g. digits and spaces).

    Raises:
        TypeError: ``chars`` is not a string. ValueError: it is empty.
    """
    chars = _check_chars("only_chars", chars)
    return TokenMask(lm, _char_mask(lm, lambda s: len(s) > 0 and all(c in chars for c in s)))
