"""The result of every inference backend."""

from __future__ import annotations

import math
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .backends import Kind, kind_of
from .diagnostics.estimators import kish_ess, normalise

__all__ = ["Posterior", "Info", "normalise"]


@dataclass(frozen=True)
class Info:
    """Base of each backend's run facts (a frozen dataclass per backend, e.g. ``SMCInfo``).

    Typed fields are the interface (``post.info.num_particles``). The read-only mapping view
    (``info["name"]``, ``info.get(name)``) of notebooks written against the earlier dict still
    reads, with a DeprecationWarning; ``"name" in info`` and :meth:`as_dict` do not warn.

    Every backend's Info also has ``lm_dtype``: the parameter dtype of the main site's LM
    (``"bfloat16"``, ``"float32"``; ``None`` for a table LM or none), filled in by the runtime.
    """

    lm_dtype: str | None = field(default=None, kw_only=True)

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def _deprecated(self, how: str) -> None:
        import warnings

        warnings.warn(f"{how} on {type(self).__name__} is deprecated: read the field, info.NAME "
                      "(getattr(info, NAME, default) where it may be absent)", DeprecationWarning, stacklevel=3)

    def __getitem__(self, key: str) -> Any:
        self._deprecated("info[NAME]")
        if key not in self._names():
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {', '.join(self._names())}")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self._deprecated("info.get(NAME)")
        return getattr(self, key) if key in self._names() else default

    def __contains__(self, key: object) -> bool:
        return key in self._names()

    def keys(self) -> tuple[str, ...]:
        return self._names()

    def items(self):
        return self.as_dict().items()

    def __iter__(self):
        return iter(self._names())

    @staticmethod
    def from_dict(facts: dict[str, Any]) -> "Info":
        """A frozen Info record with these fields (for run facts given as a dict)."""
        cls = dataclasses.make_dataclass("DictInfo", [(k, Any, dataclasses.field(default=None)) for k in facts],
                                         bases=(Info,), frozen=True)
        return cls(**facts)

    def as_dict(self) -> dict[str, Any]:
        """Every field, for JSON and report settings."""
        return {k: getattr(self, k) for k in self._names()}


