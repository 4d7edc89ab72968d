"""Preference data: pairs of texts where a rater chose one over the other.

A :class:`Preferences` holds ``n`` pairs (chosen, rejected), each side token ids ``[n, T]``
(EOS-padded, as samples are) or strings, with an optional context per pair. It is the observed
data of a Bradley–Terry reward model (:func:`ppl_lm.fit_reward`): the rater's choice is an
observed Bernoulli whose log-odds is the reward difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .validation import check_int

__all__ = ["Preferences", "simulate_preferences"]


def _side(name: str, v) -> torch.Tensor | list[str]:
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype == torch.bool or v.dim() != 2:
            raise TypeError(f"{name} must be a LongTensor [n, T] of token ids (EOS-padded) or a list of strings; "
                            f"got a {v.dtype} tensor of shape {tuple(v.shape)}")
        return v.long()
    if isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v):
        return list(v)
    raise TypeError(f"{name} must be a LongTensor [n, T] of token ids or a list of strings, got {type(v).__name__}")


@dataclass
class Preferences:
    """``n`` preference pairs: ``chosen[i]`` was preferred to ``rejected[i]`` (given ``context[i]``).

    Args:
        chosen, rejected: token ids ``[n, T]`` (EOS-padded) or ``n`` strings each (both sides alike).
        context: ``None``, or ``n`` strings (the prompt each pair answers).

    Bad data is a clear error here, before any work: sides of different lengths, an empty text,
    a pair whose two sides are identical.

    >>> import torch, ppl_lm
    >>> prefs = ppl_lm.Preferences(torch.tensor([[1, 2, 0], [2, 0, 0]]), torch.tensor([[3, 0, 0], [1, 1, 0]]))
    >>> len(prefs)
    2
    """

    chosen: torch.Tensor | list[str]
    rejected: torch.Tensor | list[str]
    context: list[str] | None = None

    def __post_init__(self):
        self.chosen, self.rejected = _side("chosen", self.chosen), _side("rejected", self.rejected)
        if isinstance(self.chosen, torch.Tensor) != isinstance(self.rejected, torch.Tensor):
            raise TypeError("chosen and rejected must both be token ids or both be strings")
        n = len(self.chosen)
        if len(self.rejected) != n:
            raise ValueError(f"chosen has {n} texts and rejected {len(self.rejected)}: one of each per pair")
        if n == 0:
            raise ValueError("no preference pairs: give at least one (chosen, rejected) pair")
        if isinstance(self.chosen, torch.Tensor) and self.chosen.shape[1] != self.rejected.shape[1]:
            raise ValueError(f"chosen has {self.chosen.shape[1]} tokens per text and rejected {self.rejected.shape[1]}: "
                             "pad both sides to one length T (with EOS)")
        if self.context is not None:
            if isinstance(self.context, str) or len(self.context) != n or not all(isinstance(c, str) for c in self.context):
                raise ValueError(f"context must be None or a list of {n} strings, one per pair")
            self.context = list(self.context)
        for i in range(n):
            a, b = self.chosen[i], self.rejected[i]
            if isinstance(a, str):
                if not a or not b:
                    raise ValueError(f"pair {i} has an empty text; every chosen and rejected text must be non-empty")
                same = a == b
            else:
                same = bool(torch.equal(a, b))
            if same:
                raise ValueError(f"pair {i}: chosen and rejected are the same text, which says nothing about the "
                                 "rater's preference; drop the pair")

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def is_text(self) -> bool:
        return not isinstance(self.chosen, torch.Tensor)

    def tokens(self, lm, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides as token ids ``[n, T]`` (strings encoded as observed text is, see
        :func:`ppl_lm.distribution.encode_texts`)."""
        if not self.is_text:
            return self.chosen, self.rejected
        from .distribution import encode_texts

        return encode_texts(lm, self.chosen, max_new_tokens), encode_texts(lm, self.rejected, max_new_tokens)

    # -- JSONL -------------------------------------------------------------------------------
    def to_jsonl(self, path: str | Path) -> None:
        """One JSON object a line: ``{"context", "chosen", "rejected"}`` (text, or token-id lists)."""
        def side(v, i):
            return v[i] if self.is_text else v[i].tolist()

        with open(path, "w", encoding="utf-8") as f:
            for i in range(len(self)):
                row = {"context": None if self.context is None else self.context[i],
                       "chosen": side(self.chosen, i), "rejected": side(self.rejected, i)}
                f.write(json.dumps(row) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "Preferences":
        """Read pairs written by :meth:`to_jsonl` (or by hand: ``chosen`` and ``rejected`` strings,
        an optional ``context``)."""
        rows = []
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{k}: not JSON ({err.msg})") from None
                missing = {"chosen", "rejected"} - set(row)
                if missing:
                    raise ValueError(f"{path}:{k}: missing key(s) {sorted(missing)}; each line needs chosen and rejected")
                rows.append(row)
        if not rows:
            raise ValueError(f"{path} holds no preference pairs")
        ctx = [r.get("context") for r in rows]
        context = None if all(c is None for c in ctx) else [c or "" for c in ctx]

        def side(key) -> torch.Tensor | list[str]:
            vals = [r[key] for r in rows]
            if all(isinstance(v, str) for v in vals):
                return vals
            return torch.tensor(vals, dtype=torch.long)

        return cls(side("chosen"), side("rejected"), context)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]], context=None) -> "Preferences":
        """From ``[(chosen, rejected), ...]``."""
        return cls([a for a, _ in pairs], [b for _, b in pairs], context)


def simulate_preferences(lm, prompt, utility, n: int, max_new_tokens: int, *, temperature: float = 1.0,
                         seed: int = 0) -> Preferences:
    """A simulated rater with a known utility: ``n`` pairs of prior draws of ``lm`` given ``prompt``,
    the first of each pair chosen with probability σ((u(a) − u(b)) / temperature) (Bradley–Terry).

    Args:
        utility: batched ``[N, T]`` token ids -> ``[N]`` (e.g. a reward function of ``ppl_lm.rewards``).
        temperature: the rater's noise; the truth of a reward model fitted to the pairs is u / temperature.

    Pairs whose two texts are identical are redrawn. Returns token-id preferences (``[n, T]``).
    """
    check_int("n", n)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    from . import seeding

    d = lm.sequence(prompt, max_new_tokens=max_new_tokens)
    chosen, rejected = [], []
    with seeding.seeded(seed), torch.no_grad():
        g = seeding.generator("cpu")
        for _ in range(20):  # redraw identical pairs; a degenerate LM gives up with a clear error
            xs = d.expand(torch.Size([2 * n])).sample().cpu()
            a, b = xs[:n], xs[n:]
            keep = ~(a == b).all(-1)
            a, b = a[keep], b[keep]
            u = (torch.as_tensor(utility(a)).double() - torch.as_tensor(utility(b)).double()).cpu() / temperature
            first = torch.rand(len(u), generator=g, dtype=torch.float64) < torch.sigmoid(u)
            chosen.append(torch.where(first[:, None], a, b))
            rejected.append(torch.where(first[:, None], b, a))
            if sum(len(c) for c in chosen) >= n:
                break
        else:
            raise ValueError("the LM keeps drawing identical texts; no preference pairs can be made from it")
    return Preferences(torch.cat(chosen)[:n], torch.cat(rejected)[:n])
