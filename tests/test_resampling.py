"""Resampling schemes (``ppl_lm.resampling``) against exact offspring laws.

Each scheme is unbiased: particle i is drawn N·w_i times in expectation. The expectations are
computed exactly where the scheme allows (systematic and stratified: an integral over the uniform
offsets, piecewise constant between known breakpoints), and the sampled means of many seeded
draws are held to the exact mean within 5 standard errors computed from each scheme's exact
offspring variance, never from the draws. A planted off-by-one in the systematic offsets fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from ppl_lm import resampling
from ppl_lm.inference import smc
from ppl_lm.resampling import SCHEMES, resample

# Two rows of normalised weights: fractional N·w_i, a zero weight inside and a trailing one.
W = torch.tensor([[0.05, 0.30, 0.00, 0.17, 0.28, 0.20],
                  [0.61, 0.02, 0.07, 0.15, 0.15, 0.00]], dtype=torch.float64)
N = W.shape[-1]


def counts(idx: torch.Tensor, n: int = N) -> torch.Tensor:
    """Offspring counts ``[..., n]`` of indices ``[..., num]``."""
    return torch.nn.functional.one_hot(idx, n).sum(-2)


def exact_spaced_offspring(w: torch.Tensor, num: int) -> torch.Tensor:
    """E[counts] of ``resampling._spaced`` over a uniform offset u shared by every stratum, exactly:
    the counts are constant between the offsets where a position (u + k)/num meets the CDF."""
    cuts = (num * torch.cumsum(w, 0)) % 1.0
    edges = torch.unique(torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64), cuts]))
    edges = edges[(edges >= 0) & (edges <= 1)]
    mid = (edges[:-1] + edges[1:]) / 2
    c = counts(resampling._spaced(w.expand(len(mid), -1), num, mid[:, None]), len(w)).double()
    return ((edges[1:] - edges[:-1])[:, None] * c).sum(0)


def stratum_probabilities(w: torch.Tensor, num: int) -> torch.Tensor:
    """P(stratum k's position falls in particle i's CDF interval) ``[num, N]``, exactly."""
    hi = torch.cumsum(w, 0)
    lo = hi - w
    k = torch.arange(num, dtype=torch.float64)[:, None]
    overlap = (torch.minimum(hi, (k + 1) / num) - torch.maximum(lo, k / num)).clamp(min=0)
    return num * overlap


def exact_moments(scheme: str, w: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and variance of each particle's offspring count under ``scheme``."""
    if scheme == "multinomial":
        return num * w, num * w * (1 - w)
    if scheme == "residual":
        base = torch.floor(num * w)
        rest = num - base.sum()
        p = (num * w - base) / rest
        return base + rest * p, rest * p * (1 - p)
    p = stratum_probabilities(w, num)
    if scheme == "stratified":  # independent Bernoulli strata
        return p.sum(0), (p * (1 - p)).sum(0)
    mean = exact_spaced_offspring(w, num)
    return mean, None  # systematic: counts are floor or ceil of num·w, checked exactly


@pytest.mark.parametrize("num", [N, 4, 11])
def test_spaced_positions_give_exactly_num_w_offspring(num):
    """Systematic / stratified: E[counts] = num·w_i exactly (to rounding), by integration over u."""
    for w in W:
        assert torch.allclose(exact_spaced_offspring(w, num), num * w, atol=1e-9)
        assert torch.allclose(stratum_probabilities(w, num).sum(0), num * w, atol=1e-12)


def test_planted_off_by_one_in_the_systematic_offsets_fails(monkeypatch):
    """Positions (u + k + 1)/num (clamped to the last particle) instead of (u + k)/num."""
    real = resampling._spaced
    monkeypatch.setattr(resampling, "_spaced",
                        lambda w, num, u: real(w, num, u + 1).clamp(max=w.shape[-1] - 1))
    assert not torch.allclose(exact_spaced_offspring(W[0], N), N * W[0], atol=1e-3)
    # The sampled check catches it too: the first particle of row 0 is never drawn.
    idx = resample(W, scheme="systematic", generator=torch.Generator().manual_seed(0))
    assert counts(idx)[0, 0] == 0 and N * W[0, 0] > 0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num", [N, 11])