@dataclass
class Posterior:
    """Weighted samples from the conditional π(x | condition).

    Attributes:
        samples: LongTensor ``[N, T]`` of the main sequence site (EOS-padded): the model's first
            latent ``lm.sequence(...)`` site; ``None`` when every sequence site is observed
            (the draws are then in ``values``).
        log_weights: ``[N]``, normalised (logsumexp == 0); uniform for MCMC.
        log_evidence: estimate of log Z, or ``None`` where the backend gives none.
        method: backend name.
        kind: what the draws are (:class:`~ppl_lm.backends.Kind`: exact support, weighted draws,
            Markov chains), from the backend's description; shared code branches on it.
        lm: the language model of the main site (for ``texts``).
        stats: per-sample arrays (``log_prior``, ``log_likelihood``, ``length``, ``reward:NAME``...).
        chain: ``[N]`` chain index of each sample (MCMC), else zeros.
        info: the backend's typed run facts (a frozen :class:`Info` dataclass, e.g. ``SMCInfo``).
        values: every latent site's samples, aligned with ``log_weights``.
        log_evidence_se: standard error of ``log_evidence`` (``None`` where not defined).
        khat: PSIS k-hat of the importance weights (``None`` for exact and MCMC).
        rhat: the largest split R-hat over the scalar summaries (MCMC with 2+ chains, else ``None``).
        bulk_ess: the smallest ArviZ bulk ESS over the scalar summaries (MCMC, else ``None``).
        seed, wall_time: the run's seed and seconds.
        guide: the trained guide (SVI) or ``None``.
        ancestor: ``[N]`` the initial particle each draw descends from, where resampling made
            draws share ancestors (SMC), else ``None`` (independent draws); the weighted standard
            errors of :meth:`marginal` sum over these groups.
        warnings: typed diagnoses of the run (:class:`~ppl_lm.diagnostics.InferenceWarning`),
            empty when every check passed.
        evidence_bounds: the :class:`~ppl_lm.inference.bounds.EvidenceBounds` that
            :func:`ppl_lm.log_evidence_bounds` computed from exact draws (``None`` before);
            ``log_evidence_bounds`` reads it.
    """

    samples: torch.Tensor | None
    log_weights: torch.Tensor
    log_evidence: float | None
    method: str
    lm: Any = None
    site: str | None = "x"
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    chain: torch.Tensor | None = None
    info: Any = field(default_factory=Info)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    guide: Any = None
    warnings: list = field(default_factory=list)
    log_evidence_se: float | None = None
    khat: float | None = None
    rhat: float | None = None
    bulk_ess: float | None = None
    seed: int | None = None
    wall_time: float | None = None
    ancestor: torch.Tensor | None = None
    kind: Kind | None = None
    evidence_bounds: Any = None

    def __post_init__(self):
        if self.samples is not None:
            self.samples = self.samples.long()
        if self.chain is None:
            self.chain = torch.zeros(len(self.log_weights), dtype=torch.long)
        if self.kind is None:
            self.kind = kind_of(self.method)
        if isinstance(self.info, dict):  # the one shim for the earlier dict of run facts
            import warnings

            warnings.warn("Posterior(info={...}) is deprecated: give a frozen Info dataclass (e.g. the backend's "
                          "own); the dict is read as one", DeprecationWarning, stacklevel=3)
            self.info = Info.from_dict(self.info)
        for name in ("log_evidence_se", "khat", "rhat", "bulk_ess"):
            v = getattr(self, name)
            if v is not None:
                v = float(v)
                setattr(self, name, None if math.isnan(v) else v)

    def __len__(self) -> int:
        return len(self.log_weights)

    def __repr__(self) -> str:
        lz = "None" if self.log_evidence is None else f"{self.log_evidence:.4f}"
        return (f"Posterior(method={self.method!r}, num_samples={len(self)}, "
                f"log_evidence={lz}, ess={self.ess:.1f})")

    @property
    def log_evidence_bounds(self) -> tuple[float, float] | None:
        """``(lower, upper)``: stochastic bounds on log Z, E[lower] ≤ log Z ≤ E[upper]; the exact
        backend's is (log Z, log Z). ``None`` until :func:`ppl_lm.log_evidence_bounds` has computed
        the upper bound from exact draws (MCMC: always ``None``, it gives no log Z)."""
        if self.evidence_bounds is not None:
            return tuple(self.evidence_bounds)
        if self.kind is Kind.EXACT and self.log_evidence is not None:
            return (self.log_evidence, self.log_evidence)
        return None

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.double().exp()

    @property
    def ess(self) -> float:
        """Effective sample size: ArviZ's bulk ESS for MCMC (the smallest over the scalar summaries,
        capped at the number of draws: anti-correlated chains can give ArviZ more, which no estimate
        here can use), Kish's for weighted samples."""
        if self.bulk_ess is None and self.kind is Kind.MCMC and self.stats:
            from .diagnostics.estimators import mcmc_diagnostics
            from .diagnostics.inference_data import chain_draws

            _, by_stat = mcmc_diagnostics(chain_draws(self))
            self.bulk_ess = min(by_stat.values()) if by_stat else None
        if self.bulk_ess is not None:
            return min(self.bulk_ess, float(len(self)))
        return kish_ess(self.log_weights)

    @property
    def is_mcmc(self) -> bool:
        """True for Markov-chain output (uniform weights, chain × draw layout)."""
        return self.kind is Kind.MCMC

    @property
    def texts(self) -> list[str]:
        if self.samples is None:
            raise ValueError("this posterior has no latent sequence site (every lm.sequence(...) site is observed): "
                             "its draws are in post.values, e.g. post.marginal(name) for a discrete site")
        if self.lm is None:
            raise ValueError("this Posterior has no LM attached to decode its samples")
        return [self.lm.decode(row.tolist()) for row in self.samples]

    @property
    def num_chains(self) -> int:
        return int(self.chain.max().item()) + 1 if len(self.chain) else 0

    def probabilities(self) -> dict[tuple, float]:
        """The weighted empirical distribution: sequence (tuple of ids) -> probability. With no
        latent sequence site (every text observed), the joint law of the other latent sites:
        the tuple of their values, in program order -> probability."""
        if self.samples is not None:
            rows = self.samples.tolist()
        elif self.values:
            rows = torch.cat([v.reshape(len(self), -1).double() for v in self.values.values()], -1).tolist()
        else:
            raise ValueError("this posterior holds no latent values")
        out: dict[tuple, float] = defaultdict(float)
        for row, wi in zip(rows, self.weights.tolist()):
            out[tuple(row)] += wi
        return dict(out)

    def marginal(self, name: str) -> dict:
        """The weighted distribution of a discrete latent site: ``{value: (probability, se)}``.

        The standard error is the self-normalised importance-sampling one,
        sqrt(Σ_i W_i² (1[v_i = k] − p_k)²), for independent weighted samples; for draws that share
        ancestors (``ancestor``, SMC) the terms are summed within each ancestor's group first,
        sqrt(Σ_e (Σ_{i∈e} W_i (1[v_i = k] − p_k))²) (Chan & Lai, 2013); for MCMC it is ArviZ's
        Monte Carlo standard error of the mean of 1[v = k] over the chains; 0 for the exact backend.

        >>> import torch, pyro, ppl_lm
        >>> import pyro.distributions as dist
        >>> lm = ppl_lm.MarkovLM(torch.zeros(3), torch.zeros(3, 3), eos_id=0)
        >>> def model():
        ...     w = pyro.sample("w", dist.Bernoulli(torch.tensor(0.5)))
        ...     x = pyro.sample("x", lm.sequence([], max_new_tokens=1))
        ...     ppl_lm.constraint("match", (x[..., 0] == 1) == w.bool())
        >>> {k: round(p, 3) for k, (p, se) in ppl_lm.infer(model, method="exact").marginal("w").items()}
        {0.0: 0.667, 1.0: 0.333}
        """
        if name not in self.values:
            raise KeyError(f"no latent site {name!r} in this posterior; sites: {', '.join(self.values)}")
        v = self.values[name]
        if v.dim() != 1 and not (v.dim() == 2 and v.shape[1] == 1):
            raise ValueError(f"site {name!r} is not a scalar site (values of shape {tuple(v.shape)}); marginal() "
                             "is for discrete scalar latents")
        v = v.reshape(-1)
        if v.dtype.is_floating_point and not bool((v == v.round()).all()):
            raise ValueError(f"site {name!r} holds non-integer values: marginal() is for discrete latents")
        W = self.weights
        out = {}
        for k in torch.unique(v).tolist():
            hit = (v == k).double()
            p = float((W * hit).sum())
            if self.kind is Kind.EXACT:  # an enumeration: exact probabilities
                se = 0.0
            elif self.is_mcmc and len(v) % max(self.num_chains, 1) == 0:
                from .diagnostics.estimators import mcmc_mean_se

                se = mcmc_mean_se(hit.reshape(self.num_chains, -1))  # chain-major draws
            else:
                se = math.sqrt(float((self._by_ancestor(W * (hit - p)) ** 2).sum()))
            out[k.item() if hasattr(k, "item") else k] = (p, se)
        return dict(sorted(out.items()))

    def _by_ancestor(self, terms: torch.Tensor) -> torch.Tensor:
        """``terms`` ``[N]`` summed within each ancestor's group (unchanged for independent draws)."""
        if self.ancestor is None:
            return terms
        _, group = torch.unique(self.ancestor, return_inverse=True)
        return torch.zeros(int(group.max()) + 1, dtype=terms.dtype).index_add_(0, group, terms)

    def expectation(self, values: torch.Tensor) -> float:
        """Weighted mean of a per-sample quantity."""
        return float((self.weights * values.double()).sum())

    def resample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """Draw unweighted samples (multinomial on the weights)."""
        if self.samples is None:
            raise ValueError("this posterior has no latent sequence site to resample; use post.values")
        g = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(self.weights.float(), num_samples, replacement=True, generator=g)
        return self.samples[idx]

    def to_inference_data(self, *, num_draws: int | None = None, seed: int | None = None):
        """An ``arviz.InferenceData`` of per-sample scalar summaries whose ``posterior`` holds
        equal-weight draws (:func:`ppl_lm.diagnostics.to_inference_data`)."""
        from .diagnostics.inference_data import to_inference_data

        return to_inference_data(self, num_draws=num_draws, seed=seed)

    def summary_stats(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.stats.items()}
