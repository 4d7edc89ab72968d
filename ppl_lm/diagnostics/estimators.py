"""Every diagnostic quantity, defined once: Kish ESS, the log-evidence standard error, PSIS
k-hat, ArviZ's split R-hat and bulk ESS, and SMC's genealogy effective count.

Backends, ``Posterior``, InferenceData, the report and the CLI all call these functions; none
computes its own variant.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

__all__ = ["arviz_scalar", "normalise", "log_mean_exp", "mcmc_mean_se", "kish_ess", "kish_ess_rows", "log_evidence_se", "pareto_khat",
           "mcmc_diagnostics", "sequence_ess", "genealogy_diagnostics", "KHAT_THRESHOLD", "RHAT_THRESHOLD",
           "MIN_DRAWS_FOR_SE"]

#: Pareto k-hat above which importance weights are too heavy-tailed to trust (Vehtari et al., 2024).
KHAT_THRESHOLD = 0.7
#: Split R-hat above which chains have not mixed (Vehtari et al., 2021).
RHAT_THRESHOLD = 1.01
#: Fewer independent draws (or SMC ancestors) than this give no usable standard error of log Z.
MIN_DRAWS_FOR_SE = 10


def import_arviz():
    # ArviZ 0.23 announces its refactor with a FutureWarning on import; it says nothing to users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _normalised(log_w: torch.Tensor) -> torch.Tensor:
    log_w = log_w.detach().double()
    return log_w - torch.logsumexp(log_w, 0)


def normalise(log_w: torch.Tensor) -> torch.Tensor:
    """Log-weights shifted so that logsumexp == 0 (float32, as ``Posterior.log_weights``).
    Raises on NaN, and when every weight is zero.

    >>> normalise(torch.log(torch.tensor([1.0, 3.0]))).exp().tolist()
    [0.25, 0.75]
    """
    log_w = log_w.detach().double()
    if torch.isnan(log_w).any():
        raise FloatingPointError("NaN in the log-weights: a reward or the LM produced NaN")
    z = torch.logsumexp(log_w, 0)
    if not torch.isfinite(z):
        raise ValueError(
            "no sample satisfies the condition: every weight is zero (log-weight -inf). "
            "The condition may be too rare for this many samples; use more samples, SMC, "
            "or a trained guide (method='svi')."
        )
    return (log_w - z).float()


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log((1/N) Σ exp(log_w)) along ``dim``: the log of an average weight, e.g. log Ẑ.

    >>> round(float(log_mean_exp(torch.log(torch.tensor([1.0, 3.0])))), 6)  # log 2
    0.693147
    """
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def kish_ess(log_w: torch.Tensor) -> float:
    """Kish's effective sample size 1/ΣW² of log-weights ``[N]`` (normalised or not); 0 if every weight is zero.

    >>> import torch
    >>> round(kish_ess(torch.zeros(10)), 9), round(kish_ess(torch.tensor([0.0, 0.0, -float("inf")])), 9)
    (10.0, 2.0)
    """
    return float(kish_ess_rows(log_w))


