"""Typed warnings: what a failed or doubtful run says about itself, first.

Every backend attaches a list of :class:`InferenceWarning` to its :class:`~ppl_lm.Posterior`
(``post.warnings``); the CLI prints them and the report shows them before anything else. Each
warning is also raised with :func:`warnings.warn` (category :class:`PplLmWarning`) so that a
script sees it at the user's own line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

__all__ = ["InferenceWarning", "PplLmWarning", "emit"]


class PplLmWarning(UserWarning):
    """The ``warnings`` category of every ppl-lm inference warning."""


@dataclass(frozen=True)
class InferenceWarning:
    """One diagnosis of a run.

    Attributes:
        code: a stable identifier (``"khat"``, ``"few_distinct"``, ``"path_degeneracy"``,
            ``"rhat"``, ``"low_ess"``, ``"svi_divergence"``, ``"disagreeing_backends"``...).
        message: one sentence saying what is wrong, with the number that shows it.
        fix: what to do about it.
    """

    code: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message} Fix: {self.fix}"


def emit(items: list[InferenceWarning], method: str, stacklevel: int = 2) -> None:
    """Raise each warning with :func:`warnings.warn`, attributed to the caller's frame."""
    for w in items:
        warnings.warn(f"{method}: {w}", PplLmWarning, stacklevel=stacklevel + 1)
