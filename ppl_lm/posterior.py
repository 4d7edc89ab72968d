"""The result of every inference backend."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Posterior", "normalise", "ess_of"]


def normalise(log_w: torch.Tensor) -> torch.Tensor:
    """Log-weights shifted so that logsumexp == 0. Raises if every weight is zero."""
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


def ess_of(log_w: torch.Tensor) -> float:
    """Kish effective sample size of normalised log-weights."""
    w = torch.exp(log_w.double())
    return float(w.sum() ** 2 / (w**2).sum())


@dataclass
class Posterior:
    """Weighted samples from the conditional π(x | condition).

    Attributes:
        samples: LongTensor ``[N, T]`` of the main sequence site (EOS-padded).
        log_weights: ``[N]``, normalised (logsumexp == 0); uniform for MCMC.
        log_evidence: estimate of log Z, or ``None`` where the backend gives none.
        method: backend name.
        lm: the language model of the main site (for ``texts``).
        stats: per-sample arrays (``log_prior``, ``log_likelihood``, ``length``, ``reward:NAME``...).
        chain: ``[N]`` chain index of each sample (MCMC), else zeros.
        info: run-level facts (seed, wall time, k-hat, acceptance, ELBO trace, ...).
        values: every latent site's samples.
        guide: the trained guide (SVI) or ``None``.
        warnings: typed diagnoses of the run (:class:`~ppl_lm.diagnostics.InferenceWarning`),
            empty when every check passed.
    """

    samples: torch.Tensor
    log_weights: torch.Tensor
    log_evidence: float | None
    method: str
    lm: Any = None
    site: str = "x"
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    chain: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    guide: Any = None
    warnings: list = field(default_factory=list)

    def __post_init__(self):
        self.samples = self.samples.long()
        if self.chain is None:
            self.chain = torch.zeros(len(self.samples), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        lz = "None" if self.log_evidence is None else f"{self.log_evidence:.4f}"
        return (f"Posterior(method={self.method!r}, num_samples={len(self)}, "
                f"log_evidence={lz}, ess={self.ess:.1f})")

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.double().exp()

    @property
    def ess(self) -> float:
        """Effective sample size: Kish's for weighted samples, ArviZ's bulk ESS for MCMC."""
        if "ess" in self.info:
            return float(self.info["ess"])
        return ess_of(self.log_weights)

    @property
    def texts(self) -> list[str]:
        if self.lm is None:
            raise ValueError("this Posterior has no LM attached to decode its samples")
        return [self.lm.decode(row.tolist()) for row in self.samples]

    @property
    def num_chains(self) -> int:
        return int(self.chain.max().item()) + 1 if len(self.chain) else 0

    def probabilities(self) -> dict[tuple[int, ...], float]:
        """The weighted empirical distribution: sequence (tuple of ids) -> probability."""
        out: dict[tuple[int, ...], float] = defaultdict(float)
        w = self.weights.tolist()
        for row, wi in zip(self.samples.tolist(), w):
            out[tuple(row)] += wi
        return dict(out)

    def expectation(self, values: torch.Tensor) -> float:
        """Weighted mean of a per-sample quantity."""
        return float((self.weights * values.double()).sum())

    def resample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """Draw unweighted samples (multinomial on the weights)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(self.weights.float(), num_samples, replacement=True, generator=g)
        return self.samples[idx]

    def to_inference_data(self):
        """An ``arviz.InferenceData`` of per-sample scalar summaries (see ``ppl_lm.diagnostics``)."""
        from .diagnostics.inference_data import to_inference_data

        return to_inference_data(self)

    def summary_stats(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.stats.items()}

    def log_evidence_se(self) -> float | None:
        se = self.info.get("log_evidence_se")
        return None if se is None or (isinstance(se, float) and math.isnan(se)) else float(se)