def kish_ess_rows(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's ESS of each row of log-weights ``[..., N]`` (SMC's replicates), in float64: 1/ΣW²
    with W = softmax(log_w); 0 for a row whose weights are all zero."""
    W = torch.nan_to_num(torch.softmax(log_w.detach().double(), -1), nan=0.0)
    return torch.nan_to_num(1.0 / (W**2).sum(-1), posinf=0.0)


def log_evidence_se(log_w: torch.Tensor) -> float:
    """Delta-method standard error of log Ẑ = log mean(w): sqrt(var(w)/N) / mean(w).

    With normalised weights ``W``, var(w)/mean(w)² = N/(N-1)·(N·ΣW² − 1). Zero for equal
    weights, ``nan`` for a single sample. ``log_w`` holds unnormalised log-weights ``[N]``.
    """
    n = log_w.numel()
    if n < 2:
        return float("nan")
    W = torch.exp(_normalised(log_w))
    rel_var = n / (n - 1) * (n * float((W**2).sum()) - 1.0)
    return math.sqrt(rel_var / n) if rel_var > 1e-12 else 0.0  # equal weights: exactly 0, not rounding noise


def pareto_khat(log_w: torch.Tensor) -> float:
    """PSIS k-hat of importance log-weights (``arviz.psislw``), robust to ties and zero weights.

    Zero weights (-inf) count as samples but never enter the tail. Degenerate cases:
    too few samples for a tail fit (fewer than ~25) gives ``nan``; a tail made of tied weights
    (bounded weights with an atom at their maximum, e.g. a hard constraint with the prior as
    proposal) gives ``-inf`` (no heavy tail); four or fewer non-zero weights among many
    samples gives ``inf`` (unreliable); at most four weights above tied ones gives ``inf`` when
    they carry most of the weight, else ``nan`` (undefined).
    """
    x = log_w.detach().double().cpu().numpy()
    n = x.size
    finite = np.isfinite(x)
    m = int(np.ceil(min(n / 5.0, 3.0 * math.sqrt(n))))  # arviz's tail length (reff = 1)
    if m <= 4:
        return float("nan")
    if finite.sum() <= 4:
        return float("inf")
    x = np.where(finite, x - x[finite].max(), -1e300)  # -inf as a huge finite: no inf - inf
    cutoff = max(np.sort(x)[-m - 1], np.log(np.finfo(float).tiny))
    tail = x[x > cutoff]
    if tail.size == 0 or (tail.size > 4 and tail.max() - tail.min() < 1e-12):
        return float("-inf")
    if tail.size <= 4:
        # A handful of weights above tied ones: no tail fit. Unreliable if they dominate.
        share = np.exp(tail).sum() / np.exp(x).sum()
        return float("inf") if share > 0.5 else float("nan")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, k = import_arviz().psislw(x)
    k = arviz_scalar(k)
    return k if math.isfinite(k) else float("inf")


def arviz_scalar(x) -> float:
    """One ArviZ statistic as a float. For a bare ``[chains, draws]`` array ArviZ returns a
    one-element array of shape ``(1,)``, which numpy >= 2.4 no longer converts with ``float()``."""
    return float(np.asarray(x, dtype=np.float64).item())


def mcmc_mean_se(draws: np.ndarray | torch.Tensor) -> float:
    """Monte Carlo standard error of the mean of one scalar laid out ``[chains, draws]``: ArviZ's
    ``mcse(method="mean")`` (its ESS of this very quantity, not the run's smallest), 0 when constant."""
    a = draws.detach().double().cpu().numpy() if isinstance(draws, torch.Tensor) else np.asarray(draws, dtype=np.float64)
    if np.ptp(a) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se = arviz_scalar(import_arviz().mcse(a, method="mean"))
    return se if math.isfinite(se) else float("nan")


def mcmc_diagnostics(draws: dict[str, np.ndarray | torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """Rank-normalised split R-hat and bulk ESS (ArviZ) of each non-constant scalar, ``[chains, draws]``.

    Constant summaries carry no information about mixing and are left out (a constraint's
    ``ok`` is 1 on the whole posterior support). Fewer than 4 draws per chain: nothing.

    Returns:
        ``(rhat, ess)``: dicts name -> value.
    """
    rhat, ess = {}, {}
    az = import_arviz()
    for name, v in draws.items():
        a = v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] < 4 or np.ptp(a) == 0 or not np.isfinite(a).all():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            e, r = arviz_scalar(az.ess(a, method="bulk")), arviz_scalar(az.rhat(a))
        if math.isfinite(e):
            ess[name] = e
        if math.isfinite(r) and a.shape[0] >= 2:
            rhat[name] = r
    return rhat, ess


def row_groups(rows: torch.Tensor) -> torch.Tensor:
    """``torch.unique(rows, dim=0, return_inverse=True)[1]`` for a matrix ``[N, T]``, fast for integers.

    Each row's index among the distinct rows in lexicographic order (the same indices
    ``torch.unique(dim=0)`` gives), by refining one column at a time with a 1-D ``unique`` of
    (index of the prefix, next column): exact, no hashing, T sorts of N numbers instead of
    ``unique(dim=0)``'s row comparisons (4.1 s of a 6.7 s SMC run at 10^5 particles, RESULTS §16).
    Float rows go to ``unique(dim=0)`` itself.

    >>> x = torch.tensor([[2, 1], [0, 3], [2, 1], [0, -1]])
    >>> row_groups(x).tolist()
    [2, 1, 2, 0]
    """
    rows = rows.reshape(len(rows), -1)
    if rows.is_floating_point() or rows.is_complex() or not len(rows):
        return torch.unique(rows, dim=0, return_inverse=True)[1]
    rows = rows.long()
    group = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
    for col in rows.T:
        col = col - col.min()
        # group < N and col < range of the column: the pair fits an int64 for token and value columns
        _, group = torch.unique(group * (int(col.max()) + 1) + col, return_inverse=True)
    return group


def sequence_ess(samples: torch.Tensor, num_chains: int) -> float:
    """Effective sample size of the empirical law over whole sequences, from between-chain spread.

    ``samples`` ``[num_chains * S, ...]`` are chain-major. Chains are independent, so the spread
    of each sequence's frequency across chains estimates the Monte Carlo variance of its pooled
    frequency, ``var_s``, whatever the autocorrelation. The result is the ``n`` whose i.i.d.
    errors match in total: ``(Σ_s sqrt(p_s(1-p_s)) / Σ_s sqrt(var_s))²``, the ``n`` at which the
    expected total-variation error of ``n`` independent draws equals this run's. It needs tens of
    chains to be precise (the variance of each frequency is estimated from ``num_chains`` chain
    means); ``nan`` with a single chain.

    >>> import torch
    >>> iid = torch.randint(0, 6, (40 * 250, 1), generator=torch.Generator().manual_seed(0))
    >>> round(sequence_ess(iid, 40), -2)  # 10,000 independent draws
    9600.0
    >>> sticky = iid.reshape(40, 250)[:, ::10].repeat_interleave(10, 1).reshape(-1, 1)  # each draw 10 times
    >>> round(sequence_ess(sticky, 40), -2)  # 1,000 independent draws
    900.0
    """
    C = num_chains
    N = len(samples)
    if C < 2:
        return float("nan")
    S = N // C
    inv = row_groups(samples)
    U = int(inv.max()) + 1
    counts = torch.zeros(C, U, dtype=torch.float64)
    counts.index_put_((torch.arange(N) // S, inv), torch.ones(N, dtype=torch.float64), accumulate=True)
    freq = counts / S
    p = freq.mean(0)
    sd = (freq.var(0, unbiased=True) / C).sqrt()
    iid = (p * (1 - p)).sqrt()
    if float(sd.sum()) == 0.0:
        return float(N)
    return float((iid.sum() / sd.sum()) ** 2)


def genealogy_diagnostics(tokens: torch.Tensor, eve: torch.Tensor, W: torch.Tensor) -> dict:
    """Effective sample size of weighted SMC particles for the law of the sequences.

    The variance of each sequence's estimated probability P̂_k is estimated from the particles
    grouped by Eve (time-0 ancestor): v_k = Σ_e (Σ_{i∈e} W_i (1[x_i=k] − P̂_k))² (Chan & Lai,
    2013); with no resampling this is the usual self-normalised importance-sampling variance.
    ``n_eff_genealogy`` is the number of independent exact draws whose empirical law has the same
    expected total-variation error, (Σ_k √(P̂_k(1−P̂_k)))² / (Σ_k √v_k)². On the toy problems it
    is calibrated (observed TV / expected TV ≈ 1), where the Kish ESS of the final weights
    overstates the information after resampling (ratio up to 1.7). ``n_eff`` caps it at the
    number of particles, and falls back to the number of Eves when fewer than
    :data:`MIN_DRAWS_FOR_SE` carry weight (the estimate degenerates as the genealogy collapses).

    Returns:
        ``{"n_eff": float, "n_eff_genealogy": float, "num_eves": int}``.
    """
    W = W.double()
    k = row_groups(tokens)
    K = int(k.max()) + 1
    P = torch.zeros(K, dtype=torch.float64).index_add_(0, k, W)
    _, e = torch.unique(eve, return_inverse=True)
    E = int(e.max()) + 1
    W_e = torch.zeros(E, dtype=torch.float64).index_add_(0, e, W)
    pair, pair_idx = torch.unique(e * K + k, return_inverse=True)
    A = torch.zeros(len(pair), dtype=torch.float64).index_add_(0, pair_idx, W)
    pe, pk = pair // K, pair % K
    # v_k = Σ_e A_ek² − 2 P_k Σ_e A_ek W_e + P_k² Σ_e W_e²
    v = (torch.zeros(K, dtype=torch.float64).index_add_(0, pk, A**2)
         - 2 * P * torch.zeros(K, dtype=torch.float64).index_add_(0, pk, A * W_e[pe])
         + P**2 * float((W_e**2).sum()))
    num = float(torch.sqrt((P * (1 - P)).clamp(min=0)).sum()) ** 2
    den = float(torch.sqrt(v.clamp(min=0)).sum()) ** 2
    num_eves = int((W_e > 0).sum())
    n_eff = num / den if den > 0 else math.inf
    capped = float(num_eves) if num_eves < MIN_DRAWS_FOR_SE else min(n_eff, float(len(W)))
    return {"n_eff": capped, "n_eff_genealogy": n_eff, "num_eves": num_eves}
