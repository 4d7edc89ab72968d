"""Cross-backend checks: posteriors of one model from several backends must agree.

Each backend's log Z estimate comes with a standard error; two estimates of the same log Z that
differ by many combined standard errors mean that at least one backend is wrong (or that its
standard error is too small, which is the usual way a weighted estimator fails), so neither
result can be trusted until they agree.
"""

from __future__ import annotations

import math
from typing import Mapping

from ..backends import Kind
from ..posterior import Posterior
from .inference_data import log_evidence_se_reason
from .warnings import InferenceWarning

__all__ = ["disagreeing_backends", "DISAGREEMENT_Z"]

#: Two log Z estimates disagree when they differ by more than this many combined standard errors.
#: Under agreement and honest standard errors a pair exceeds 4 with probability 6e-5, so a handful
#: of backends compared once rarely cries wolf.
DISAGREEMENT_Z = 4.0

# Estimates that are exact to floating-point precision (method="exact", se 0) still differ by
# rounding; this is the smallest difference that counts.
_ATOL = 1e-6


def _estimate(post: Posterior) -> tuple[float, float] | None:
    if post.log_evidence is None or not math.isfinite(post.log_evidence):
        return None
    se = post.log_evidence_se
    se = 0.0 if post.kind is Kind.EXACT and se is None else se  # an enumeration's log Z is exact
    if se is None or not math.isfinite(se) or log_evidence_se_reason(post):
        return None  # no error bar (e.g. one SMC ancestor's se of 1.0): nothing to compare against
    return float(post.log_evidence), float(se)


def disagreeing_backends(posteriors: Mapping[str, Posterior], *, z: float = DISAGREEMENT_Z
                         ) -> list[InferenceWarning]:
    """One ``disagreeing_backends`` warning if some pair of log Z estimates differ beyond their errors.

    Args:
        posteriors: name -> Posterior of the same model and context (an ``exact`` one included,
            with standard error 0). Backends without a log Z or without a usable standard error
            (MH; fewer than 10 effective draws or SMC ancestors) are left out.
        z: how many combined standard errors, ``sqrt(se_a² + se_b²)``, make a disagreement.

    Returns:
        ``[]`` when every pair agrees, else one warning naming every disagreeing pair, worst
        first.

    >>> import torch
    >>> from ppl_lm import Posterior
    >>> def post(lz, se):
    ...     return Posterior(torch.zeros(40, 1), torch.full((40,), -3.6889), lz, "importance", log_evidence_se=se)
    >>> disagreeing_backends({"a": post(-1.0, 0.1), "b": post(-1.1, 0.1)})
    []
    >>> [w.code for w in disagreeing_backends({"a": post(-1.0, 0.1), "b": post(-3.0, 0.1)})]
    ['disagreeing_backends']
    """
    est = {n: e for n, p in posteriors.items() if (e := _estimate(p)) is not None}
    names = list(est)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (la, sa), (lb, sb) = est[a], est[b]
            diff = abs(la - lb)
            if diff <= _ATOL:
                continue
            se = math.hypot(sa, sb)
            score = math.inf if se == 0 else diff / se
            if score > z:
                pairs.append((score, a, b))
    if not pairs:
        return []
    pairs.sort(key=lambda p: -p[0])

    def show(n: str) -> str:
        lz, se = est[n]
        return f"{n} {lz:.3f} ± {se:.3f}"

    def times(score: float) -> str:
        return "with zero standard errors" if math.isinf(score) else f"{score:.1f} standard errors apart"

    listed = "; ".join(f"{show(a)} vs {show(b)} ({times(s)})" for s, a, b in pairs)
    return [InferenceWarning(
        code="disagreeing_backends",
        message=f"The backends' log Z estimates disagree beyond their standard errors: {listed}.",
        fix="At least one of these results is wrong: read each backend's own warnings, give the failing "
            "one more samples or particles (or a better proposal), and trust none until they agree; "
            "on a toy LM compare with method='exact'.",
    )]