def test_sampled_offspring_match_the_exact_mean(scheme, num):
    """4000 seeded draws of both rows at once: mean counts within 5 exact standard errors of
    num·w_i (systematic: every draw is floor or ceil, and its mean is checked against the exact
    integral with the variance of a floor/ceil count)."""
    M = 4000
    g = torch.Generator().manual_seed(1)
    batch = W.repeat(M, 1)  # [2M, N]: M independent resamplings of each row
    c = counts(resample(batch, num, scheme, g)).view(M, 2, N).double()
    assert (c.sum(-1) == num).all()
    for r, w in enumerate(W):
        mean, var = exact_moments(scheme, w, num)
        assert torch.allclose(mean, num * w, atol=1e-9)
        if var is None:  # a floor/ceil count with mean m: Bernoulli on the fractional part
            frac = num * w - torch.floor(num * w)
            var = frac * (1 - frac)
        tol = 5 * torch.sqrt(var / M) + 1e-12
        assert ((c[:, r].mean(0) - mean).abs() <= tol).all(), (scheme, r, c[:, r].mean(0), mean, tol)
        assert (c[:, r, w == 0] == 0).all()  # a zero weight is never drawn


@pytest.mark.parametrize("num", [N, 11])
def test_offspring_bounds(num):
    """Systematic: floor or ceil of num·w_i, always. Residual: at least floor. Stratified: within one
    of them (a particle's interval meets at most ceil + 1 strata and holds at least floor − 1)."""
    g = torch.Generator().manual_seed(2)
    batch = W.repeat(2000, 1)
    lo, hi = torch.floor(num * batch), torch.ceil(num * batch)
    sys_c = counts(resample(batch, num, "systematic", g))
    assert ((sys_c >= lo) & (sys_c <= hi)).all()
    assert (counts(resample(batch, num, "residual", g)) >= lo).all()
    st_c = counts(resample(batch, num, "stratified", g))
    assert ((st_c >= lo - 1) & (st_c <= hi + 1)).all()


def test_rounding_never_draws_a_trailing_zero_weight():
    """Weights whose CDF stops short of 1 by rounding, and offsets within an ulp of 1 (where
    (u + num − 1)/num rounds to 1): no position falls past the last positive weight."""
    g = torch.Generator().manual_seed(3)
    for w in (torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64),
              torch.tensor([0.1] * 10 + [0.0, 0.0], dtype=torch.float64)):
        last = int(torch.nonzero(w).max())
        for scheme in SCHEMES:
            assert int(resample(w.expand(5000, -1).contiguous(), None, scheme, g).max()) <= last, scheme
        for num in (3, 11, 1000):
            u = torch.tensor([[1 - 2**-53]], dtype=torch.float64)
            idx = resampling._spaced(w[None], num, u)
            assert int(idx.max()) == last and torch.equal(counts(idx, len(w))[0, last + 1:], torch.zeros(len(w) - last - 1,
                                                                                                        dtype=torch.long))


def test_shapes_and_seeds():
    def g():
        return torch.Generator().manual_seed(4)

    for scheme in SCHEMES:
        one = resample(W[0], 7, scheme, g())
        assert one.shape == (7,) and one.dtype == torch.long
        assert torch.equal(one, resample(W[0], 7, scheme, g()))  # same seed, same draws
        assert resample(W, None, scheme, g()).shape == (2, N)
        if scheme != "multinomial":
            assert (one[1:] >= one[:-1]).all()  # ascending


def test_smc_accepts_every_scheme():
    assert smc.RESAMPLING == SCHEMES


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"scheme must be one of .*; got 'sytematic' \(did you mean 'systematic'\?\)"):
        resample(W, scheme="sytematic")
    with pytest.raises(ValueError, match="sum to 1.*torch.softmax"):
        resample(torch.tensor([0.2, 0.2]))
    with pytest.raises(ValueError, match="non-negative"):
        resample(torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        resample(torch.tensor([math.nan, 1.0]))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num must be a positive integer"):
            resample(W, bad)
    with pytest.raises(ValueError, match=r"tensor \[N\] or \[R, N\]"):
        resample(W[None])
