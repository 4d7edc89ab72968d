"""Token masks: token-level, prefix-closed conditions that SMC uses as a locally constrained proposal."""

from __future__ import annotations

import torch

__all__ = ["TokenMask"]


class TokenMask:
    """Which next tokens keep a prefix admissible: a token-level, prefix-closed condition.

    Subclasses implement ``allowed(prefix)`` -> bool ``[B, V]`` (``prefix``: ``[B, t]``).
    The default masks are static (independent of the prefix); EOS is always allowed.
    """

    def __init__(self, lm, allowed_tokens: torch.Tensor | None = None):
        self.lm = lm
        self._static = allowed_tokens

    def allowed(self, prefix: torch.Tensor) -> torch.Tensor:
        return self._static.to(prefix.device).expand(prefix.shape[0], -1)

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """``ok`` for full sequences ``[..., T]``: every generated token allowed."""
        flat = x.reshape(-1, x.shape[-1])
        ok = torch.ones(flat.shape[0], dtype=torch.bool, device=x.device)
        for t in range(flat.shape[-1]):
            a = self.allowed(flat[:, :t])
            ok &= a.gather(-1, flat[:, t : t + 1])[:, 0]
        return ok.reshape(x.shape[:-1])
