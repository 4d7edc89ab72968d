"""Conditions as likelihood factors (:mod:`.factors`) and token-level masks (:mod:`.masks`)."""

from .factors import constraint, is_partial, partial_prefix, pin, prefix_length, reward, token_constraint
from .masks import TokenMask

__all__ = ["reward", "constraint", "pin", "token_constraint", "is_partial", "prefix_length", "partial_prefix",
           "TokenMask"]
