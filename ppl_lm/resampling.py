"""Resampling schemes, defined once: ancestor indices drawn from normalised weights.

Every scheme is unbiased: particle ``i`` of a row is expected to be drawn ``num·W_i`` times.
They differ in the noise they add (Douc, Cappé & Moulines, 2005):

- ``"multinomial"``: ``num`` independent draws from the weights.
- ``"stratified"``: one uniform draw in each of ``num`` equal strata of the weights' CDF.
- ``"systematic"``: one uniform offset shared by the ``num`` evenly spaced positions; each
  particle gets ``floor`` or ``ceil`` of ``num·W_i`` copies.
- ``"residual"``: ``floor(num·W_i)`` copies of each particle, then the remaining draws
  multinomially from the fractional parts.

SMC (``ppl_lm.inference.smc``, option ``resampling=``) and the equal-weight posterior draws of
:func:`ppl_lm.diagnostics.to_inference_data` (systematic) both call :func:`resample`.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from .validation import check_int, check_value

__all__ = ["Scheme", "SCHEMES", "resample"]

#: A scheme's name, as an option's annotation (``resampling: Scheme = "multinomial"``).
Scheme = Literal["multinomial", "stratified", "systematic", "residual"]
#: The schemes :func:`resample` knows, in the order the benchmarks list them.
SCHEMES: tuple[str, ...] = typing.get_args(Scheme)


def resample(weights: torch.Tensor, num: int | None = None, scheme: str = "multinomial",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices drawn from normalised weights, by one of :data:`SCHEMES`.

    Args:
        weights: ``[N]`` or ``[R, N]`` (one row per independent resampling), non-negative, each
            row summing to 1 (e.g. ``torch.softmax(log_w, -1)``). A zero weight is never drawn.
        num: draws per row (default ``N``).
        scheme: ``"multinomial"``, ``"stratified"``, ``"systematic"`` or ``"residual"``.
        generator: a CPU ``torch.Generator`` (the global one if ``None``).

    Returns:
        LongTensor ``[num]`` or ``[R, num]`` of indices into the last dimension of ``weights``;
        ascending for every scheme but multinomial.

    Raises:
        ValueError: an unknown scheme, a bad ``num``, or weights that are not normalised.

    >>> import torch
    >>> resample(torch.tensor([0.5, 0.25, 0.25, 0.0]), scheme="systematic").tolist()
    [0, 0, 1, 2]
    >>> resample(torch.tensor([0.5, 0.5]), 4, "residual").tolist()
    [0, 0, 1, 1]
    """
    W = _check(weights, num, scheme)
    num = W.shape[-1] if num is None else num
    rows = W.view(-1, W.shape[-1])
    R = rows.shape[0]
    if scheme == "multinomial":
        idx = torch.multinomial(rows, num, replacement=True, generator=generator)
    elif scheme in ("stratified", "systematic"):  # one offset per stratum, or one shared by all
        u = torch.rand(R, num if scheme == "stratified" else 1, dtype=torch.float64, generator=generator)
        idx = _spaced(rows, num, u)
    else:
        idx = _residual(rows, num, generator)
    return idx.view(*W.shape[:-1], num)


def _check(weights: torch.Tensor, num, scheme: str) -> torch.Tensor:
    check_value("scheme", scheme, Scheme)
    check_int("num", num, optional=True)  # draws per row
    if not isinstance(weights, torch.Tensor) or weights.dim() not in (1, 2) or weights.shape[-1] < 1:
        raise ValueError("weights must be a tensor [N] or [R, N] with N >= 1, got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}")
    W = weights.detach().double()
    total = W.sum(-1)
    if not bool(torch.isfinite(W).all()) or bool((W < 0).any()) or not bool(((total - 1).abs() < 1e-6).all()):
        raise ValueError("weights must be finite, non-negative and sum to 1 in each row (got row sums "
                         f"{total.flatten()[:4].tolist()}...); from log-weights pass torch.softmax(log_w, -1)")
    return W


def _spaced(W: torch.Tensor, num: int, u: torch.Tensor) -> torch.Tensor:
    """Stratified positions (u_k + k)/num, k = 0..num−1, on the CDF of each row of ``W [R, N]``:
    ``u [R, num]`` (stratified) or ``u [R, 1]`` (systematic: one offset for every stratum).
    Returns the particle whose CDF interval holds each position."""
    positions = (u + torch.arange(num, dtype=torch.float64)) / num
    # right=True: the first particle whose CDF passes the position, so a zero weight is never drawn.
    idx = torch.searchsorted(torch.cumsum(W, -1), positions, right=True)
    # A position past the CDF's last value (which rounding can leave below 1, and (u + num − 1)/num
    # can round up to 1) goes to the last positive weight, never to a zero weight after it.
    last = W.shape[-1] - 1 - torch.argmax(torch.flip(W > 0, [-1]).to(torch.uint8), -1, keepdim=True)
    return torch.minimum(idx, last)


def _residual(W: torch.Tensor, num: int, generator) -> torch.Tensor:
    """``floor(num·W_i)`` copies, then the rest drawn multinomially from the fractional parts."""
    R, N = W.shape
    W = W / W.sum(-1, keepdim=True)  # so that the floors never add up to more than num
    counts = torch.floor(num * W).long()
    rest = num - counts.sum(-1)  # [R], 0 <= rest < N
    frac = (num * W - counts).clamp(min=0)
    frac = torch.where(rest[:, None] > 0, frac, torch.ones_like(frac))  # rows with nothing left: draws unused
    m = int(rest.max())
    if m > 0:
        extra = torch.multinomial(frac, m, replacement=True, generator=generator)
        keep = (torch.arange(m) < rest[:, None]).long()
        counts = counts.scatter_add(-1, extra, keep)
    return torch.repeat_interleave(torch.arange(N).repeat(R), counts.reshape(-1)).view(R, num)
